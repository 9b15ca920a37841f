#!/usr/bin/env python3
"""Build the image as a user does and check it running: the container test.

Steps, each printed as it goes, then a summary table (record it in docs/container.md):

  dockerd    start it (as root) when `docker info` does not answer
  base       BASE_IMAGE (python:3.11-slim-bookworm) if present or pullable; else a local
             stand-in, Debian bookworm with its python3 (3.11) made with debootstrap and
             `docker import`ed, as on machines that reach no container registry
  build      the project's Dockerfile unchanged, with BASE_IMAGE and this machine's CA
             bundle as EXTRA_CA_CERTS (pip behind a TLS-intercepting proxy); its time and
             the image's size
  run        the container (no GPU: the CPU path), a logs folder mounted: healthy within its
             start period, running as uid 1000, the JFK clip through curl, metrics on :8082,
             the model log in the mounted folder
  drain      `docker stop` while a ~160 s file is being transcribed: that request gets its
             200 with the whole transcript, /ping said Draining meanwhile, exit code 0

    container_check.py [--audio ../shared/audio] [--image whisper-torchserve:check]

Run it (as root: dockerd, debootstrap) after every change of Dockerfile, serve.sh or the
requirements; tests/unit/test_docs.py fails until docs/container.md records a run of the
current ones (`--inputs-hash` prints what it compares).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

BASE_IMAGE = "python:3.11-slim-bookworm"
STAND_IN = "whisper-base:bookworm-python3.11"  # the local stand-in for BASE_IMAGE
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTEXT_CA = ".container-check-ca.crt"  # copied into the build context for the build only (git-ignored)
INPUTS = ("Dockerfile", ".dockerignore", "serve.sh", "requirements.txt")  # what a run is recorded for
LONG = "long/librispeech_concat_16k.flac"
JFK_TEXT = "ask not what your country can do for you"


def inputs_hash() -> str:
    """sha256 over the files the image is built from that this check is re-run for."""
    digest = hashlib.sha256()
    for name in INPUTS:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def say(message: str) -> None:
    print(f"[container] {message}", flush=True)


def docker(*args, check=True, capture=True, timeout=None) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=check, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)


def ensure_dockerd() -> None:
    if docker("info", check=False, timeout=30).returncode == 0:
        return
    if shutil.which("dockerd") is None:
        raise SystemExit("no dockerd: install Debian's docker.io (apt-get install docker.io)")
    say("starting dockerd")
    log = open("/tmp/container-check-dockerd.log", "a")
    subprocess.Popen(["dockerd", "--storage-driver", "overlay2"], stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True)
    deadline = time.monotonic() + 90
    while docker("info", check=False, timeout=30).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit("dockerd did not come up in 90 s: /tmp/container-check-dockerd.log")
        time.sleep(1)


def ensure_base(base: str) -> str:
    """`base` if present or pullable, else the debootstrap stand-in (built once)."""
    if docker("image", "inspect", base, check=False).returncode == 0:
        return base
    say(f"pulling {base}")
    if docker("pull", base, check=False, timeout=120).returncode == 0:
        return base
    if docker("image", "inspect", STAND_IN, check=False).returncode == 0:
        say(f"{base} is not reachable: using the stand-in {STAND_IN}")
        return STAND_IN
    if shutil.which("debootstrap") is None:
        raise SystemExit(f"{base} is not reachable and debootstrap is missing (apt-get install debootstrap)")
    say(f"{base} is not reachable: building the stand-in {STAND_IN} with debootstrap (a few minutes)")
    with tempfile.TemporaryDirectory(prefix="container-base-") as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,"
                        "ca-certificates,curl", "bookworm", str(root), DEBIAN_MIRROR], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-c", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "-c", "ENV LANG=C.UTF-8", "-", STAND_IN], stdin=tar.stdout, check=True,
                       stdout=subprocess.DEVNULL)
        tar.wait()
    return STAND_IN


def build(image: str, base: str) -> float:
    """docker build of the Dockerfile as it is; returns the seconds it took."""
    args = ["--build-arg", f"BASE_IMAGE={base}"]
    context_ca = REPO / CONTEXT_CA
    if HOST_CA_BUNDLE.exists():
        shutil.copy(HOST_CA_BUNDLE, context_ca)
        args += ["--build-arg", f"EXTRA_CA_CERTS={CONTEXT_CA}"]
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        if os.environ.get(name):
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    # BuildKit where the buildx plugin is installed, else the classic builder (Debian's docker.io)
    buildkit = docker("buildx", "version", check=False).returncode == 0
    say(f"building {image} on {base} ({'BuildKit' if buildkit else 'the classic builder'})")
    started = time.monotonic()
    try:
        subprocess.run(["docker", "build", *(["--progress=plain"] if buildkit else []), *args, "-t", image,
                        str(REPO)], check=True, env=dict(os.environ, DOCKER_BUILDKIT="1" if buildkit else "0"))
    finally:
        context_ca.unlink(missing_ok=True)
    return time.monotonic() - started


def long_upload(audio: Path, seconds: float, out: Path):
    """The long shared file followed by the JFK clip until at least `seconds`, as FLAC;
    returns (path, reference transcript)."""
    import numpy as np
    import soundfile

    from audio import decode_audio
    from scoring import read_manifest

    references = {e.file: e.reference for e in read_manifest(audio / "manifest.tsv")}
    parts, texts = [decode_audio((audio / LONG).read_bytes()).samples], [references[LONG]]
    jfk = decode_audio((audio / "jfk/jfk.flac").read_bytes()).samples
    while sum(len(p) for p in parts) < seconds * 16000:
        parts.append(jfk)
        texts.append(references["jfk/jfk.flac"])
    soundfile.write(out, np.concatenate(parts), 16000, format="FLAC")
    return out, " ".join(texts)


def wait_for(condition, what: str, timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(1)
    return time.monotonic() - started


def run_checks(image: str, audio: Path, results: dict) -> None:
    from local_service import free_ports
    from scoring import score

    name = f"whisper-check-{os.getpid()}"
    port, metrics_port = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="container-check-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        os.chown(logs, 1000, 1000)
        docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080", "-p", f"127.0.0.1:{metrics_port}:8082",
               "--stop-timeout", "330", "-v", f"{logs}:/home/model-server/app/logs", image)
        url = f"http://127.0.0.1:{port}"
        try:
            say("waiting for the container to report healthy")

            def health() -> str:
                return docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()

            results["healthy after s"] = round(wait_for(lambda: health() == "healthy", "healthy", 330), 1)
            results["user in the container"] = docker("exec", name, "id", "-u").stdout.strip()
            assert results["user in the container"] == "1000", results
            owners = docker("exec", name, "sh", "-c", "stat -c %u /proc/[0-9]*", check=False).stdout.split()
            results["uids of the container's processes"] = ", ".join(sorted(set(owners)))
            assert set(owners) == {"1000"}, owners
            sent = time.monotonic()
            jfk = subprocess.run(["curl", "-fsS", "-F", f"file=@{REPO / 'samples/jfk.flac'}",
                                  f"{url}/predictions/whisper"], capture_output=True, text=True, timeout=300)
            text = json.loads(jfk.stdout)["text"]
            results["JFK through curl"] = f"{text.strip()} ({time.monotonic() - sent:.1f} s, 44.1 kHz stereo: resampled)"
            assert JFK_TEXT in text.lower().replace(",", ""), text
            metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
            results["metrics"] = "ts_inference_requests_total and AudioSecondsProcessed exported"
            assert "ts_inference_requests_total" in metrics and "AudioSecondsProcessed" in metrics
            model_log = logs / "model_log.log"
            assert model_log.exists() and "audio 11.00s" in model_log.read_text(errors="replace")
            results["logs in the mounted folder"] = ", ".join(sorted(p.name for p in logs.glob("*.log")))
            results["device log line"] = next((line.split("] ", 1)[-1] for line in docker(
                "logs", name).stdout.splitlines() if "[device]" in line), "(none)")

            say("drain: docker stop while a long file is transcribed")
            upload, reference = long_upload(audio, 160, Path(tmp) / "long.flac")
            box = {}

            def send():
                with open(upload, "rb") as f:
                    box["response"] = requests.post(f"{url}/predictions/whisper", files={"file": ("long.flac", f)},
                                                    timeout=600)

            sender = threading.Thread(target=send)
            sender.start()
            wait_for(lambda: "audio 16" in model_log.read_text(errors="replace"), "the upload in the engine", 120)
            stopped_at = time.monotonic()
            stopper = threading.Thread(target=lambda: docker("stop", "-t", "330", name, timeout=400))
            stopper.start()
            pings = []
            while stopper.is_alive() and len(pings) < 600:
                try:
                    pings.append(requests.get(f"{url}/ping", timeout=5).json().get("status"))
                except (requests.RequestException, ValueError):
                    break
                time.sleep(0.5)
            stopper.join()
            sender.join(600)
            response = box.get("response")
            assert response is not None and response.status_code == 200, box
            wer = score(reference, response.json()["text"]).rate
            results["drain: request in flight"] = f"200, {response.json()['duration']:.1f} s of audio"
            results["drain: /ping while stopping"] = ", ".join(dict.fromkeys(pings)) or "(no answer)"
            assert "Draining" in pings, pings
            results["drain: stop took s"] = round(time.monotonic() - stopped_at, 1)
            results["drain: exit code"] = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
            assert results["drain: exit code"] == "0", results
            results["drain: WER of its transcript"] = f"{100 * wer:.1f}%"
            assert wer < 0.15, wer  # the whole file, not a part of it
        finally:
            say("container log (tail):\n" + "\n".join(docker("logs", name, check=False).stdout.splitlines()[-25:]))
            docker("rm", "-f", name, check=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", type=Path, default=REPO.parent / "shared" / "audio",
                        help="the shared corpus (default: ../shared/audio)")
    parser.add_argument("--image", default="whisper-torchserve:check")
    parser.add_argument("--base", default=BASE_IMAGE)
    parser.add_argument("--inputs-hash", action="store_true", help="print the hash of the checked inputs and exit")
    args = parser.parse_args(argv)
    if args.inputs_hash:
        print(inputs_hash())
        return 0
    from cpu import cpu_description

    results = {"inputs": f"{', '.join(INPUTS)}: sha256 {inputs_hash()}", "cpu": cpu_description()}
    ensure_dockerd()
    results["docker"] = docker("version", "-f", "{{.Server.Version}}").stdout.strip()
    base = ensure_base(args.base)
    results["base"] = base
    results["build s"] = round(build(args.image, base), 1)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", args.image).stdout.strip())
    results["image size"] = f"{size / 1e9:.2f} GB"
    try:
        run_checks(args.image, args.audio, results)
        ok = True
    except AssertionError as e:
        results["FAILED"] = str(e)[:500]
        ok = False
    print("\n| check | result |\n| --- | --- |")
    for key, value in results.items():
        print(f"| {key} | {value} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""A stop lets the requests in flight finish (what `docker stop` and Kubernetes do).

SIGTERM to serve.sh in the foreground (the container's process) drains: /ping answers 503
Draining, a new request gets 503 `draining` with Retry-After, the request in flight gets its
200 with the whole transcript, then TorchServe stops and serve.sh exits 0. `serve.sh
--stop` drains the same way, and a second signal ends a drain at once.
"""

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, session_processes
from local_service import SESSIONS, service_env, service_of, start_service
from scoring import score

pytestmark = pytest.mark.e2e

LONG = "long/librispeech_concat_16k.flac"  # 141.5 s: about 10 s of work for tiny.en on 2 cores
SHORT = REPO / "samples" / "lj_speech_LJ002-0020.wav"


def post(service, path: Path, timeout=300) -> requests.Response:
    with open(path, "rb") as f:
        return requests.post(f"{service.url}/predictions/whisper", files={"file": (path.name, f)}, timeout=timeout)


def ping(service) -> requests.Response:
    return requests.get(f"{service.url}/ping", timeout=10)


def until(condition, what: str, timeout_s: float = 120):
    """Wait for `condition()` to hold (polling a server's state), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)


def logged(service, text: str) -> bool:
    path = service.log_dir / "model_log.log"
    return path.exists() and text in path.read_text(errors="replace")


def in_flight(service, path: Path):
    """Send `path` from a thread; returns (thread, box with its response or error) once the
    worker has decoded the upload (the engine is transcribing it)."""
    box = {}

    def send():
        try:
            box["response"] = post(service, path)
        except requests.RequestException as e:
            box["error"] = e

    thread = threading.Thread(target=send)
    thread.start()
    until(lambda: logged(service, "audio 141.53s"), "the long upload reached the engine")
    return thread, box


def assert_draining(service):
    until(lambda: ping(service).status_code == 503, "/ping reporting the drain", 30)
    assert ping(service).json() == {"status": "Draining"}
    refused = post(service, SHORT, timeout=60)
    assert refused.status_code == 503 and refused.json()["code"] == "draining", refused.text
    assert int(refused.headers["Retry-After"]) >= 1


def test_sigterm_to_serve_sh_finishes_the_request_in_flight_and_exits_0(tmp_path, shared_audio, manifest):
    env = service_env(tmp_path, "tiny.en")
    service = service_of(env, "tiny.en", openai=False)
    with open(tmp_path / "serve.log", "w") as out:
        proc = subprocess.Popen([str(REPO / "serve.sh")], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    SESSIONS.append(proc.pid)
    try:
        until(lambda: proc.poll() is None and _healthy(service), "the foreground service healthy", 600)
        assert ping(service).json() == {"status": "Healthy"}
        thread, box = in_flight(service, shared_audio / LONG)
        proc.send_signal(signal.SIGTERM)  # docker stop, a Kubernetes rollout
        assert_draining(service)
        thread.join(300)
        response = box.get("response")
        assert response is not None and response.status_code == 200, box
        reference = manifest[LONG]["reference_transcript"]
        assert score(reference, response.json()["text"]).rate < 0.1  # the whole file, not a part of it
        assert proc.wait(120) == 0
        log = (tmp_path / "serve.log").read_text()
        assert "drained: nothing in flight" in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert session_processes(proc.pid) == []


def _healthy(service) -> bool:
    try:
        return ping(service).status_code == 200
    except requests.RequestException:
        return False


def test_stop_drains_and_a_second_signal_stops_at_once(tmp_path, shared_audio):
    service = start_service(tmp_path, "tiny.en")
    try:
        thread, box = in_flight(service, shared_audio / LONG)
        stop = subprocess.Popen([str(REPO / "serve.sh"), "--stop"], env=service.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert_draining(service)
        stop.send_signal(signal.SIGTERM)  # the impatient second signal
        output, _ = stop.communicate(timeout=60)
        assert stop.returncode == 0, output
        assert "second signal: stopping now" in output, output
        thread.join(120)
        assert "response" not in box or box["response"].status_code != 200  # cut off, as asked
    finally:
        service.stop()

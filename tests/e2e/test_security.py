"""Security end to end: what is reachable from outside, what the APIs refuse, and what an
upload can and cannot do to the server's file system.

- The management API (which can load code) and gRPC listen on loopback only; from another
  network namespace, joined to the host by a veth pair like a container or a second
  machine would be, only the inference port answers (needs root for `ip netns`).
- Registering a model through the management API is refused (enable_model_api=false).
- Hostile upload file names are just names: nothing runs, nothing is written.
- The handler writes no upload to a predictable path: the service's TMPDIR lists the same
  before and after, and the only thing that may appear during a request is ffmpeg's
  private temp dir for an mp4 whose index comes last.
- ffmpeg runs with -nostdin, a protocol whitelist and a wall-clock timeout.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from conftest import PYTHON, REPO, free_port, start_service
from scoring import score

JFK = REPO / "samples" / "jfk.flac"
SHORT = "english/LJ002-0020.wav"  # 1.5 s: "In 1813."
JFK_TEXT = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
ANY = {"0.0.0.0", "::"}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def local(url: str) -> str:
    return url.replace("//0.0.0.0", "//127.0.0.1")


def listening(pid: int) -> dict:
    """port -> set of addresses the process listens on (TCP)."""
    process = psutil.Process(pid)
    connections = process.net_connections(kind="tcp") if hasattr(process, "net_connections") else process.connections(kind="tcp")
    ports = {}
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN:
            ports.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
    return ports


def ss_listening(pid: int) -> dict:
    """The same from `ss -ltnp`, as a second opinion that does not go through psutil."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=30).stdout
    ports = {}
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        address = line.split()[3]
        host, port = address.rsplit(":", 1)
        ports.setdefault(int(port), set()).add(host.strip("[]").replace("*", "0.0.0.0"))
    return ports


def jfk_ok(response: requests.Response):
    assert response.status_code == 200, response.text[:500]
    assert score(JFK_TEXT, response.json()["text"]).rate <= 0.1, response.json()["text"]


# --- listening addresses --------------------------------------------------------------


@pytest.mark.e2e
def test_test_service_listens_on_loopback_only(service):
    pid = service.pid()
    ports = listening(pid)
    assert ports, "the frontend listens on nothing?"
    expected = {port_of(service.url), port_of(service.management_url), port_of(service.metrics_url),
                int(service.env["TS_GRPC_INFERENCE_PORT"]), int(service.env["TS_GRPC_MANAGEMENT_PORT"])}
    assert expected <= set(ports), ports
    for port, addresses in ports.items():
        assert addresses <= LOOPBACK, f"port {port} listens on {addresses}"
    if shutil.which("ss"):
        for port, addresses in ss_listening(pid).items():
            assert addresses <= LOOPBACK | {"::ffff:127.0.0.1"}, f"ss: port {port} on {addresses}"


@pytest.fixture(scope="module")
def public_service(tmp_path_factory):
    """Inference on all interfaces, as in the container; everything else as configured
    (management on loopback, gRPC on loopback from config.properties)."""
    port = free_port()
    svc = start_service(
        tmp_path_factory.mktemp("public-service"),
        extra_env={"TS_INFERENCE_ADDRESS": f"http://0.0.0.0:{port}"},
    )
    try:
        yield svc
    finally:
        svc.stop()


@pytest.mark.e2e
def test_public_service_exposes_only_inference(public_service):
    svc = public_service
    ports = listening(svc.pid())
    inference = port_of(svc.url)
    assert ports.get(inference, set()) & ANY, f"inference not on all interfaces: {ports}"
    for port, addresses in ports.items():
        if port != inference:
            assert addresses <= LOOPBACK, f"port {port} (not inference) listens on {addresses}"
    for name in ("TS_GRPC_INFERENCE_PORT", "TS_GRPC_MANAGEMENT_PORT"):
        assert ports[int(svc.env[name])] <= LOOPBACK, (name, ports)
    assert ports[port_of(svc.management_url)] <= LOOPBACK


class Namespace:
    """A network namespace joined to the host by a veth pair: another host, as far as
    TCP is concerned. Removing the namespace removes the veth pair."""

    def __init__(self):
        tag = os.getpid() % 100000
        self.name = f"whisper-sec-{tag}"
        self.host_if, self.ns_if = f"wsh{tag}", f"wsn{tag}"
        subnet = 10 + tag % 200
        self.host_ip, self.ns_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def ip(self, *args, check=True):
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)

    def __enter__(self):
        self.ip("netns", "add", self.name)
        try:
            self.ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self.ip("link", "set", self.ns_if, "netns", self.name)
            self.ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            self.ip("link", "set", self.host_if, "up")
            self.ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self.ip("netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
            self.ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.ip("link", "del", self.host_if, check=False)
        self.ip("netns", "del", self.name, check=False)

    def probe(self, host: str, ports: list) -> dict:
        """From inside the namespace: port -> "open", "refused" or "timeout"."""
        code = (
            "import json, socket, sys\n"
            "out = {}\n"
            "for port in map(int, sys.argv[2:]):\n"
            "    try:\n"
            "        socket.create_connection((sys.argv[1], port), timeout=3).close(); out[port] = 'open'\n"
            "    except ConnectionRefusedError: out[port] = 'refused'\n"
            "    except OSError as e: out[port] = type(e).__name__\n"
            "print(json.dumps(out))\n"
        )
        out = self.ip("netns", "exec", self.name, PYTHON, "-c", code, host, *map(str, ports))
        return {int(k): v for k, v in json.loads(out.stdout).items()}

    def curl(self, url: str) -> subprocess.CompletedProcess:
        return self.ip("netns", "exec", self.name, "curl", "-sS", "--max-time", "10", url, check=False)


def netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root to create a network namespace (ip netns add)"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"whisper-probe-{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"whisper-probe-{os.getpid()}"], capture_output=True)
    return ""


@pytest.mark.e2e
def test_from_another_host_only_inference_answers(public_service):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    svc = public_service
    inference, management, metrics = port_of(svc.url), port_of(svc.management_url), port_of(svc.metrics_url)
    grpc = [int(svc.env["TS_GRPC_INFERENCE_PORT"]), int(svc.env["TS_GRPC_MANAGEMENT_PORT"])]
    # Control: on the host itself management answers.
    assert requests.get(f"{svc.management_url}/models", timeout=10).status_code == 200
    with Namespace() as ns:
        reach = ns.probe(ns.host_ip, [inference, management, metrics, *grpc])
        assert reach[inference] == "open", reach
        for port in (management, metrics, *grpc):
            assert reach[port] != "open", f"port {port} reachable from outside: {reach}"
        ping = ns.curl(f"http://{ns.host_ip}:{inference}/ping")
        assert ping.returncode == 0 and "Healthy" in ping.stdout, ping
        models = ns.curl(f"http://{ns.host_ip}:{management}/models")
        assert models.returncode != 0, f"management answered from outside: {models.stdout[:200]}"
        # And a real transcription from the other side.
        upload = ns.ip("netns", "exec", ns.name, "curl", "-sS", "--max-time", "300", "-F", f"file=@{JFK}",
                       f"http://{ns.host_ip}:{inference}/predictions/whisper", check=False)
        assert upload.returncode == 0, upload.stderr
        assert score(JFK_TEXT, json.loads(upload.stdout)["text"]).rate <= 0.1, upload.stdout[:300]
    print(f"\nfrom a network namespace: {reach}")


# --- the management API refuses to load code ------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "url",
    ["whisper.mar", "https://example.com/evil.mar", "file:///etc/passwd", "../../model-store/whisper.mar"],
)
def test_model_registration_is_refused(service, url):
    before = requests.get(f"{service.management_url}/models", timeout=10).json()
    response = requests.post(f"{service.management_url}/models", params={"url": url, "model_name": "evil"}, timeout=30)
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    assert requests.get(f"{service.management_url}/models", timeout=10).json() == before


@pytest.mark.e2e
def test_model_cannot_be_unregistered_over_the_api(public_service):
    svc = public_service
    response = requests.delete(f"{svc.management_url}/models/whisper", timeout=30)
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    jfk_ok(requests.post(f"{local(svc.url)}/predictions/whisper", files={"file": JFK.open("rb")}, timeout=300))


# --- hostile file names ---------------------------------------------------------------

NASTY_NAMES = [
    "x;rm -rf /tmp/canary;.flac",
    "../../etc/passwd",
    "$(touch /tmp/pwned).flac",
    "`touch /tmp/pwned`.flac",
    "-i /etc/passwd.flac",
    "a\"; filename=\"evil.flac",
    "/tmp/canary",
    "x" * 4000 + ".flac",
    "ジョン・F・ケネディ.flac",
]


@pytest.fixture
def canary():
    path = Path("/tmp/canary")
    created = not path.exists()
    if created:
        path.write_text("canary\n")
    pwned = Path("/tmp/pwned")
    pwned.unlink(missing_ok=True)
    yield path
    assert not pwned.exists(), "a file name was executed as a shell command"
    if created:
        path.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
@pytest.mark.parametrize("name", NASTY_NAMES, ids=lambda n: n[:30])
def test_hostile_file_names_are_just_names(service, shared_audio, canary, name):
    passwd = (sha256(Path("/etc/passwd")), Path("/etc/passwd").stat().st_mtime)
    tmpdir = Path(service.env["WHISPER_RUN_DIR"]) / "tmp"
    before = tree(tmpdir)
    response = requests.post(
        f"{service.url}/predictions/whisper",
        files={"file": (name, (shared_audio / SHORT).read_bytes(), "audio/wav")},
        timeout=300,
    )
    assert response.status_code == 200, response.text[:300]
    assert "1813" in response.json()["text"], response.text[:300]
    assert canary.read_text() == "canary\n"
    assert not Path("/tmp/pwned").exists()
    assert (sha256(Path("/etc/passwd")), Path("/etc/passwd").stat().st_mtime) == passwd
    assert tree(tmpdir) == before


# --- no uploads on disk ---------------------------------------------------------------


def tree(directory: Path) -> set:
    found = set()
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(root, name), directory))
    return found


def ffmpeg_bytes(*args) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *args], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


@pytest.fixture(scope="module")
def jfk_m4a_index_at_end(tmp_path_factory) -> bytes:
    """JFK as an mp4 whose "moov" comes after "mdat" (what muxers write by default)."""
    sys.path.insert(0, str(REPO / "handler"))
    from audio import _mp4_index_at_end

    path = tmp_path_factory.mktemp("m4a") / "jfk.m4a"
    ffmpeg_bytes("-i", str(JFK), "-c:a", "aac", "-b:a", "64k", "-y", str(path))
    data = path.read_bytes()
    assert _mp4_index_at_end(data)
    return data


@pytest.mark.e2e
def test_no_upload_lands_on_disk(service, jfk_m4a_index_at_end):
    tmpdir = Path(service.env["WHISPER_RUN_DIR"]) / "tmp"
    before = tree(tmpdir)
    tmp_before = {p.name for p in Path("/tmp").glob("whisper-audio-*")}
    seen, modes = set(), {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for path in tree(tmpdir) - before:
                if path not in seen:
                    seen.add(path)
                    try:
                        modes[path] = stat.S_IMODE((tmpdir / path).stat().st_mode)
                    except OSError:
                        pass
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        uploads = [
            ("jfk.m4a", jfk_m4a_index_at_end, "audio/mp4"),
            ("jfk.flac", JFK.read_bytes(), "audio/flac"),
            ("jfk.mp3", ffmpeg_bytes("-i", str(JFK), "-f", "mp3", "pipe:1"), "audio/mpeg"),
            ("jfk.webm", ffmpeg_bytes("-i", str(JFK), "-c:a", "libopus", "-f", "webm", "pipe:1"), "audio/webm"),
        ]
        for name, data, content_type in uploads:
            response = requests.post(
                f"{service.url}/predictions/whisper", files={"file": (name, data, content_type)}, timeout=300
            )
            jfk_ok(response)
    finally:
        stop.set()
        watcher.join()
    time.sleep(0.5)
    assert tree(tmpdir) == before, f"left behind in {tmpdir}: {tree(tmpdir) - before}"
    assert {p.name for p in Path("/tmp").glob("whisper-audio-*")} == tmp_before
    for path in seen:
        top = path.split(os.sep)[0]
        assert top.startswith("whisper-audio-"), f"the handler wrote {path} in its TMPDIR"
        if path == top and path in modes:
            assert modes[path] == 0o700, f"{path} has mode {oct(modes[path])}"
    print(f"\nseen during requests in TMPDIR: {sorted(seen) or 'nothing'}")


# --- ffmpeg is bounded ----------------------------------------------------------------


def test_ffmpeg_argv_has_nostdin_and_whitelist():
    sys.path.insert(0, str(REPO / "handler"))
    import audio

    pipe = audio._ffmpeg_argv("ffmpeg", "pipe:0", "pipe", 60)
    assert "-nostdin" in pipe
    assert pipe[pipe.index("-protocol_whitelist") + 1] == "pipe"
    assert pipe[pipe.index("-i") + 1] == "pipe:0"
    assert float(pipe[pipe.index("-t") + 1]) <= 61 + 1e-6  # bounded output
    file = audio._ffmpeg_argv("ffmpeg", "/private/dir/upload", "file", 60, input_format="mov")
    assert "-nostdin" in file
    assert file[file.index("-protocol_whitelist") + 1] == "file"
    # the demuxer is forced, so an upload cannot pass for a playlist that names other files
    assert file[file.index("-f") + 1] == "mov" and file.index("-f") < file.index("-i")


def test_ffmpeg_is_killed_at_its_timeout(jfk_m4a_index_at_end, tmp_path):
    """A real decode with a tiny timeout: a 400 decode_timeout, no ffmpeg left running,
    and no private temp dir left behind."""
    sys.path.insert(0, str(REPO / "handler"))
    import audio
    from errors import InvalidAudio

    # 20 minutes of tone: 10 s encoded once, then stream-copied in a loop (fast to build).
    seed = tmp_path / "seed.webm"
    ffmpeg_bytes("-f", "lavfi", "-i", "sine=f=300:r=16000", "-t", "10", "-c:a", "libopus", "-y", str(seed))
    long_webm = ffmpeg_bytes("-stream_loop", "-1", "-i", str(seed), "-c", "copy", "-t", "1200", "-f", "webm", "pipe:1")
    for data in (long_webm, jfk_m4a_index_at_end):
        started = time.monotonic()
        with pytest.raises(InvalidAudio) as err:
            audio.decode_audio(data, max_duration_s=14400, ffmpeg_timeout_s=0.02)
        assert err.value.code == "decode_timeout"
        assert time.monotonic() - started < 5
        assert not [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(audio.TEMP_PREFIX + "*"))

"""Reliability end to end: bad input, killed and stuck workers, a full queue, OOM, a soak.

Everything here runs against a real TorchServe started by serve.sh. Services whose
configuration differs from the shared `service` fixture are started once per module and
share what they can: `limits_service` (small max duration and request size, injected OOM)
and `faults_service` (short response timeout, tiny job queue, no batching).

Measured figures (recovery after SIGKILL, bomb rejection times) are printed; run with
`-s` to see them.
"""

import concurrent.futures
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
import soxr

from conftest import BATCHING_ENV, PYTHON, REPO, running_service
from scoring import normalize, score

pytestmark = pytest.mark.e2e

JFK = REPO / "samples" / "jfk.flac"
JFK_TEXT = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
LONG = "long/librispeech_concat_16k.flac"  # 141.5 s of read speech, 2.2 MB
SHORT = "english/LJ002-0020.wav"  # 1.5 s: "In 1813."
BOMB_HOURS = 5  # longer than the default handler.max_duration_s (4 h)


# --- helpers ---------------------------------------------------------------------------


def predictions(service) -> str:
    return f"{service.url}/predictions/whisper"


def post_raw(service, data: bytes, content_type=None, timeout=120) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(predictions(service), data=data, headers=headers, timeout=timeout)


def post_file(service, data: bytes, filename: str, content_type: str, timeout=120) -> requests.Response:
    return requests.post(predictions(service), files={"file": (filename, data, content_type)}, timeout=timeout)


def workers(service) -> list:
    response = requests.get(f"{service.management_url}/models/whisper", timeout=10)
    response.raise_for_status()
    return response.json()[0]["workers"]


def worker_pid(service):
    ready = [w for w in workers(service) if w["status"] == "READY"]
    return ready[0]["pid"] if ready else None


def wait_for_new_worker(service, old_pid, timeout_s=120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = worker_pid(service)
        if pid is not None and pid != old_pid:
            return pid
        time.sleep(0.1)
    raise AssertionError(f"no new READY worker within {timeout_s} s (old pid {old_pid}): {workers(service)}")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM): what a request cost at its worst."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def assert_error(response: requests.Response, status: int, code=None) -> dict:
    assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) >= {"code", "type", "message"}, body
    assert body["message"], body
    if body["type"] in ("invalid_request_error", "server_error"):  # ours, not TorchServe's
        assert len(body["message"]) < 1000, body
    if code is not None:
        assert body["code"] == code, body
    return body


def assert_jfk(response: requests.Response, max_wer=0.0):
    assert response.status_code == 200, response.text[:500]
    text = response.json()["text"]
    wer = score(JFK_TEXT, text).rate
    assert wer <= max_wer, f"WER {wer:.2f}: {text!r}"


def ffmpeg(*args, input=None) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *args], input=input, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


# --- inputs ----------------------------------------------------------------------------


def encode(samples: np.ndarray, rate: int, fmt: str, subtype=None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def wav_claiming(hours: float, samples: np.ndarray, rate: int) -> bytes:
    """A 16-bit wav whose RIFF and data sizes claim `hours` but that holds `samples`."""
    data = bytearray(encode(samples, rate, "WAV", "PCM_16"))
    claimed = int(hours * 3600 * rate) * 2
    data[4:8] = (claimed + 36).to_bytes(4, "little")
    at = data.find(b"data")
    data[at + 4 : at + 8] = claimed.to_bytes(4, "little")
    return bytes(data)


def silence_bomb(directory: Path, ext: str, codec_args: list, rate: int, loop: bool) -> bytes:
    """BOMB_HOURS of silence in a small file. flac encodes silence fast and its header
    tells the length; other codecs are encoded for 10 s and then stream-copied in a loop
    (no re-encoding: a second or two). A looped flac would keep its 10 s header, which
    libsndfile believes, so flac is encoded in full."""
    bomb = directory / f"bomb{ext}"
    silence = ["-f", "lavfi", "-i", f"anullsrc=r={rate}:cl=mono"]
    if not bomb.exists():
        if loop:
            seed = directory / f"seed{ext}"
            ffmpeg(*silence, "-t", "10", *codec_args, "-y", str(seed))
            ffmpeg("-stream_loop", "-1", "-i", str(seed), "-c", "copy", "-t", str(BOMB_HOURS * 3600), "-y", str(bomb))
        else:
            ffmpeg(*silence, "-t", str(BOMB_HOURS * 3600), *codec_args, "-y", str(bomb))
    return bomb.read_bytes()


@pytest.fixture(scope="module")
def jfk16k() -> np.ndarray:
    samples, rate = sf.read(JFK, dtype="float32")
    return soxr.resample(samples.mean(axis=1), rate, 16000).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(jfk16k, shared_audio, tmp_path_factory) -> dict:
    """name -> (bytes, content type, how to send: "multipart" or "raw")."""
    work = tmp_path_factory.mktemp("inputs")
    jfk = jfk16k
    wav = encode(jfk, 16000, "WAV", "PCM_16")
    flac = encode(jfk, 16000, "FLAC")
    mp3 = ffmpeg("-i", str(JFK), "-f", "mp3", "-b:a", "64k", "pipe:1")
    random = bytearray(np.random.default_rng(0).bytes(200_000))
    random[0] = 0x5A  # not an MPEG sync byte: random bytes, not "broken mp3"
    nan, inf = jfk.copy(), jfk.copy()
    nan[8000] = np.nan
    inf[8000:8100] = np.inf
    mono = sf.read(JFK, dtype="float32")[0].mean(axis=1)
    opening = jfk[: 4 * 16000]  # "And so, my fellow Americans"
    short = (shared_audio / SHORT).read_bytes()  # content-type cases: the type matters, not the speech
    silent_video = ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-t", "2", "-f", "matroska", "pipe:1")
    return {
        "empty raw body": (b"", "audio/wav", "raw"),
        "empty multipart file": (b"", "audio/wav", "multipart"),
        "random bytes": (bytes(random), "application/octet-stream", "raw"),
        "text file": (("meeting notes: nothing to hear here\n" * 100).encode(), "text/plain", "multipart"),
        "truncated wav": (wav[: len(wav) // 2], "audio/wav", "raw"),
        "truncated flac": (flac[: len(flac) // 2], "audio/flac", "raw"),
        "truncated mp3": (mp3[: len(mp3) // 2], "audio/mpeg", "raw"),
        "wav header claiming 10 h, 1 s of data": (wav_claiming(10, jfk[:16000], 16000), "audio/wav", "raw"),
        "NaN float wav": (encode(nan, 16000, "WAV", "FLOAT"), "audio/wav", "raw"),
        "inf float wav": (encode(inf, 16000, "WAV", "FLOAT"), "audio/wav", "raw"),
        "0-sample wav": (encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"), "audio/wav", "raw"),
        "1-sample wav": (encode(np.array([0.25], np.float32), 16000, "WAV", "PCM_16"), "audio/wav", "raw"),
        "clipping int16 (x1000)": (encode(np.clip(opening * 1000, -1, 1), 16000, "WAV", "PCM_16"), "audio/wav", "raw"),
        "float wav far beyond [-1, 1] (x1000)": (encode(opening * 1000, 16000, "WAV", "FLOAT"), "audio/wav", "raw"),
        "8 kHz wav": (encode(soxr.resample(mono, 44100, 8000), 8000, "WAV", "PCM_16"), "audio/wav", "raw"),
        "96 kHz flac": (encode(soxr.resample(mono, 44100, 96000), 96000, "FLAC"), "audio/flac", "raw"),
        "6-channel flac": (encode(np.repeat(jfk[:, None], 6, axis=1), 16000, "FLAC"), "audio/flac", "raw"),
        "video without audio": (silent_video, "video/x-matroska", "multipart"),
        # Longer than the default 4 h limit, yet tiny: the header says how long it is.
        f"{BOMB_HOURS} h of silence, flac": (
            silence_bomb(work, ".flac", ["-c:a", "flac", "-frame_size", "65535"], 8000, loop=False), "audio/flac", "raw"),
        # Decoded by ffmpeg (libsndfile reads neither): mp4 with its index at the end (the
        # private temp dir path) and webm from a pipe.
        f"{BOMB_HOURS} h of silence, m4a": (
            silence_bomb(work, ".m4a", ["-c:a", "aac", "-b:a", "8k"], 8000, loop=True), "audio/mp4", "raw"),
        f"{BOMB_HOURS} h of silence, webm/opus": (
            silence_bomb(work, ".webm", ["-c:a", "libopus", "-b:a", "6k"], 48000, loop=True), "audio/webm", "raw"),
        "raw wav, Content-Type text/plain": (short, "text/plain", "raw"),
        "raw wav, Content-Type application/octet-stream": (short, "application/octet-stream", "raw"),
        "raw wav, no Content-Type": (short, None, "raw"),
        "raw wav, Content-Type application/x-www-form-urlencoded": (short, "application/x-www-form-urlencoded", "raw"),
    }


# name -> (status, error code or check of the transcript). Why each answer is the right one:
BAD_INPUTS = {
    "empty raw body": (400, "empty_body"),
    "empty multipart file": (400, "empty_body"),
    "random bytes": (400, "not_audio"),
    # TorchServe hands a text/plain multipart field to the handler as str, not bytes.
    "text file": (400, ("not_audio", "undecodable_audio")),
    # A truncated file whose header survived decodes to the part that is there: the client
    # gets the transcript of the first half (about 5.5 s) rather than nothing.
    "truncated wav": (200, "first half"),
    "truncated flac": (200, "first half"),
    "truncated mp3": (200, "first half"),
    # libsndfile trusts the file over the header's sizes: the 1 s that is there is read
    # (and costs 1 s); the 10 h claim allocates nothing.
    "wav header claiming 10 h, 1 s of data": (200, "one second"),
    "NaN float wav": (400, "invalid_samples"),
    "inf float wav": (400, "invalid_samples"),
    "0-sample wav": (400, "zero_length_audio"),
    # One sample is valid audio with nothing said in it.
    "1-sample wav": (200, "empty"),
    "clipping int16 (x1000)": (200, "loud"),
    "float wav far beyond [-1, 1] (x1000)": (200, "loud"),
    "8 kHz wav": (200, "jfk"),
    "96 kHz flac": (200, "jfk"),
    "6-channel flac": (200, "jfk"),
    "video without audio": (415, "unsupported_media_type"),
    f"{BOMB_HOURS} h of silence, flac": (413, "audio_too_long"),
    f"{BOMB_HOURS} h of silence, m4a": (413, "audio_too_long"),
    f"{BOMB_HOURS} h of silence, webm/opus": (413, "audio_too_long"),
    # Audio sent with a wrong or missing Content-Type is still audio.
    "raw wav, Content-Type text/plain": (200, "1813"),
    "raw wav, Content-Type application/octet-stream": (200, "1813"),
    "raw wav, no Content-Type": (200, "1813"),
    # What `curl --data-binary @f` sends without -H. TorchServe's frontend parses the body
    # as form fields itself: bytes that are not valid form encoding get its 500 (nothing
    # the handler can change), otherwise the handler sees garbage option names and answers
    # 400. Either way a JSON error, and the worker is untouched.
    "raw wav, Content-Type application/x-www-form-urlencoded": ((400, 500), None),
}
# Bombs must be refused from their header, not by decoding hours of audio: this long at
# most (the shared service's 1 s batching delay included), and this much memory at most.
BOMB_MAX_S = 5.0
BOMB_MAX_PEAK_RSS_GROWTH_MB = 300


@pytest.fixture(scope="module")
def first_worker(service):
    """The shared service's worker pid before the bad inputs: it must survive them all."""
    pid = worker_pid(service)
    assert pid is not None, workers(service)
    return pid


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_answer(service, inputs, first_worker, name):
    data, content_type, how = inputs[name]
    status, expected = BAD_INPUTS[name]
    hwm_before = peak_rss_mb(first_worker)
    started = time.monotonic()
    if how == "raw":
        response = post_raw(service, data, content_type)
    else:
        response = post_file(service, data, "upload" + (".txt" if content_type == "text/plain" else ""), content_type)
    elapsed = time.monotonic() - started
    hwm_growth = max(0.0, peak_rss_mb(first_worker) - hwm_before)
    print(f"\n{name}: {response.status_code} in {elapsed:.2f} s, {len(data)} bytes, peak RSS +{hwm_growth:.0f} MB")
    if status != 200:
        if isinstance(status, tuple):
            assert response.status_code in status, response.text[:300]
            status = response.status_code
        body = assert_error(response, status)
        if isinstance(expected, str):
            assert body["code"] == expected, body
        elif isinstance(expected, tuple):
            assert body["code"] in expected, body
        if status == 413:
            assert f"{BOMB_HOURS * 3600:.0f}" in body["message"] or "at least" in body["message"], body
            assert elapsed < BOMB_MAX_S, f"a {BOMB_HOURS} h bomb took {elapsed:.1f} s to refuse"
            assert hwm_growth < BOMB_MAX_PEAK_RSS_GROWTH_MB, (
                f"refusing a {len(data) // 1024} KiB bomb raised the worker's peak RSS by {hwm_growth:.0f} MB"
            )
        return
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    text = normalize(body["text"], "en")
    if expected == "jfk":
        assert score(JFK_TEXT, body["text"]).rate <= 0.1, body["text"]
    elif expected == "first half":
        assert 4.0 < body["duration"] < 7.0, body["duration"]
        assert text.startswith("and so my fellow american"), body["text"]
        assert "for your country" not in text, body["text"]
    elif expected == "one second":
        assert body["duration"] == pytest.approx(1.0, abs=0.05)
    elif expected == "empty":
        assert body["duration"] < 0.01 and not body["segments"], body
    elif expected == "loud":
        assert text.strip(), body  # distorted beyond recognition in places, but speech
    elif expected == "1813":
        assert "1813" in body["text"] or "eighteen" in text, body["text"]


def test_same_worker_transcribes_after_all_bad_inputs(service, first_worker):
    assert worker_pid(service) == first_worker, f"the worker was replaced: {workers(service)}"
    with open(JFK, "rb") as f:
        response = requests.post(predictions(service), files={"file": ("jfk.flac", f, "audio/flac")}, timeout=300)
    assert_jfk(response)
    assert worker_pid(service) == first_worker


# --- limits and injected OOM: a service of its own ------------------------------------

LIMITS_ENV = {
    **BATCHING_ENV,
    "WHISPER_MAX_DURATION_S": "60",
    "TS_MAX_REQUEST_SIZE": str(3 * 1024 * 1024),  # JFK (1.1 MB) passes, 4 MB does not
    "WHISPER_FAULT_OOM_ABOVE_S": "12",
}


@pytest.fixture(scope="module")
def limits_service(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("limits-service"), extra_env=LIMITS_ENV) as svc:
        yield svc


def test_longer_than_max_duration_is_413(limits_service, shared_audio):
    """141 s of speech against handler.max_duration_s=60 (WHISPER_MAX_DURATION_S)."""
    pid = worker_pid(limits_service)
    response = post_raw(limits_service, (shared_audio / LONG).read_bytes(), "audio/flac")
    body = assert_error(response, 413, "audio_too_long")
    assert "60" in body["message"] and "141" in body["message"], body
    assert worker_pid(limits_service) == pid


def test_body_over_max_request_size_is_413_from_torchserve(limits_service):
    pid = worker_pid(limits_service)
    started = time.monotonic()
    try:
        response = post_raw(limits_service, os.urandom(4 * 1024 * 1024), "audio/wav", timeout=60)
    except requests.ConnectionError:
        # Netty may close the connection before the client has finished sending.
        pytest.fail("the frontend reset the connection instead of answering 413")
    assert response.status_code == 413, response.text[:300]
    assert time.monotonic() - started < 10
    assert worker_pid(limits_service) == pid
    # and the service still works
    assert_jfk(post_raw(limits_service, JFK.read_bytes(), "audio/flac"))


def test_injected_oom_splits_the_batch(limits_service, shared_audio):
    """WHISPER_FAULT_OOM_ABOVE_S=12: four 11 s requests batched together (44 s) fail,
    the halves (22 s) fail, the singles pass: all four 200 with the right text."""
    pid = worker_pid(limits_service)
    data = JFK.read_bytes()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: post_raw(limits_service, data, "audio/flac", timeout=300), range(4)))
    for response in responses:
        assert_jfk(response)
    assert worker_pid(limits_service) == pid


def test_injected_oom_fails_only_the_request_too_big_to_fit(limits_service, shared_audio):
    """A 29 s file in a batch of JFKs: it alone is over the 12 s budget and gets 507 JSON;
    the three JFKs of its batch succeed."""
    pid = worker_pid(limits_service)
    big = (shared_audio / "librispeech/dev-clean/1272-128104-0004-8k.wav").read_bytes()
    uploads = [(JFK.read_bytes(), "audio/flac"), (big, "audio/wav")] + [(JFK.read_bytes(), "audio/flac")] * 2
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda u: post_raw(limits_service, u[0], u[1], timeout=300), uploads))
    body = assert_error(responses[1], 507, "out_of_memory")
    assert body["type"] == "server_error"
    for response in responses[:1] + responses[2:]:
        assert_jfk(response)
    assert worker_pid(limits_service) == pid


# --- faults: killed worker, stuck worker, full queue ----------------------------------

RESPONSE_TIMEOUT_S = 15  # the very long upload takes far longer on CPU; the short one far less
LONG_REPEATS = 8  # the long file 8 times over: 19 minutes, minutes of work even for tiny.en


@pytest.fixture(scope="module")
def very_long_flac(shared_audio) -> tuple:
    """(flac bytes, duration as the handler logs it) of the long file repeated."""
    samples, rate = sf.read(shared_audio / LONG, dtype="float32")
    samples = np.tile(samples, LONG_REPEATS)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC")
    return buffer.getvalue(), f"audio {len(samples) / rate:.2f}s"
FAULTS_ENV = {
    "WHISPER_RESPONSE_TIMEOUT_S": str(RESPONSE_TIMEOUT_S),
    "TS_JOB_QUEUE_SIZE": "2",
    "WHISPER_BATCH_SIZE": "1",
    "WHISPER_MAX_BATCH_DELAY_MS": "10",
}


@pytest.fixture(scope="module")
def faults_service(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("faults-service"), extra_env=FAULTS_ENV) as svc:
        yield svc


def post_in_background(service, data: bytes, content_type: str, timeout: float) -> dict:
    """POST on a thread; the returned dict gets "response" or "error", and "elapsed"."""
    result = {}

    def run():
        started = time.monotonic()
        try:
            result["response"] = post_raw(service, data, content_type, timeout=timeout)
        except requests.RequestException as err:
            result["error"] = err
        result["elapsed"] = time.monotonic() - started

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result


def wait_for_log(service, text: str, start_at: int, timeout_s: float = 60):
    log = service.log_dir / "model_log.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace")[start_at:]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout_s} s")


def log_size(service) -> int:
    return len((service.log_dir / "model_log.log").read_text(errors="replace"))


@pytest.mark.slow
def test_worker_killed_mid_request_recovers(faults_service, shared_audio, very_long_flac):
    svc = faults_service
    old_pid = worker_pid(svc)
    mark = log_size(svc)
    upload, logged_duration = very_long_flac
    request = post_in_background(svc, upload, "audio/flac", timeout=60)
    # Kill once the worker is transcribing it (decoded and handed to the engine).
    wait_for_log(svc, logged_duration, mark)
    time.sleep(0.5)
    os.kill(old_pid, signal.SIGKILL)
    killed = time.monotonic()
    request["thread"].join(70)
    assert "error" not in request, f"no HTTP answer: {request.get('error')!r}"
    response = request["response"]
    answered_s = time.monotonic() - killed
    assert 500 <= response.status_code < 600, response.text[:300]
    assert response.json()["message"], response.text
    new_pid = wait_for_new_worker(svc, old_pid)
    ready_s = time.monotonic() - killed
    short = (shared_audio / SHORT).read_bytes()
    first = post_raw(svc, short, "audio/wav")
    first_ok_s = time.monotonic() - killed
    assert first.status_code == 200, first.text[:300]
    assert "1813" in first.json()["text"] or "eighteen" in normalize(first.json()["text"], "en")
    for _ in range(2):
        assert post_raw(svc, short, "audio/wav").status_code == 200
    assert worker_pid(svc) == new_pid
    print(
        f"\nSIGKILL recovery: in-flight request answered {response.status_code} after {answered_s:.2f} s; "
        f"new worker READY after {ready_s:.1f} s; first 200 after {first_ok_s:.1f} s"
    )


@pytest.mark.slow
def test_request_over_response_timeout_gets_an_error_not_a_hang(faults_service, shared_audio, very_long_flac):
    svc = faults_service
    old_pid = worker_pid(svc)
    started = time.monotonic()
    response = post_raw(svc, very_long_flac[0], "audio/flac", timeout=RESPONSE_TIMEOUT_S + 60)
    elapsed = time.monotonic() - started
    assert 500 <= response.status_code < 600, response.text[:300]
    assert RESPONSE_TIMEOUT_S - 1 <= elapsed < RESPONSE_TIMEOUT_S + 30
    # TorchServe replaces the stuck worker; the service goes on.
    wait_for_new_worker(svc, old_pid)
    assert post_raw(svc, (shared_audio / SHORT).read_bytes(), "audio/wav").status_code == 200
    print(f"\nresponse timeout {RESPONSE_TIMEOUT_S} s: answered {response.status_code} after {elapsed:.1f} s")


@pytest.mark.slow
def test_full_queue_answers_503_quickly(faults_service, shared_audio):
    """job_queue_size=2, one request at a time: of 12 concurrent requests a few are
    accepted and transcribed; the rest are refused at once with 503, not queued."""
    svc = faults_service
    short = (shared_audio / SHORT).read_bytes()
    assert post_raw(svc, short, "audio/wav").status_code == 200  # a warm worker

    def one(_):
        started = time.monotonic()
        response = post_raw(svc, short, "audio/wav", timeout=300)
        return response.status_code, time.monotonic() - started, response.text

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, results
    refused = [elapsed for status, elapsed, _ in results if status == 503]
    assert refused, "nothing was refused: the queue is not bounded"
    assert statuses.count(200) >= 1
    assert max(refused) < 2.0, f"503s took up to {max(refused):.2f} s"
    for status, _, text in results:
        if status == 200:
            assert "1813" in text or "eighteen" in normalize(text, "en")
    print(f"\nfull queue: {statuses.count(200)} x 200, {len(refused)} x 503 in at most {max(refused):.3f} s")


# --- soak ------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_soak(service, shared_audio, tmp_path):
    """scripts/soak.py for 45 s with 4 clients: every request answered once, good ones
    right, worker memory flat, no fd or temp file leaks."""
    report = tmp_path / "soak.json"
    out = subprocess.run(
        [PYTHON, str(REPO / "scripts" / "soak.py"),
         "--url", service.url, "--management-url", service.management_url,
         "--duration", "45", "--concurrency", "4", "--bad",
         "--tmp-dir", str(Path(service.env["WHISPER_RUN_DIR"]) / "tmp"),
         "--report", str(report), "--no-progress"],
        capture_output=True, text=True, timeout=400, env={**os.environ, "WHISPER_SHARED_AUDIO": str(shared_audio)},
    )
    print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

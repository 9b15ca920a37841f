"""The service foundation end to end: serve.sh, a real TorchServe, real weights, real audio."""

import json
import subprocess
import time

import psutil
import pytest
import requests

from conftest import REPO, start_service
from scoring import normalize, score

pytestmark = pytest.mark.e2e

JFK = REPO / "samples" / "jfk.flac"
JFK_TEXT = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


def predictions(service) -> str:
    return f"{service.url}/predictions/whisper"


def assert_jfk(body: dict):
    assert normalize(body["text"], "en") == normalize(JFK_TEXT, "en")
    assert body["language"] == "en"
    assert body["duration"] == pytest.approx(11.0, abs=0.05)
    assert body["segments"], "segments missing"
    for segment in body["segments"]:
        assert 0 <= segment["start"] < segment["end"] <= 11.5
        assert segment["text"].strip()


def test_ping(service):
    response = requests.get(f"{service.url}/ping", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "Healthy"


def test_jfk_multipart(service):
    with open(JFK, "rb") as f:
        response = requests.post(predictions(service), files={"file": ("jfk.flac", f, "audio/flac")}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert_jfk(response.json())


def test_jfk_raw_body_with_content_type(service):
    response = requests.post(
        predictions(service), data=JFK.read_bytes(), headers={"Content-Type": "audio/flac"}, timeout=300
    )
    assert response.status_code == 200, response.text
    assert_jfk(response.json())


def test_jfk_curl_upload_file(service):
    """`curl -T file URL` as the README shows it."""
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-T", str(JFK), predictions(service)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert_jfk(json.loads(out.stdout))


def test_librispeech_wer(service, shared_audio, manifest):
    name = "librispeech/test-clean/1089-134686-0000.flac"
    with open(shared_audio / name, "rb") as f:
        response = requests.post(predictions(service), files={"file": (name, f)}, timeout=300)
    assert response.status_code == 200, response.text
    wer = score(manifest[name]["reference_transcript"], response.json()["text"], "en").rate
    assert wer < 0.15, f"WER {wer:.1%}: {response.json()['text']!r}"


def test_handler_logs_environment(service):
    log = (service.log_dir / "model_log.log").read_text()
    assert "whisper ready: model=tiny.en" in log
    assert "torch=" in log and "device=cpu" in log


def worker_processes(run_dir: str):
    """Processes started from this run dir (TorchServe frontend and its Python workers)."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("WHISPER_RUN_DIR") == run_dir:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_base_model_end_to_end_and_clean_stop(tmp_path):
    """The default model users get (base), then --stop leaves no process behind."""
    service = start_service(tmp_path, model="base")
    try:
        assert worker_processes(service.env["WHISPER_RUN_DIR"]), "no TorchServe processes found"
        with open(JFK, "rb") as f:
            response = requests.post(predictions(service), files={"file": f}, timeout=300)
        assert response.status_code == 200, response.text
        assert_jfk(response.json())
        assert "model=base" in (service.log_dir / "model_log.log").read_text()
    finally:
        stopped = service.stop()
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.time() + 30
    while worker_processes(service.env["WHISPER_RUN_DIR"]) and time.time() < deadline:
        time.sleep(0.5)
    assert worker_processes(service.env["WHISPER_RUN_DIR"]) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{service.url}/ping", timeout=5)

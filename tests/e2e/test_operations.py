"""Operations: Prometheus metrics from the handler, logs findable by request id, privacy."""

import re
import time

import pytest
import requests

from conftest import REPO

pytestmark = pytest.mark.e2e

JFK = REPO / "samples" / "jfk.flac"
HANDLER_METRICS = (
    "AudioSecondsProcessed",
    "RealTimeFactor",
    "WindowsPerBatch",
    "QueueToStartLatency",
    "FallbackCount",
    "RequestErrors",
)


def transcribe(service, path=JFK, **fields):
    with open(path, "rb") as f:
        return requests.post(f"{service.url}/predictions/whisper", files={"file": f}, data=fields, timeout=300)


def samples(text: str, name: str) -> dict:
    """{label string: value} of one metric family in Prometheus text format."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


@pytest.fixture(scope="module")
def scraped(service, tmp_path_factory):
    """/metrics after two good requests and one bad one."""
    junk = tmp_path_factory.mktemp("junk") / "junk.txt"
    junk.write_text("not audio " * 100)
    assert transcribe(service).status_code == 200
    assert transcribe(service, response_format="text").status_code == 200
    assert transcribe(service, junk).status_code == 400
    time.sleep(1)
    response = requests.get(f"{service.metrics_url}/metrics", timeout=30)
    assert response.status_code == 200
    return response.text


@pytest.mark.parametrize("name", HANDLER_METRICS)
def test_handler_metric_is_exported(scraped, name):
    assert re.search(rf"^# TYPE {name} ", scraped, re.M), f"{name} missing from /metrics"


def test_metric_values_are_plausible(scraped):
    audio = samples(scraped, "AudioSecondsProcessed")
    assert audio and max(audio.values()) >= 22.0 - 0.1  # at least the two JFK requests
    rtf = samples(scraped, "RealTimeFactor")
    assert rtf and all(0 < v < 10 for v in rtf.values())
    windows = samples(scraped, "WindowsPerBatch_count")
    assert windows and max(windows.values()) >= 1
    assert samples(scraped, "WindowsPerBatch_sum") and max(samples(scraped, "WindowsPerBatch_sum").values()) >= 1
    assert max(samples(scraped, "QueueToStartLatency_count").values()) >= 2
    errors = samples(scraped, "RequestErrors")
    assert any('ErrorType="not_audio"' in labels and value >= 1 for labels, value in errors.items()), errors
    assert all(v >= 0 for v in samples(scraped, "FallbackCount").values())
    # TorchServe's own frontend metrics are there too (the HPA reads the queue latency)
    assert samples(scraped, "ts_queue_latency_microseconds")


def test_one_request_is_found_in_the_logs_by_its_id(service):
    response = transcribe(service)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    lines = [line for line in (service.log_dir / "model_log.log").read_text().splitlines() if request_id in line]
    assert any("audio 11.00s" in line and "via soundfile" in line for line in lines), lines
    assert any("batch:" in line and "real time" in line for line in lines), lines


def test_transcripts_are_not_logged(service):
    assert transcribe(service).status_code == 200
    log = (service.log_dir / "model_log.log").read_text().lower()
    assert "fellow americans" not in log


def test_errors_are_logged_with_the_request_id(service, tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("still not audio " * 50)
    response = transcribe(service, junk)
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]
    log = (service.log_dir / "model_log.log").read_text()
    assert re.search(rf"request {re.escape(request_id)}: 400 not_audio", log)


def test_log_files_exist(service):
    for name in ("ts_log.log", "model_log.log", "access_log.log"):
        assert (service.log_dir / name).exists(), name

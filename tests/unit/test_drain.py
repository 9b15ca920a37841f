"""handler/drain.py: a worker's part in a graceful stop, without TorchServe."""

import os

import pytest

from drain import DRAINING_FILE, Drain
from errors import Draining


def test_a_worker_refuses_new_requests_once_draining_and_reports_what_is_in_flight(tmp_path):
    drain = Drain(str(tmp_path), poll_s=0.01)
    try:
        drain.enter()
        drain.enter()
        report = tmp_path / f"worker-{os.getpid()}"
        assert drain.inflight == 2 and not report.exists()  # nothing written before the mark
        (tmp_path / DRAINING_FILE).touch()
        assert drain.draining.wait(10)
        assert report.read_text() == "2"
        with pytest.raises(Draining) as refused:
            drain.enter()
        assert refused.value.status == 503 and refused.value.code == "draining" and refused.value.retry_after >= 1
        drain.leave()
        assert report.read_text() == "1"
        drain.leave()
        assert report.read_text() == "0" and drain.inflight == 0
    finally:
        drain.close()


def test_without_a_drain_folder_nothing_is_watched(tmp_path):
    drain = Drain(None)
    drain.enter()
    drain.leave()
    assert drain.inflight == 0 and not drain.draining.is_set()

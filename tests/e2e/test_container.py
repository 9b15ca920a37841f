"""The image, built and run as a user does (scripts/container_check.py): healthy, non-root,
JFK through curl, metrics, logs in a mounted folder, and `docker stop` while a 160 s file
is transcribed answering it in full and exiting 0.

Marked `docker`: minutes of building (the CUDA torch wheels), so not part of `make test`;
run it with `pytest -m docker` (as root: it starts dockerd and debootstraps the base when
no registry is reachable) after changing the Dockerfile, serve.sh or the requirements, and
record the table in docs/container.md (tests/unit/test_docs.py checks that it was)."""

import subprocess
import sys

import pytest

from conftest import REPO, SHARED_AUDIO

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


def test_the_image_builds_runs_and_drains():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "container_check.py"), "--audio",
                           str(SHARED_AUDIO)], capture_output=True, text=True, timeout=3600)
    table = done.stdout[done.stdout.find("| check | result |"):]
    print(table)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "| drain: exit code | 0 |" in table and "| user in the container | 1000 |" in table

"""Shared test set-up: import paths, the real audio corpus, and real TorchServe services.

The `service` fixture starts TorchServe with ./serve.sh --background exactly as a user
does (tiny.en for speed, on free ports, with its own run/log/model-store directories so
it never touches a server a developer has running) and stops it at the end.
"""

import csv
import os
import sys
from pathlib import Path
from typing import Dict

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts"), str(REPO / "tests")]

SHARED_AUDIO = Path(os.environ.get("WHISPER_SHARED_AUDIO", REPO.parent / "shared" / "audio"))
MODELS_DIR = REPO / "whisper-models"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable

from local_service import SESSIONS, Service, free_port, running_service, session_processes, start_service  # noqa: E402,F401  (scripts/ is on the path now)


def pytest_collection_modifyitems(config, items):
    """Tests marked `docker` build the image (minutes): they run only when -m names them."""
    if "docker" in (config.option.markexpr or ""):
        return
    left_out = [item for item in items if item.get_closest_marker("docker")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("docker")]


def missing(reason: str):
    """Skip a test whose inputs (../shared, a checkpoint) are not here; under CI (the
    environment variable CI set) fail it instead, so a broken checkout never passes by
    skipping everything."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: missing inputs fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def no_service_process_survives():
    """After the whole suite, no process of any TorchServe a test started is alive: every
    fixture stops its service, workers that replaced killed ones included."""
    yield
    survivors = {session: session_processes(session) for session in SESSIONS}
    survivors = {session: pids for session, pids in survivors.items() if pids}
    assert not survivors, f"processes of stopped test services are still running: {survivors}"


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """TorchServe with tiny.en, shared by the end-to-end tests of one session."""
    with running_service(tmp_path_factory.mktemp("service"), openai=True) as svc:
        yield svc


@pytest.fixture(scope="session")
def base_service(tmp_path_factory):
    """TorchServe with base, the default (multilingual) model users get."""
    with running_service(tmp_path_factory.mktemp("base-service"), model="base") as svc:
        yield svc


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    if not (SHARED_AUDIO / "manifest.tsv").exists():
        missing(f"shared audio corpus not found at {SHARED_AUDIO} (set WHISPER_SHARED_AUDIO)")
    return SHARED_AUDIO


@pytest.fixture(scope="session")
def manifest(shared_audio) -> Dict[str, dict]:
    """manifest.tsv rows by relative file path."""
    with open(shared_audio / "manifest.tsv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


def checkpoint(model: str) -> Path:
    path = MODELS_DIR / f"whisper_{model}.pth"
    if not path.exists():
        missing(f"{path} missing: run scripts/download_model.py --model {model}")
    return path


@pytest.fixture(scope="module")
def tiny_en_model():
    """The real tiny.en model on CPU, loaded once per test module (an Engine may cast it)."""
    from checkpoint import load_whisper

    if not SHARED_AUDIO.exists():
        missing(f"shared audio missing: {SHARED_AUDIO}")
    return load_whisper(str(checkpoint("tiny.en")), "cpu")


def load_properties(path: Path) -> dict:
    """A Java .properties file (TorchServe's config) as a dict."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props

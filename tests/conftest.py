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
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

SHARED_AUDIO = Path(os.environ.get("WHISPER_SHARED_AUDIO", REPO.parent / "shared" / "audio"))
MODELS_DIR = REPO / "whisper-models"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable

from local_service import Service, free_port, running_service, start_service  # noqa: E402,F401  (scripts/ is on the path now)


# The shared services batch up to 4 requests that arrive within 1 s of each other, so
# the end-to-end tests exercise TorchServe's dynamic batching, not one request at a time.
BATCHING_ENV = {"WHISPER_BATCH_SIZE": "4", "WHISPER_MAX_BATCH_DELAY_MS": "1000"}


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """TorchServe with tiny.en, shared by the end-to-end tests of one session."""
    with running_service(tmp_path_factory.mktemp("service"), extra_env=BATCHING_ENV, openai=True) as svc:
        yield svc


@pytest.fixture(scope="session")
def base_service(tmp_path_factory):
    """TorchServe with base, the default (multilingual) model users get."""
    with running_service(tmp_path_factory.mktemp("base-service"), model="base", extra_env=BATCHING_ENV) as svc:
        yield svc


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    if not (SHARED_AUDIO / "manifest.tsv").exists():
        pytest.skip(f"shared audio corpus not found at {SHARED_AUDIO} (set WHISPER_SHARED_AUDIO)")
    return SHARED_AUDIO


@pytest.fixture(scope="session")
def manifest(shared_audio) -> Dict[str, dict]:
    """manifest.tsv rows by relative file path."""
    with open(shared_audio / "manifest.tsv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


def checkpoint(model: str) -> Path:
    path = MODELS_DIR / f"whisper_{model}.pth"
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/download_model.py --model {model}")
    return path


@pytest.fixture(scope="module")
def tiny_en_model():
    """The real tiny.en model on CPU, loaded once per test module (an Engine may cast it)."""
    from checkpoint import load_whisper

    if not SHARED_AUDIO.exists():
        pytest.skip(f"shared audio missing: {SHARED_AUDIO}")
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

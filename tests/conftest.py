"""Shared test set-up: import paths, the real audio corpus, and real TorchServe services.

The `service` fixture starts TorchServe with ./serve.sh --background exactly as a user
does (tiny.en for speed, on free ports, with its own run/log/model-store directories so
it never touches a server a developer has running) and stops it at the end.
"""

import csv
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

SHARED_AUDIO = Path(os.environ.get("WHISPER_SHARED_AUDIO", REPO.parent / "shared" / "audio"))
MODELS_DIR = REPO / "whisper-models"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A running TorchServe started by serve.sh, and how to reach and stop it."""

    url: str
    management_url: str
    metrics_url: str
    model: str
    env: Dict[str, str] = field(repr=False)
    log_dir: Path = None
    token: Optional[str] = None
    openai_url: Optional[str] = None  # the nginx proxy (serve.sh --openai), if started

    def stop(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / "serve.sh"), "--stop"], env=self.env, capture_output=True, text=True, timeout=120
        )

    def pid(self) -> Optional[int]:
        pid_file = Path(self.env["WHISPER_RUN_DIR"]) / "tmp" / ".model_server.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None


def start_service(
    root: Path, model: str = "tiny.en", extra_env: Optional[dict] = None, openai: bool = False
) -> Service:
    ports = [free_port() for _ in range(7)]
    env = dict(os.environ)
    env.update(
        WHISPER_MODEL=model,
        WHISPER_RUN_DIR=str(root / "run"),
        WHISPER_LOG_DIR=str(root / "logs"),
        WHISPER_MODEL_STORE=str(root / "model-store"),
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{ports[0]}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{ports[1]}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{ports[2]}",
        # Worker ports (and their socket names in /tmp) must not collide with another
        # TorchServe on the machine, whose workers start at 9000.
        TS_INITIAL_WORKER_PORT=str(ports[3]),
        TS_GRPC_INFERENCE_PORT=str(ports[4]),
        TS_GRPC_MANAGEMENT_PORT=str(ports[5]),
        WHISPER_OPENAI_LISTEN=f"127.0.0.1:{ports[6]}",
    )
    env.update(extra_env or {})
    proc = subprocess.run(
        [str(REPO / "serve.sh"), "--background", *(["--openai"] if openai else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    service = Service(
        url=env["TS_INFERENCE_ADDRESS"],
        management_url=env["TS_MANAGEMENT_ADDRESS"],
        metrics_url=env["TS_METRICS_ADDRESS"],
        model=model,
        env=env,
        log_dir=root / "logs",
        openai_url=f"http://127.0.0.1:{ports[6]}/v1" if openai else None,
    )
    if proc.returncode != 0:
        service.stop()
        logs = ""
        for name in ("ts_log.log", "model_log.log"):
            path = root / "logs" / name
            if path.exists():
                logs += f"\n--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-40:])
        raise RuntimeError(f"serve.sh --background failed ({proc.returncode}):\n{proc.stderr}{logs}")
    return service


# The shared services batch up to 4 requests that arrive within 1 s of each other, so
# the end-to-end tests exercise TorchServe's dynamic batching, not one request at a time.
BATCHING_ENV = {"WHISPER_BATCH_SIZE": "4", "WHISPER_MAX_BATCH_DELAY_MS": "1000"}


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """TorchServe with tiny.en, shared by the end-to-end tests of one session."""
    svc = start_service(tmp_path_factory.mktemp("service"), extra_env=BATCHING_ENV, openai=True)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def base_service(tmp_path_factory):
    """TorchServe with base, the default (multilingual) model users get."""
    svc = start_service(tmp_path_factory.mktemp("base-service"), model="base", extra_env=BATCHING_ENV)
    yield svc
    svc.stop()


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

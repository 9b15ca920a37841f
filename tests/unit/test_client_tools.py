"""Pure parts of the client tools: no server needed."""

import argparse
import csv
import email.parser
import email.policy
import io
import json
import math
import statistics
import sys
import threading
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]  # also done by tests/conftest.py

import bulk_request  # noqa: E402
import client  # noqa: E402
import download_audio  # noqa: E402
import request_train  # noqa: E402
import test_client  # noqa: E402


def write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    samples = (0.1 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())
    return path


# ---------------------------------------------------------------------------- client.py


@pytest.fixture
def audio_tree(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ["a.wav", "b.FLAC", "notes.txt", "sub/c.mp3", "sub/deeper/d.opus", "sub/e.json", "sub/f.m4a"]:
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_expand_directory_recurses_and_keeps_audio_only(audio_tree):
    paths = client.expand_audio_paths([audio_tree])
    names = [p.relative_to(audio_tree).as_posix() for p in paths]
    assert names == ["a.wav", "b.FLAC", "sub/c.mp3", "sub/deeper/d.opus", "sub/f.m4a"]


def test_expand_glob_and_explicit_file(audio_tree):
    paths = client.expand_audio_paths([str(audio_tree / "*"), str(audio_tree / "notes.txt")])
    names = [p.relative_to(audio_tree).as_posix() for p in paths]
    # "*" matches files (audio only) and the sub directory (expanded); an explicit file is kept as is
    assert names == ["a.wav", "b.FLAC", "sub/c.mp3", "sub/deeper/d.opus", "sub/f.m4a", "notes.txt"]


def test_expand_drops_duplicates_keeping_order(audio_tree):
    a = audio_tree / "a.wav"
    paths = client.expand_audio_paths([a, audio_tree / "sub" / "c.mp3", str(a), audio_tree / "sub" / ".." / "a.wav"])
    assert paths == [a, audio_tree / "sub" / "c.mp3"]


@pytest.mark.parametrize("arg", ["missing.wav", "nothing-*.flac"])
def test_expand_missing_raises(tmp_path, arg):
    with pytest.raises(FileNotFoundError, match="missing|nothing"):
        client.expand_audio_paths([str(tmp_path / arg)])


def test_audio_extensions_cover_the_service_formats():
    assert {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac"} == client.AUDIO_EXTENSIONS


def test_audio_duration_wav_and_unreadable(tmp_path):
    assert client.audio_duration(write_wav(tmp_path / "tone.wav", 1.25)) == pytest.approx(1.25)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    assert client.audio_duration(tmp_path / "junk.wav") is None


def test_audio_duration_of_real_flac():
    jfk = REPO / "samples" / "jfk.flac"
    if not jfk.exists():
        pytest.skip("samples/jfk.flac missing")
    assert client.audio_duration(jfk) == pytest.approx(11.0, abs=0.01)


def test_option_fields_map_lists_bools_and_drop_none():
    fields = client.option_fields(
        dict(language="en", prompt=None, temperature=0.2, timestamp_granularities=["segment", "word"], word_timestamps=True)
    )
    assert fields == [
        ("language", "en"),
        ("temperature", "0.2"),
        ("timestamp_granularities[]", "segment"),
        ("timestamp_granularities[]", "word"),
        ("word_timestamps", "true"),
    ]
    assert client.option_fields({"timestamp_granularities[]": ("word",)}) == [("timestamp_granularities[]", "word")]


def test_content_types():
    assert client.content_type_for("x.flac") == "audio/flac"
    assert client.content_type_for("X.MP3") == "audio/mpeg"
    assert client.content_type_for("x.opus") == "audio/ogg"
    assert client.content_type_for("x.unknown-ext") == "application/octet-stream"


def test_client_defaults_from_environment(monkeypatch):
    monkeypatch.setenv("WHISPER_URL", "http://example.test:1234/")
    monkeypatch.setenv("WHISPER_TOKEN", "secret")
    c = client.WhisperClient()
    assert c.url == "http://example.test:1234"
    assert c.predictions_url == "http://example.test:1234/predictions/whisper"
    assert c.session.headers["Authorization"] == "Bearer secret"
    monkeypatch.delenv("WHISPER_URL")
    monkeypatch.delenv("WHISPER_TOKEN")
    c = client.WhisperClient()
    assert c.url == client.DEFAULT_URL and "Authorization" not in c.session.headers


def test_one_session_per_thread():
    c = client.WhisperClient("http://127.0.0.1:9")
    sessions = []
    threads = [threading.Thread(target=lambda: sessions.append(c.session)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in sessions}) == 3
    assert c.session is c.session


def test_common_args(monkeypatch):
    monkeypatch.setenv("WHISPER_URL", "http://from-env:1")
    monkeypatch.delenv("WHISPER_TOKEN", raising=False)
    parser = client.add_common_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.url, args.token, args.timeout) == ("http://from-env:1", None, client.DEFAULT_TIMEOUT_S)
    args = parser.parse_args(["--url", "http://x:2", "--token", "t", "--timeout", "5"])
    c = client.client_from_args(args)
    assert (c.url, c.token, c.timeout) == ("http://x:2", "t", 5.0)


def test_unreachable_service_is_a_client_error_without_status():
    # port 9 (discard) on localhost: nothing listens there
    c = client.WhisperClient("http://127.0.0.1:9", timeout=5)
    with pytest.raises(client.ClientError) as info:
        c.transcribe(b"RIFF....", filename="x.wav")
    assert info.value.status is None and info.value.code == "connection_error"
    assert "127.0.0.1:9" in str(info.value)


def test_error_from_response_keeps_the_server_message():
    import requests

    response = requests.Response()
    response.status_code = 503
    response._content = json.dumps({"code": 503, "type": "ServiceUnavailableException", "message": "Model whisper has no worker"}).encode()
    error = client.error_from_response(response)
    assert (error.status, error.code, error.type) == (503, 503, "ServiceUnavailableException")
    assert error.message == "Model whisper has no worker"
    assert str(error) == "Model whisper has no worker (HTTP 503)"

    response = requests.Response()
    response.status_code = 502
    response.reason = "Bad Gateway"
    response._content = b"<html>proxy error</html>"
    error = client.error_from_response(response)
    assert (error.status, error.message) == (502, "<html>proxy error</html>")


# ---------------------------------------------------------------------------- bulk_request.py


def test_round_robin_plan():
    assert bulk_request.plan_requests(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert bulk_request.plan_requests(["a"], 0) == []


def test_request_plan_is_shared_safely_between_threads():
    plan = bulk_request.RequestPlan(["a", "b"], count=1000)
    taken = []

    def worker():
        while (item := plan.take()) is not None:
            taken.append(item)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for i, _ in taken) == list(range(1000))
    assert all(f == ("a" if i % 2 == 0 else "b") for i, f in taken)


def test_request_plan_stops_at_the_deadline():
    plan = bulk_request.RequestPlan(["a"], count=None, deadline=0.0)  # monotonic clock is past 0
    assert plan.take() is None


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [0.3, 1.7, 0.2, 5.0, 2.2, 0.9, 1.1]
    assert bulk_request.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edge_cases():
    assert bulk_request.percentile([], 50) is None
    assert bulk_request.percentile([4.0], 99) == 4.0
    stats = bulk_request.latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats["min"] == 1.0 and stats["max"] == 4.0 and stats["p50"] == 2.5
    assert stats["mean"] == statistics.mean([1.0, 2.0, 3.0, 4.0])
    assert bulk_request.latency_stats([])["p50"] is None


def make_records():
    R = bulk_request.Record
    return [
        R(0, "a.wav", 200, 1.0, 10.0, 30, 1000, 0.0, text="hello world", language="en"),
        R(1, "b.wav", 200, 3.0, 5.0, 12, 500, 0.1, text="good bye", language="en"),
        R(2, "a.wav", 503, 0.1, 10.0, None, 1000, 0.2, error="Model whisper has no worker"),
        R(3, "b.wav", "timeout", 30.0, 5.0, None, 500, 0.3, error="no answer"),
    ]


def test_summarize_counts_and_rates():
    summary = bulk_request.summarize(make_records(), wall_s=4.0)
    assert (summary["requests"], summary["ok"], summary["failed"]) == (4, 2, 2)
    assert summary["by_status"] == {200: 2, 503: 1, "timeout": 1}
    # latency and audio only over successful requests
    assert summary["latency_s"]["min"] == 1.0 and summary["latency_s"]["max"] == 3.0
    assert summary["audio_s"] == 15.0
    assert summary["rtfx"] == summary["audio_s_per_s"] == 15.0 / 4.0
    assert summary["requests_per_s"] == 1.0
    assert summary["bytes_sent"] == 3000
    text = bulk_request.format_summary(summary)
    assert "2 ok, 2 failed" in text and "503: 1" in text and "3.75" in text


def test_report_json_and_csv_round_trip(tmp_path):
    records = make_records()
    summary = bulk_request.summarize(records, 4.0)
    bulk_request.write_report(tmp_path / "r.json", summary, records, wer={"overall_wer": 0.1})
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["ok"] == 2 and report["wer"]["overall_wer"] == 0.1
    assert [r["status"] for r in report["records"]] == [200, 200, 503, "timeout"]  # numbers are numbers
    for key in ("file", "status", "latency_s", "audio_duration_s", "text_length", "error", "started_at"):
        assert key in report["records"][0]

    bulk_request.write_report(tmp_path / "out" / "r.csv", summary, records)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "r.csv").read_text())))
    assert len(rows) == 4 and rows[2]["error"] == "Model whisper has no worker"
    assert float(rows[1]["latency_s"]) == 3.0
    assert bulk_request.read_report(tmp_path / "out" / "r.csv")[0]["file"] == "a.wav"

    with pytest.raises(ValueError):
        bulk_request.write_report(tmp_path / "r.txt", summary, records)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    bulk_request.plot_latency(tmp_path / "p.png", make_records())
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_references_by_path_then_by_name(tmp_path):
    (tmp_path / "x").mkdir()
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(
        "file\tduration_s\treference_transcript\n"
        "x/one.wav\t1.0\tfirst text\n"
        "x/two.wav\t1.0\tsecond text\n"
        "y/two.wav\t1.0\tother second\n"
    )
    refs = bulk_request.load_references(manifest)
    assert refs.get(tmp_path / "x" / "one.wav").text == "first text"
    assert refs.get(tmp_path / "y" / "two.wav") == bulk_request.Reference("other second", "y/two.wav")
    assert refs.get("/elsewhere/one.wav").text == "first text"  # by name
    assert refs.get("/elsewhere/two.wav") is None  # ambiguous name
    assert refs.get("/elsewhere/three.wav") is None


def test_references_reject_a_manifest_without_transcripts(tmp_path):
    (tmp_path / "m.tsv").write_text("file\tduration_s\na.wav\t1\n")
    with pytest.raises(ValueError, match="reference_transcript"):
        bulk_request.load_references(tmp_path / "m.tsv")


def test_reference_language():
    pytest.importorskip("scoring")
    R = bulk_request.Reference
    assert bulk_request.reference_language(R("t", "x.wav", "de"), "en") == "de"
    assert bulk_request.reference_language(R("t", "multilingual/fr_picovoice.wav"), "en") == "fr"
    assert bulk_request.reference_language(R("t", "talk.wav"), "es") == "es"
    assert bulk_request.reference_language(R("t", "talk.wav"), None) == "en"


def test_score_records_flags_swapped_answers(tmp_path):
    pytest.importorskip("scoring")
    manifest = tmp_path / "m.tsv"
    manifest.write_text(
        "file\treference_transcript\n"
        "a.wav\tAnd so, my fellow Americans, ask not what your country can do for you\n"
        "b.wav\tHE HOPED THERE WOULD BE STEW FOR DINNER\n"
    )
    R = bulk_request.Record
    records = [
        R(0, str(tmp_path / "a.wav"), 200, 1, 1, 1, 1, 0, text="And so my fellow Americans, ask not what your country can do for you.", language="en"),
        R(1, str(tmp_path / "b.wav"), 200, 1, 1, 1, 1, 0, text="He hoped there would be stew for dinner.", language="en"),
        # the answer meant for a.wav delivered for b.wav
        R(2, str(tmp_path / "b.wav"), 200, 1, 1, 1, 1, 0, text="And so my fellow Americans, ask not.", language="en"),
        R(3, str(tmp_path / "c.wav"), 200, 1, 1, 1, 1, 0, text="no reference", language="en"),
        R(4, str(tmp_path / "a.wav"), 503, 1, 1, None, 1, 0, error="busy"),
    ]
    report = bulk_request.score_records(records, bulk_request.load_references(manifest), flag_wer=0.5)
    assert records[0].wer == 0 and records[1].wer == 0 and records[2].wer > 0.5
    assert [f["index"] for f in report["flagged"]] == [2]
    assert report["files"][str(tmp_path / "a.wav")]["wer"] == 0
    assert report["files"][str(tmp_path / "b.wav")]["requests"] == 2
    assert report["without_reference"] == [str(tmp_path / "c.wav")]
    assert 0 < report["overall_wer"] < 1
    assert "FLAGGED request 2" in bulk_request.format_wer(report)


def test_bulk_request_argument_checks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bulk_request.parse_args(["a.wav", "--requests", "3", "--duration", "5"])
    with pytest.raises(SystemExit):
        bulk_request.parse_args(["a.wav", "--report", "out.txt"])
    with pytest.raises(SystemExit):
        bulk_request.parse_args(["a.wav", "--concurrency", "0"])
    args = bulk_request.parse_args(["a.wav", "-c", "8", "-n", "20", "--report", "r.csv"])
    assert (args.concurrency, args.requests, args.report) == (8, 20, Path("r.csv"))


# ---------------------------------------------------------------------------- request_train.py


def test_fixed_rate_schedule():
    assert request_train.arrival_schedule(1, 5) == [0, 1, 2, 3, 4]
    assert request_train.arrival_schedule(2, 2) == [0, 0.5, 1.0, 1.5]
    assert len(request_train.arrival_schedule(0.1, 30)) == 3  # 0, 10, 20 (not 30)
    assert len(request_train.arrival_schedule(3, 10)) == 30
    assert request_train.arrival_schedule(0, 10) == [] and request_train.arrival_schedule(1, 0) == []


def test_poisson_schedule_is_seeded_ordered_and_has_the_right_rate():
    a = request_train.arrival_schedule(20, 100, poisson=True, seed=1)
    assert a == request_train.arrival_schedule(20, 100, poisson=True, seed=1)
    assert a != request_train.arrival_schedule(20, 100, poisson=True, seed=2)
    assert all(0 < t < 100 for t in a) and a == sorted(a)
    assert abs(len(a) - 2000) < 4 * math.sqrt(2000)  # Poisson count: mean 2000, sd ~45
    gaps = np.diff(a)
    assert np.mean(gaps) == pytest.approx(1 / 20, rel=0.1)
    assert np.std(gaps) == pytest.approx(1 / 20, rel=0.15)  # exponential: sd == mean


def test_train_summary():
    A = request_train.Arrival
    arrivals = [
        A(0, "a.wav", 0.0, 0.0, 200, 0.5, 0.6),
        A(1, "a.wav", 1.0, 1.2, 200, 1.5, 1.6),
        A(2, "a.wav", 2.0, 2.0, 503, 0.01, 0.01, "Model whisper has no worker"),
        A(3, "a.wav", 3.0, 3.0, "timeout", None, 10.0, "no answer"),
        A(4, "a.wav", 4.0),  # never sent
    ]
    s = request_train.summarize(arrivals, duration_s=5.0, wall_s=10.0)
    assert (s["planned"], s["sent"], s["ok"], s["failed"]) == (5, 4, 2, 3)
    assert (s["timeouts"], s["service_unavailable_503"]) == (1, 1)
    assert s["offered_rate"] == 1.0 and s["sent_rate"] == 0.8 and s["achieved_rate"] == 0.2
    assert s["max_send_lag_s"] == pytest.approx(0.2)
    assert s["ttfb_s"]["max"] == 1.5 and s["latency_s"]["min"] == 0.6
    assert "2 ok, 3 failed" in request_train.format_summary(s)


# ---------------------------------------------------------------------------- test_client.py, download_audio.py


def test_test_client_options_and_rendering():
    args = test_client.parse_args(["x.wav", "--word-timestamps", "--language", "en", "--response-format", "verbose_json"])
    options = test_client.request_options(args)
    assert options["timestamp_granularities"] == ["segment", "word"]
    assert options["language"] == "en" and options["response_format"] == "verbose_json"
    assert test_client.parse_args(["x.wav", "--word-timestamps"]).response_format == "verbose_json"
    assert test_client.parse_args(["x.wav", "--word-timestamps", "--response-format", "srt"]).response_format == "srt"
    assert test_client.parse_args(["x.wav"]).response_format == "json"
    assert test_client.render({"text": " hi there "}, as_json=False) == "hi there\n"
    assert json.loads(test_client.render({"text": "hi"}, as_json=True)) == {"text": "hi"}
    assert test_client.render("1\n00:00:00,000 --> 00:00:01,000\nhi\n", as_json=False).startswith("1\n")


def test_test_client_output_paths(tmp_path):
    args = test_client.parse_args(["x.wav", "--output", str(tmp_path / "o"), "--response-format", "srt"])
    assert test_client.output_path(args, Path("d/talk.flac"), several=True) == tmp_path / "o" / "talk.srt"
    assert test_client.output_path(args, Path("d/talk.flac"), several=False) == tmp_path / "o"
    (tmp_path / "o").mkdir()  # one input into an existing directory: named after the input
    assert test_client.output_path(args, Path("d/talk.flac"), several=False) == tmp_path / "o" / "talk.srt"


def test_download_error_messages_are_one_line():
    error = Exception(
        "\x1b[0;31mERROR:\x1b[0m [generic] x: Unable to download webpage: HTTP Error 404: File not found "
        "(caused by <HTTPError 404: File not found>)\nmore"
    )
    assert download_audio.one_line(error) == "[generic] x: Unable to download webpage: HTTP Error 404: File not found"


def test_download_saved_paths_of_videos_and_playlists():
    video = {"requested_downloads": [{"filepath": "/d/a.flac"}]}
    assert download_audio.saved_paths(video) == [Path("/d/a.flac")]
    playlist = {"entries": [video, None, {"requested_downloads": [{"filepath": "/d/b.flac"}]}]}
    assert download_audio.saved_paths(playlist) == [Path("/d/a.flac"), Path("/d/b.flac")]


# ---------------------------------------------------------------------------- over the wire
# A local HTTP server that records what the client sent and answers with canned bodies:
# it checks the protocol side (fields, headers, errors, concurrency), not transcription.


class Recorder(BaseHTTPRequestHandler):
    def do_GET(self):
        self.reply(200, b'{"status": "Healthy"}', "application/json")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = {"path": self.path, "headers": dict(self.headers), "body": body, "fields": [], "file": None}
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + body
            )
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name == "file":
                    request["file"] = (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
                else:
                    request["fields"].append((name, part.get_payload(decode=True).decode()))
        self.server.requests.append(request)
        status, payload, ctype = self.server.answer
        self.reply(status, payload, ctype)

    def reply(self, status, payload, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.requests = []
    server.answer = (200, json.dumps({"text": "hello", "language": "en", "duration": 1.0, "segments": []}).encode(), "application/json")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def test_multipart_upload_with_options_and_token(recorder, tmp_path):
    wav = write_wav(tmp_path / "tone.wav", 0.5)
    c = client.WhisperClient(recorder.url, token="k3y")
    assert c.ping() == {"status": "Healthy"}
    body = c.transcribe(wav, language="en", temperature=0.0, timestamp_granularities=["segment", "word"], prompt=None)
    assert body["text"] == "hello"
    sent = recorder.requests[-1]
    assert sent["path"] == "/predictions/whisper"
    assert sent["headers"]["Authorization"] == "Bearer k3y"
    assert sent["file"] == ("tone.wav", "audio/wav", wav.read_bytes())
    assert sent["fields"] == [
        ("language", "en"), ("temperature", "0.0"),
        ("timestamp_granularities[]", "segment"), ("timestamp_granularities[]", "word"),
    ]


def test_raw_upload_puts_options_in_headers(recorder):
    recorder.answer = (200, b"hello\n", "text/plain; charset=utf-8")
    c = client.WhisperClient(recorder.url)
    text = c.transcribe(b"fLaC-bytes", filename="a.flac", raw=True, response_format="text", timestamp_granularities=["word"])
    assert text == "hello\n"
    sent = recorder.requests[-1]
    assert sent["body"] == b"fLaC-bytes" and sent["headers"]["Content-Type"] == "audio/flac"
    assert sent["path"] == "/predictions/whisper"
    assert sent["headers"]["X-Whisper-Response-Format"] == "text"
    assert sent["headers"]["X-Whisper-Timestamp-Granularities"] == "word"
    assert "Authorization" not in sent["headers"]


def test_server_errors_raise_with_the_servers_message(recorder):
    recorder.answer = (415, json.dumps({"code": "unsupported_media_type", "type": "invalid_request_error", "message": "not audio: text/plain"}).encode(), "application/json")
    with pytest.raises(client.ClientError) as info:
        client.WhisperClient(recorder.url).transcribe(b"hello", filename="notes.txt")
    assert (info.value.status, info.value.code, info.value.message) == (415, "unsupported_media_type", "not audio: text/plain")


def test_bulk_run_load_round_robin_and_concurrency(recorder, tmp_path):
    files = [write_wav(tmp_path / f"{i}.wav", 0.25 * (i + 1)) for i in range(3)]
    records, wall = bulk_request.run_load(
        client.WhisperClient(recorder.url), files, concurrency=4, count=10, duration_s=None,
        options={"response_format": "json"}, progress=False,
    )
    assert [r.index for r in records] == list(range(10))
    assert [Path(r.file).name for r in records] == [f"{i % 3}.wav" for i in range(10)]
    assert all(r.ok and r.text == "hello" and r.language == "en" for r in records)
    assert records[1].audio_duration_s == pytest.approx(0.5)
    assert records[0].bytes_sent > files[0].stat().st_size  # the multipart body around the file
    assert len(recorder.requests) == 10 and wall > 0
    summary = bulk_request.summarize(records, wall)
    assert summary["ok"] == 10 and summary["audio_s"] == pytest.approx(sum([0.25, 0.5, 0.75, 0.25, 0.5, 0.75, 0.25, 0.5, 0.75, 0.25]))


def test_bulk_run_load_by_duration_and_failures(recorder, tmp_path):
    recorder.answer = (503, b'{"code": 503, "type": "ServiceUnavailableException", "message": "Model \\"whisper\\" has no worker to serve inference request. Please use scale workers API to add workers."}', "application/json")
    records, wall = bulk_request.run_load(
        client.WhisperClient(recorder.url), [write_wav(tmp_path / "a.wav", 0.1)], concurrency=2, count=None,
        duration_s=0.3, options={}, progress=False,
    )
    assert records and all(r.status == 503 and "no worker" in r.error for r in records)
    assert 0.3 <= wall < 2


class FakeClock:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_request_train_fires_on_schedule(recorder, tmp_path):
    """Each request goes out at its planned time: the train sleeps exactly the gaps of the
    schedule (on its own clock, so a busy machine cannot make it look late)."""
    files = [write_wav(tmp_path / "a.wav", 0.1)]
    schedule = request_train.arrival_schedule(20, 0.5)
    clock = FakeClock()
    arrivals, wall = request_train.run_train(client.WhisperClient(recorder.url), files, schedule, options={},
                                             progress=False, clock=clock, sleep=clock.sleep)
    assert len(arrivals) == 10 and all(a.ok for a in arrivals) and len(recorder.requests) == 10
    assert [a.sent_at for a in arrivals] == [a.planned_at for a in arrivals] == schedule
    assert clock.slept == [0.05] * 9
    assert all(0 <= a.ttfb_s <= a.latency_s for a in arrivals)
    assert wall == pytest.approx(0.45)
    summary = request_train.summarize(arrivals, 0.5, wall)
    assert summary["offered_rate"] == 20 and summary["ok"] == 10


def test_request_train_counts_timeouts(tmp_path):
    """A server that accepts connections but never answers: every request times out, on time."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        c = client.WhisperClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
        arrivals, wall = request_train.run_train(c, [write_wav(tmp_path / "a.wav", 0.1)], [0.0, 0.1], options={}, progress=False)
    finally:
        listener.close()
    assert [a.status for a in arrivals] == ["timeout", "timeout"]
    assert wall < 3

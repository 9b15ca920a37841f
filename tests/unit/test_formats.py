"""render(): json fields, and srt/vtt parsed back with real subtitle libraries."""

import io
import json
import re
from datetime import timedelta

import pytest
import srt
import webvtt

from errors import AudioTooLong, InvalidOption
from formats import Segment, Transcript, Word, error_body, format_timestamp, render
from options import TranscriptionOptions

WORDS = [Word(" Hello", 0.0, 0.48, 0.9), Word(" world.", 0.5, 1.2, 0.8)]
SEGMENTS = [
    Segment(0, 0, 0.0, 1.2, " Hello world.", [50364, 2425, 1002, 13], 0.0, -0.21, 1.1, 0.01, WORDS),
    Segment(1, 3000, 59.999, 61.5, " Über die Brücke --> weiter.", [400], 0.2, -0.5, 1.3, 0.02, []),
    Segment(2, 3000, 3599.9996, 3725.25, " Line one\n\nline two", [401], 0.0, -0.3, 1.2, 0.03, None),
    Segment(3, 9000, 361_000.5, 361_002.0, " A hundred hours in.", [402], 0.0, -0.3, 1.2, 0.03, None),
]
TRANSCRIPT = Transcript(
    text=" Hello world. Über die Brücke --> weiter. Line one line two A hundred hours in.",
    language="en",
    duration=361_002.5,
    segments=SEGMENTS,
)
EMPTY = Transcript(text="", language="en", duration=3.0, segments=[])


def rendered(transcript, response_format, **kwargs):
    return render(transcript, TranscriptionOptions(response_format=response_format, **kwargs))


@pytest.mark.parametrize(
    "seconds, srt_text, vtt_text",
    [
        (0, "00:00:00,000", "00:00:00.000"),
        (1.2345, "00:00:01,234", "00:00:01.234"),  # (float 1.2345 is just under)
        (59.9996, "00:01:00,000", "00:01:00.000"),  # rounding carries into the minutes
        (3725.25, "01:02:05,250", "01:02:05.250"),
        (361_000.5, "100:16:40,500", "100:16:40.500"),  # hours > 99
        (-0.2, "00:00:00,000", "00:00:00.000"),
    ],
)
def test_format_timestamp(seconds, srt_text, vtt_text):
    assert format_timestamp(seconds, ",") == srt_text
    assert format_timestamp(seconds) == vtt_text


def test_json_is_the_default_shape():
    body, content_type = rendered(TRANSCRIPT, "json")
    assert content_type == "application/json"
    data = json.loads(body)
    assert set(data) == {"text", "language", "duration", "segments", "usage"}
    assert data["text"] == TRANSCRIPT.text and data["language"] == "en"
    assert data["usage"] == {"type": "duration", "seconds": 361_002.5}
    assert data["duration"] == 361_002.5
    assert data["segments"][0] == {"id": 0, "start": 0.0, "end": 1.2, "text": " Hello world."}
    assert data["segments"][2]["start"] == 3600.0  # rounded to milliseconds
    assert "Über" in body.decode("utf-8")  # UTF-8, not \u escapes


def test_verbose_json_matches_openai_fields():
    body, content_type = rendered(TRANSCRIPT, "verbose_json")
    assert content_type == "application/json"
    data = json.loads(body)
    assert {"task", "language", "duration", "text", "segments"} <= set(data)
    assert "words" not in data
    assert data["task"] == "transcribe"
    first = data["segments"][0]
    assert set(first) == {
        "id", "seek", "start", "end", "text", "tokens", "temperature",
        "avg_logprob", "compression_ratio", "no_speech_prob",
    }
    assert first["tokens"] == [50364, 2425, 1002, 13] and first["avg_logprob"] == -0.21
    assert data["segments"][1]["seek"] == 3000 and data["segments"][1]["temperature"] == 0.2


def test_verbose_json_words_when_asked():
    body, _ = rendered(TRANSCRIPT, "verbose_json", word_timestamps=True)
    words = json.loads(body)["words"]
    assert words == [
        {"word": " Hello", "start": 0.0, "end": 0.48},
        {"word": " world.", "start": 0.5, "end": 1.2},
    ]
    body, _ = rendered(EMPTY, "verbose_json", word_timestamps=True)
    assert json.loads(body)["words"] == []


def test_text():
    body, content_type = rendered(TRANSCRIPT, "text")
    assert content_type == "text/plain; charset=utf-8"
    assert body.decode("utf-8") == TRANSCRIPT.text.strip() + "\n"
    assert rendered(EMPTY, "text")[0] == b"\n"


def test_srt_round_trips_through_the_srt_library():
    body, content_type = rendered(TRANSCRIPT, "srt")
    assert content_type == "application/x-subrip"
    cues = list(srt.parse(body.decode("utf-8")))
    assert [c.index for c in cues] == [1, 2, 3, 4]
    assert [c.start for c in cues] == [
        timedelta(0), timedelta(seconds=59.999), timedelta(seconds=3600), timedelta(seconds=361_000.5)
    ]
    assert [c.end for c in cues] == [
        timedelta(seconds=1.2), timedelta(seconds=61.5), timedelta(seconds=3725.25), timedelta(seconds=361_002)
    ]
    assert [c.content for c in cues] == [
        "Hello world.", "Über die Brücke -> weiter.", "Line one line two", "A hundred hours in."
    ]


def test_vtt_round_trips_through_webvtt():
    body, content_type = rendered(TRANSCRIPT, "vtt")
    assert content_type == "text/vtt"
    assert body.startswith(b"WEBVTT\n\n")
    # The WebVTT spec allows hours of two or more digits; webvtt-py accepts only two, so
    # the 100-hour cue is checked against the spec's pattern and the rest parsed back.
    head, _, last = body.decode("utf-8").rpartition("\n\n100:")
    assert re.fullmatch(r"\d{2}:\d{2}\.\d{3} --> 100:16:42\.000\nA hundred hours in\.\n", last)
    cues = webvtt.from_buffer(io.StringIO(head + "\n")).captions
    assert [c.start for c in cues] == ["00:00:00.000", "00:00:59.999", "01:00:00.000"]
    assert [c.end for c in cues] == ["00:00:01.200", "00:01:01.500", "01:02:05.250"]
    assert [c.start_in_seconds for c in cues] == [0, 59, 3600]
    assert [c.text for c in cues] == ["Hello world.", "Über die Brücke -> weiter.", "Line one line two"]


def test_empty_transcript_gives_valid_empty_subtitles():
    body, _ = rendered(EMPTY, "srt")
    assert body == b"" and list(srt.parse("")) == []
    body, _ = rendered(EMPTY, "vtt")
    assert webvtt.from_buffer(io.StringIO(body.decode())).captions == []
    blank = Transcript(" ", "en", 2.0, [Segment(0, 0, 0.0, 2.0, "  ")])
    assert rendered(blank, "srt")[0] == b""
    assert json.loads(rendered(EMPTY, "json")[0])["segments"] == []


def test_error_body():
    err = InvalidOption("task", "Invalid task 'x'; allowed values: transcribe, translate.")
    assert json.loads(error_body(err)) == {
        "code": "invalid_option", "type": "invalid_request_error", "message": err.message
    }
    too_long = AudioTooLong("Audio is 20.0 s long; the limit is 10 s.")
    assert too_long.status == 413
    assert json.loads(error_body(too_long))["code"] == "audio_too_long"


@pytest.mark.parametrize("response_format", ["json", "verbose_json"])
def test_openai_routes_answer_language_names_and_usage(response_format):
    """OpenAI's whisper-1 says "english", not "en"; the native route keeps the ISO code."""
    openai = json.loads(render(TRANSCRIPT, TranscriptionOptions(response_format=response_format,
                                                                 openai_api=True))[0])
    native = json.loads(render(TRANSCRIPT, TranscriptionOptions(response_format=response_format))[0])
    assert (openai["language"], native["language"]) == ("english", "en")
    assert openai["usage"] == native["usage"] == {"type": "duration", "seconds": 361_002.5}
    assert isinstance(openai["duration"], float)
    assert all(isinstance(s["id"], int) for s in openai["segments"])

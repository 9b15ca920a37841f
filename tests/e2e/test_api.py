"""The request API end to end: options, formats, word timestamps, per-request errors."""

import concurrent.futures
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO
from scoring import normalize, score

pytestmark = pytest.mark.e2e

JFK = REPO / "samples" / "jfk.flac"
JFK_TEXT = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
WORD_TIMES = json.loads((REPO / "tests" / "data" / "jfk_word_times.json").read_text())["words"]


def post(service, path: Path = JFK, timeout=300, **fields) -> requests.Response:
    data = [(k, v) for k, value in fields.items() for v in (value if isinstance(value, list) else [value])]
    with open(path, "rb") as f:
        return requests.post(
            f"{service.url}/predictions/whisper", files={"file": (path.name, f)}, data=data, timeout=timeout
        )


def assert_error(response: requests.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"code", "type", "message"}, body
    for needle in needles:
        assert needle in body["message"], body
    return body


# --- formats -------------------------------------------------------------------------


def test_text_format(service):
    response = post(service, response_format="text")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert normalize(response.text, "en") == normalize(JFK_TEXT, "en")


def test_verbose_json(service):
    response = post(service, response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert {"task", "language", "duration", "text", "segments"} <= set(body)
    assert body["task"] == "transcribe" and body["language"] == "en"
    assert "words" not in body
    for segment in body["segments"]:
        assert {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                "compression_ratio", "no_speech_prob"} <= set(segment)
        assert segment["tokens"] and all(isinstance(t, int) for t in segment["tokens"])
        assert segment["avg_logprob"] <= 0 and 0 <= segment["no_speech_prob"] <= 1


def test_srt_parses_back(service):
    import srt

    response = post(service, response_format="srt")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/x-subrip"
    cues = list(srt.parse(response.text))
    assert cues
    assert normalize(" ".join(c.content for c in cues), "en") == normalize(JFK_TEXT, "en")
    ends = [c.end.total_seconds() for c in cues]
    assert all(c.start < c.end for c in cues) and ends == sorted(ends) and ends[-1] <= 11.5


def test_vtt_parses_back(service):
    import webvtt

    response = post(service, response_format="vtt")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/vtt"
    captions = webvtt.from_buffer(io.StringIO(response.text))
    assert normalize(" ".join(c.text for c in captions), "en") == normalize(JFK_TEXT, "en")
    assert all(c.start_in_seconds < c.end_in_seconds <= 11.5 for c in captions)


def test_word_timestamps_match_the_speech(service):
    response = post(service, response_format="verbose_json", **{"timestamp_granularities[]": ["word", "segment"]})
    assert response.status_code == 200, response.text
    body = response.json()
    words = body["words"]
    assert len(words) >= 20
    starts = [w["start"] for w in words]
    assert starts == sorted(starts), "word starts are not monotonic"
    assert all(w["start"] <= w["end"] for w in words)
    segments = body["segments"]
    for w in words:
        assert any(s["start"] - 0.01 <= w["start"] and w["end"] <= s["end"] + 0.01 for s in segments), w

    occurrences = {}
    found = []
    for w in words:
        key = re.sub(r"[^a-z]", "", w["word"].lower())
        found.append((key, occurrences.get(key, 0), w))
        occurrences[key] = occurrences.get(key, 0) + 1
    for expected in WORD_TIMES:
        matches = [w for key, n, w in found if key == expected["word"] and n == expected["occurrence"]]
        assert matches, f"word {expected['word']!r} #{expected['occurrence']} missing"
        for edge in ("start", "end"):
            if edge in expected:
                assert abs(matches[0][edge] - expected[edge]) <= 0.5, (expected, matches[0])


def test_word_timestamps_in_srt(service):
    """Word timings are usable for subtitles: srt with word granularity still parses."""
    import srt

    response = post(service, response_format="srt", timestamp_granularities="word")
    assert response.status_code == 200, response.text
    assert list(srt.parse(response.text))


def test_prompt_and_temperature_are_accepted(service):
    response = post(service, prompt="Kennedy inaugural address.", temperature="0")
    assert response.status_code == 200, response.text
    assert score(JFK_TEXT, response.json()["text"], "en").rate < 0.15


def test_sequential_mode_matches(service):
    response = post(service, mode="sequential")
    assert response.status_code == 200, response.text
    assert normalize(response.json()["text"], "en") == normalize(JFK_TEXT, "en")


def test_model_option(service):
    assert post(service, model="whisper-1").status_code == 200
    assert post(service, model=service.model).status_code == 200
    body = assert_error(post(service, model="large-v3"), 400, "large-v3")
    assert body["code"] == "model_not_found"


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, option",
    [
        ({"language": "xx"}, "language"),
        ({"temperature": "-1"}, "temperature"),
        ({"response_format": "docx"}, "response_format"),
        ({"task": "summarize"}, "task"),
        ({"colour": "blue"}, "colour"),
        ({"timestamp_granularities[]": "sentence"}, "timestamp_granularities"),
    ],
)
def test_bad_options_are_400_naming_the_option(service, fields, option):
    body = assert_error(post(service, **fields), 400, option)
    assert body["code"] == "invalid_option"


SHORT_SAMPLE = REPO / "samples" / "lj_speech_LJ002-0020.wav"  # 1.5 s
HOSTILE_VALUES = ["[" * 100_000 + "]" * 100_000, "NaN", "inf", "-1e309", "1" * 5000, "\u202e😀\x00", "",
                  '{"type": "server_vad", "threshold": [[[[1]]]]}', ["a", "b"]]


def test_hostile_option_values_get_a_200_or_a_4xx_with_a_code(service):
    """Every option, and a few names that are none, with nesting, sizes, NaN, unicode and
    duplicates: each answer is a transcript or a 4xx JSON error with a code, and the
    service still transcribes afterwards."""
    from options import OPTIONS

    outcomes = {}
    for name in [*OPTIONS, "chunking_strategy[threshold]", "include[]", "x" * 5000]:
        for k, value in enumerate(HOSTILE_VALUES):
            response = post(service, SHORT_SAMPLE, timeout=120, **{name: value})
            if response.status_code != 200:
                body = assert_error(response, response.status_code)
                assert 400 <= response.status_code < 500 and body["code"], (name[:20], k, body)
            outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
    print(f"\nhostile option values: {outcomes}")
    assert set(outcomes) <= {200, 400} and outcomes[400] > 0
    assert post(service, JFK).json()["text"].strip()


def test_two_audio_files_in_one_request_are_400(service):
    with open(JFK, "rb") as a, open(SHORT_SAMPLE, "rb") as b:
        response = requests.post(f"{service.url}/predictions/whisper", timeout=120,
                                 files=[("file", ("a.flac", a)), ("file", ("b.wav", b))])
    body = assert_error(response, 400, "one audio file per request")
    assert body["code"] == "multiple_files"


def test_english_only_model_refuses_translate(service):
    assert_error(post(service, task="translate"), 400, "translate")


def test_not_audio_is_400(service, tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("this is not audio\n" * 50)
    body = assert_error(post(service, junk), 400)
    assert body["code"] == "not_audio"


def test_empty_body_is_400(service):
    response = requests.post(
        f"{service.url}/predictions/whisper", data=b"", headers={"Content-Type": "audio/wav"}, timeout=60
    )
    assert response.status_code == 400, response.text


def test_zero_length_audio_is_400(service, tmp_path):
    import numpy as np
    import soundfile as sf

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype="float32"), 16000)
    body = assert_error(post(service, empty), 400)
    assert body["code"] == "zero_length_audio"


def test_one_bad_request_among_concurrent_good_ones(service, shared_audio, tmp_path):
    """Four requests sent at the same moment, one of them not audio: the bad one gets its
    400 without waiting for the others, the three good ones their own transcripts."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 64)
    good = [JFK, shared_audio / "librispeech/test-clean/2830-3980-0043.wav", shared_audio / "english/LJ002-0020.wav"]
    uploads = [good[0], junk, good[1], good[2]]
    barrier = threading.Barrier(len(uploads))

    def send(path):
        barrier.wait(timeout=60)
        response = post(service, path)
        return response, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
        results = list(pool.map(send, uploads))
    responses = [response for response, _ in results]
    body = assert_error(responses[1], 400)
    assert body["code"] == "not_audio", body
    for r in (responses[0], responses[2], responses[3]):
        assert r.status_code == 200, r.text
    texts = [r.json()["text"] for r in (responses[0], responses[2], responses[3])]
    assert normalize(texts[0], "en") == normalize(JFK_TEXT, "en")
    assert "experience" in normalize(texts[1], "en")
    assert "eighteen" in normalize(texts[2], "en") or "1813" in texts[2]
    # answered on its own, not held until its neighbours' transcription was done
    assert results[1][1] < max(done for _, done in results[:1] + results[2:])
    # and logged under its own request id
    log = (service.log_dir / "model_log.log").read_text()
    assert re.search(rf"request {re.escape(responses[1].headers['x-request-id'])}: 400 not_audio", log)


# --- the multilingual default model --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, language",
    [
        ("multilingual/de_picovoice.wav", "de"),
        ("multilingual/es_picovoice.wav", "es"),
        ("multilingual/fr_picovoice.wav", "fr"),
        ("multilingual/zh_aishell_BAC009S0724W0121.wav", "zh"),
        ("multilingual/ja_cv_24511055.mp3", "ja"),
    ],
)
def test_language_detection(base_service, shared_audio, name, language):
    response = post(base_service, shared_audio / name)
    assert response.status_code == 200, response.text
    assert response.json()["language"] == language


@pytest.mark.slow
def test_translate_to_english(base_service, shared_audio):
    response = post(base_service, shared_audio / "multilingual/es_picovoice.wav", task="translate")
    assert response.status_code == 200, response.text
    text = normalize(response.json()["text"], "en")
    # "The sands are whitish of medium grain and have very little assistance."
    assert "sand" in text, text
    assert not any(w in text.split() for w in ("las", "arenas", "son", "tiene")), text


@pytest.mark.slow
def test_language_option_forces_the_language(base_service, shared_audio):
    response = post(base_service, shared_audio / "multilingual/de_picovoice.wav", language="de", response_format="verbose_json")
    assert response.status_code == 200, response.text
    assert response.json()["language"] == "de"
    assert "portal" in response.json()["text"].lower()

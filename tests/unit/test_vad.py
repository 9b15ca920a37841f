"""Voice activity detection: vad.py (Silero VAD's ONNX model, from the installed silero-vad
package) on real speech and generated non-speech, and the engine with it on tiny.en:
silence, noise and music are not decoded at all (engine.stats counts the windows), a long
gap between two clips loses no words against vad_filter=false, a silent tail is not
decoded and nothing starts past the end, and a short run of scripts/hallucination_check.py
finds no invented word. Also the other accuracy options of issue 11 in the engine:
condition_on_previous_text and hallucination_silence_threshold.
"""

import os
import subprocess
import sys
import threading
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest

from conftest import PYTHON, REPO, SHARED_AUDIO as AUDIO

from audio import decode_audio  # noqa: E402
import vad as vad_module  # noqa: E402
from vad import SAMPLE_RATE, SileroVad, VadOptions  # noqa: E402

import hallucination_check as check  # noqa: E402  (scripts/)

JFK = "jfk/jfk.flac"  # 11.0 s, speech from about 0.3 s to 10.5 s
LIBRI = "librispeech/test-clean/1089-134686-0000.flac"  # 10.4 s
OSR = "english/OSR_us_000_0034_8k.wav"  # 35.5 s: ten sentences, pauses of about a second


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


@lru_cache(maxsize=None)
def load(name):
    if not (AUDIO / name).exists():
        pytest.skip(f"shared audio missing: {AUDIO / name}")
    return decode_audio((AUDIO / name).read_bytes()).samples


def seconds(spans):
    return [(round(a / SAMPLE_RATE, 2), round(b / SAMPLE_RATE, 2)) for a, b in spans]


# ---------------------------------------------------------------- vad.py


def test_the_model_is_the_onnx_file_inside_the_installed_package(vad):
    import silero_vad

    package = os.path.dirname(silero_vad.__file__)
    assert vad.model_path == os.path.join(package, "data", "silero_vad.onnx")
    assert os.path.exists(vad.model_path)
    assert [i.name for i in vad.session.get_inputs()] == ["input", "state", "sr"]


def test_loading_it_keeps_torchs_thread_count():
    # importing silero_vad sets torch's threads to 1; the engine sizes them for Whisper
    code = ("import sys, torch; sys.path.insert(0, 'handler'); torch.set_num_threads(2); "
            "from vad import SileroVad; SileroVad(); print(torch.get_num_threads())")
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"


def test_speech_of_a_real_recording_is_one_span(vad):
    spans = seconds(vad.speech(load(JFK)))
    assert len(spans) == 1  # its pauses are shorter than min_silence_duration_ms
    (start, end), = spans
    assert start < 0.6 and end > 10.4


def test_a_pause_between_two_recordings_is_found(vad):
    audio = np.concatenate([load(JFK), np.zeros(10 * SAMPLE_RATE, np.float32), load(LIBRI)])
    spans = seconds(vad.speech(audio))
    assert spans[0][0] < 0.6 and spans[-1][1] > 31.0
    assert not any(a < 20.0 and b > 12.0 for a, b in spans), spans  # nothing in the pause
    assert sum(b - a for a, b in spans) > 19.0


def test_spans_are_sorted_disjoint_and_inside_the_audio(vad):
    audio = load(OSR)
    spans = vad.speech(audio, VadOptions(min_silence_duration_ms=300, speech_pad_ms=30))
    assert len(spans) >= 8  # the sentences, one by one
    assert all(0 <= a < b <= len(audio) for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


def test_options_change_the_spans(vad):
    audio = load(OSR)
    default = vad.speech(audio)
    assert len(default) == 1  # pauses under 2 s do not end a span
    covered = lambda spans: sum(b - a for a, b in spans)  # noqa: E731
    tight = vad.speech(audio, VadOptions(speech_pad_ms=0, min_silence_duration_ms=300))
    assert covered(tight) < 0.8 * covered(default)
    strict = vad.speech(audio, VadOptions(threshold=0.95, speech_pad_ms=0, min_silence_duration_ms=300))
    assert covered(strict) < covered(tight)
    # a span shorter than min_speech_duration_ms is dropped
    assert vad.speech(load(JFK), VadOptions(min_speech_duration_ms=20_000)) == []


@pytest.mark.parametrize("name, make", [
    ("silence", lambda: check.silence(20)),
    ("white noise -60 dB", lambda: check.white_noise(20, 0.001)),
    ("white noise -40 dB", lambda: check.white_noise(20, 0.01)),
    ("white noise -20 dB", lambda: check.white_noise(20, 0.1)),
    ("white noise -10 dB", lambda: check.white_noise(20, 0.3)),
    ("rumble", lambda: check.rumble(20)),
    ("clicks", lambda: check.clicks(20)),
    ("chords", lambda: check.chords(20)),
])
def test_generated_non_speech_has_no_speech(vad, name, make):
    assert vad.speech(make()) == []


def test_probabilities_per_32_ms_frame_and_edge_lengths(vad):
    assert vad.probabilities(np.zeros(1000, np.float32)).shape == (2,)
    assert vad.speech(np.zeros(0, np.float32)) == [] and vad.speech(np.zeros(100, np.float32)) == []
    probs = vad.probabilities(load(JFK))
    assert probs.shape == (-(-len(load(JFK)) // 512),) and probs.max() > 0.9


def test_a_long_file_in_rows_decides_as_in_one_row(vad, monkeypatch):
    # OSR, a pause, JFK, a pause, OSR: 86 s, three rows of 30 s
    pause = np.zeros(2 * SAMPLE_RATE, np.float32)
    audio = np.concatenate([load(OSR), pause, load(JFK), pause, load(OSR)])
    rows = vad.probabilities(audio)
    with monkeypatch.context() as m:
        m.setattr(vad_module, "ROW_FRAMES", 10**9)
        one_row = vad.probabilities(audio)
    assert rows.shape == one_row.shape and len(rows) > 2 * vad_module.ROW_FRAMES
    moved = int(((rows >= 0.5) != (one_row >= 0.5)).sum())
    assert moved <= 0.01 * len(rows), moved
    assert not np.array_equal(rows, one_row), "the rows ran on their own states"
    options = dict(sampling_rate=SAMPLE_RATE, audio_length_samples=len(audio), min_silence_duration_ms=300)
    spans, expected = (vad._to_spans(p.tolist(), **options) for p in (rows, one_row))
    assert len(spans) == len(expected) > 10  # the sentences, one span each
    for got, want in zip(spans, expected):  # edges within two 32 ms frames
        assert abs(got["start"] - want["start"]) <= 1024 and abs(got["end"] - want["end"]) <= 1024


def test_one_instance_serves_threads_at_once(vad):
    audios = [load(JFK), load(OSR), load(LIBRI), load(OSR)]
    alone = [vad.speech(a, VadOptions(min_silence_duration_ms=300)) for a in audios]
    together = [None] * len(audios)

    def run(k):
        together[k] = vad.speech(audios[k], VadOptions(min_silence_duration_ms=300))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(audios))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


# ---------------------------------------------------------------- the engine with VAD


whisper = pytest.importorskip("whisper")

from engine import Engine, EngineConfig  # noqa: E402
from options import TranscriptionOptions  # noqa: E402
from scoring import score  # noqa: E402

OFF = TranscriptionOptions(vad_filter=False)


@pytest.fixture(scope="module")
def engine(tiny_en_model):
    e = Engine(tiny_en_model, EngineConfig(cpu_bf16=False))
    yield e
    e.close()


def run(engine, audio, options=TranscriptionOptions()):
    """The transcript and what the engine counted for it."""
    before = dict(engine.stats)
    transcript = engine.transcribe([(audio, options)])[0]
    counted = {k: engine.stats[k] - before[k]
               for k in ("encoder_windows", "decoded_windows", "vad_skipped_windows", "vad_skipped_audio_s")}
    return transcript, counted


@pytest.mark.parametrize("make", [lambda: check.silence(60), lambda: check.white_noise(60, 0.1),
                                  lambda: check.chords(60)], ids=["silence", "white noise", "chords"])
def test_non_speech_is_not_decoded_at_all(engine, make):
    transcript, counted = run(engine, make())
    assert transcript.text == "" and transcript.segments == []
    assert counted["encoder_windows"] == counted["decoded_windows"] == 0
    assert counted["vad_skipped_windows"] == 1 and counted["vad_skipped_audio_s"] == pytest.approx(60.0, abs=0.02)


def test_without_vad_the_same_silence_is_decoded(engine):
    _, counted = run(engine, check.silence(60), OFF)
    assert counted["decoded_windows"] >= 2 and counted["vad_skipped_windows"] == 0


def test_a_long_noise_gap_is_skipped_and_no_word_lost(engine, manifest):
    first, second = load(JFK), load(LIBRI)
    gap = check.white_noise(60, 0.01, seed=3)
    audio = np.concatenate([first, gap, second])
    reference = f"{manifest[JFK]['reference_transcript']} {manifest[LIBRI]['reference_transcript']}"
    with_vad, counted = run(engine, audio, TranscriptionOptions(word_timestamps=True))
    without, counted_off = run(engine, audio, replace(OFF, word_timestamps=True))
    # each clip is one window; the seek jumps over the gap once
    assert counted["decoded_windows"] == 2 and counted["vad_skipped_windows"] == 1
    assert counted["vad_skipped_audio_s"] > 55 and counted_off["decoded_windows"] >= 3
    on, off = score(reference, with_vad.text), score(reference, without.text)
    assert on.deletions <= off.deletions and on.errors <= off.errors, (with_vad.text, without.text)
    assert on.rate < 0.1
    gap_start, gap_end = len(first) / SAMPLE_RATE + 1, (len(first) + len(gap)) / SAMPLE_RATE - 1
    words = [w for s in with_vad.segments for w in s.words]
    assert not [w for w in words if gap_start < (w.start + w.end) / 2 < gap_end]


def test_a_silent_tail_is_not_decoded_and_nothing_starts_past_the_end(engine):
    audio = np.concatenate([load(JFK), check.silence(40)])
    transcript, counted = run(engine, audio)
    assert counted["decoded_windows"] == 1 and counted["vad_skipped_windows"] == 1
    assert counted["vad_skipped_audio_s"] > 39
    assert transcript.segments and all(s.end <= 11.5 for s in transcript.segments)
    assert "country" in transcript.text


def test_sequential_mode_transcribes_only_the_runs_of_speech(engine):
    # JFK, 60 s of noise, JFK again: whisper.transcribe gets the two runs as clip_timestamps
    jfk = load(JFK)
    audio = np.concatenate([jfk, check.white_noise(60, 0.01, seed=3), jfk])
    sequential = TranscriptionOptions(mode="sequential", word_timestamps=True)
    with_vad = engine.transcribe([(audio, sequential)])[0]
    gap_start, gap_end = len(jfk) / SAMPLE_RATE + 1, len(jfk) / SAMPLE_RATE + 59
    words = [w for s in with_vad.segments for w in s.words]
    assert with_vad.text.count("country") == 4 and words
    assert not [w for w in words if gap_start < (w.start + w.end) / 2 < gap_end]
    assert not [s for s in with_vad.segments if gap_start < s.start < gap_end]
    # non-speech alone is not decoded at all
    silence = engine.transcribe([(check.chords(60), replace(sequential, word_timestamps=False))])[0]
    assert silence.text == "" and silence.segments == [] and silence.duration == pytest.approx(60.0)


def test_vad_runs_in_the_submitting_thread(engine):
    before = engine.stats["vad_s"]
    with engine._cond:  # the engine thread cannot take the request meanwhile
        future = engine.submit(load(OSR), TranscriptionOptions())
        assert engine.stats["vad_s"] > before and not future.done()
    assert future.result().text


def test_the_requests_vad_options_are_used(engine):
    # threshold 1: no frame is speech, so not even JFK is decoded
    options = TranscriptionOptions(vad=VadOptions(threshold=1.0))
    transcript, counted = run(engine, load(JFK), options)
    assert transcript.text == "" and counted["decoded_windows"] == 0 and counted["vad_skipped_windows"] == 1


def test_speech_transcribes_the_same_with_and_without_vad(engine):
    # OSR's pauses are short: VAD changes no window
    on, counted = run(engine, load(OSR))
    off, _ = run(engine, load(OSR), OFF)
    assert on.text == off.text and counted["vad_skipped_windows"] == 0


def test_condition_on_previous_text_reaches_the_streams(engine):
    with engine._cond:  # both in the same step
        off = TranscriptionOptions(condition_on_previous_text=False)
        futures = [engine.submit(load(JFK), off, request_id="off"),
                   engine.submit(load(JFK), TranscriptionOptions(), request_id="default")]
        engine.scheduler_add = engine.scheduler.add
        seen = set()

        def add(request, sharing=1):
            engine.scheduler_add(request, sharing)
            seen.update((request.id, s.condition_on_previous_text) for s in request.streams)

        engine.scheduler.add = add
    try:
        assert futures[0].result().text == futures[1].result().text
    finally:
        del engine.scheduler.add
    assert seen == {("off", False), ("default", True)}  # the default: EngineConfig's, whisper's


def test_hallucination_silence_threshold_drops_what_whisper_invents_in_faint_noise(engine):
    # without VAD, tiny.en writes a run of dots into 60 s of -60 dB noise (its greedy
    # windows fail the checks; with seed 1 a sampled one is kept); the silence threshold
    # finds them (improbable, instant words between silences) and skips them
    noise = check.white_noise(60, 0.001)
    plain, _ = run(engine, noise, replace(OFF, seed=1))
    assert plain.text.strip()
    skipped, counted = run(engine, noise, replace(OFF, seed=1, hallucination_silence_threshold=2.0))
    assert skipped.text.strip() == "" and not [s for s in skipped.segments if s.text.strip()]
    assert counted["decoded_windows"] > 2  # it seeks on in small steps past each suspect
    # the words were computed for the check, not answered
    speech, _ = run(engine, load(JFK), TranscriptionOptions(hallucination_silence_threshold=2.0))
    assert "country" in speech.text and all(s.words is None for s in speech.segments)


# ---------------------------------------------------------------- hallucination_check.py, short


def test_hallucination_check_short_finds_no_invented_words(engine, shared_audio):
    names = ["silence", "white-60dB", "white-20dB", "rumble", "clicks", "chords", "speech-tail",
             "speech-past-window"]
    results = [check.run_engine_case(engine, case, {})
               for case in check.cases(shared_audio, seconds=20, only=names)]
    assert [r.case for r in results] == names
    assert {r.case: r.invented for r in results if r.invented} == {}
    assert {r.case: r.past_end for r in results if r.past_end} == {}
    assert all(r.wer < 0.1 for r in results if r.wer is not None)


def test_hallucination_check_help():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "hallucination_check.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--engine" in out.stdout and "speech-gap" in out.stdout

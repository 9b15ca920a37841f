"""The continuous-batching engine on real speech with tiny.en.

Accuracy: the same text as openai-whisper's transcribe, bf16 close to fp32, a long
request cut into streams loses and repeats nothing, silence stays silent, word times are
ordered. Scheduling (a step starts windows in the free places of the decode batch and
decodes every running window a chunk of tokens further): arrivals join the next step,
short requests are not held back by a long one, a failing window fails only its request,
out-of-memory errors split the work and lower the window budget, sampling does not depend
on the neighbours, segments are streamed in order, admission refuses beyond its cap,
close stops the thread.

Several tests submit requests while holding the engine's condition (`together`): it is
reentrant, and the engine thread cannot take its inbox meanwhile, so all of them are
admitted in the same step.
"""

import threading
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import SHARED_AUDIO as AUDIO

whisper = pytest.importorskip("whisper")

from audio import decode_audio  # noqa: E402
from engine import Engine, EngineConfig, model_runner  # noqa: E402
from errors import InternalError, OutOfMemory  # noqa: E402
from fault_runner import FaultInjectingRunner  # noqa: E402
from options import TranscriptionOptions  # noqa: E402
from scoring import normalize  # noqa: E402
from windows import Thresholds  # noqa: E402

JFK = "jfk/jfk.flac"  # 11 s, one window
OSR = "english/OSR_us_000_0034_8k.wav"  # 35.5 s, two windows
LONG = "long/librispeech_concat_16k.flac"  # 141.5 s, five or more windows
SHORT = ["english/LDC93S1.wav", "english/LJ002-0020.wav", "librispeech/test-clean/2830-3980-0043.wav",
         "librispeech/test-clean/61-70968-0000.flac"]  # 2.9, 1.5, 2.0, 4.9 s
FP32 = dict(cpu_bf16=False)
OPTIONS = TranscriptionOptions()


@pytest.fixture(scope="module")
def model(tiny_en_model):
    return tiny_en_model


@pytest.fixture(scope="module")
def engine(model):
    """The shared fp32 engine for the tests that need no special configuration."""
    e = Engine(model, EngineConfig(**FP32))
    yield e
    e.close()


@contextmanager
def closing(model, oom_above_windows=0, **config):
    config = EngineConfig(**{**FP32, **config})
    runner = None
    if oom_above_windows:
        runner = FaultInjectingRunner(model_runner(model, config.resolved(model.dims)), oom_above_windows)
    e = Engine(model, config, runner=runner)
    try:
        yield e
    finally:
        e.close()


@lru_cache(maxsize=None)
def load(name):
    return decode_audio((AUDIO / name).read_bytes()).samples


def words(text):
    return normalize(text, "en").split()


@contextmanager
def together(engine):
    """Submissions inside this block are admitted in the same step."""
    with engine._cond:
        yield


def submit_together(engine, requests, **kwargs):
    with together(engine):
        return [engine.submit(audio, options, **kwargs) for audio, options in requests]


_alone = {}


def alone(engine, name):
    """The file's text decoded alone by the shared fp32 engine (the reference)."""
    if name not in _alone:
        _alone[name] = engine.transcribe([(load(name), OPTIONS)])[0].text
    return _alone[name]


class Steps:
    """The engine's step reports, and the step count at which each future resolved."""

    def __init__(self, engine):
        self.engine = engine
        self._reports = []

    @property
    def reports(self):
        while not self.engine.reports.empty():
            self._reports.append(self.engine.reports.get_nowait())
        return self._reports

    def done_at(self, future):
        box = {}
        future.add_done_callback(lambda f: box.setdefault("step", self.engine.stats["steps"]))
        return box


# ---------------------------------------------------------------------------- accuracy


def test_batched_equals_sequential_on_real_speech(engine):
    # fp32 like transcribe on cpu: the same tokens, window by window
    audios = [load(JFK), load(OSR)]
    before = dict(engine.stats)
    batched = [f.result() for f in submit_together(engine, [(a, OPTIONS) for a in audios])]
    assert engine.stats["encoder_windows"] - before["encoder_windows"] >= 3  # 1 + 2 windows
    sequential = engine.transcribe([(a, TranscriptionOptions(mode="sequential")) for a in audios])
    _alone.setdefault(JFK, batched[0].text)
    _alone.setdefault(OSR, batched[1].text)
    for b, s in zip(batched, sequential):
        assert b.text == s.text
        assert b.language == "en" and b.segments
        assert [(x.start, x.end) for x in b.segments] == [(x.start, x.end) for x in s.segments]
        seg = b.segments[0]
        assert seg.avg_logprob < 0 and 0 <= seg.no_speech_prob <= 1 and seg.compression_ratio > 0


def test_bf16_on_cpu_stays_close_to_fp32(engine, model):
    fp32 = alone(engine, OSR)
    with closing(model, cpu_bf16=True) as bf16_engine:
        assert bf16_engine.config.precision == "bf16" and bf16_engine.runner.dtype == torch.bfloat16
        bf16 = bf16_engine.transcribe([(load(OSR), OPTIONS)])[0].text
    assert next(model.parameters()).dtype == torch.float32  # the loaded model was not cast
    ref, got = words(fp32), words(bf16)
    assert abs(len(ref) - len(got)) <= 2
    assert sum(a != b for a, b in zip(ref, got)) <= max(2, len(ref) // 20)


@pytest.fixture(scope="module")
def two_utterances(model):
    """Two utterances with a 1 s pause (28.7 s), and its transcript cut at the pause into two
    streams decoded side by side (with the steps' reports)."""
    audio = np.concatenate([load(JFK), np.zeros(16000, dtype=np.float32),
                            load("librispeech/test-clean/1221-135766-0001.wav")])
    with closing(model, split_long=True, min_stream_seconds=12) as e:
        steps = Steps(e)
        cut = e.transcribe([(audio, OPTIONS)])[0]
        e.wait_idle()
        windows = e.stats["encoder_windows"]
        reports = steps.reports
    return audio, cut, reports, windows


def test_long_request_cut_into_streams_loses_and_repeats_nothing(engine, two_utterances):
    audio, cut, reports, _ = two_utterances
    whole = engine.transcribe([(audio, OPTIONS)])[0]
    assert reports[0].windows == 2 and reports[0].streams <= 2  # two streams side by side
    assert words(cut.text) == words(whole.text)
    starts = [s.start for s in cut.segments]
    assert starts == sorted(starts) and [s.id for s in cut.segments] == list(range(len(starts)))


def test_silence_and_low_noise_give_no_invented_text(engine):
    rng = np.random.default_rng(0)
    silent = np.zeros(16000 * 8, dtype=np.float32)
    noise = (0.001 * rng.standard_normal(16000 * 8)).astype(np.float32)
    out = engine.transcribe([(silent, OPTIONS), (noise, OPTIONS)])
    assert out[0].text.strip() == "" and not any(s.text.strip() for s in out[0].segments)
    assert len(words(out[1].text)) <= 2


def test_word_timestamps_are_monotonic_and_inside_segments(engine):
    (t,) = engine.transcribe([(load(OSR), TranscriptionOptions(word_timestamps=True))])
    last, n = 0.0, 0
    for s in t.segments:
        for w in s.words:
            assert s.start - 0.01 <= w.start <= w.end <= s.end + 0.01
            assert w.start >= last - 0.01
            last = w.end
            n += 1
    assert n > 30


def test_words_of_windows_ending_in_one_step_are_timed_together(engine):
    before = dict(engine.stats)
    jfk = load(JFK)
    with together(engine):  # both arrive before the loop looks: they start, and end, in one step
        futures = [engine.submit(a, TranscriptionOptions(word_timestamps=True)) for a in (jfk, jfk.copy())]
    out = [f.result() for f in futures]
    assert engine.stats["word_timed_windows"] - before["word_timed_windows"] == 2
    assert engine.stats["word_timing_calls"] - before["word_timing_calls"] == 1
    assert out[0].segments[0].words == out[1].segments[0].words and out[0].segments[0].words


def test_a_failing_word_timing_call_is_retried_window_by_window(engine, model):
    """A batched word-timing call that raises is retried one window at a time: the window
    that fails alone fails its request, the other gets its words as usual."""
    words_on = TranscriptionOptions(word_timestamps=True)
    jfk = load(JFK)
    (expected,) = engine.transcribe([(jfk, words_on)])
    calls = []
    with closing(model) as e:
        original = e.runner.add_word_timestamps

        def failing(windows):
            calls.append(len(windows))
            if len(windows) > 1 or len(calls) == 3:  # the batch, then the second window alone
                raise ValueError("bad alignment")
            return original(windows)

        e.runner.add_word_timestamps = failing
        with together(e):
            futures = [e.submit(a, words_on) for a in (jfk, jfk.copy())]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=60))
            except InternalError as error:
                assert "word timestamps failed" in error.message and "bad alignment" in error.message
                outcomes.append(None)
        assert calls == [2, 1, 1] and e.stats["failed_requests"] == 1
    (ok,) = [t for t in outcomes if t is not None]
    assert [s.words for s in ok.segments] == [s.words for s in expected.segments] and ok.segments[0].words


# ---------------------------------------------------------------------------- scheduling


def test_short_requests_are_not_held_back_by_a_long_one(engine, model):
    # two pieces of about 70 s (three or four windows each) fill both places of the decode
    # batch; a place that frees up while short requests wait must go to one of them (the long
    # one already holds a window), not to the long one's next window
    with closing(model, window_budget=2, split_long=True, min_stream_seconds=30) as e:
        steps = Steps(e)
        long = e.submit(load(LONG), OPTIONS)
        shorts = [e.submit(load(n), OPTIONS) for n in SHORT[:3]]
        done, unfinished_pieces = [steps.done_at(f) for f in shorts], []
        for f in shorts:
            f.add_done_callback(lambda _: unfinished_pieces.append(e.load()["streams"]))
        texts = [f.result(timeout=120).text for f in shorts]
        assert not long.done()  # the rest of it is not needed here: close() drops it
        reports = steps.reports
    assert max(r.windows for r in reports) <= 2
    assert reports[0].windows == 2  # the long one's two pieces
    freed = next(r.step for r in reports if r.ended)  # the first step in which one of them ended
    last = max(d["step"] for d in done)
    # each short one starts as soon as a place frees up (about four steps each)
    assert last <= freed + 4 * len(shorts), (freed, done)
    assert unfinished_pieces[-1] == 2  # when the last one is done, neither piece of the long one is
    assert texts == [alone(engine, n) for n in SHORT[:3]]


def test_out_of_memory_step_is_split_and_lowers_the_budget(engine, model):
    # the injected limit is one window in the decode batch: two windows starting together
    # fail, the halves are tried, and the second half fails beside the first one's window
    # in the batch; that is not "alone", so its request must not get a 507
    names = [JFK] + SHORT[:3]
    with closing(model, oom_above_windows=1, window_budget=4) as e:
        futures = submit_together(e, [(load(n), OPTIONS) for n in names])
        texts = [f.result(timeout=120).text for f in futures]
        assert e.stats["oom_splits"] >= 1 and e.window_budget == 1
        assert e.stats["failed_requests"] == 0 and e.runner.injected >= 1
    assert texts == [alone(engine, n) for n in names]


def test_out_of_memory_for_one_window_alone_is_507(model):
    with closing(model) as e:
        encode = e.runner.encode

        def oom(mels):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

        e.runner.encode = oom
        future = e.submit(load(SHORT[1]), OPTIONS)
        with pytest.raises(OutOfMemory) as raised:
            future.result(timeout=60)
        assert raised.value.status == 507
        assert e.stats["oom_splits"] == 1 and e.stats["failed_requests"] == 1
        e.runner.encode = encode
        assert e.transcribe([(load(SHORT[1]), OPTIONS)])[0].text.strip()


def test_cuts_of_a_long_request_do_not_depend_on_the_current_window_budget(model, two_utterances):
    # a request's pieces come from the configured budget (its share of it), not from the
    # current one, which an out-of-memory error lowers for good
    audio, before, _, windows = two_utterances
    with closing(model, split_long=True, min_stream_seconds=12) as e:
        e.scheduler.window_budget = 1  # what an out-of-memory error on two windows leaves
        after = e.transcribe([(audio, OPTIONS)])[0]
        assert e.stats["encoder_windows"] == windows  # cut into the same two pieces
    assert after.text == before.text
    assert [(s.start, s.end) for s in after.segments] == [(s.start, s.end) for s in before.segments]


def test_the_cuda_layout_on_cpu_transcribes_a_long_file_as_fp32(engine, model):
    """fp16 weights, activations and LayerNorms (the engine's cuda layout, here behind
    cpu_fp16_layout): the long file's segments are fp32's, token for token."""
    audio = load(LONG)
    fp32 = engine.transcribe([(audio, OPTIONS)])[0]
    with closing(model, cpu_fp16_layout=True) as e:
        assert {p.dtype for p in e.runner.model.parameters()} == {torch.float16}
        half = e.transcribe([(audio, OPTIONS)])[0]
    assert [s.tokens for s in half.segments] == [s.tokens for s in fp32.segments]
    assert len(fp32.segments) > 10


def test_long_requests_arriving_together_share_the_budget_in_pieces(model, two_utterances):
    audio, alone, _, _ = two_utterances  # alone: two pieces
    with closing(model, split_long=True, min_stream_seconds=12, window_budget=2) as e:
        steps = Steps(e)
        with e._cond:  # both arrive before the loop looks
            futures = [e.submit(audio, OPTIONS), e.submit(audio.copy(), OPTIONS)]
        texts = [f.result().text for f in futures]
        reports = steps.reports
    assert reports[0].streams == 2  # one piece each: the two places of the budget
    assert texts[0] == texts[1] and words(texts[0]) == words(alone.text)


def test_sampling_does_not_depend_on_the_neighbours(model):
    # every window fails the compression check, so each is sampled at 0.6 and then again at
    # 1.0 (keeping its encoder output), and the more probable sample is kept
    schedule = (0.6, 1.0)
    sampled = TranscriptionOptions(temperature=schedule, seed=0)
    target = load(SHORT[0])  # 2.9 s; tiny.en's samples of it differ between seeds
    with closing(model, thresholds=Thresholds(compression_ratio=0.0)) as e:
        first = e.transcribe([(target, sampled)])[0]
        assert {k: e.stats[k] for k in ("encoder_windows", "decoded_windows", "fallback_windows")} == {
            "encoder_windows": 1, "decoded_windows": 2, "fallback_windows": 1}
        assert first.segments and all(s.temperature in schedule for s in first.segments)
        neighbours = [(load(SHORT[1 + i % 2]), TranscriptionOptions(temperature=(0.6,), seed=i)) for i in range(8)]
        crowd = submit_together(e, [(target, sampled)] + neighbours)
        among = crowd[0].result(timeout=120)
        for f in crowd[1:]:
            f.result(timeout=120)
        after = e.transcribe([(target, sampled)])[0]  # after that sampled traffic
        assert first.text == among.text == after.text
        assert [s.temperature for s in first.segments] == [s.temperature for s in after.segments]


def test_segments_are_streamed_in_order_before_the_answer(engine):
    submission = engine.submit(load(OSR), OPTIONS)
    arrivals = []  # (step of the engine when the batch was put, segments)
    k = 0
    while True:
        batch = submission.segments.get(k)
        batch.add_done_callback(lambda f: arrivals.append((engine.stats["steps"], f.result())))
        if batch.result(timeout=120) is None:
            break
        k += 1
    transcript = submission.result(timeout=120)
    batches = [(step, b) for step, b in arrivals if b]
    segments = [s for _, b in batches for s in b]
    assert len(batches) >= 2  # one batch per decoded window (two windows)
    assert [s.id for s in segments] == list(range(len(transcript.segments)))
    assert "".join(s.text for s in segments) == transcript.text
    assert [(s.start, s.end, s.text) for s in segments] == [(s.start, s.end, s.text) for s in transcript.segments]
    assert batches[0][0] < batches[-1][0]  # the first window's segments came steps before the last's


def test_sequential_mode_runs_beside_the_batched_loop(model):
    """A mode=sequential request runs on its own worker: a batched request sent while it is
    held inside whisper's transcribe is answered, and the engine loop kept stepping."""
    with closing(model) as e:
        entered, release = threading.Event(), threading.Event()
        transcribe = e.sequential.model.transcribe

        def held(*args, **kwargs):
            entered.set()
            assert release.wait(60)
            return transcribe(*args, **kwargs)

        e.sequential.model.transcribe = held
        try:
            sequential = e.submit(load(JFK), TranscriptionOptions(mode="sequential"))
            assert entered.wait(60)
            batched = e.submit(load(SHORT[0]), OPTIONS)
            assert batched.result(timeout=120).text == alone(e, SHORT[0])
            assert not sequential.done() and e.stats["steps"] > 0
        finally:
            release.set()
            del e.sequential.model.transcribe
        assert sequential.result(timeout=120).text == alone(e, JFK)
        assert sequential.segments.all()  # its segments came, all at once


def test_sequential_mode_and_the_engine_decode_on_models_of_their_own(model):
    """whisper's decode installs hooks on the decoder's attention layers while it runs: a
    model shared with the engine broke the engine's steps (shapes of whisper's kv cache).
    Both decoding at the same time give their own right answers."""
    with closing(model) as e:
        assert e.sequential.model is not e.runner.model
        long, short = load(LONG), load(SHORT[3])
        sequential = e.submit(long, TranscriptionOptions(mode="sequential"))
        batched = [e.submit(short, OPTIONS) for _ in range(6)]  # while the long one decodes
        texts = [b.result(timeout=300).text for b in batched]
        assert texts == [alone(e, SHORT[3])] * 6
        assert words(sequential.result(timeout=300).text)[-3:] == ["welcome", "his", "gospel"]


def test_close_stops_the_thread(model):
    e = Engine(model, EngineConfig(**FP32))
    assert e._thread.is_alive()
    e.close()
    assert not e._thread.is_alive()
    assert not any(t.name == "whisper-engine" and t is e._thread for t in threading.enumerate())


# ---------------------------------------------------------------------------- window_mode "pauses"


def test_pauses_mode_decodes_a_files_chunks_side_by_side_as_text(engine, model, manifest):
    from whisper.tokenizer import get_tokenizer

    from scoring import score
    from windows import MAX_SEGMENT_S

    audio = load(LONG)
    with closing(model, window_mode="pauses") as e:
        steps = Steps(e)
        (t,) = e.transcribe([(audio, OPTIONS)])
        reports = steps.reports
        stats = dict(e.stats)
    chunks = reports[0].streams
    # a window per chunk, and one more where the decoder ended a chunk early (the rest of it)
    assert chunks >= 5 and chunks <= stats["encoder_windows"] <= chunks + 2
    assert max(r.windows for r in reports) >= 3  # chunks of the one file decode side by side
    assert stats["word_timed_windows"] == stats["encoder_windows"]  # every window's words, to cut segments
    timestamp_begin = get_tokenizer(False).timestamp_begin
    assert all(token < timestamp_begin for s in t.segments for token in s.tokens)  # text only
    assert [s.id for s in t.segments] == list(range(len(t.segments))) and len(t.segments) > chunks
    assert all(a.end <= b.start + 0.01 for a, b in zip(t.segments, t.segments[1:]))
    assert all(0 < s.end - s.start <= MAX_SEGMENT_S + 0.01 and s.end <= len(audio) / 16000 for s in t.segments)
    assert all(s.words is None for s in t.segments)  # words were timed, not asked for
    reference = manifest[LONG]["reference_transcript"]
    seek = score(reference, alone(engine, LONG)).errors
    assert score(reference, t.text).errors <= seek + 5  # 360 words; on the dev set it reads fewer errors

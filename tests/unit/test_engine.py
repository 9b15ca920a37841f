"""The engine on real speech with tiny.en: same text as openai-whisper's transcribe,
silence stays silent, packed short clips come back to the right requests, word
timestamps are monotonic and inside their segments."""

import numpy as np
import pytest

from conftest import SHARED_AUDIO as AUDIO

whisper = pytest.importorskip("whisper")

from audio import decode_audio  # noqa: E402
from engine import Engine, EngineConfig  # noqa: E402
from options import TranscriptionOptions  # noqa: E402
from scoring import normalize  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_en_model):
    return tiny_en_model


def load(name):
    return decode_audio((AUDIO / name).read_bytes()).samples


def words(text):
    return normalize(text, "en").split()


def test_batched_equals_sequential_on_real_speech(model):
    # fp32 like transcribe on cpu: the same tokens, window by window
    engine = Engine(model, EngineConfig(pack_short=False, cpu_bf16=False))
    names = ["jfk/jfk.flac", "english/OSR_us_000_0034_8k.wav"]  # 11 s and 35.5 s (two windows)
    audios = [load(n) for n in names]
    batched = engine.transcribe([(a, TranscriptionOptions()) for a in audios])
    sequential = engine.transcribe([(a, TranscriptionOptions(mode="sequential")) for a in audios])
    for b, s in zip(batched, sequential):
        assert b.text == s.text
        assert b.language == "en" and b.segments
        assert [(x.start, x.end) for x in b.segments] == [(x.start, x.end) for x in s.segments]
        seg = b.segments[0]
        assert seg.avg_logprob < 0 and 0 <= seg.no_speech_prob <= 1 and seg.compression_ratio > 0


def test_bf16_on_cpu_stays_close_to_fp32(model):
    audio = load("english/OSR_us_000_0034_8k.wav")
    fp32 = Engine(model, EngineConfig(cpu_bf16=False)).transcribe([(audio, TranscriptionOptions())])[0]
    bf16 = Engine(model, EngineConfig(cpu_bf16=True)).transcribe([(audio, TranscriptionOptions())])[0]
    ref, got = words(fp32.text), words(bf16.text)
    assert abs(len(ref) - len(got)) <= 2
    assert sum(a != b for a, b in zip(ref, got)) <= max(2, len(ref) // 20)


def test_long_request_cut_into_streams_loses_and_repeats_nothing(model):
    # two utterances with a pause; cut at the pause into two streams decoded side by side
    a, b = load("jfk/jfk.flac"), load("librispeech/test-clean/1221-135766-0001.wav")
    audio = np.concatenate([a, np.zeros(16000, dtype=np.float32), b])
    config = dict(pack_short=False, cpu_bf16=False)
    whole = Engine(model, EngineConfig(split_long=False, **config)).transcribe([(audio, TranscriptionOptions())])[0]
    engine = Engine(model, EngineConfig(split_long=True, min_stream_seconds=12, **config))
    cut = engine.transcribe([(audio, TranscriptionOptions())])[0]
    assert engine.stats["encoder_windows"] >= 2  # it was decoded as two streams
    assert words(cut.text) == words(whole.text)
    starts = [s.start for s in cut.segments]
    assert starts == sorted(starts) and [s.id for s in cut.segments] == list(range(len(starts)))


def test_silence_and_low_noise_give_no_invented_text(model):
    engine = Engine(model, EngineConfig())
    rng = np.random.default_rng(0)
    silent = np.zeros(16000 * 8, dtype=np.float32)
    noise = (0.001 * rng.standard_normal(16000 * 8)).astype(np.float32)
    out = engine.transcribe([(silent, TranscriptionOptions()), (noise, TranscriptionOptions())])
    assert out[0].text.strip() == ""
    assert len(words(out[1].text)) <= 2


def test_packed_short_clips_return_to_their_requests(model):
    names = ["jfk/jfk.flac", "english/LJ002-0020.wav", "librispeech/test-clean/2830-3980-0043.wav",
             "english/LDC93S1.wav"]
    audios = [load(n) for n in names]
    alone = Engine(model, EngineConfig(pack_short=False)).transcribe(
        [(a, TranscriptionOptions()) for a in audios])
    engine = Engine(model, EngineConfig(pack_short=True))
    packed = engine.transcribe([(a, TranscriptionOptions(word_timestamps=(i == 0)))
                                for i, a in enumerate(audios)])
    assert engine.stats["encoder_windows"] < len(names)  # they shared a window
    for a, p, audio in zip(alone, packed, audios):
        ref = words(a.text)
        got = words(p.text)
        errors = sum(x != y for x, y in zip(ref, got)) + abs(len(ref) - len(got))
        assert errors <= max(1, len(ref) // 10), (a.text, p.text)
        for s in p.segments:
            assert 0 <= s.start <= s.end <= len(audio) / 16000 + 0.01
    assert packed[0].segments[0].words and packed[1].segments[0].words is None


def test_word_timestamps_are_monotonic_and_inside_segments(model):
    engine = Engine(model, EngineConfig(pack_short=False))
    (t,) = engine.transcribe([(load("english/OSR_us_000_0034_8k.wav"), TranscriptionOptions(word_timestamps=True))])
    last = 0.0
    n = 0
    for s in t.segments:
        for w in s.words:
            assert s.start - 0.01 <= w.start <= w.end <= s.end + 0.01
            assert w.start >= last - 0.01
            last = w.end
            n += 1
    assert n > 30

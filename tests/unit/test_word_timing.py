"""Word edges moved off pauses, on synthetic speech-like bursts with known timing."""

import numpy as np

from formats import Word
from word_timing import SAMPLE_RATE, snap_words, voiced_frames


def bursts(spans, total_s=6.0, noise=1e-4, seed=0):
    """A 200 Hz tone during each (start, end) span, faint noise elsewhere."""
    rng = np.random.default_rng(seed)
    audio = rng.normal(0, noise, int(total_s * SAMPLE_RATE)).astype(np.float32)
    for start, end in spans:
        t = np.arange(int(start * SAMPLE_RATE), int(end * SAMPLE_RATE))
        audio[t] += 0.3 * np.sin(2 * np.pi * 200 * t / SAMPLE_RATE)
    return audio


def test_start_moves_past_the_pause_whisper_gave_the_word():
    audio = bursts([(0.5, 1.5), (3.0, 3.6)])
    # DTW gives the pause 1.5-3.0 to the second word
    words = [Word(" hello", 0.4, 1.5), Word(" there", 1.5, 3.7)]
    first, second = snap_words(words, audio)
    assert abs(first.start - 0.5) <= 0.04 and abs(first.end - 1.5) <= 0.04
    assert abs(second.start - 3.0) <= 0.04 and abs(second.end - 3.6) <= 0.04


def test_trailing_silence_is_cut_from_the_end():
    audio = bursts([(1.0, 1.4), (2.5, 3.0)])
    words = [Word(" you", 1.0, 2.3), Word(" ask", 2.3, 3.0)]
    you, ask = snap_words(words, audio)
    assert abs(you.end - 1.4) <= 0.04
    assert abs(ask.start - 2.5) <= 0.04


def test_a_pause_before_a_short_voiced_tail_of_the_previous_word():
    """The word span starts in the previous word's tail, then a pause, then the word."""
    audio = bursts([(1.0, 2.0), (2.8, 3.2)])
    (word,) = snap_words([Word(" ask", 1.9, 3.3)], audio)
    assert abs(word.start - 2.8) <= 0.04 and abs(word.end - 3.2) <= 0.04


def test_short_dips_inside_a_word_are_not_pauses():
    audio = bursts([(1.0, 1.3), (1.4, 1.8)])  # 100 ms dip
    (word,) = snap_words([Word(" fellow", 1.0, 1.8)], audio)
    assert abs(word.start - 1.0) <= 0.04


def test_words_stay_inside_their_spans_and_in_order():
    rng = np.random.default_rng(1)
    spans, t = [], 0.3
    for _ in range(12):
        length = rng.uniform(0.15, 0.6)
        spans.append((t, t + length))
        t += length + rng.choice([0.05, 0.5, 1.0])
    audio = bursts(spans, total_s=t + 1)
    edges = np.sort(rng.uniform(0, t + 0.5, 2 * len(spans)))
    words = [Word(f" w{i}", edges[2 * i], edges[2 * i + 1]) for i in range(len(spans))]
    snapped = snap_words(words, audio)
    for before, after in zip(words, snapped):
        assert before.start <= after.start <= after.end <= before.end
    starts = [w.start for w in snapped]
    assert starts == sorted(starts)


def test_no_pauses_means_no_change():
    audio = bursts([(0.0, 6.0)])
    words = [Word(" a", 0.0, 2.0), Word(" b", 2.0, 6.0)]
    assert snap_words(words, audio) == words
    silent = np.zeros(SAMPLE_RATE * 2, dtype=np.float32)
    assert snap_words(words, silent) == words


def test_voiced_frames_threshold():
    voiced = voiced_frames(bursts([(1.0, 2.0)], total_s=3.0))
    assert voiced[55:95].all() and not voiced[:45].any() and not voiced[105:].any()

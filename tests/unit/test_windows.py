"""Pure window logic: segment parsing, seeking without losing or repeating words at
window edges, fallback and silence checks, splitting at pauses."""

import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "handler")]

from decoding import DecodedWindow  # noqa: E402
from stream import stream_clips  # noqa: E402
from windows import (  # noqa: E402
    N_FRAMES,
    Thresholds,
    best_attempt,
    is_silence,
    longest_repeat,
    is_segment_anomaly,
    needs_fallback,
    parse_window,
    skip_hallucinated_silence,
    split_points,
)

TS = 50363  # tiny.en's <|0.00|>; only the offset matters here
EOT = 50256


def ts(seconds: float) -> int:
    return TS + round(seconds / 0.02)


def test_parse_window_complete_segments_and_single_timestamp_ending():
    tokens = [ts(0.0), 1, 2, ts(2.0), ts(2.5), 3, ts(4.0)]
    parsed = parse_window(tokens, TS, seek=1000, segment_size=N_FRAMES)
    assert [(s.start, s.end) for s in parsed.segments] == [(10.0, 12.0), (12.5, 14.0)]
    assert parsed.single_timestamp_ending
    assert parsed.next_seek == 1000 + N_FRAMES  # nothing after the last timestamp


def test_parse_window_drops_unfinished_segment_and_seeks_to_it():
    tokens = [ts(0.0), 1, 2, ts(3.0), ts(3.2), 3, 4]  # the second segment never closes
    parsed = parse_window(tokens, TS, seek=0, segment_size=N_FRAMES)
    assert [(s.start, s.end, s.tokens) for s in parsed.segments] == [(0.0, 3.0, [ts(0.0), 1, 2, ts(3.0)])]
    assert parsed.next_seek == 300  # the start of the unfinished segment, in mel frames


def test_parse_window_without_timestamp_pairs_keeps_all_text():
    parsed = parse_window([ts(0.0), 1, 2, 3], TS, seek=0, segment_size=1234)
    assert len(parsed.segments) == 1 and parsed.segments[0].tokens == [ts(0.0), 1, 2, 3]
    assert parsed.next_seek == 1234


def fake_window(words, seek, size):
    """What a decoder does on one window of a known word timeline: segments of two words
    each, the last one left unfinished when a word crosses the window's end."""
    start_s, end_s = seek / 100, (seek + size) / 100
    inside = [w for w in words if w[1] >= start_s and w[1] < end_s]
    tokens = []
    for i in range(0, len(inside), 2):
        pair = inside[i : i + 2]
        if pair[-1][2] > end_s:  # runs over the edge: the model leaves it open
            tokens += [ts(pair[0][1] - start_s)] + [p[0] for p in pair if p[2] <= end_s]
            return tokens
        tokens += [ts(pair[0][1] - start_s)] + [p[0] for p in pair] + [ts(pair[-1][2] - start_s)]
    return tokens


def test_seeking_over_a_long_timeline_loses_and_repeats_nothing():
    rng = np.random.default_rng(0)
    words, t = [], 0.0
    for token in range(1, 400):  # about 400 words over several windows
        t += rng.uniform(0.05, 0.4)
        length = rng.uniform(0.2, 0.7)
        words.append((token, round(t, 2), round(t + length, 2)))
        t += length
    content = int(t * 100) + 1
    seek, seen = 0, []
    while seek < content:
        size = min(N_FRAMES, content - seek)
        parsed = parse_window(fake_window(words, seek, size), TS, seek, size)
        assert parsed.next_seek > seek
        seen += [tok for s in parsed.segments for tok in s.tokens if tok < TS]
        seek = parsed.next_seek
    assert seen == [w[0] for w in words]


def result(avg_logprob=-0.2, compression=1.5, no_speech=0.1):
    return DecodedWindow([], "", 0.0, avg_logprob, no_speech, 0.0, compression)


def test_fallback_and_silence_follow_transcribe():
    t = Thresholds()
    assert not needs_fallback(result(), t)
    assert needs_fallback(result(compression=2.6), t)  # repetitive
    assert needs_fallback(result(avg_logprob=-1.5), t)  # improbable
    assert not needs_fallback(result(avg_logprob=-1.5, no_speech=0.9), t)  # silence
    assert is_silence(result(avg_logprob=-1.5, no_speech=0.9), t)
    assert not is_silence(result(avg_logprob=-0.5, no_speech=0.9), t)  # confident text
    assert not is_silence(result(avg_logprob=-1.5, no_speech=0.3), t)


def test_all_temperatures_failed_keeps_the_most_probable_attempt():
    t = Thresholds()
    cold = result(avg_logprob=-1.08)  # just under the bar at temperature 0
    hot = result(avg_logprob=-5.5)  # whisper would keep this last, hottest sample
    looping = result(avg_logprob=-0.3, compression=3.1)  # probable but repetitive
    assert best_attempt([cold, looping, hot], t) is cold
    assert best_attempt([looping, result(avg_logprob=-0.1, compression=2.9)], t).avg_logprob == -0.1


def test_longest_repeat_counts_back_to_back_copies_of_a_run_of_words():
    assert longest_repeat("") == 0 and longest_repeat("Hello.") == 1
    assert longest_repeat("And so, my fellow Americans, ask not what your country can do for you.") == 1
    assert longest_repeat("you you") == 2
    assert longest_repeat("Thank you. Thank you. thank you, THANK YOU!") == 4  # case, punctuation ignored
    loop = "I will see you next time. " * 3
    assert longest_repeat("So that is all. " + loop + "Bye.") == 3
    # copies apart are not back to back; runs longer than MAX_NGRAM_WORDS are not counted
    assert longest_repeat("the cat sat, a dog ran, the cat sat") == 1
    assert longest_repeat(" ".join([f"w{i}" for i in range(11)] * 2), max_n=10) == 1
    assert longest_repeat(" ".join([f"w{i}" for i in range(11)] * 2), max_n=11) == 2


def test_a_short_loop_falls_back_though_it_compresses_under_the_ratio():
    t = Thresholds()
    text = "I'll see you guys next time. " * 4
    looping = DecodedWindow([], text, 0.0, -0.3, 0.1, 0.0, 1.9)
    assert needs_fallback(looping, t)
    assert not needs_fallback(DecodedWindow([], "I'll see you guys next time. " * 3, 0.0, -0.3, 0.1, 0.0, 1.9), t)
    assert not needs_fallback(looping, Thresholds(max_repeats=None))
    # silence stays silence: no point sampling hotter
    assert not needs_fallback(DecodedWindow([], text, 0.0, -1.5, 0.9, 0.0, 1.9), t)


def tone(seconds, freq=220.0):
    x = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * x)).astype(np.float32)


def test_split_points_fall_in_pauses():
    rng = np.random.default_rng(1)
    parts, pauses, t = [], [], 0.0
    for _ in range(6):
        speech = rng.uniform(15, 25)
        parts.append(tone(speech))
        t += speech
        parts.append(np.zeros(8000, dtype=np.float32))  # 0.5 s pause
        pauses.append((t, t + 0.5))
        t += 0.5
    audio = np.concatenate(parts)
    cuts = split_points(audio, 3, search_seconds=15)
    assert len(cuts) == 2
    for cut in cuts:
        assert any(a - 0.05 <= cut / 100 <= b + 0.05 for a, b in pauses), cut
    clips = stream_clips(len(audio) // 160, cuts)
    assert clips[0][0] == 0 and clips[-1][1] == len(audio) // 160
    assert all(a[1] == b[0] for a, b in zip(clips, clips[1:]))


def test_split_points_read_only_around_the_targets_and_cut_as_a_whole_file_scan():
    """Cuts from the energy near each target equal those of the whole file's energy (the
    moving average reads a margin past the search span); a cut near an end is unchanged."""
    from windows import frame_energy

    rng = np.random.default_rng(2)
    audio = (rng.standard_normal(16000 * 100) * np.repeat(rng.uniform(0, 1, 500), 3200)).astype(np.float32)
    for n_pieces, search in ((7, 5.0), (3, 20.0), (40, 5.0)):
        energy = frame_energy(audio)
        smoothed = np.convolve(energy, np.ones(15) / 15, mode="same")  # 0.3 s of 0.02 s frames
        expected = []
        for k in range(1, n_pieces):
            lo, hi = max(0, int((100 * k / n_pieces - search) / 0.02)), min(len(energy), int((100 * k / n_pieces + search) / 0.02))
            frame = round((lo + int(np.argmin(smoothed[lo:hi]))) * 2)
            if not expected or frame > expected[-1] + 100:
                expected.append(frame)
        assert split_points(audio, n_pieces, search_seconds=search) == expected



def words_of(start, end, n=3, probability=0.9):
    step = (end - start) / n
    return [dict(word=f" w{i}", start=start + i * step, end=start + (i + 1) * step, probability=probability)
            for i in range(n)]


def segment(start, end, probability=0.9, n=3):
    return dict(start=start, end=end, text="...", tokens=[1], words=words_of(start, end, n, probability))


def test_segment_anomaly_is_whispers_word_score():
    assert not is_segment_anomaly(segment(0, 3)) and not is_segment_anomaly(None)
    assert is_segment_anomaly(segment(0, 3, probability=0.05))  # improbable words
    assert is_segment_anomaly(segment(0, 0.2, n=4))  # words of 0.05 s
    assert not is_segment_anomaly(dict(start=0, end=1, words=[]))


def test_hallucination_after_a_long_silence_is_dropped_and_the_seek_goes_to_it():
    kept = segment(0.0, 2.0)
    invented = segment(10.0, 10.6, probability=0.05)
    out = skip_hallucinated_silence([kept, invented], 2.0, seek=0, segment_size=N_FRAMES, next_seek=N_FRAMES,
                                    single_timestamp_ending=True, last_speech_timestamp=0.0, content_frames=6000)
    assert out.segments == [kept] and out.next_seek == 1000 and not out.drop_window
    # the same with a shorter silence than the threshold is kept
    out = skip_hallucinated_silence([kept, segment(3.0, 3.6, probability=0.05), segment(4.0, 6.0)], 2.0, seek=0,
                                    segment_size=N_FRAMES, next_seek=N_FRAMES, single_timestamp_ending=True,
                                    last_speech_timestamp=0.0, content_frames=6000)
    assert len(out.segments) == 3 and out.next_seek == N_FRAMES


def test_a_suspect_first_segment_after_leading_silence_drops_the_window():
    out = skip_hallucinated_silence([segment(1012.0, 1014.0, probability=0.05)], 2.0, seek=100_000,
                                    segment_size=N_FRAMES, next_seek=100_000 + N_FRAMES, single_timestamp_ending=True,
                                    last_speech_timestamp=990.0, content_frames=200_000)
    assert out.drop_window and out.segments == [] and out.next_seek == 100_000 + 1200


def test_a_suspect_near_the_end_of_the_audio_ends_the_stream():
    # two suspects in a row after a silence, the first ending 2.5 s before the end
    suspects = [segment(12.0, 12.5, probability=0.05), segment(13.5, 14.0, probability=0.05)]
    out = skip_hallucinated_silence([segment(0.0, 2.0), *suspects], 3.0, seek=0, segment_size=1500,
                                    next_seek=1500, single_timestamp_ending=True, last_speech_timestamp=0.0,
                                    content_frames=1500)
    assert len(out.segments) == 1 and out.next_seek == 1500


def test_without_suspects_the_seek_follows_the_last_word_unless_little_is_left():
    words = [segment(0.0, 5.0), segment(5.5, 9.0)]
    out = skip_hallucinated_silence(words, 2.0, seek=0, segment_size=N_FRAMES, next_seek=900,
                                    single_timestamp_ending=False, last_speech_timestamp=0.0, content_frames=6000)
    assert out.segments == words and out.next_seek == 900  # 21 s left in the window: to the last word
    late = [segment(0.0, 5.0), segment(5.5, 28.5)]
    out = skip_hallucinated_silence(late, 2.0, seek=0, segment_size=N_FRAMES, next_seek=2850,
                                    single_timestamp_ending=False, last_speech_timestamp=0.0, content_frames=6000)
    assert out.next_seek == N_FRAMES  # 1.5 s left: the whole window

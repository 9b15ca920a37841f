"""handler/stream.py: the Stream and Request state machines, driven by synthetic decoded
windows (no model): seeking, cut streams, fallback, silence, prompts, word timing, the
order in which a request's segments are handed out, and its final transcript."""

import numpy as np
import pytest

from whisper.tokenizer import get_tokenizer

from decoding import DecodedWindow
from options import TranscriptionOptions
from stream import Request, Stream, spans_in_frames, speech_runs, stream_clips
from windows import Thresholds

TOKENIZER = get_tokenizer(False)  # English-only, as tiny.en
T0 = TOKENIZER.timestamp_begin
THRESHOLDS = Thresholds()
SCHEDULE = (0.0, 0.2, 0.4)


def ts(seconds: float) -> int:
    """The timestamp token of a time inside the window (0.02 s steps)."""
    return T0 + round(seconds / 0.02)


def seg(start: float, text: str, end: float):
    return [ts(start), *TOKENIZER.encode(text), ts(end)]


def open_seg(start: float, text: str):
    """A segment the decoder never closed (it ran into the window's end)."""
    return [ts(start), *TOKENIZER.encode(text)]


def decoded(*pieces, avg_logprob=-0.2, no_speech=0.1, temperature=0.0, compression=1.5):
    tokens = [t for piece in pieces for t in piece]
    return DecodedWindow(tokens, TOKENIZER.decode(tokens), avg_logprob * len(tokens), avg_logprob,
                         no_speech, temperature, compression)


def stream(content_frames=6000, clip=None, temperatures=SCHEDULE, **kwargs) -> Stream:
    start, end = clip or (0, content_frames)
    return Stream(clip_start=start, clip_end=end,
                  content_frames=content_frames, temperatures=temperatures, **kwargs)


def apply(s: Stream, result, words=None):
    """One window through the stream as the engine does it; `words` (per segment) stand in
    for the runner's word timestamps."""
    chosen = s.record(result, THRESHOLDS)
    assert chosen is not None, "the window asked for a fallback"
    proposal = s.propose(chosen, THRESHOLDS, TOKENIZER)
    if words is not None:
        for segment, ws in zip(proposal.segments, words):
            segment["words"] = [dict(word=w, start=a, end=b, probability=0.9) for w, a, b in ws]
    return proposal, s.commit(proposal)


def spans(segments):
    return [(round(d["start"], 2), round(d["end"], 2), d["text"]) for d in segments]


# ---------------------------------------------------------------- seeking


def test_seek_moves_to_the_end_of_the_last_complete_segment():
    s = stream()
    proposal, new = apply(s, decoded(seg(0, " Hello", 2.0), seg(2.5, " world.", 4.0), open_seg(4.2, " And")))
    assert spans(new) == [(0.0, 2.0, " Hello"), (2.5, 4.0, " world.")]  # " And" is dropped ...
    assert proposal.next_seek == s.seek == 400  # ... and decoded again from 4.0 s
    assert s.all_tokens == seg(0, " Hello", 2.0) + seg(2.5, " world.", 4.0)
    # the next window starts at 4.0 s: its times are absolute
    _, new = apply(s, decoded(seg(0.2, " And then", 1.5), open_seg(2.0, " more")))
    assert spans(new) == [(4.2, 5.5, " And then")] and new[0]["seek"] == 400
    assert s.seek == 400 + 150 and s.windows == 2 and not s.done


def test_single_timestamp_ending_seeks_a_full_window():
    s = stream(content_frames=6000, seek=1000)
    # text and then one timestamp: the window's speech ended there
    _, new = apply(s, decoded(seg(0, " Hello", 2.0), seg(2.5, " world.", 4.0)))
    assert spans(new) == [(10.0, 12.0, " Hello"), (12.5, 14.0, " world.")]
    assert s.seek == 1000 + 3000  # nothing is said after the last timestamp
    # the last window is shorter than 30 s: the seek goes to the end and the stream is done
    assert s.window_size == 2000
    apply(s, decoded(seg(0, " Bye.", 1.0)))
    assert s.seek == 6000 and s.done


def test_cut_stream_keeps_segments_centred_before_the_cut():
    s = stream(content_frames=6000, clip=(0, 4000))
    assert s.window_size == 3000  # windows are not truncated at the cut
    _, new = apply(s, decoded(seg(0, " One", 10.0), seg(10.0, " two", 25.0), open_seg(26.0, " three")))
    assert len(new) == 2 and s.seek == 2500 and not s.done  # all before the cut: seeks as usual
    proposal, new = apply(s, decoded(
        seg(0, " Four", 10.0),  # 25-35 s
        seg(10.0, " five", 15.6),  # 35-40.6 s: ends after the cut, centred before it: kept
        seg(15.6, " six", 20.0),  # 40.6-45 s: centred after the cut: the next stream's
        open_seg(21.0, " seven"),
    ))
    assert spans(new) == [(25.0, 35.0, " Four"), (35.0, 40.6, " five")]
    # at or past the cut: this stream is done, the next one starts at 40 s
    assert proposal.reached_cut and s.seek >= 4000 and s.done


def test_cut_stream_is_not_pulled_back_before_the_cut_by_word_timestamps():
    # a dropped segment would otherwise be decoded by this stream and by the next one
    s = stream(content_frames=6000, clip=(1000, 2000), word_timestamps=True)
    assert s.seek == 1000
    proposal, _ = apply(
        s, decoded(seg(0, " One", 8.0), seg(9.5, " two", 11.5), open_seg(12.0, " three")),
        words=[[(" One", 10.5, 17.0)]],  # for the one segment kept: " two" is centred after 20 s
    )
    assert proposal.reached_cut and len(s.segments) == 1
    assert s.seek >= 2000 and s.done  # not back at the last kept word's end (17.0 s)
    assert s.last_speech_timestamp == 17.0


def test_stream_of_a_later_piece_starts_at_its_clip():
    s = stream(content_frames=6000, clip=(2000, 6000))
    assert s.seek == 2000 and s.window_size == 3000
    _, new = apply(s, decoded(seg(0, " Hi", 1.0), open_seg(1.5, " there")))
    assert spans(new) == [(20.0, 21.0, " Hi")] and s.seek == 2100


# ---------------------------------------------------------------- fallback and silence


def test_failed_window_is_decoded_again_one_temperature_hotter():
    s = stream()
    assert s.temperature == 0.0
    assert s.record(decoded(seg(0, " Hm", 1.0), avg_logprob=-1.5), THRESHOLDS) is None
    assert (s.level, s.temperature) == (1, 0.2)
    assert s.record(decoded(seg(0, " Hm", 1.0), compression=2.6, temperature=0.2), THRESHOLDS) is None
    assert (s.level, s.temperature) == (2, 0.4)
    good = decoded(seg(0, " Hello", 1.0), temperature=0.4)
    assert s.record(good, THRESHOLDS) is good
    assert (s.level, s.attempts) == (0, [])  # the next window starts cold


def test_at_the_last_temperature_the_best_attempt_is_kept():
    s = stream()
    cold = decoded(seg(0, " Hello", 1.0), avg_logprob=-1.1)
    looping = decoded(seg(0, " la la", 1.0), avg_logprob=-0.3, compression=3.0, temperature=0.2)
    hot = decoded(seg(0, " Yellow", 1.0), avg_logprob=-2.5, temperature=0.4)  # whisper keeps this
    assert s.record(cold, THRESHOLDS) is None and s.record(looping, THRESHOLDS) is None
    assert s.record(hot, THRESHOLDS) is cold  # most probable of those not too repetitive
    assert (s.level, s.attempts) == (0, [])
    _, new = apply(s, decoded(seg(0, " Next", 1.0)))
    assert new[0]["temperature"] == 0.0


def test_a_single_temperature_never_falls_back():
    s = stream(temperatures=(0.7,))
    bad = decoded(seg(0, " Hm", 1.0), avg_logprob=-3.0, temperature=0.7)
    assert s.record(bad, THRESHOLDS) is bad and s.level == 0


def test_silent_window_moves_a_full_window_without_segments():
    s = stream(content_frames=6000, seek=1000, initial_prompt=[11, 12])
    silence = decoded(seg(0, " you", 1.0), avg_logprob=-1.5, no_speech=0.9)
    assert s.record(silence, THRESHOLDS) is silence  # silence is not sampled hotter
    proposal = s.propose(silence, THRESHOLDS, TOKENIZER)
    assert proposal.silent and proposal.segments == [] and proposal.next_seek == 4000
    assert s.commit(proposal) == []
    assert (s.seek, s.segments, s.all_tokens, s.windows) == (4000, [], [11, 12], 1)
    assert s.prompt(448) == [11, 12]  # a skipped window does not reset the prompt


def test_confident_text_is_not_silence():
    s = stream()
    proposal, new = apply(s, decoded(seg(0, " Yes.", 1.0), avg_logprob=-0.5, no_speech=0.9))
    assert not proposal.silent and spans(new) == [(0.0, 1.0, " Yes.")]


# ---------------------------------------------------------------- voice activity (speech spans)


def test_no_speech_at_all_is_done_before_any_window():
    s = stream(content_frames=6000, speech=[])
    assert s.done and s.seek == 6000 and s.skips == 1 and s.skipped_frames == 6000 and s.windows == 0


def test_without_spans_nothing_is_skipped():
    s = stream(content_frames=6000)
    assert s.seek == 0 and s.window_size == 3000 and s.skips == 0


def test_first_window_starts_at_the_first_speech():
    s = stream(content_frames=6000, speech=[(1200, 2500)])
    assert s.seek == 1200 and s.skips == 1 and s.skipped_frames == 1200
    # the window ends where the speech does (nothing after it): the rest is never decoded
    assert s.window_size == 1300


def test_a_short_pause_before_the_first_speech_is_decoded_as_whisper_would():
    s = stream(content_frames=6000, speech=[(120, 2500)], long_pause=300)
    assert s.seek == 0 and s.skips == 0 and s.window_size == 2500


def test_window_ends_at_a_long_pause_but_not_a_short_one():
    # pauses shorter than long_pause (500 frames here) stay inside the window
    s = stream(content_frames=20000, speech=[(0, 1000), (1300, 2000), (9000, 9500)], long_pause=500)
    assert s.window_size == 2000
    # a run longer than a window: Whisper's 30 s
    s = stream(content_frames=20000, speech=[(0, 1000), (1300, 5000)], long_pause=500)
    assert s.window_size == 3000


def test_seek_that_lands_in_a_pause_jumps_to_the_next_speech_start():
    s = stream(content_frames=20000, speech=[(0, 1000), (1300, 2000), (9000, 9600)], long_pause=500)
    apply(s, decoded(seg(0, " Hello there.", 9.6), seg(13.5, " Again.", 19.9)))
    # single timestamp ending: the window (up to 2000) is done; the seek jumps over 70 s
    assert s.seek == 9000 and s.skips == 1 and s.skipped_frames == 7000
    assert s.window_size == 600
    _, new = apply(s, decoded(seg(0.2, " Bye.", 5.8)))
    assert spans(new) == [(90.0, 95.8, " Bye.")]
    assert s.done and s.seek == 20000 and s.skips == 2 and s.skipped_frames == 7000 + 10400


def test_a_window_with_too_little_speech_left_is_not_decoded():
    # the residue after the last complete segment: 30 frames of a padded span
    s = stream(content_frames=1100, speech=[(0, 1000)], min_window_speech=50)
    _, new = apply(s, decoded(seg(0, " All of it.", 9.7), open_seg(9.7, " and")))
    assert spans(new) == [(0.0, 9.7, " All of it.")]
    assert s.done and s.seek == 1100 and s.skips == 1 and s.windows == 1


def test_a_short_run_of_speech_is_skipped_but_a_longer_one_decoded():
    s = stream(content_frames=9000, speech=[(400, 430), (5000, 5100)], min_window_speech=50)
    assert s.seek == 5000 and s.skips == 1  # to 400, past the 30-frame run, to 5000: one jump
    assert s.window_size == 100 and not s.done


def test_silent_window_jumps_to_the_next_speech():
    s = stream(content_frames=20000, speech=[(0, 800), (12000, 13000)])
    _, new = apply(s, decoded([ts(0), TOKENIZER.eot], avg_logprob=-2.0, no_speech=0.9))
    assert new == [] and s.seek == 12000 and s.skips == 1


def test_a_cut_stream_skips_no_further_than_its_clip():
    s = stream(content_frames=9000, clip=(0, 3000), speech=[(100, 900), (5000, 6000)])
    apply(s, decoded(seg(0, " First.", 8.0)))
    assert s.done and s.seek == 3000  # the next piece starts at its clip, at 3000
    later = stream(content_frames=9000, clip=(3000, 9000), speech=[(100, 900), (5000, 6000)])
    assert later.seek == 5000 and later.window_size == 1000


def test_speech_spans_in_samples_become_whole_mel_frames():
    assert spans_in_frames([(0, 16000), (16001, 32159)]) == [(0, 100), (100, 201)]
    assert spans_in_frames([]) == []


# ---------------------------------------------------------------- prompts


def test_prompt_is_the_previous_text_until_a_hot_window_resets_it():
    s = stream(initial_prompt=[11, 12])
    assert s.prompt(448) == [11, 12]
    apply(s, decoded(seg(0, " One", 1.0), open_seg(2.0, " x")))
    assert s.prompt(448) == [11, 12, *seg(0, " One", 1.0)]
    apply(s, decoded(seg(0, " Two", 1.0), open_seg(2.0, " x"), temperature=0.5))  # not above 0.5
    assert s.prompt(448)[-len(seg(0, " Two", 1.0)):] == seg(0, " Two", 1.0)
    apply(s, decoded(seg(0, " Three", 1.0), open_seg(2.0, " x"), temperature=0.6))
    assert s.prompt(448) == []
    apply(s, decoded(seg(0, " Four", 1.0), open_seg(2.0, " x")))
    assert s.prompt(448) == seg(0, " Four", 1.0)  # only text after the reset


def test_without_conditioning_only_the_first_window_gets_the_initial_prompt():
    s = stream(initial_prompt=[11, 12], condition_on_previous_text=False)
    assert s.prompt(448) == [11, 12]
    apply(s, decoded(seg(0, " One", 1.0), open_seg(2.0, " x")))
    assert s.prompt(448) == []
    apply(s, decoded(seg(0, " Two", 1.0), open_seg(2.0, " x")))
    assert s.prompt(448) == []


def test_prompt_is_at_most_half_the_text_context():
    s = stream(initial_prompt=list(range(1, 1001)))
    assert s.prompt(448) == list(range(1001 - 223, 1001))  # 448 // 2 - 1 = 223 newest tokens
    s.prompt_reset_since = 900
    assert s.prompt(448) == list(range(901, 1001))


# ---------------------------------------------------------------- word timestamps


WINDOW = (seg(0, " Hello", 2.0), seg(2.5, " world.", 4.0), open_seg(4.2, " And"))
WORDS = [[(" Hello", 0.3, 1.2)], [(" world.", 2.6, 3.7)]]


def test_with_words_the_seek_goes_to_the_last_words_end():
    s = stream(word_timestamps=True)
    _, new = apply(s, decoded(*WINDOW), words=WORDS)
    assert s.seek == 370  # not 400, the closing timestamp
    assert s.last_speech_timestamp == 3.7
    assert new[1]["words"][0]["word"] == " world."


def test_without_word_timestamps_words_do_not_move_the_seek():
    s = stream(word_timestamps=False)
    apply(s, decoded(*WINDOW), words=WORDS)
    assert s.seek == 400 and s.last_speech_timestamp == 0.0


def test_with_words_a_single_timestamp_ending_still_seeks_a_full_window():
    s = stream(word_timestamps=True)
    apply(s, decoded(seg(0, " Hello", 2.0)), words=[[(" Hello", 0.3, 1.2)]])
    assert s.seek == 3000 and s.last_speech_timestamp == 1.2


def test_a_word_end_before_the_window_start_does_not_move_the_seek():
    s = stream(word_timestamps=True, seek=1000)
    apply(s, decoded(seg(0, " Hello", 2.0), open_seg(3.0, " x")), words=[[(" Hello", 9.0, 9.5)]])
    assert s.seek == 1200


def test_instant_and_textless_segments_are_kept_empty():
    s = stream()
    _, new = apply(s, decoded(seg(0, " Hi", 0.0), seg(0.5, " ", 1.0), seg(1.0, " Yes.", 2.0), open_seg(3.0, " x")))
    assert [(d["text"], d["tokens"], d.get("words")) for d in new[:2]] == [("", [], []), ("", [], [])]
    assert s.all_tokens == seg(1.0, " Yes.", 2.0)


def test_hallucination_silence_threshold_drops_a_suspect_after_silence():
    s = stream(word_timestamps=True, hallucination_silence_threshold=2.0)
    sure = [(" Hello", 0.0, 0.8), (" there.", 0.9, 1.8)]
    _, new = apply(s, decoded(seg(0, " Hello there.", 2.0), seg(10.0, " Subscribe.", 10.1)),
                   words=[sure, [(" Subscribe.", 10.0, 10.05)]])  # a 50 ms word: suspect
    assert spans(new) == [(0.0, 2.0, " Hello there.")]
    assert s.seek == 1000 and s.all_tokens == seg(0, " Hello there.", 2.0)
    assert s.last_speech_timestamp == 1.8


def test_hallucination_silence_threshold_drops_a_window_opening_with_a_suspect():
    s = stream(word_timestamps=True, hallucination_silence_threshold=2.0, seek=1000)
    _, new = apply(s, decoded(seg(12.0, " Thanks", 13.0), seg(13.0, " for watching.", 14.0)),
                   words=[[(" Thanks", 22.0, 22.02)], [(" for", 23.0, 23.02), (" watching.", 23.02, 23.04)]])
    assert new == [] and s.segments == [] and s.seek == 1000 + 1200 and s.windows == 1


# ---------------------------------------------------------------- requests


def two_piece_request():
    r = Request(id="r", serial=0, audio=np.zeros(16000 * 40, dtype=np.float32), options=TranscriptionOptions(),
                language="en", content_frames=4000)
    r.streams = [Stream(clip_start=a, clip_end=b, content_frames=4000, temperatures=SCHEDULE, initial_prompt=[11])
                 for a, b in stream_clips(4000, [2000])]
    return r


def texts(segments):
    return [d["text"] for d in segments]


def test_ready_segments_wait_for_the_earlier_pieces():
    r = two_piece_request()
    first, second = r.streams
    apply(second, decoded(seg(0, " C", 1.0), open_seg(2.0, " x")))
    assert r.ready_segments() == [] and r.segment_count() == 0  # piece 0 may still say things first
    apply(first, decoded(seg(0, " A", 1.0), open_seg(2.0, " x")))
    assert texts(r.ready_segments()) == [" A"] and r.segment_count() == 1
    assert r.ready_segments() == []  # nothing new
    apply(first, decoded(seg(0, " B", 1.0)))  # single ending: piece 0 is done
    assert first.done and not r.streams_done
    assert texts(r.ready_segments()) == [" B", " C"] and r.segment_count() == 3
    apply(second, decoded(seg(0, " D", 1.0)))
    assert texts(r.ready_segments()) == [" D"] and r.streams_done


def test_transcript_puts_pieces_in_order_with_ids_from_zero():
    r = two_piece_request()
    first, second = r.streams
    apply(second, decoded(seg(0, " Three.", 1.0)))
    apply(first, decoded(seg(0, " One,", 1.0), seg(1.0, " two.", 2.0)))
    second.segments[0]["words"] = [dict(word=" Three.", start=20.1, end=20.8, probability=0.5)]
    t = r.transcript(TOKENIZER, want_words=True)
    assert [(x.id, x.text, x.start) for x in t.segments] == [(0, " One,", 0.0), (1, " two.", 1.0), (2, " Three.", 20.0)]
    assert t.text == " One, two. Three."  # without the initial prompt
    assert (t.language, t.duration, t.task) == ("en", 40.0, "transcribe")
    assert t.segments[2].words[0].word == " Three." and t.segments[0].words == []
    assert r.transcript(TOKENIZER, want_words=False).segments[2].words is None


@pytest.mark.parametrize(
    "content, cuts, clips",
    [
        (1000, [], [(0, 1000)]),
        (1000, [300, 700], [(0, 300), (300, 700), (700, 1000)]),
        (1000, [0, 1000, 1500], [(0, 1000)]),  # cuts at or beyond the ends are ignored
        (1000, [400, 400], [(0, 400), (400, 1000)]),  # no empty clip
        (0, [], []),
    ],
)
def test_stream_clips(content, cuts, clips):
    assert stream_clips(content, cuts) == clips


@pytest.mark.parametrize("speech, runs", [
    ([], []),
    ([(100, 400)], [(0, 400)]),  # less than a long pause before the speech: from the start
    ([(400, 700)], [(400, 700)]),
    ([(400, 700), (800, 900)], [(400, 900)]),  # a 1 s pause stays inside the run
    ([(400, 700), (1100, 1200)], [(400, 700), (1100, 1200)]),  # a 4 s pause ends it
    ([(400, 430), (1100, 1500)], [(1100, 1500)]),  # 0.3 s of speech alone is not worth a window
    ([(400, 430), (500, 530)], [(400, 530)]),  # two short spans together are
    ([(5900, 6500)], [(5900, 6000)]),  # clipped to the content
])
def test_speech_runs(speech, runs):
    assert speech_runs(speech, long_pause=300, min_speech=50, content_frames=6000) == runs


# ---------------------------------------------------------------- window_mode "pauses"


def test_pause_chunks_join_spans_up_to_a_window_and_cut_at_pauses():
    from stream import pause_chunks

    speech = [(100, 900), (950, 2000), (2100, 3200), (3300, 3400), (4000, 10500)]
    chunks = pause_chunks(speech, content_frames=10400)
    # (100..2000) then 2100..3200 would pass 3000 frames from 100: a new chunk at the pause
    assert chunks[:3] == [(100, 2000), (2100, 3400), (4000, 7000)]
    assert chunks[3:] == [(7000, 10000), (10000, 10400)]  # a span over a window is cut, the end clipped
    assert all(b - a <= 3000 for a, b in chunks)
    assert pause_chunks([], 5000) == [] and pause_chunks([(6000, 7000)], 5000) == []


def test_a_text_only_stream_decodes_its_chunk_as_one_window_and_keeps_all_text():
    s = stream(content_frames=6000, clip=(1000, 2500), timestamps=False, word_timestamps=True)
    assert s.window_size == 1500  # the chunk, not the next 30 s of the request
    tokens = TOKENIZER.encode(" Hello there. How are you")
    proposal, committed = apply(s, decoded(tokens), words=[[(" Hello", 10.2, 10.5), (" there.", 10.5, 10.9),
                                                             (" How", 12.0, 12.2), (" are", 12.2, 12.4),
                                                             (" you", 12.4, 24.0)]])
    assert spans(committed) == [(10.0, 25.0, " Hello there. How are you")]  # the chunk's span until cut
    assert s.done and s.seek == 2500  # the words reach the chunk's end: no seek back to the last one
    assert s.all_tokens == tokens


def test_a_text_only_window_that_ends_early_is_followed_by_the_rest_of_its_chunk():
    from stream import MIN_CHUNK_REST_FRAMES

    s = stream(content_frames=6000, clip=(1000, 2500), timestamps=False, word_timestamps=True)
    apply(s, decoded(TOKENIZER.encode(" Hello there.")), words=[[(" Hello", 10.2, 10.5), (" there.", 10.5, 16.0)]])
    assert not s.done and s.seek == 1600 and s.window_size == 900  # the decoder stopped 9 s early
    apply(s, decoded(TOKENIZER.encode(" The rest.")), words=[[(" The", 16.5, 17.0), (" rest.", 17.0, 24.0)]])
    assert s.done and [d["text"] for d in s.segments] == [" Hello there.", " The rest."]
    short = stream(content_frames=6000, clip=(1000, 2500), timestamps=False, word_timestamps=True)
    end = (2500 - MIN_CHUNK_REST_FRAMES + 1) / 100
    apply(short, decoded(TOKENIZER.encode(" Hi.")), words=[[(" Hi.", 10.2, end)]])
    assert short.done  # less than MIN_CHUNK_REST_FRAMES left: nothing more to decode


def test_split_at_words_cuts_at_sentence_ends_pauses_and_length():
    from windows import MAX_SEGMENT_S, SEGMENT_PAUSE_S, split_at_words

    def word(w, a, b):
        return dict(word=w, start=a, end=b, probability=0.9)

    words = [word(" One", 0.0, 0.3), word(" two.", 0.3, 0.6), word(" Three", 0.7, 1.0),
             word(" four", 1.0 + SEGMENT_PAUSE_S, 1.9 + SEGMENT_PAUSE_S)]
    words += [word(f" w{k}", 2.5 + k, 3.5 + k) for k in range(12)]  # 12 s of words without a pause
    segment = dict(seek=0, start=0.0, end=30.0, text="".join(w["word"] for w in words), tokens=[1, 2],
                   temperature=0.0, avg_logprob=-0.3, compression_ratio=1.2, no_speech_prob=0.1, words=words)
    pieces = split_at_words(segment, TOKENIZER.encode)
    texts = [p["text"] for p in pieces]
    assert texts[:2] == [" One two.", " Three"]  # a sentence's end, then a pause
    assert texts[2:] == [" four" + "".join(f" w{k}" for k in range(9)), " w9 w10 w11"]  # at most 10 s
    assert "".join(texts) == segment["text"]  # nothing lost or repeated
    assert all(p["end"] - p["start"] <= MAX_SEGMENT_S for p in pieces)
    for p in pieces:
        assert (p["start"], p["end"]) == (p["words"][0]["start"], p["words"][-1]["end"])
        assert p["tokens"] == TOKENIZER.encode(p["text"]) and p["avg_logprob"] == -0.3
    abbreviated = [word(" Mr.", 0.0, 0.3), word(" J.", 0.3, 0.5), word(" Smith.", 0.5, 0.9), word(" No.", 1.0, 1.2)]
    assert [p["text"] for p in split_at_words(dict(segment, words=abbreviated), TOKENIZER.encode)] == [
        " Mr. J. Smith.", " No."]
    bare = dict(segment, words=[])
    assert split_at_words(bare, TOKENIZER.encode) == [bare]

"""Requests and streams as plain state machines, driven by decoded windows.

A `Request` is one upload on its way through the engine; its audio is decoded as one or
more `Stream`s (a long request may be cut at pauses into pieces decoded side by side). A
stream owns everything `whisper.transcribe`'s loop keeps between windows: the seek, the
prompt (previous text), the segments so far, the fallback level of the window being
decoded and the last speech timestamp of word timing. It never touches a model:

    window = stream.window_size, stream.prompt(...), stream.temperature   # what to decode
    chosen = stream.record(result, thresholds)   # None: decode again, one level hotter
    proposal = stream.propose(chosen, thresholds, tokenizer)
    ... the caller adds word timestamps to proposal.segments when asked for ...
    stream.commit(proposal)                      # seek and prompt move on

so every rule of seeking, fallback, silence and prompt reset is tested with synthetic
decoded windows (tests/unit/test_stream.py).

With voice activity detection (`speech`: the request's speech spans in mel frames, from
vad.py) a stream also owns the rule that keeps non-speech away from the decoder: a window
ends where speech is followed by a long pause (`long_pause`) or by nothing, the seek jumps
over such a pause to the next speech start, and a window that would hold less than
`min_window_speech` frames of speech is not decoded (the tails where Whisper invents
text). Inside speech and across short pauses, windows advance by Whisper's own timestamps.
"""

import bisect
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from whisper.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from whisper.utils import get_end

from formats import Segment, Transcript, Word
from windows import (FRAMES_PER_SECOND, Thresholds, best_attempt, is_silence, needs_fallback, parse_window,
                     skip_hallucinated_silence)

# Voice activity: a pause at least this long between speech spans (or non-speech up to the
# end) is never decoded; a window holding less speech than this is not decoded (the residue
# after the last complete segment, where Whisper invents text).
LONG_PAUSE_S = 3.0
MIN_WINDOW_SPEECH_S = 0.5
# window_mode "pauses": a text-only window whose last word ends at least this long before
# its chunk does is followed by a window over the rest of the chunk
MIN_CHUNK_REST_FRAMES = round(1.5 * FRAMES_PER_SECOND)


@dataclass(frozen=True)
class Proposal:
    """What one decoded window would do to its stream, before word timing and commit."""

    segments: List[dict]  # whisper.transcribe's segment dicts (seek, start, end, text, tokens, ...)
    next_seek: int  # mel frame where the next window starts
    single_timestamp_ending: bool = False
    reached_cut: bool = False  # the window ran past the end of a cut stream's clip
    silent: bool = False
    temperature: float = 0.0
    time_offset: float = 0.0  # seconds at the window's start
    seek: int = 0  # the window's start and size, mel frames
    size: int = 0


@dataclass(eq=False)
class Stream:
    """One run of consecutive windows from `clip_start`, keeping the segments that start
    before `clip_end` (where the next stream of the same request begins). Windows are not
    truncated at clip_end, so speech just before the cut is decoded in full context."""

    clip_start: int  # mel frames
    clip_end: int
    content_frames: int  # of the whole request
    temperatures: Tuple[float, ...]
    word_timestamps: bool = False
    initial_prompt: List[int] = field(default_factory=list)
    condition_on_previous_text: bool = True
    seek: int = -1  # -1: clip_start
    all_tokens: List[int] = field(default_factory=list)
    prompt_reset_since: int = 0
    segments: List[dict] = field(default_factory=list)
    last_speech_timestamp: float = 0.0
    level: int = 0  # fallback level of the window being decoded
    attempts: List[Any] = field(default_factory=list)
    windows: int = 0  # windows committed
    # voice activity: sorted, disjoint (start, end) mel frames of speech; None: all is speech
    speech: Optional[Sequence[Tuple[int, int]]] = None
    long_pause: int = round(LONG_PAUSE_S * FRAMES_PER_SECOND)  # a pause this long is not decoded (frames)
    min_window_speech: int = round(MIN_WINDOW_SPEECH_S * FRAMES_PER_SECOND)  # less speech: the window is skipped
    # whisper's hallucination_silence_threshold (seconds; needs word_timestamps): skip the
    # silence around a suspected hallucination (windows.skip_hallucinated_silence)
    hallucination_silence_threshold: Optional[float] = None
    # False: the stream is one chunk of speech, at most one window long, decoded as one
    # window without timestamp tokens (window_mode "pauses"; one more over the rest of the
    # chunk where the decoder ended early); its segment is cut at its words
    # (windows.split_at_words); no prompt from an earlier window, no hallucination skip
    timestamps: bool = True
    skipped_frames: int = 0  # frames the seek jumped over as non-speech
    skips: int = 0  # jumps of the seek over non-speech (each one a window not decoded)
    _span_ends: List[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.seek < 0:
            self.seek = self.clip_start
        if not self.all_tokens:
            self.all_tokens = list(self.initial_prompt)
        self._span_ends = [b for _, b in self.speech or ()]
        self.skip_to_speech()

    @property
    def end(self) -> int:
        """Mel frame where this stream stops: its clip's end or the audio's."""
        return min(self.clip_end, self.content_frames)

    @property
    def done(self) -> bool:
        return self.seek >= self.end

    @property
    def window_size(self) -> int:
        """Mel frames of audio in the current window (at most N_FRAMES): with voice activity,
        up to the end of the speech run it starts in when that run ends inside it."""
        end = min(self.seek + N_FRAMES, self.content_frames)
        if not self.timestamps:
            end = min(end, self.clip_end)
        if self.speech is not None:
            end = min(end, self.speech_run_end(self.seek))
        return max(0, end - self.seek)

    def speech_run_end(self, frame: int) -> int:
        """End of the run of speech at or after `frame`: spans less than `long_pause` apart
        are one run; the last run ends where its last span ends."""
        end = None
        for a, b in self._spans_after(frame):
            if end is not None and a - end >= self.long_pause:
                break
            end = b
        return self.content_frames if end is None else min(end, self.content_frames)

    def speech_frames(self, start: int, end: int) -> int:
        """Frames of speech between `start` and `end`."""
        total = 0
        for a, b in self._spans_after(start):
            if a >= end:
                break
            total += min(b, end) - max(a, start)
        return total

    def _spans_after(self, frame: int):
        """The speech spans that end after `frame`, in order (bisect: long files have
        thousands of spans)."""
        return itertools.islice(self.speech or (), bisect.bisect_right(self._span_ends, frame), None)

    def skip_to_speech(self) -> None:
        """VAD's rule for the next window (nothing without `speech`): move the seek over a
        long pause (at least `long_pause`, or up to the end) to the next speech start, and
        past a run's last window when that window would hold less than `min_window_speech`
        frames of speech."""
        if self.speech is None:
            return
        seek = self.seek
        while seek < self.end:
            start = next((max(a, seek) for a, _ in self._spans_after(seek)), self.end)
            if start >= self.end or start - seek >= self.long_pause:
                seek = min(start, self.end)  # a shorter pause is decoded, as Whisper would
                continue
            run_end = self.speech_run_end(seek)
            if run_end <= seek + N_FRAMES and self.speech_frames(seek, run_end) < self.min_window_speech:
                seek = min(max(run_end, seek + 1), self.end)
                continue
            break
        if seek > self.seek:  # one jump, one window not decoded
            self.skipped_frames += seek - self.seek
            self.skips += 1
            self.seek = seek

    @property
    def temperature(self) -> float:
        return self.temperatures[min(self.level, len(self.temperatures) - 1)]

    def prompt(self, n_text_ctx: int) -> List[int]:
        """Previous-text tokens for the next window (empty after a reset), as transcribe
        passes them: at most half the text context."""
        tokens = self.all_tokens[self.prompt_reset_since:]
        return tokens[-(n_text_ctx // 2 - 1):] if tokens else []

    def record(self, result, thresholds: Thresholds):
        """Record one decoded attempt of the current window. Returns the result to apply,
        or None when the window must be decoded again at the next temperature (the level
        is raised). When every temperature failed, the most probable attempt is kept (as
        faster-whisper does), not whisper's last, hottest one."""
        self.attempts.append(result)
        if needs_fallback(result, thresholds):
            if self.level + 1 < len(self.temperatures):
                self.level += 1
                return None
            result = best_attempt(self.attempts, thresholds)
        self.level, self.attempts = 0, []
        return result

    def propose(self, result, thresholds: Thresholds, tokenizer) -> Proposal:
        """Cut the chosen result of the current window into segments, as one iteration of
        transcribe's loop, without changing the stream."""
        size = self.window_size
        time_offset = self.seek * HOP_LENGTH / SAMPLE_RATE
        if is_silence(result, thresholds):
            return Proposal([], self.seek + size, silent=True, temperature=result.temperature,
                            time_offset=time_offset, seek=self.seek, size=size)
        parsed = parse_window(result.tokens, tokenizer.timestamp_begin, self.seek, size)
        pieces, next_seek, reached_cut = parsed.segments, parsed.next_seek, False
        if self.clip_end < self.content_frames:
            # a cut stream: the segments centred after the cut belong to the next stream
            cut = self.clip_end * HOP_LENGTH / SAMPLE_RATE
            kept = [p for p in pieces if (p.start + p.end) / 2 < cut]
            if len(kept) < len(pieces):
                pieces, next_seek, reached_cut = kept, max(next_seek, self.clip_end), True
        segments = [
            dict(
                seek=self.seek, start=p.start, end=p.end,
                text=tokenizer.decode([t for t in p.tokens if t < tokenizer.eot]), tokens=p.tokens,
                temperature=result.temperature, avg_logprob=result.avg_logprob,
                compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob,
            )
            for p in pieces
        ]
        return Proposal(segments, next_seek, parsed.single_timestamp_ending, reached_cut,
                        temperature=result.temperature, time_offset=time_offset, seek=self.seek, size=size)

    def commit(self, proposal: Proposal) -> List[dict]:
        """Apply a proposal (with word timestamps added to its segments when the stream asked
        for them): move the seek, keep the segments, update the prompt. Returns the new
        segments."""
        self.windows += 1
        self.seek = proposal.next_seek
        if proposal.silent:
            self.skip_to_speech()
            return []
        segments = self._commit_segments(proposal)
        self.skip_to_speech()
        return segments

    def _commit_segments(self, proposal: Proposal) -> List[dict]:
        segments = proposal.segments
        if not self.timestamps:
            # the decoder may end a text-only window before its chunk does (a sentence left
            # out): the rest of the chunk after the last timed word is decoded as a window
            last_word_end = get_end(segments)
            if last_word_end is not None:
                rest_from = round(last_word_end * FRAMES_PER_SECOND)
                if proposal.seek < rest_from <= self.end - MIN_CHUNK_REST_FRAMES:
                    self.seek = rest_from
        elif self.word_timestamps:
            last_word_end = get_end(segments)
            if (not proposal.single_timestamp_ending and not proposal.reached_cut
                    and last_word_end is not None and last_word_end > proposal.time_offset):
                # transcribe seeks to the last word's end when words are timed
                self.seek = round(last_word_end * FRAMES_PER_SECOND)
            if self.hallucination_silence_threshold is not None and not proposal.reached_cut:
                cut = skip_hallucinated_silence(
                    segments, self.hallucination_silence_threshold, proposal.seek, proposal.size, self.seek,
                    proposal.single_timestamp_ending, self.last_speech_timestamp, self.content_frames)
                self.seek = cut.next_seek
                if cut.drop_window:  # as transcribe's `continue`: nothing of it is kept
                    return []
                segments = cut.segments
                last_word_end = get_end(segments)
            if last_word_end is not None:
                self.last_speech_timestamp = last_word_end
        # an instantaneous or textless segment is kept empty, as transcribe does
        for segment in segments:
            if segment["start"] == segment["end"] or segment["text"].strip() == "":
                segment["text"], segment["tokens"], segment["words"] = "", [], []
        self.segments.extend(segments)
        self.all_tokens.extend(t for segment in segments for t in segment["tokens"])
        if not self.condition_on_previous_text or proposal.temperature > 0.5:
            self.prompt_reset_since = len(self.all_tokens)
        return segments


class RequestStatus(enum.Enum):
    QUEUED = "queued"  # submitted, not yet taken up by the scheduler
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(eq=False)
class Request:
    """One upload in the engine: its options, its streams, and where it stands.

    Made by the engine when it is submitted; from then on written by the engine's thread
    only (the scheduler moves its status, windows and language; the output processor its
    emitted-segment counts)."""

    id: str  # the caller's id (logs)
    serial: int  # unique in the engine: the runner keys the request's log-mel by it
    audio: Any  # float32 samples at 16 kHz
    options: Any  # TranscriptionOptions
    content_frames: int = 0
    speech: Optional[List[Tuple[int, int]]] = None  # speech spans in mel frames (vad.py); None: no VAD
    # window_mode "pauses": the chunks of speech to decode, one text-only window each
    # (pause_chunks); None: Whisper's windows, moved by their timestamps
    chunks: Optional[List[Tuple[int, int]]] = None
    prompt_tokens: Tuple[int, ...] = ()  # the `prompt` option's tokens
    arrived: float = field(default_factory=time.monotonic)
    language: Optional[str] = None  # None until detected
    status: RequestStatus = RequestStatus.QUEUED
    streams: List[Stream] = field(default_factory=list)
    windows: List[Any] = field(default_factory=list)  # the scheduler's: each stream's next window (None: done)
    first_window_at: Optional[float] = None
    error: Optional[BaseException] = None
    _emitted: List[int] = field(default_factory=list)  # per stream: segments already emitted

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def streams_done(self) -> bool:
        return all(s.done for s in self.streams)

    def ready_segments(self) -> List[dict]:
        """Segments committed since the last call whose earlier segments are all known:
        a later piece's segments wait until the pieces before it are done."""
        if len(self._emitted) != len(self.streams):
            self._emitted = [0] * len(self.streams)
        ready = []
        for k, s in enumerate(self.streams):
            ready.extend(s.segments[self._emitted[k]:])
            self._emitted[k] = len(s.segments)
            if not s.done:
                break
        return ready

    def segment_count(self) -> int:
        return sum(self._emitted)

    def transcript(self, tokenizer, want_words: bool) -> Transcript:
        """The whole answer, pieces in order, segment ids from 0."""
        segments, tokens = [], []
        for s in self.streams:
            tokens.extend(s.all_tokens[len(s.initial_prompt):])
            for d in s.segments:
                segments.append(to_segment(d, len(segments), want_words, self.duration))
        return Transcript(
            text=tokenizer.decode(tokens), language=self.language, duration=self.duration,
            segments=segments, task=self.options.task,
        )


def to_segment(d: dict, id: int, want_words: bool, duration: float) -> Segment:
    """A committed segment dict as a Segment, its times clamped to the audio's `duration`
    (the last window's timestamps may run past the end)."""
    return Segment(
        id=id, seek=d["seek"], start=min(d["start"], duration), end=min(d["end"], duration), text=d["text"],
        tokens=list(d["tokens"]), temperature=d["temperature"], avg_logprob=d["avg_logprob"],
        compression_ratio=d["compression_ratio"], no_speech_prob=d["no_speech_prob"],
        words=[Word(w["word"], min(w["start"], duration), min(w["end"], duration), w["probability"])
               for w in d.get("words") or []]
        if want_words else None,
    )


def spans_in_frames(spans: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Speech spans in samples (vad.py) -> mel frames, widened to whole frames."""
    return [(a // HOP_LENGTH, -(-b // HOP_LENGTH)) for a, b in spans]


def speech_runs(speech: Sequence[Tuple[int, int]], long_pause: int, min_speech: int,
                content_frames: int) -> List[Tuple[int, int]]:
    """(start, end) mel frames of the runs of speech that are worth decoding, as a Stream
    decodes them (`skip_to_speech`): spans less than `long_pause` apart form one run, a
    run starts at frame 0 when the speech starts less than `long_pause` in, and a run with
    less than `min_speech` frames of speech is dropped. What `mode=sequential` hands
    whisper.transcribe as clip_timestamps."""
    runs: List[List[int]] = []
    for a, b in speech:
        a, b = max(0, a), min(b, content_frames)
        if b <= a:
            continue
        if runs and a - runs[-1][1] < long_pause:
            runs[-1][1], runs[-1][2] = b, runs[-1][2] + b - a
        else:
            runs.append([0 if not runs and a < long_pause else a, b, b - a])
    return [(a, b) for a, b, speech_frames in runs if speech_frames >= min_speech]


def pause_chunks(speech: Sequence[Tuple[int, int]], content_frames: int,
                 max_frames: int = N_FRAMES) -> List[Tuple[int, int]]:
    """(start, end) mel frames of the chunks a request is decoded in with window_mode
    "pauses": consecutive speech spans (vad.py's, cut at short pauses) joined while the
    chunk from its first span's start to its last span's end fits in one window, so every
    chunk starts and ends at a pause; a span longer than a window (the VAD cuts speech at
    30 s) is cut into windows."""
    chunks: List[Tuple[int, int]] = []
    for a, b in speech:
        a, b = max(0, a), min(b, content_frames)
        if b <= a:
            continue
        if chunks and b - chunks[-1][0] <= max_frames:
            chunks[-1] = (chunks[-1][0], b)
            continue
        while b - a > max_frames:
            chunks.append((a, a + max_frames))
            a += max_frames
        chunks.append((a, b))
    return chunks


def stream_clips(content_frames: int, cuts: Sequence[int]) -> List[Tuple[int, int]]:
    """(start, end) mel-frame ranges of the streams one request is split into."""
    bounds = [0] + [c for c in cuts if 0 < c < content_frames] + [content_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

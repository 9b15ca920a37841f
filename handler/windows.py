"""Pure logic of the engine: parsing one decoded window into segments and the next seek,
fallback and silence checks, splitting long audio at silences, and packing short clips
into one window and splitting the result back. No model here; everything is testable
with plain lists and arrays.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from whisper.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
INPUT_STRIDE = 2  # mel frames per audio token
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token


@dataclass
class WindowSegment:
    start: float
    end: float
    tokens: List[int]


@dataclass
class ParsedWindow:
    segments: List[WindowSegment]
    next_seek: int  # mel frame where the stream's next window starts
    single_timestamp_ending: bool


def parse_window(
    tokens: Sequence[int], timestamp_begin: int, seek: int, segment_size: int
) -> ParsedWindow:
    """Cut a window's tokens into segments at timestamp pairs and find the next seek,
    exactly as whisper.transcribe does: the unfinished last segment is dropped and the
    stream seeks to its start, so words are neither cut at the window edge nor repeated."""
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    is_ts = [t >= timestamp_begin for t in tokens]
    single_timestamp_ending = is_ts[-2:] == [False, True]
    consecutive = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    segments = []

    if consecutive:
        slices = list(consecutive)
        if single_timestamp_ending:
            slices.append(len(tokens))
        last_slice = 0
        for current in slices:
            piece = list(tokens[last_slice:current])
            start_pos = piece[0] - timestamp_begin
            end_pos = piece[-1] - timestamp_begin
            segments.append(
                WindowSegment(
                    start=time_offset + start_pos * TIME_PRECISION,
                    end=time_offset + end_pos * TIME_PRECISION,
                    tokens=piece,
                )
            )
            last_slice = current
        if single_timestamp_ending:
            # a single timestamp at the end means no speech after it
            next_seek = seek + segment_size
        else:
            last_pos = tokens[last_slice - 1] - timestamp_begin
            next_seek = seek + last_pos * INPUT_STRIDE
    else:
        duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        timestamps = [t for t in tokens if t >= timestamp_begin]
        if timestamps and timestamps[-1] != timestamp_begin:
            # no consecutive timestamps but a timestamp at the end: use it as the end
            duration = (timestamps[-1] - timestamp_begin) * TIME_PRECISION
        segments.append(
            WindowSegment(start=time_offset, end=time_offset + duration, tokens=list(tokens))
        )
        next_seek = seek + segment_size

    return ParsedWindow(segments, next_seek, single_timestamp_ending)


@dataclass(frozen=True)
class Thresholds:
    compression_ratio: Optional[float] = 2.4
    logprob: Optional[float] = -1.0
    no_speech: Optional[float] = 0.6


def best_attempt(attempts: Sequence, thresholds: Thresholds):
    """When every temperature failed: the attempt with the highest average log-probability
    among those that are not too repetitive (or among all, if none is). Whisper keeps the
    last, hottest sample instead, which on hard audio is usually the worst one."""
    limit = thresholds.compression_ratio
    candidates = [a for a in attempts if limit is None or a.compression_ratio <= limit] or list(attempts)
    return max(candidates, key=lambda a: a.avg_logprob)


def needs_fallback(result, thresholds: Thresholds) -> bool:
    """True when a decoded window should be decoded again at the next temperature
    (too repetitive or too improbable, and not simply silence)."""
    t = thresholds
    failed = False
    if t.compression_ratio is not None and result.compression_ratio > t.compression_ratio:
        failed = True
    if t.logprob is not None and result.avg_logprob < t.logprob:
        failed = True
    if (
        t.no_speech is not None
        and result.no_speech_prob > t.no_speech
        and t.logprob is not None
        and result.avg_logprob < t.logprob
    ):
        failed = False  # silence: no point sampling hotter
    return failed


def is_silence(result, thresholds: Thresholds) -> bool:
    """True when whisper.transcribe would skip the window as having no speech."""
    t = thresholds
    if t.no_speech is None:
        return False
    skip = result.no_speech_prob > t.no_speech
    if t.logprob is not None and result.avg_logprob > t.logprob:
        skip = False  # confident text despite the no-speech probability
    return skip


# ---------------------------------------------------------------- splitting long audio


def frame_energy(audio: np.ndarray, frame_seconds: float = 0.02) -> np.ndarray:
    """RMS energy per frame."""
    n = int(SAMPLE_RATE * frame_seconds)
    usable = len(audio) // n * n
    if usable == 0:
        return np.zeros(0, dtype=np.float32)
    frames = audio[:usable].reshape(-1, n).astype(np.float32)
    return np.sqrt((frames**2).mean(axis=1))


def split_points(
    audio: np.ndarray, n_pieces: int, search_seconds: float = 5.0, frame_seconds: float = 0.02
) -> List[int]:
    """Mel-frame positions that cut `audio` into about `n_pieces` equal parts, each cut
    moved to the quietest 0.3 s stretch within `search_seconds` of its target, so the cut
    falls in a pause rather than inside a word."""
    duration = len(audio) / SAMPLE_RATE
    if n_pieces <= 1 or duration <= 0:
        return []
    energy = frame_energy(audio, frame_seconds)
    smooth = max(1, int(0.3 / frame_seconds))
    smoothed = np.convolve(energy, np.ones(smooth) / smooth, mode="same")
    cuts = []
    for k in range(1, n_pieces):
        target = duration * k / n_pieces
        lo = max(0, int((target - search_seconds) / frame_seconds))
        hi = min(len(smoothed), int((target + search_seconds) / frame_seconds))
        if hi <= lo:
            continue
        best = lo + int(np.argmin(smoothed[lo:hi]))
        frame = round(best * frame_seconds * FRAMES_PER_SECOND)
        if not cuts or frame > cuts[-1] + FRAMES_PER_SECOND:
            cuts.append(frame)
    return cuts


def stream_clips(content_frames: int, cuts: Sequence[int]) -> List[Tuple[int, int]]:
    """(start, end) mel-frame ranges of the streams one request is split into."""
    bounds = [0] + [c for c in cuts if 0 < c < content_frames] + [content_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# ---------------------------------------------------------------- packing short clips


def plan_packs(
    durations: Sequence[float], max_seconds: float = 28.0, gap: float = 2.0
) -> List[List[int]]:
    """Group clip indices into packs whose clips plus silent gaps fit in `max_seconds`
    (first fit, order kept inside a pack); a clip too long to share a window is alone."""
    packs: List[List[int]] = []
    totals: List[float] = []
    for i, d in enumerate(durations):
        if d + gap > max_seconds:
            packs.append([i])
            totals.append(max_seconds)
            continue
        for p, total in enumerate(totals):
            if total + gap + d <= max_seconds:
                packs[p].append(i)
                totals[p] = total + gap + d
                break
        else:
            packs.append([i])
            totals.append(d)
    return packs


@dataclass
class PackLayout:
    """Where each clip sits in the packed audio, in seconds."""

    starts: List[float]
    ends: List[float]

    def boundaries(self) -> List[float]:
        """Midpoints of the gaps: everything before boundary k belongs to clips <= k."""
        return [(e + s) / 2 for e, s in zip(self.ends[:-1], self.starts[1:])]


def pack_audio(clips: Sequence[np.ndarray], gap: float) -> Tuple[np.ndarray, PackLayout]:
    """Concatenate clips with `gap` seconds of digital silence between them."""
    silence = np.zeros(int(round(gap * SAMPLE_RATE)), dtype=np.float32)
    parts, starts, ends, t = [], [], [], 0
    for i, clip in enumerate(clips):
        if i:
            parts.append(silence)
            t += len(silence)
        starts.append(t / SAMPLE_RATE)
        parts.append(clip.astype(np.float32))
        t += len(clip)
        ends.append(t / SAMPLE_RATE)
    return np.concatenate(parts), PackLayout(starts, ends)


@dataclass
class PackedWord:
    word: str
    start: float
    end: float
    probability: float
    segment: int  # index of the packed window's segment the word came from


@dataclass
class SplitResult:
    words: List[List[PackedWord]]  # per clip, times relative to the clip's start
    ambiguous: List[int] = field(default_factory=list)  # clips to decode again alone


def split_words(
    words: Sequence[PackedWord], layout: PackLayout, margin: float = 0.2
) -> SplitResult:
    """Give each word of a packed window to the clip its midpoint falls in (split at the
    middle of each gap), with times made relative to that clip.

    A clip is ambiguous, and should be decoded again on its own, when a word straddles a
    gap midpoint by more than `margin` seconds on both sides (it may belong to either
    neighbour), or when a clip that is not the only one received no words at all."""
    bounds = layout.boundaries()
    n = len(layout.starts)
    per_clip: List[List[PackedWord]] = [[] for _ in range(n)]
    ambiguous = set()
    for w in words:
        mid = (w.start + w.end) / 2
        k = int(np.searchsorted(bounds, mid, side="right")) if bounds else 0
        for j, b in enumerate(bounds):
            if w.start < b - margin and w.end > b + margin:
                ambiguous.update((j, j + 1))
        offset = layout.starts[k]
        length = layout.ends[k] - layout.starts[k]
        start = min(max(w.start - offset, 0.0), length)
        end = min(max(w.end - offset, start), length)
        per_clip[k].append(PackedWord(w.word, round(start, 2), round(end, 2), w.probability, w.segment))
    if n > 1:
        ambiguous.update(k for k in range(n) if not per_clip[k])
    return SplitResult(per_clip, sorted(ambiguous))

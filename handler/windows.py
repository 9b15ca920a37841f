"""Pure logic of the engine: parsing one decoded window into segments and the next seek,
fallback checks (compression ratio, log-probability, repeated runs of words) and silence
checks, and splitting long audio at silences. No model here;
everything is testable with plain lists and arrays.
"""

import string
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from whisper.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from whisper.utils import get_end

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
    # more back-to-back copies of one run of words than this is a loop; the compression
    # ratio misses loops in short windows (a sentence three times gzips to under 2.4)
    max_repeats: Optional[int] = 3


MAX_NGRAM_WORDS = 10  # longest run of words whose repeats are counted


def longest_repeat(text: str, max_n: int = MAX_NGRAM_WORDS) -> int:
    """The most back-to-back copies of one n-gram of words (1 <= n <= max_n) in `text`,
    case and punctuation ignored: 1 when nothing repeats, 0 for no words."""
    words = [w for w in (w.strip(string.punctuation).lower() for w in text.split()) if w]
    best = 1 if words else 0
    for n in range(1, max_n + 1):
        for start in range(len(words) - 2 * n + 1):
            gram, count = words[start: start + n], 1
            while words[start + count * n: start + (count + 1) * n] == gram:
                count += 1
            best = max(best, count)
    return best


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
    if t.max_repeats is not None and longest_repeat(result.text) > t.max_repeats:
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


# ---------------------------------------------------------------- hallucination_silence_threshold

PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"  # whisper.transcribe's, left out of anomaly scores


def word_anomaly_score(word: dict) -> float:
    """whisper.transcribe's: improbable, very short or very long words score high."""
    probability = word.get("probability", 0.0)
    duration = word["end"] - word["start"]
    score = 0.0
    if probability < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_segment_anomaly(segment: Optional[dict]) -> bool:
    """A segment whose first eight words look invented (whisper.transcribe's rule)."""
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in PUNCTUATION][:8]
    score = sum(word_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def _next_words_segment(segments: Sequence[dict]) -> Optional[dict]:
    return next((s for s in segments if s["words"]), None)


@dataclass
class SilenceSkip:
    segments: List[dict]  # the window's segments that are kept
    next_seek: int
    drop_window: bool = False  # nothing of the window is kept, not even its prompt update


def skip_hallucinated_silence(segments: List[dict], threshold: float, seek: int, segment_size: int,
                              next_seek: int, single_timestamp_ending: bool,
                              last_speech_timestamp: float, content_frames: int) -> SilenceSkip:
    """openai-whisper's hallucination_silence_threshold on one window whose segments have
    word timestamps (dicts with "words"): when a suspected hallucination is surrounded by
    more than `threshold` seconds of silence, drop it and everything after it in the window
    and seek to it; skip leading silence before a suspected first segment. `next_seek` is
    the seek the window moves to otherwise (frames)."""
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    window_end_time = (seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE
    segment_duration = segment_size * HOP_LENGTH / SAMPLE_RATE
    content_duration = content_frames * HOP_LENGTH / SAMPLE_RATE
    if not single_timestamp_ending:
        last_word_end = get_end(segments)
        if last_word_end is not None and last_word_end > time_offset:
            if window_end_time - last_word_end > threshold:
                next_seek = round(last_word_end * FRAMES_PER_SECOND)
            else:
                next_seek = seek + segment_size
    first = _next_words_segment(segments)
    if first is not None and is_segment_anomaly(first):
        gap = first["start"] - time_offset
        if gap > threshold:
            return SilenceSkip([], seek + round(gap * FRAMES_PER_SECOND), drop_window=True)
    last_end = last_speech_timestamp
    for k, segment in enumerate(segments):
        if not segment["words"]:
            continue
        if is_segment_anomaly(segment):
            following = _next_words_segment(segments[k + 1:])
            next_start = (following["words"][0]["start"] if following is not None
                          else time_offset + segment_duration)
            silence_before = (segment["start"] - last_end > threshold or segment["start"] < threshold
                              or segment["start"] - time_offset < 2.0)
            silence_after = (next_start - segment["end"] > threshold or is_segment_anomaly(following)
                             or window_end_time - segment["end"] < 2.0)
            if silence_before and silence_after:
                next_seek = round(max(time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                if content_duration - segment["end"] < threshold:
                    next_seek = content_frames
                return SilenceSkip(segments[:k], next_seek)
        last_end = segment["end"]
    return SilenceSkip(segments, next_seek)


# ---------------------------------------------------------------- splitting long audio


# Segments of a text-only window, cut from its timed words (subtitle-sized)
SEGMENT_PAUSE_S = 0.6  # a pause at least this long between two words starts a new segment
MAX_SEGMENT_S = 10.0  # a segment longer than this is cut before the word that would pass it
SENTENCE_ENDS = (".", "?", "!")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "mt", "e.g", "i.e"}


def ends_sentence(word: str) -> bool:
    """The word ends a sentence: it ends in . ? or ! and is not an abbreviation or an
    initial ("Mr.", "J.")."""
    word = word.strip()
    if not word.endswith(SENTENCE_ENDS):
        return False
    stem = word.rstrip(".?!").lower()
    return word[-1] != "." or (len(stem) > 1 and stem not in ABBREVIATIONS)


def split_at_words(segment: dict, encode) -> List[dict]:
    """A window's one segment (decoded without timestamps, its words timed) as segments
    of a subtitle's size: a new one after a word that ends a sentence (ends_sentence), at a pause of
    SEGMENT_PAUSE_S, and before a word that would take it past MAX_SEGMENT_S; each spans
    its words, its text is theirs and its tokens `encode(text)`. A segment without words
    is returned as it is."""
    words = segment.get("words") or []
    if not words:
        return [segment]
    pieces: List[List[dict]] = [[words[0]]]
    for before, word in zip(words, words[1:]):
        if (ends_sentence(before["word"]) or word["start"] - before["end"] >= SEGMENT_PAUSE_S
                or word["end"] - pieces[-1][0]["start"] > MAX_SEGMENT_S):
            pieces.append([])
        pieces[-1].append(word)
    out = []
    for piece in pieces:
        text = "".join(w["word"] for w in piece)
        out.append(dict(segment, start=piece[0]["start"], end=piece[-1]["end"], text=text,
                        tokens=list(encode(text)), words=piece))
    return out


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
    falls in a pause rather than inside a word. Only the audio around each target is read
    (an hour cut in 60 pieces: 10 of its 60 minutes)."""
    duration = len(audio) / SAMPLE_RATE
    if n_pieces <= 1 or duration <= 0:
        return []
    hop = int(SAMPLE_RATE * frame_seconds)
    n_frames = len(audio) // hop
    smooth = max(1, int(0.3 / frame_seconds))
    cuts = []
    for k in range(1, n_pieces):
        target = duration * k / n_pieces
        lo = max(0, int((target - search_seconds) / frame_seconds))
        hi = min(n_frames, int((target + search_seconds) / frame_seconds))
        if hi <= lo:
            continue
        # the frames the moving average over [lo, hi) reads, as on the whole file
        first, last = max(0, lo - smooth), min(n_frames, hi + smooth)
        energy = frame_energy(audio[first * hop: last * hop], frame_seconds)
        smoothed = np.convolve(energy, np.ones(smooth) / smooth, mode="same")
        best = lo + int(np.argmin(smoothed[lo - first: hi - first]))
        frame = round(best * frame_seconds * FRAMES_PER_SECOND)
        if not cuts or frame > cuts[-1] + FRAMES_PER_SECOND:
            cuts.append(frame)
    return cuts

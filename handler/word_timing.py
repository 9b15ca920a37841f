"""Move word boundaries off silence.

Whisper's word timestamps come from cross-attention alignment (dynamic time warping), which
has no notion of a pause: the silence before a word is given to that word, so after a pause
a word "starts" where the previous one ended, often a second early (openai-whisper's own
`word_timestamps` puts "ask" in the JFK clip at 2.1 s; it is spoken at 3.25 s). The audio
itself says where the pauses are. This module measures short-time energy and, within each
word's own span only, moves its start past the last pause inside it and its end back to the
last voiced frame. Words never move outside their original span, so order, monotonicity
and segment membership are kept; audio with no clear pauses is left alone.
"""

from dataclasses import dataclass, replace
from typing import List, Sequence

import numpy as np

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class SilenceSettings:
    frame_s: float = 0.02  # energy frame length
    quiet_db: float = 25.0  # a frame this far below the loud level is silent
    min_pause_s: float = 0.25  # shorter dips are gaps between syllables, not pauses
    min_voiced_s: float = 0.06  # a word keeps at least this much voiced audio


def voiced_frames(audio: np.ndarray, settings: SilenceSettings = SilenceSettings()) -> np.ndarray:
    """One bool per frame: is the frame louder than the silence threshold?"""
    hop = max(1, int(settings.frame_s * SAMPLE_RATE))
    n = len(audio) // hop
    if n == 0:
        return np.zeros(0, dtype=bool)
    frames = np.asarray(audio[: n * hop], dtype=np.float32).reshape(n, hop)
    db = 10.0 * np.log10(np.mean(frames * frames, axis=1) + 1e-10)
    loud = np.percentile(db, 95)
    return db > loud - settings.quiet_db


def snap_words(words: Sequence, audio: np.ndarray, settings: SilenceSettings = SilenceSettings()) -> List:
    """Words (anything with .start and .end in seconds, a dataclass) with their edges moved
    off the pauses inside their own spans; see the module docstring."""
    voiced = voiced_frames(audio, settings)
    if len(voiced) == 0 or voiced.all() or not voiced.any():
        return list(words)
    frame_s = settings.frame_s
    min_pause = max(1, round(settings.min_pause_s / frame_s))
    min_voiced = max(1, round(settings.min_voiced_s / frame_s))
    snapped = []
    for word in words:
        first = max(0, int(np.floor(word.start / frame_s)))
        last = min(len(voiced), int(np.ceil(word.end / frame_s)))
        span = voiced[first:last]
        if len(span) == 0 or not span.any():
            snapped.append(word)
            continue
        start_frame = first + _after_last_pause(span, min_pause, min_voiced)
        if start_frame == first and not span[0]:
            start_frame = first + int(np.argmax(span))  # leading silence, shorter than a pause
        end_frame = first + len(span) - int(np.argmax(span[::-1]))  # past the last voiced frame
        start = max(word.start, start_frame * frame_s)
        end = min(word.end, end_frame * frame_s)
        if end - start < settings.min_voiced_s:
            snapped.append(word)
            continue
        snapped.append(replace(word, start=float(start), end=float(end)))
    return snapped


def _after_last_pause(span: np.ndarray, min_pause: int, min_voiced: int) -> int:
    """Index just after the last run of >= min_pause silent frames that still leaves at
    least min_voiced voiced frames after it; 0 if there is none."""
    best = 0
    run = 0
    for i, is_voiced in enumerate(span):
        if not is_voiced:
            run += 1
            continue
        if run >= min_pause and span[i:].sum() >= min_voiced:
            best = i
        run = 0
    return best

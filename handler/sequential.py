"""`mode=sequential`: openai-whisper's own `transcribe`, one request at a time, on a worker
thread of its own (and a copy of the model of its own), beside the batched engine and never
inside its loop, so a batched request never waits for a sequential one.

Its admission is its own: one request runs, `max_waiting` more may wait; beyond that a
request gets 503 `overloaded` with Retry-After at once. With `vad_filter` (the default)
whisper.transcribe runs only over the runs of speech the batched engine would decode (its
`clip_timestamps`); the request's `condition_on_previous_text`, `prompt`, temperatures
and `hallucination_silence_threshold` are passed on.
"""

import copy
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from whisper.audio import SAMPLE_RATE

from errors import InternalError, Overloaded
from formats import Segment, Transcript, Word
from options import TranscriptionOptions
from stream import speech_runs
from windows import FRAMES_PER_SECOND

logger = logging.getLogger(__name__)


class SequentialWorker:
    """whisper.transcribe on its own thread, with its own bounded queue."""

    def __init__(self, model, fp16: bool, long_pause_s: float, min_window_speech_s: float,
                 condition_on_previous_text: bool, max_waiting: int):
        self._loaded = model  # as loaded: the seed's behaviour, not the engine's reduced copy
        self._model = None
        self.fp16 = fp16
        self.long_pause_s, self.min_window_speech_s = long_pause_s, min_window_speech_s
        self.condition_on_previous_text = condition_on_previous_text
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._queued_s: List[float] = []  # audio seconds of the requests running or waiting
        self._rate = 1.0  # audio seconds per second, measured
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="whisper-sequential")

    @property
    def model(self):
        """A copy of the model for this worker alone, made on first use. whisper's decode and
        word timing install forward hooks on the decoder's attention layers while they run:
        on a model shared with the engine, its steps would run through them."""
        if self._model is None:
            self._model = copy.deepcopy(self._loaded)
        return self._model

    def submit(self, audio: np.ndarray, options: TranscriptionOptions,
               speech: Callable[[], Optional[List[Tuple[int, int]]]], request_id: str) -> Future:
        """Queue one request (Overloaded beyond `max_waiting` waiting ones); `speech` gives
        its VAD spans in mel frames (or None), called on the worker. The Future gives its
        Transcript or raises its RequestError."""
        duration = len(audio) / SAMPLE_RATE
        with self._lock:
            if len(self._queued_s) > self.max_waiting:
                ahead = sum(self._queued_s)
                retry_after = int(min(60, max(1, math.ceil(ahead / max(self._rate, 1.0)))))
                raise Overloaded(
                    f"{len(self._queued_s)} sequential requests are running or waiting, the limit is "
                    f"{self.max_waiting + 1}; retry in {retry_after} s (mode=batched is not limited so)",
                    retry_after=retry_after)
            self._queued_s.append(duration)
        return self._executor.submit(self._run, audio, options, speech, request_id, duration)

    def _run(self, audio, options, speech, request_id, duration) -> Transcript:
        started = time.perf_counter()
        try:
            return self.transcribe(audio, options, speech())
        except Exception as exc:
            logger.exception("request %s: sequential transcription failed", request_id)
            raise InternalError(f"transcription failed: {type(exc).__name__}: {exc}") from None
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self._queued_s.remove(duration)
                if elapsed > 0 and duration > 0:
                    self._rate = duration / elapsed

    def transcribe(self, audio: np.ndarray, options: TranscriptionOptions,
                   speech: Optional[List[Tuple[int, int]]] = None) -> Transcript:
        """openai-whisper's transcribe; with `speech` (VAD spans in mel frames) only over the
        runs of speech the batched engine would decode (its clip_timestamps)."""
        duration = len(audio) / SAMPLE_RATE
        clips = {}
        if speech is not None:
            runs = speech_runs(speech, round(self.long_pause_s * FRAMES_PER_SECOND),
                               round(self.min_window_speech_s * FRAMES_PER_SECOND),
                               int(duration * FRAMES_PER_SECOND))
            if not runs:
                # nothing decoded, nothing detected: as the batched engine answers
                language = options.language or (None if self.model.is_multilingual else "en")
                return Transcript(text="", language=language, duration=duration, segments=[], task=options.task)
            clips = {"clip_timestamps": [t / FRAMES_PER_SECOND for run in runs for t in run]}
        conditioned = options.condition_on_previous_text
        temperature = options.temperature
        with torch.no_grad():
            result = self.model.transcribe(
                audio, language=options.language, task=options.task, initial_prompt=options.prompt,
                temperature=temperature[0] if len(temperature) == 1 else tuple(temperature),
                word_timestamps=options.word_timestamps, fp16=self.fp16,
                hallucination_silence_threshold=options.hallucination_silence_threshold,
                condition_on_previous_text=self.condition_on_previous_text if conditioned is None else conditioned,
                **clips,
            )
        segments = [
            Segment(
                id=s["id"], seek=s["seek"], start=s["start"], end=s["end"], text=s["text"],
                tokens=list(s["tokens"]), temperature=s["temperature"],
                avg_logprob=s["avg_logprob"], compression_ratio=s["compression_ratio"],
                no_speech_prob=s["no_speech_prob"],
                words=[Word(**w) for w in s["words"]] if "words" in s else None,
            )
            for s in result["segments"]
        ]
        return Transcript(text=result["text"], language=result["language"],
                          duration=duration, segments=segments, task=options.task)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

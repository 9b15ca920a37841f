"""The output processor: decoded windows applied to their streams, answers built.

For each window that ended in a step (runner output), in the engine's thread:

    chosen = stream.record(result)        # None: the scheduler requeues it one level hotter
    proposal = stream.propose(chosen)     # segments, next seek
    ... word timestamps of every proposal that needs them, in one runner call ...
    stream.commit(proposal)               # the scheduler gives the stream its next window

then hands each request's newly committed segments to its `SegmentFeed` (streaming), and,
for a finished request, builds the transcript (word edges snapped to the audio) in a
finisher thread and resolves its future. No torch here: the runner times the words.
"""

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from whisper.audio import HOP_LENGTH, SAMPLE_RATE

from errors import InternalError, RequestError
from formats import Segment, Transcript
from scheduler import Scheduler, Window
from stream import Proposal, Request, RequestStatus, to_segment
from windows import Thresholds, split_at_words
from word_timing import snap_words

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WordTimingJob:
    """One window's segments to time (whisper.timing's add_word_timestamps)."""

    window_id: int  # the runner keeps its encoder output under this id
    segments: Tuple[dict, ...]
    num_frames: int
    language: Optional[str]
    task: str
    last_speech_timestamp: float


class SegmentFeed:
    """A request's committed segments, batch by batch, for a reader that awaits them:
    `get(k)` is a Future of the k-th batch, or of None once the feed is closed before it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._batches: List[List[Segment]] = []
        self._waiting: Dict[int, List[Future]] = {}
        self._closed = False

    def put(self, segments: List[Segment]) -> None:
        with self._lock:
            self._batches.append(segments)
            waiting = self._waiting.pop(len(self._batches) - 1, [])
        for future in waiting:
            future.set_result(segments)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiting = [f for futures in self._waiting.values() for f in futures]
            self._waiting.clear()
        for future in waiting:
            future.set_result(None)

    def get(self, index: int) -> Future:
        future: Future = Future()
        with self._lock:
            if index < len(self._batches):
                future.set_result(self._batches[index])
            elif self._closed:
                future.set_result(None)
            else:
                self._waiting.setdefault(index, []).append(future)
        return future

    def all(self) -> List[Segment]:
        """Every segment put so far."""
        with self._lock:
            return [s for batch in self._batches for s in batch]


class Submission(Future):
    """What `Engine.submit` returns: the request's Transcript (or its RequestError) as a
    Future, and its segments as they are committed (`segments`)."""

    def __init__(self, request_id: str):
        super().__init__()
        self.request_id = request_id
        self.segments = SegmentFeed()


def words_on_speech(transcript: Transcript, audio) -> Transcript:
    """The transcript with its word edges moved off pauses (see word_timing.py) and, as
    whisper's add_word_timestamps does, each segment spanning exactly its words."""
    counts = [len(s.words or []) for s in transcript.segments]
    snapped = iter(snap_words([w for s in transcript.segments for w in s.words or []], audio))
    segments = []
    for segment, n in zip(transcript.segments, counts):
        if n:
            words = [next(snapped) for _ in range(n)]
            segment = replace(segment, words=words, start=words[0].start, end=words[-1].end)
        segments.append(segment)
    return replace(transcript, segments=segments)


def describe_error(exc: BaseException) -> str:
    """'Type: first line of the message', for a request's error and the log."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class OutputProcessor:
    """Applies runner outputs to streams and answers requests (module docstring)."""

    def __init__(self, scheduler: Scheduler, runner, thresholds: Thresholds, stats: dict, finisher):
        self.scheduler, self.runner, self.thresholds = scheduler, runner, thresholds
        self.stats = stats
        self.finisher = finisher  # an Executor: answers are built beside the loop
        for key in ("decoded_windows", "decoded_tokens", "word_timing_calls", "word_timed_windows",
                    "finished_requests", "audio_s", "committed_audio_s", "vad_skipped_audio_s",
                    "vad_skipped_windows"):
            stats.setdefault(key, 0)

    def apply(self, ended) -> List[Request]:
        """The windows that ended this step ((window id, DecodedWindow) pairs) to their
        streams: each again one level hotter, or committed, the words of all that ask for
        word timestamps timed together. Returns the requests they belong to."""
        self.stats["decoded_windows"] += len(ended)
        self.stats["decoded_tokens"] += sum(len(result.tokens) for _, result in ended)
        results = dict(ended)
        proposals: List[Tuple[Window, Proposal]] = []
        touched = []
        for window in self.scheduler.ended([window_id for window_id, _ in ended]):
            touched.append(window.request)
            try:
                proposal = self._propose(window, results[window.id])
            except Exception as exc:
                self._fail_window(window, "transcription", exc)
                continue
            if proposal is None:
                self.scheduler.requeue(window)
            else:
                proposals.append((window, proposal))
        timed = self._time_words([(w, p) for w, p in proposals if w.stream.word_timestamps and p.segments])
        for window, proposal in proposals:
            if window.request.status is not RequestStatus.RUNNING:
                continue
            stream = window.stream
            try:
                seek = stream.seek
                proposal = timed.get(window.id, proposal)
                if not stream.timestamps:  # one text-only segment: cut at its words
                    r = window.request
                    encode = self.runner.tokenizer(r.language, r.options.task).encode
                    proposal = replace(proposal, segments=[
                        piece for segment in proposal.segments for piece in split_at_words(segment, encode)])
                stream.commit(proposal)
            except Exception as exc:
                self._fail_window(window, "transcription", exc)
                continue
            self.stats["committed_audio_s"] += max(0, stream.seek - seek) * HOP_LENGTH / SAMPLE_RATE
            self.scheduler.advance(window)
        return list(dict.fromkeys(touched))

    def _propose(self, window: Window, result) -> Optional[Proposal]:
        """The proposal for a window's result, or None: it decodes again, hotter."""
        chosen = window.stream.record(result, self.thresholds)
        if chosen is None:
            return None
        r = window.request
        return window.stream.propose(chosen, self.thresholds, self.runner.tokenizer(r.language, r.options.task))

    def _time_words(self, proposals: Sequence[Tuple[Window, Proposal]]) -> Dict[int, Proposal]:
        """Word timestamps for these windows in one runner call; if it fails, each window
        alone, so only a request whose own window fails is failed."""
        if not proposals:
            return {}
        self.stats["word_timing_calls"] += 1
        self.stats["word_timed_windows"] += len(proposals)

        def job(w: Window, p: Proposal) -> WordTimingJob:
            r = w.request
            return WordTimingJob(w.id, tuple(p.segments), w.stream.window_size, r.language, r.options.task,
                                 w.stream.last_speech_timestamp)

        def timed(items, segments) -> Dict[int, Proposal]:
            return {w.id: replace(p, segments=list(s)) for (w, p), s in zip(items, segments)}

        if len(proposals) > 1:
            try:
                return timed(proposals, self.runner.time_words([job(w, p) for w, p in proposals]))
            except Exception:
                logger.exception("word timestamps of %d windows failed: timing them one at a time", len(proposals))
        out = {}
        for item in proposals:
            try:
                out.update(timed([item], self.runner.time_words([job(*item)])))
            except Exception as exc:
                self._fail_window(item[0], "word timestamps", exc)
        return out

    def _fail_window(self, window: Window, what: str, exc: BaseException) -> None:
        """Fail the window's request: `what` failed ("transcription", "word timestamps")."""
        logger.exception("request %s: %s failed", window.request.id, what)
        self.scheduler.fail(window.request, InternalError(f"{what} failed: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ answers

    def publish(self, r: Request, feed: SegmentFeed) -> None:
        """Put the request's newly committed segments, in order, into its feed."""
        first_id = r.segment_count()
        ready = r.ready_segments()
        if ready:
            feed.put([to_segment(d, first_id + k, False, r.duration) for k, d in enumerate(ready)])

    def finish(self, r: Request, submission: Submission) -> None:
        """Close the request's feed and build its answer beside the loop."""
        self.publish(r, submission.segments)
        submission.segments.close()
        self.stats["finished_requests"] += 1
        self.stats["audio_s"] += r.duration
        self.stats["vad_skipped_audio_s"] += sum(s.skipped_frames for s in r.streams) * HOP_LENGTH / SAMPLE_RATE
        self.stats["vad_skipped_windows"] += sum(s.skips for s in r.streams)
        tokenizer = self.runner.tokenizer(r.language, r.options.task)

        def answer():
            try:
                transcript = r.transcript(tokenizer, r.options.word_timestamps)
                if r.options.word_timestamps:
                    transcript = words_on_speech(transcript, r.audio)
                submission.set_result(transcript)
            except Exception as exc:
                logger.exception("request %s: building the answer failed", r.id)
                submission.set_exception(InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))

        self.finisher.submit(answer)

    @staticmethod
    def fail(submission: Submission, error: RequestError) -> None:
        submission.segments.close()
        if not submission.done():
            submission.set_exception(error)

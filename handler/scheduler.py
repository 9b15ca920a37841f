"""The scheduler: requests and their windows as explicit state, turned into step plans.

No torch, no model, no threads. The engine loop (engine.py) asks it each step for a
`StepPlan` (which windows to start, at which temperature and prompt, and how many tokens
to decode), has the model runner (runner.py) execute it, and tells it what happened:

    plan = scheduler.schedule()
    scheduler.started(jobs, languages)          # or start_failed(jobs, failure, rows)
    scheduler.decode_failed(window_ids, failure)
    scheduler.requeue(window) / scheduler.advance(window)   # from the output processor
    scheduler.end_step()

Every stream with audio left has exactly one `Window`: the next 30 s it decodes, with a
stable id (the runner keeps its encoder output under it while it goes round the fallback
ladder) and a `WindowStatus`. The policy lives here and only here:

- admission (`Admission`: seconds of audio in flight, 503 with Retry-After beyond them);
- cutting a long request into streams (its share of the configured window budget among
  the requests in flight at its arrival);
- choosing windows for the free places of the decode batch: one per request per round, in
  order of arrival, so a long file uses free places but never holds back a later request;
- failures: a start that fails is split in halves down to one window, which fails its
  request alone (or, out of memory beside running windows, waits in the pool); a decode
  chunk that fails sends its windows back to the pool, after an out-of-memory error under
  a halved budget, after any other error to run one at a time until the one at fault fails;
- the window budget: halved by out-of-memory errors, one window more after every
  `BUDGET_RETRY_STEPS` steps without one.
"""

import enum
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from errors import InternalError, OutOfMemory, Overloaded, RequestError
from stream import Request, RequestStatus, Stream, stream_clips
from windows import FRAMES_PER_SECOND, split_points

logger = logging.getLogger(__name__)

BUDGET_RETRY_STEPS = 1000  # steps without an out-of-memory error before a lowered budget grows by one


class WindowStatus(enum.Enum):
    WAITING = "waiting"  # its stream's next window, not in the decode batch
    DECODING = "decoding"  # a row of the runner's decode batch
    SUSPECT = "suspect"  # was in a decode chunk that failed: runs alone before anything else starts


@dataclass(eq=False)
class Window:
    """The next window of one stream, from its seek, until it commits."""

    id: int
    request: Request
    stream: Stream
    status: WindowStatus = WindowStatus.WAITING
    encoded: bool = False  # the runner holds its encoder output (kept through fallback retries)


@dataclass(frozen=True)
class WindowJob:
    """One window to start: what the runner needs to encode it (or reuse its encoder
    output), build its prompt and add it to the decode batch."""

    window_id: int
    request: int  # Request.serial: the runner's key of the request's log-mel
    seek: int  # mel frames
    size: int
    encoded: bool
    language: Optional[str]  # None: detect it (the request's first window decides)
    languages: Tuple[str, ...]  # candidates for detection; (): all of the model's
    task: str
    prompt: Tuple[int, ...]  # previous-text tokens (without <|startofprev|>)
    temperature: float
    seed: int
    timestamps: bool = True  # False: decoded as text only (<|notimestamps|>)


@dataclass(frozen=True)
class StepPlan:
    start: Tuple[WindowJob, ...]
    tokens: int  # decoder tokens for every row of the batch


@dataclass(frozen=True)
class Failure:
    """A runner call that raised, as the scheduler needs to know it."""

    oom: bool
    message: str  # 'Type: first line of the message'


@dataclass(frozen=True)
class RequestFailed:
    request: Request
    error: RequestError


@dataclass(frozen=True)
class StepReport:
    """What one step did (the engine publishes it for metrics)."""

    step: int
    windows: int  # rows in the decode batch
    ended: int  # windows that ended (left the batch)
    seconds: float
    requests: int  # in flight after the step
    streams: int
    first_window_waits: Tuple[float, ...] = ()  # s from arrival, per request that started
    fallback_windows: int = 0  # windows started again at a hotter temperature


@dataclass(frozen=True)
class SchedulerConfig:
    window_budget: int  # windows in the decode batch at once
    new_windows_per_step: int  # windows that may join it per step (their encoder pass delays it)
    tokens_per_step: int
    n_text_ctx: int = 448  # the decoder's context: a prompt takes at most half of it
    split_long: bool = False
    min_stream_seconds: float = 60.0
    long_pause_frames: int = 3 * FRAMES_PER_SECOND
    min_window_speech_frames: int = FRAMES_PER_SECOND // 2
    condition_on_previous_text: bool = True


def window_seed(seed: int, stream: Stream) -> int:
    """The sampling seed of a stream's current window and fallback level: a function of the
    request's seed and the window's place only."""
    return (seed * 1_000_003 + stream.clip_start * 65_537 + stream.seek * 257 + stream.level) % (1 << 62)


class Admission:
    """Seconds of audio in flight, bounded by `cap`: thread-safe (requests are admitted in
    the callers' threads and released in the engine's)."""

    def __init__(self, cap: float, rate: Callable[[], float] = lambda: 1.0):
        self.cap = cap
        self.rate = rate  # audio seconds transcribed per second, for Retry-After
        self._lock = threading.Lock()
        self.audio_s = 0.0
        self.requests = 0

    def admit(self, duration: float, always: bool = False) -> None:
        """Count a request in, or raise Overloaded (a request alone is always admitted)."""
        with self._lock:
            if not (always or self.requests == 0 or self.audio_s + duration <= self.cap):
                excess = self.audio_s + duration - self.cap
                # seconds until enough audio has been transcribed, at least at real time
                retry_after = int(min(60, max(1, math.ceil(excess / max(self.rate(), 1.0)))))
                raise Overloaded(
                    f"the server is transcribing {self.audio_s:.0f} s of audio, its limit is "
                    f"{self.cap:.0f} s; retry in {retry_after} s", retry_after=retry_after)
            self.audio_s += duration
            self.requests += 1

    def release(self, duration: float) -> None:
        with self._lock:
            self.audio_s = max(0.0, self.audio_s - duration)
            self.requests -= 1


class Scheduler:
    """Requests in flight and the next window of each of their streams (module docstring)."""

    def __init__(self, config: SchedulerConfig, stats: Optional[dict] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.window_budget = config.window_budget  # lowered after an out-of-memory error
        self.stats = stats if stats is not None else {}
        for key in ("steps", "oom_splits", "failed_requests"):
            self.stats.setdefault(key, 0)
        self.clock = clock
        self._steps_since_oom = 0
        self._requests: List[Request] = []  # running, in order of arrival
        self._windows: Dict[int, Window] = {}  # the live windows by id
        self._ids = itertools.count()
        self._events: List[RequestFailed] = []
        self._released: List[int] = []  # window ids whose encoder outputs can go
        self._waits: List[float] = []
        self._fallbacks = 0

    # ------------------------------------------------------------------ requests

    def add(self, request: Request, sharing: int = 1) -> None:
        """Cut a request into streams (its share of the configured window budget among
        `sharing` requests in flight) and give each its first window. A request without
        audio frames is finished at once."""
        c = self.config
        cuts = []
        if c.split_long and request.chunks is None and request.duration >= 2 * c.min_stream_seconds:
            n_pieces = min(int(request.duration // c.min_stream_seconds), max(1, c.window_budget // sharing))
            cuts = split_points(request.audio, n_pieces)
        o = request.options
        conditioned = c.condition_on_previous_text if o.condition_on_previous_text is None \
            else o.condition_on_previous_text
        if request.chunks is not None:  # independent chunks, words timed to cut segments
            request.streams = [
                Stream(clip_start=a, clip_end=b, content_frames=request.content_frames,
                       temperatures=tuple(o.temperature), word_timestamps=True, timestamps=False,
                       initial_prompt=list(request.prompt_tokens), condition_on_previous_text=False)
                for a, b in request.chunks
            ]
        else:
            request.streams = [
                Stream(clip_start=a, clip_end=b, content_frames=request.content_frames,
                       temperatures=tuple(o.temperature),
                       word_timestamps=o.word_timestamps or o.hallucination_silence_threshold is not None,
                       hallucination_silence_threshold=o.hallucination_silence_threshold,
                       initial_prompt=list(request.prompt_tokens), condition_on_previous_text=conditioned,
                       speech=request.speech, long_pause=c.long_pause_frames,
                       min_window_speech=c.min_window_speech_frames)
                for a, b in stream_clips(request.content_frames, cuts)
            ]
        request.status = RequestStatus.RUNNING
        request.windows = [self._new_window(request, s) for s in request.streams]
        self._requests.append(request)

    def _new_window(self, request: Request, stream: Stream) -> Optional[Window]:
        if stream.done:
            return None
        window = Window(next(self._ids), request, stream)
        self._windows[window.id] = window
        return window

    @property
    def requests(self) -> List[Request]:
        """The running requests, in order of arrival."""
        return list(self._requests)

    def finished(self) -> List[Request]:
        """The running requests whose streams are all done; they leave the scheduler."""
        done = [r for r in self._requests if r.status is RequestStatus.RUNNING and r.streams_done]
        for r in done:
            r.status = RequestStatus.FINISHED
        self._requests = [r for r in self._requests if r.status is RequestStatus.RUNNING]
        return done

    def fail(self, request: Request, error: RequestError) -> None:
        """End a request with `error`: its windows leave (those in the decode batch run on,
        and their results are dropped)."""
        if request.status in (RequestStatus.FAILED, RequestStatus.FINISHED):
            return
        request.status = RequestStatus.FAILED
        request.error = error
        for k, window in enumerate(request.windows):
            if window is not None:
                self._drop(window)
                request.windows[k] = None
        self.stats["failed_requests"] += 1
        if request in self._requests:
            self._requests.remove(request)
        self._events.append(RequestFailed(request, error))

    def fail_all(self, error: RequestError) -> None:
        for request in list(self._requests):
            self.fail(request, error)

    def take_events(self) -> List[RequestFailed]:
        events, self._events = self._events, []
        return events

    def take_released(self) -> List[int]:
        """Ids of windows that left since the last call (their encoder outputs can go)."""
        released, self._released = self._released, []
        return released

    def _drop(self, window: Window) -> None:
        self._windows.pop(window.id, None)
        self._released.append(window.id)

    # ------------------------------------------------------------------ windows

    def window(self, window_id: int) -> Optional[Window]:
        """A live window, or None when it left (its request failed)."""
        return self._windows.get(window_id)

    @property
    def has_work(self) -> bool:
        return bool(self._windows)

    def decoding(self) -> int:
        return sum(1 for w in self._windows.values() if w.status is WindowStatus.DECODING)

    def requeue(self, window: Window) -> None:
        """A window that failed whisper's checks decodes again at its stream's next
        (hotter) level, from the encoder output the runner kept."""
        window.status = WindowStatus.WAITING

    def advance(self, window: Window) -> None:
        """A window committed: its stream's next window (if any) takes its place."""
        request = window.request
        self._drop(window)
        k = request.windows.index(window)
        request.windows[k] = self._new_window(request, window.stream)

    # ------------------------------------------------------------------ planning

    def schedule(self) -> StepPlan:
        """The windows to start in the free places of the decode batch this step."""
        windows = self._select()
        now = self.clock()
        for w in windows:
            if w.request.first_window_at is None:
                w.request.first_window_at = now
                self._waits.append(now - w.request.arrived)
        return StepPlan(tuple(self._job(w) for w in windows), self.config.tokens_per_step)

    def _select(self) -> List[Window]:
        """Up to the free places in the decode batch (and `new_windows_per_step`), one per
        request per round, in order of arrival: a place that frees up goes to the request
        holding the fewest, earlier arrivals first. While a window is suspected of failing
        the batch, it runs alone."""
        decoding = self.decoding()
        suspects = [w for r in self._requests for w in r.windows if w and w.status is WindowStatus.SUSPECT]
        if suspects:
            return suspects[:1] if decoding == 0 else []
        room = min(self.window_budget - decoding, self.config.new_windows_per_step)
        queues = [[w for w in r.windows if w and w.status is WindowStatus.WAITING] for r in self._requests]
        held = [sum(1 for w in r.windows if w and w.status is WindowStatus.DECODING) for r in self._requests]
        chosen: List[Window] = []
        level = 0
        while len(chosen) < room and any(queues):
            for k, queue in enumerate(queues):
                if queue and held[k] <= level and len(chosen) < room:
                    chosen.append(queue.pop(0))
                    held[k] += 1
            level += 1
        return chosen

    def _job(self, w: Window) -> WindowJob:
        s, r = w.stream, w.request
        return WindowJob(
            window_id=w.id, request=r.serial, seek=s.seek, size=s.window_size, encoded=w.encoded,
            language=r.language, languages=tuple(r.options.languages), task=r.options.task,
            prompt=tuple(s.prompt(self.config.n_text_ctx)), temperature=s.temperature,
            seed=window_seed(r.options.seed, s), timestamps=s.timestamps)

    # ------------------------------------------------------------------ outcomes

    def started(self, jobs: Sequence[WindowJob], languages: Dict[int, str]) -> None:
        """The jobs' windows joined the decode batch, each decoded in `languages[id]` (the
        detected language of a request that gave none)."""
        self._fallbacks += sum(job.encoded for job in jobs)
        for job in jobs:
            w = self._windows.get(job.window_id)
            if w is None:
                continue
            w.status, w.encoded = WindowStatus.DECODING, True
            if w.request.language is None:
                w.request.language = languages[job.window_id]

    def ended(self, window_ids: Sequence[int]) -> List[Window]:
        """The windows whose rows ended this step (those of failed requests are left out)."""
        windows = [self._windows.get(i) for i in window_ids]
        for w in windows:
            if w is not None:
                w.status = WindowStatus.WAITING
        return [w for w in windows if w is not None]

    def start_failed(self, jobs: Sequence[WindowJob], failure: Failure, decoding: int) -> List[List[WindowJob]]:
        """A start of these jobs raised (`decoding`: rows in the batch beside them). Returns
        the halves to try again now; one window alone fails its request, unless it ran out
        of memory beside running windows (then it waits in the pool)."""
        self._after_failure(failure, len(jobs) + decoding)
        if len(jobs) > 1:
            half = (len(jobs) + 1) // 2
            return [list(jobs[:half]), list(jobs[half:])]
        w = self._windows.get(jobs[0].window_id)
        if w is not None and not (failure.oom and decoding):
            self.fail(w.request, self._window_error(w.request, failure))
        return []

    def decode_failed(self, window_ids: Sequence[int], failure: Failure) -> None:
        """A decode chunk raised and the runner dropped its batch (these windows): they go
        back to the pool with their encoder outputs; after an error that is not out of
        memory, to run one at a time; a window that fails alone fails its request."""
        self._after_failure(failure, len(window_ids))
        windows = [w for w in (self._windows.get(i) for i in window_ids) if w is not None]
        if len(window_ids) == 1:
            if windows:
                self.fail(windows[0].request, self._window_error(windows[0].request, failure))
            return
        if not failure.oom:
            logger.error("decoding %d windows failed (%s): retrying them one at a time",
                         len(window_ids), failure.message)
        for w in windows:
            w.status = WindowStatus.WAITING if failure.oom else WindowStatus.SUSPECT

    def _after_failure(self, failure: Failure, windows: int) -> None:
        if not failure.oom:
            return
        self.stats["oom_splits"] += 1
        self._steps_since_oom = 0
        if windows > 1:
            self.window_budget = max(1, min(self.window_budget, windows // 2))
            logger.warning("out of memory with %d windows: step split, window budget now %d",
                           windows, self.window_budget)

    @staticmethod
    def _window_error(request: Request, failure: Failure) -> RequestError:
        if failure.oom:
            return OutOfMemory("Not enough device memory to transcribe this audio, even alone "
                               f"in a step ({failure.message}). Retry later.")
        logger.error("request %s: window failed alone: %s", request.id, failure.message)
        return InternalError(f"transcription failed: {failure.message}")

    def end_step(self, rows: int, ended: int, seconds: float) -> StepReport:
        """Count the step, grow a lowered budget after enough clean steps, report."""
        self.stats["steps"] += 1
        self._steps_since_oom += 1
        if self.window_budget < self.config.window_budget and self._steps_since_oom >= BUDGET_RETRY_STEPS:
            # the memory may have been taken by something passing: try one window more
            self.window_budget += 1
            self._steps_since_oom = 0
            logger.info("window budget raised to %d after %d steps without running out of memory",
                        self.window_budget, BUDGET_RETRY_STEPS)
        report = StepReport(self.stats["steps"], rows, ended, seconds, len(self._requests), self.streams_left(),
                            tuple(self._waits), self._fallbacks)
        self._waits, self._fallbacks = [], 0
        return report

    def streams_left(self) -> int:
        return sum(1 for r in self._requests for s in r.streams if not s.done)

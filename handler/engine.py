"""The serving engine: continuous batching of 30 s windows across all in-flight requests.

Requests are submitted at any time (`submit` returns a `Submission`: a Future of the
Transcript, with the request's segments as they are committed) and join the running batch
at the next step. Three parts, joined by typed objects, and a short loop that owns the
thread:

- the scheduler (scheduler.py, no torch): requests and windows as state; each step a
  `StepPlan` of the windows to start in the free places of the decode batch;
- the model runner (runner.py): starts those windows (encoder, language detection,
  prompts, joining the decode batch), decodes every running window `tokens_per_step`
  tokens further, times words;
- the output processor (outputs.py): applies the windows that ended to their streams
  (again one temperature hotter, or committed as `whisper.transcribe` would), publishes
  new segments and builds the answers.

A failure stays with its cause: the scheduler decides what a failing runner call means
(a start split in halves down to the window at fault, a decode chunk retried under a
lower budget or one window at a time), and only a window that fails alone fails, and only
its request. Sampling at temperatures above 0 uses a generator seeded per window from the
request's `seed`.

`mode="sequential"` requests go to their own worker (sequential.py), never into the loop.
"""

import itertools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from whisper.audio import N_FRAMES, SAMPLE_RATE

from cpu import bf16_unit
from errors import InternalError, InvalidAudio
from formats import Transcript
from oom import is_out_of_memory
from options import TranscriptionOptions
from runner import MAX_ENCODER_BATCH, ModelRunner, gpu_window_budget
from outputs import OutputProcessor, Submission, describe_error, words_on_speech
from scheduler import Admission, Failure, Scheduler, SchedulerConfig, StepReport
from sequential import SequentialWorker
from settings import WINDOW_MODES, HandlerSettings
from stream import LONG_PAUSE_S, MIN_WINDOW_SPEECH_S, Request, pause_chunks, spans_in_frames
from vad import CHUNK_MAX_SPEECH_S, CHUNK_PAUSE_MS, SileroVad
from windows import FRAMES_PER_SECOND, Thresholds

logger = logging.getLogger(__name__)

MAX_REPORTS = 10_000  # step reports kept for a reader that falls behind (older ones are dropped)


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    # tests: cuda's layout (fp16 weights, activations and LayerNorms) on the cpu, to check
    # it against fp32 where there is no GPU
    cpu_fp16_layout: bool = False
    # bf16 weights and activations on cpu; None: on where the cpu multiplies bf16 natively
    # (AMX or AVX-512 bf16), fp32 elsewhere (bf16 is 4x slower on AVX2); docs/benchmarks.md
    cpu_bf16: Optional[bool] = None
    # The cpu encoder: "torch" or "onnxruntime"; None: onnxruntime where the model runs in
    # fp32 (faster than torch's fp32 encoder), torch in bf16
    cpu_encoder: Optional[str] = None
    window_budget: Optional[int] = None  # max windows per step; None: by device
    cuda_graphs: bool = True  # cuda: the decode step replayed as CUDA graphs (decoding.py)
    max_new_tokens: int = 224
    thresholds: Thresholds = field(default_factory=Thresholds)  # whisper's fallback and silence checks
    # whisper.transcribe's default, kept by measurement (docs/benchmarks.md)
    condition_on_previous_text: bool = True
    # Cut long requests at pauses into streams decoded side by side (None: on cuda only; on
    # cpu the encoder already fills the cores, and each cut costs an extra window). A request
    # gets its share of the configured window budget among the requests in flight when it
    # arrives (each piece at least min_stream_seconds), so a long file's seams, and the
    # words right at them, can differ with the load at its arrival; False: they never do.
    split_long: Optional[bool] = None
    min_stream_seconds: float = 60.0
    # Windows per encoder call: on CPU larger calls are slower per window (the attention
    # maps leave the cache), so pairs; on GPU up to MAX_ENCODER_BATCH at once. None: by device.
    encoder_batch: Optional[int] = None
    # Decoder tokens per step: between steps finished windows leave the decode batch and
    # new ones join, so this bounds how long a new request waits to start (None: by device).
    tokens_per_step: Optional[int] = None
    # Windows that may join the decode batch per step (their encoder pass delays the step);
    # None: 2 on cpu (one encoder call), the whole budget on cuda.
    new_windows_per_step: Optional[int] = None
    # Seconds of audio admitted at once; a request beyond it gets 503 with Retry-After
    # (a request alone is always admitted: max_duration_s bounds it).
    max_inflight_audio_s: float = HandlerSettings.max_inflight_audio_s
    # mode=sequential requests that may wait behind the one running; beyond them, 503
    max_sequential_waiting: int = HandlerSettings.max_sequential_waiting
    # Wait for the device at the edges of each phase so encode_s/decode_s are exact on cuda
    # (profiling: four syncs per step); off, the step's one sync is reading the finished rows.
    timing_syncs: bool = False
    # "seek": Whisper's long-form decoding, 30 s windows moved by their timestamp tokens;
    # "pauses": the speech (vad_filter) cut at pauses into chunks of at most 30 s, decoded
    # side by side without timestamp tokens, segments cut at their timed words
    window_mode: str = HandlerSettings.window_mode
    # Voice activity detection (requests with vad_filter): stream.py's rules
    vad_long_pause_s: float = LONG_PAUSE_S
    vad_min_window_speech_s: float = MIN_WINDOW_SPEECH_S

    def resolved(self, dims=None) -> "EngineConfig":
        """Fill in the device-dependent defaults (`dims`: the model's ModelDimensions, for
        the GPU window budget)."""
        cuda = str(self.device).startswith("cuda")
        budget = self.window_budget
        if budget is None:
            budget = 16
            if cuda and dims is not None:
                budget = gpu_window_budget(self.device, dims, self.max_inflight_audio_s)
        if budget < 1:
            raise ValueError(f"window_budget must be at least 1, not {budget}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, not {self.window_mode!r}")
        cpu_bf16 = (bf16_unit() is not None if self.cpu_bf16 is None else self.cpu_bf16) and not (
            cuda or self.cpu_fp16_layout)
        return replace(
            self,
            window_budget=budget,
            split_long=cuda if self.split_long is None else self.split_long,
            tokens_per_step=(16 if cuda else 8) if self.tokens_per_step is None else self.tokens_per_step,
            encoder_batch=(min(budget, MAX_ENCODER_BATCH) if cuda else 2) if self.encoder_batch is None
            else self.encoder_batch,
            new_windows_per_step=self.new_windows_per_step or (budget if cuda else 2),
            cpu_bf16=cpu_bf16,
            cpu_encoder="torch" if cuda or self.cpu_fp16_layout
            else self.cpu_encoder or ("torch" if cpu_bf16 else "onnxruntime"),
        )

    @property
    def precision(self) -> str:
        """fp16 (cuda, or its layout on the cpu), bf16 or fp32."""
        if str(self.device).startswith("cuda") or self.cpu_fp16_layout:
            return "fp16"
        return "bf16" if self.cpu_bf16 else "fp32"


def model_runner(model, config: EngineConfig) -> ModelRunner:
    """The ModelRunner of `model` for a resolved config."""
    c = config
    return ModelRunner(model, c.device, c.precision, encoder_batch=c.encoder_batch, max_new_tokens=c.max_new_tokens,
                       timing_syncs=c.timing_syncs, encoder_backend=c.cpu_encoder, cuda_graphs=c.cuda_graphs)


class Engine:
    """Continuous batching of Whisper windows across requests (see the module docstring).

    `runner`: a runner to use instead of a ModelRunner of `model` (tests pass a fake or a
    fault-injecting one); `model` may then be None (no sequential mode)."""

    def __init__(self, model, config: EngineConfig = EngineConfig(), *, runner=None):
        self.config = c = config.resolved(model.dims if model is not None else None)
        self.runner = runner = runner if runner is not None else model_runner(model, c)
        # Counters and seconds per phase since start; the handler logs and exports them.
        self.stats: dict = {"encoder_windows": 0, "fallback_windows": 0, "mel_s": 0.0, "encode_s": 0.0,
                            "decode_s": 0.0, "step_s": 0.0, "vad_s": 0.0}
        self._stats_lock = threading.Lock()  # mel_s and vad_s are added in the callers' threads
        self.scheduler = Scheduler(SchedulerConfig(
            window_budget=c.window_budget, new_windows_per_step=c.new_windows_per_step,
            tokens_per_step=c.tokens_per_step, n_text_ctx=runner.n_text_ctx, split_long=c.split_long,
            min_stream_seconds=c.min_stream_seconds,
            long_pause_frames=round(c.vad_long_pause_s * FRAMES_PER_SECOND),
            min_window_speech_frames=round(c.vad_min_window_speech_s * FRAMES_PER_SECOND),
            condition_on_previous_text=c.condition_on_previous_text), self.stats)
        self.admission = Admission(c.max_inflight_audio_s, rate=self._audio_rate)
        # finishing a request (text, word snapping on the audio) is per-request CPU work:
        # it runs beside the loop, not in it
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="whisper-finish")
        self.outputs = OutputProcessor(self.scheduler, runner, c.thresholds, self.stats, self._finisher)
        self.sequential = None if model is None else SequentialWorker(
            model, c.precision == "fp16", c.vad_long_pause_s, c.vad_min_window_speech_s,
            c.condition_on_previous_text, c.max_sequential_waiting)
        self.vad = SileroVad()
        # what each step did, for a reader (the handler's metrics) that takes them as they come
        self.reports: "queue.Queue[StepReport]" = queue.Queue(MAX_REPORTS)
        self._cond = threading.Condition()
        self._inbox: Deque[Request] = deque()
        self._submissions: Dict[int, Submission] = {}  # by Request.serial (engine thread)
        self._serials = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="whisper-engine", daemon=True)
        self._thread.start()

    @property
    def model(self):
        return self.runner.model

    @property
    def languages(self) -> Tuple[str, ...]:
        return self.runner.languages

    @property
    def window_budget(self) -> int:
        """The current window budget (lowered after an out-of-memory error)."""
        return self.scheduler.window_budget

    def _audio_rate(self) -> float:
        """Audio seconds committed per second of stepping so far."""
        return self.stats.get("committed_audio_s", 0.0) / max(self.stats["step_s"], 1e-3)

    # ------------------------------------------------------------------ public entry

    def submit(self, audio: np.ndarray, options: TranscriptionOptions = TranscriptionOptions(),
               request_id: Optional[str] = None, admit_always: bool = False) -> Submission:
        """Queue one request; the Submission gives its Transcript or raises its RequestError,
        and its `segments` feed gets each run of newly committed segments, in order.

        Raises Overloaded when more than `max_inflight_audio_s` seconds of audio would be
        in flight (or, for mode=sequential, when its queue is full), InvalidAudio for
        non-finite samples. The log-mel and the speech spans are computed here, in the
        caller's thread, not in the engine loop."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if not np.isfinite(audio).all():
            raise InvalidAudio("invalid_samples", "the audio has NaN or infinite samples")
        if self._closed:
            raise InternalError("the engine is shut down")
        serial = next(self._serials)
        request_id = request_id or str(serial)
        if options.mode == "sequential":
            return self._submit_sequential(audio, options, request_id)
        duration = len(audio) / SAMPLE_RATE
        self.admission.admit(duration, admit_always)  # before any work: a refusal is at once
        try:
            started = time.perf_counter()
            content_frames = self.runner.add_audio(serial, audio) - N_FRAMES
            self._add_stat("mel_s", time.perf_counter() - started)
            chunks = None
            if self.config.window_mode == "pauses" and options.vad_filter:
                chunks = pause_chunks(self._speech(audio, options, chunked=True), content_frames)
            speech = None if chunks is not None else self._speech(audio, options)
            prompt = self.runner.tokenizer("en", options.task).encode(" " + options.prompt.strip()) \
                if options.prompt else []
            request = Request(id=request_id, serial=serial, audio=audio, options=options,
                              content_frames=content_frames, speech=speech, chunks=chunks, prompt_tokens=tuple(prompt),
                              language=options.language if self.runner.is_multilingual else "en")
        except BaseException:
            self.admission.release(duration)
            self.runner.release(requests=[serial])
            raise
        submission = Submission(request_id)
        with self._cond:
            if self._closed:
                self.admission.release(duration)
                self.runner.release(requests=[serial])
                raise InternalError("the engine is shut down")
            self._submissions[serial] = submission
            self._inbox.append(request)
            self._cond.notify()
        return submission

    def _speech(self, audio: np.ndarray, options: TranscriptionOptions,
                chunked: bool = False) -> Optional[List[Tuple[int, int]]]:
        """Speech spans in mel frames (vad_filter), or None; per-request CPU work, here.
        `chunked`: cut at short pauses and at most a window long (window_mode "pauses")."""
        if not options.vad_filter:
            return None
        started = time.perf_counter()
        vad = replace(options.vad, min_silence_duration_ms=CHUNK_PAUSE_MS,
                      max_speech_duration_s=CHUNK_MAX_SPEECH_S) if chunked else options.vad
        speech = spans_in_frames(self.vad.speech(audio, vad))
        self._add_stat("vad_s", time.perf_counter() - started)
        return speech

    def _add_stat(self, key: str, value: float) -> None:
        with self._stats_lock:
            self.stats[key] += value

    def _submit_sequential(self, audio, options, request_id) -> Submission:
        if self.sequential is None:
            raise InternalError("mode=sequential needs the model (this engine runs a stand-in runner)")
        # the speech spans are found on the sequential worker, once it takes the request up
        inner = self.sequential.submit(audio, options, lambda: self._speech(audio, options), request_id)
        submission = Submission(request_id)

        def settle(done):
            if done.cancelled() or done.exception() is not None:
                submission.segments.close()
                submission.set_exception(done.exception() if not done.cancelled() else
                                         InternalError("the engine was shut down before this request was done"))
                return
            transcript = done.result()
            if options.word_timestamps:
                transcript = words_on_speech(transcript, audio)
            submission.segments.put([replace(s, words=None) for s in transcript.segments])
            submission.segments.close()
            submission.set_result(transcript)

        inner.add_done_callback(settle)
        return submission

    def transcribe(self, requests: Sequence[Tuple[np.ndarray, TranscriptionOptions]]) -> List[Transcript]:
        """Transcribe (audio, options) pairs together and wait for all (scripts and tests)."""
        submissions = [self.submit(audio, options, admit_always=True) for audio, options in requests]
        return [s.result() for s in submissions]

    def load(self) -> dict:
        """In-flight requests and streams, admitted audio seconds, and the window budget."""
        return {
            "requests": self.admission.requests,
            "streams": self.scheduler.streams_left(),
            "inflight_audio_s": round(self.admission.audio_s, 3),
            "window_budget": self.scheduler.window_budget,
        }

    def warmup(self) -> None:
        """Run two short synthetic clips with word timestamps through the engine, so the
        first real requests do not pay for lazy initialisation (numba compiles
        whisper.timing's DTW on first use, cuDNN picks its kernels) and, on cuda, the decode
        step is captured as CUDA graphs; the stats start after it."""
        t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
        clip = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        # vad_filter off: the VAD would (rightly) find no speech in a tone, and nothing would run
        # greedy only: a clip that fails whisper's checks would go down the whole fallback ladder
        self.transcribe([(clip, TranscriptionOptions(word_timestamps=True, vad_filter=False, temperature=(0.0,)))] * 2)
        self.runner.warm_kernels()
        self.runner.capture_graphs(self.config.window_budget)  # cuda: every decode step shape, now
        self.wait_idle()
        with self._stats_lock:
            for key, value in self.stats.items():
                self.stats[key] = type(value)()
        self.runner.reset_counts()
        while not self.reports.empty():
            self.reports.get_nowait()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until the loop has nothing in flight and has reported its last step."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._inbox or self.scheduler.has_work or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            return not (self._inbox or self.scheduler.has_work or self._busy)

    def close(self) -> None:
        """Stop the loop; requests not answered yet get an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        closed = InternalError("the engine was shut down before this request was done")
        with self._cond:
            arrived, self._inbox = list(self._inbox), deque()
        for request in arrived:
            self.admission.release(request.duration)
            self.outputs.fail(self._submissions.pop(request.serial), closed)
        self.scheduler.fail_all(closed)
        self._settle()
        if self.sequential is not None:
            self.sequential.close()
        self._finisher.shutdown(wait=True)

    # ------------------------------------------------------------------ the loop

    _busy = False  # the loop is inside a step (wait_idle)

    def _loop(self) -> None:
        self.runner.bind_thread()
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._inbox and not self.scheduler.has_work and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                arrived, self._inbox = list(self._inbox), deque()
                self._busy = True
            try:
                sharing = len(self.scheduler.requests) + len(arrived)
                for request in arrived:
                    try:
                        self.scheduler.add(request, sharing)
                    except Exception as exc:
                        logger.exception("request %s: admission failed", request.id)
                        self.scheduler.fail(request, InternalError(
                            f"transcription failed: {type(exc).__name__}: {exc}"))
                if self.scheduler.has_work:
                    self._step()
                else:
                    self._settle()  # requests without audio frames
            except Exception as exc:  # a bug outside the per-window guards: fail what is in flight
                logger.exception("engine step failed")
                self.runner.reset()
                self.scheduler.fail_all(InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))
                self._settle()

    def _step(self) -> None:
        """Start windows in the free places of the decode batch, decode every running
        window `tokens_per_step` tokens further, apply the windows that ended."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        pending = [list(plan.start)] if plan.start else []
        while pending:  # depth first: a failing start is split in halves, tried at once
            jobs = pending.pop(0)
            clock = self.runner.clock()
            try:
                output = self.runner.start(jobs)
            except Exception as exc:
                failure = Failure(is_out_of_memory(exc), describe_error(exc))
                del exc  # its traceback holds the failed call's tensors
                pending[:0] = self.scheduler.start_failed(jobs, failure, len(self.runner.decoding))
                continue
            self.stats["encode_s"] += self.runner.clock() - clock
            self.stats["encoder_windows"] += output.encoded
            self.stats["fallback_windows"] += len(jobs) - output.encoded
            self.scheduler.started(jobs, output.languages)
        rows, ended = len(self.runner.decoding), []
        if rows:
            clock = self.runner.clock()
            try:
                ended = self.runner.decode(plan.tokens)
            except Exception as exc:
                failure = Failure(is_out_of_memory(exc), describe_error(exc))
                del exc
                self.scheduler.decode_failed(self.runner.reset(), failure)
            else:
                self.stats["decode_s"] += self.runner.clock() - clock
                self.stats.update(self.runner.graph_counts)  # graph_steps, eager_steps, ...
                for request in self.outputs.apply(ended):
                    if request.serial in self._submissions:
                        self.outputs.publish(request, self._submissions[request.serial].segments)
        self._settle()  # before the report: it counts what is still in flight
        elapsed = time.perf_counter() - started
        self.stats["step_s"] += elapsed
        report = self.scheduler.end_step(rows, len(ended), elapsed)
        try:
            self.reports.put_nowait(report)
        except queue.Full:  # nobody reads them: keep the newest
            self.reports.get_nowait()
            self.reports.put_nowait(report)

    def _settle(self) -> None:
        """Answer the requests that failed or finished, free what they held."""
        for event in self.scheduler.take_events():
            self._release(event.request)
            self.outputs.fail(self._submissions.pop(event.request.serial), event.error)
        for request in self.scheduler.finished():
            self._release(request)
            self.outputs.finish(request, self._submissions.pop(request.serial))
        self.runner.release(windows=self.scheduler.take_released())

    def _release(self, request: Request) -> None:
        self.admission.release(request.duration)
        self.runner.release(requests=[request.serial])

"""The serving engine: a scheduler that batches 30 s windows across all in-flight requests.

Requests are submitted at any time (`submit` returns a Future) and join the running batch
at the next step. The scheduler runs its own thread; each step it

1. admits the requests that arrived (cutting a long one into pieces on GPU),
2. takes up to `window_budget` windows from the in-flight streams, one per request per
   round in order of arrival, so a long file uses free slots but never holds back a
   short request that came later,
3. has the model runner (runner.py, the only part that touches torch) encode the new
   windows, detect languages and decode every window at its own temperature,
4. applies each decoded window to its stream (stream.py): a window that fails whisper's
   checks goes back into the next step's pool one temperature hotter, keeping its encoder
   output; the others move their stream's seek on exactly as `whisper.transcribe` does,
5. hands newly committed segments to the request's listener (streaming) and finishes
   the requests whose streams are all done.

A failure is confined to what caused it: a runner call that raises is split in halves
and retried (an out-of-memory error also lowers the window budget), so only the window
that fails alone fails, and only its request; a stream whose update raises ends its own
request. Sampling at temperatures above 0 uses a generator seeded per window from the
request's `seed`, so an answer never depends on what else was decoded.

`mode="sequential"` runs openai-whisper's own `transcribe` in the same thread, between
steps.
"""

import itertools
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from whisper.audio import HOP_LENGTH, N_FRAMES, SAMPLE_RATE

from errors import InternalError, InvalidAudio, Overloaded, OutOfMemory, RequestError
from formats import Segment, Transcript, Word
from oom import is_out_of_memory
from options import TranscriptionOptions
from cpu import bf16_unit
from runner import MAX_ENCODER_BATCH, AlignmentWindow, ModelRunner, gpu_window_budget
from stream import Request, Stream, speech_runs, spans_in_frames, stream_clips, to_segment
from vad import SileroVad
from windows import FRAMES_PER_SECOND, Thresholds, split_points
from word_timing import snap_words

logger = logging.getLogger(__name__)

BUDGET_RETRY_STEPS = 1000  # steps without an out-of-memory error before a lowered budget grows by one


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    fp16: Optional[bool] = None  # None: fp16 on cuda, fp32 on cpu
    # tests: cuda's layout (fp16 weights, activations and LayerNorms) on the cpu, to check
    # it against fp32 where there is no GPU
    cpu_fp16_layout: bool = False
    # bf16 weights and activations on cpu; None: on where the cpu multiplies bf16 natively
    # (AMX or AVX-512 bf16: encoder 1.75-3x and 16-row decode steps 2x faster there; WER
    # within the accuracy bar with tiny.en and base), fp32 elsewhere (bf16 is 4x slower on AVX2)
    cpu_bf16: Optional[bool] = None
    # The cpu encoder: "torch" or "onnxruntime"; None: onnxruntime where the model runs in
    # fp32 (1.76x faster than torch's fp32 encoder), torch in bf16 (as fast or faster)
    cpu_encoder: Optional[str] = None
    window_budget: Optional[int] = None  # max windows per step; None: by device
    cuda_graphs: bool = True  # cuda: the decode step replayed as CUDA graphs (decoding.py)
    max_new_tokens: int = 224
    compression_ratio_threshold: Optional[float] = 2.4
    logprob_threshold: Optional[float] = -1.0
    no_speech_threshold: Optional[float] = 0.6
    # a window whose text repeats one run of words back to back more often than this falls
    # back to a hotter temperature, like one failing the compression ratio (None: off)
    max_repeats: Optional[int] = 3
    # whisper.transcribe's default, kept by measurement (base, VAD on): English WER 4.99%
    # with it, 5.37% without, and no invented word either way (docs/benchmarks.md)
    condition_on_previous_text: bool = True
    # Cut long requests at pauses into streams decoded side by side (None: on cuda only; on
    # cpu the encoder already fills the cores, and each cut costs an extra window). A request
    # gets its share of the configured window budget among the requests in flight when it
    # arrives (each piece at least min_stream_seconds): one long file alone fills the
    # device, 64 share it without cutting more pieces than there are places (each cut
    # costs a partial window). So a long file's seams, and the words right at them, can
    # differ with the load at its arrival; split_long=False gives answers that never do.
    split_long: Optional[bool] = None
    min_stream_seconds: float = 60.0  # pieces a long request is cut into are at least this long
    # Windows per encoder call. On CPU larger calls are slower per window (the attention
    # maps leave the cache: 112 ms/window alone, 108 in pairs, 164 in sixteens for base bf16
    # on 2 cores), so the step's windows are encoded in pairs; on GPU up to MAX_ENCODER_BATCH at once.
    encoder_batch: Optional[int] = None
    # Decoder tokens per step: between steps finished windows leave the decode batch and
    # new ones join, so this bounds how long a new request waits to start (None: by device).
    tokens_per_step: Optional[int] = None
    # Windows that may join the decode batch per step (their encoder pass delays the step);
    # None: the encoder batch.
    new_windows_per_step: Optional[int] = None
    # Seconds of audio admitted at once; a request beyond it gets 503 with Retry-After
    # (a request alone is always admitted: max_duration_s bounds it).
    max_inflight_audio_s: float = 8 * 3600
    oom_above_windows: int = 0  # tests only: runner calls with more windows raise an injected OOM
    # Wait for the device at the edges of each phase so encode_s/decode_s are exact on cuda
    # (profiling: four syncs per step); off, the step's one sync is reading the finished rows.
    timing_syncs: bool = False
    # Voice activity detection (requests with vad_filter): a pause between speech spans at
    # least this long (or non-speech up to the end) is never decoded: a window ends where it
    # starts and the seek jumps over it (across shorter pauses windows advance by Whisper's
    # own timestamps); a window holding less speech than min_window_speech_s is not decoded
    # (the residue after the last complete segment, where Whisper invents text).
    vad_long_pause_s: float = 3.0
    vad_min_window_speech_s: float = 0.5

    def resolved(self, dims=None) -> "EngineConfig":
        """Fill in the device-dependent defaults (`dims`: the model's ModelDimensions)."""
        cuda = str(self.device).startswith("cuda")
        budget = self.window_budget
        if budget is None:
            budget = 16
            if cuda and dims is not None:
                budget = gpu_window_budget(torch.device(self.device), dims, self.max_inflight_audio_s)
        if budget < 1:
            raise ValueError(f"window_budget must be at least 1, not {budget}")
        cpu_bf16 = (bf16_unit() is not None if self.cpu_bf16 is None else self.cpu_bf16) and not (
            cuda or self.cpu_fp16_layout)
        return replace(
            self,
            fp16=cuda if self.fp16 is None else (self.fp16 and cuda),
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
    def dtype(self) -> torch.dtype:
        if self.fp16 or self.cpu_fp16_layout:
            return torch.float16
        return torch.bfloat16 if self.cpu_bf16 else torch.float32


@dataclass
class StepReport:
    """What one step did, for metrics (handed to the engine's `on_step`)."""

    windows: int
    seconds: float
    requests: int  # in flight after the step
    streams: int
    first_window_waits: List[float] = field(default_factory=list)  # s from arrival, per request
    fallback_windows: int = 0  # windows started again at a hotter temperature


def words_on_speech(transcript: Transcript, audio: np.ndarray) -> Transcript:
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


def window_seed(seed: int, stream: Stream) -> int:
    """The sampling seed of a stream's current window and fallback level: a function of the
    request's seed and the window's place only."""
    return (seed * 1_000_003 + stream.clip_start * 65_537 + stream.seek * 257 + stream.level) % (1 << 62)


class Engine:
    """Continuous batching of Whisper windows across requests (see the module docstring)."""

    def __init__(self, model, config: EngineConfig = EngineConfig(),
                 on_step: Optional[Callable[[StepReport], None]] = None):
        self.config = config.resolved(model.dims)
        c = self.config
        self.runner = ModelRunner(model, c.device, c.dtype, encoder_batch=c.encoder_batch,
                                  max_new_tokens=c.max_new_tokens, oom_above_windows=c.oom_above_windows,
                                  timing_syncs=c.timing_syncs, encoder_backend=c.cpu_encoder,
                                  cuda_graphs=c.cuda_graphs)
        # mode="sequential" is the seed's behaviour: the model as loaded, not a reduced cpu
        # copy (on cuda the runner lays out the loaded model itself in fp16)
        self.sequential_model = model
        self.thresholds = Thresholds(c.compression_ratio_threshold, c.logprob_threshold,
                                     c.no_speech_threshold, c.max_repeats)
        self.window_budget = c.window_budget  # lowered after an out-of-memory step
        self._steps_since_oom = 0
        self.on_step = on_step
        # Counters and seconds per phase since start; the handler logs and exports them.
        self.stats = {
            "steps": 0, "encoder_windows": 0, "decoded_windows": 0, "decoded_tokens": 0,
            "fallback_windows": 0, "oom_splits": 0, "failed_requests": 0, "finished_requests": 0,
            "audio_s": 0.0,
            "word_timing_calls": 0, "word_timed_windows": 0,  # calls batch a step's windows
            "committed_audio_s": 0.0,  # audio the streams' seeks have moved past
            "mel_s": 0.0, "encode_s": 0.0, "decode_s": 0.0, "step_s": 0.0,
            # voice activity detection: seconds spent, audio skipped, windows not decoded
            "vad_s": 0.0, "vad_skipped_audio_s": 0.0, "vad_skipped_windows": 0,
        }
        self.vad = SileroVad()
        self._cond = threading.Condition()
        self._inbox: Deque[Tuple[Request, Future]] = deque()
        self._inflight_audio_s = 0.0
        self._inflight_requests = 0
        self._active: List[Request] = []  # admitted, in order of arrival (engine thread only)
        self._futures: Dict[int, Future] = {}
        # id(stream) -> encoder output of its current window, kept until the window commits
        # (word timing, fallback retries)
        self._features: Dict[int, torch.Tensor] = {}
        self._decoding: set = set()  # id(stream) of the windows in the decode batch
        self._suspects: set = set()  # id(stream) of windows to run alone after a failed chunk
        self._ids = itertools.count()
        self._closed = False
        # finishing a request (text, word snapping on the audio) is per-request CPU work:
        # it runs beside the loop, not in it
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="whisper-finish")
        self._thread = threading.Thread(target=self._loop, name="whisper-engine", daemon=True)
        self._thread.start()

    @property
    def model(self):
        return self.runner.model

    @property
    def languages(self) -> Tuple[str, ...]:
        return self.runner.languages

    # ------------------------------------------------------------------ public entry

    def submit(self, audio: np.ndarray, options: TranscriptionOptions = TranscriptionOptions(),
               on_segments: Optional[Callable[[List[Segment]], None]] = None,
               request_id: Optional[str] = None, admit_always: bool = False) -> Future:
        """Queue one request; the Future gives its Transcript or raises its RequestError.

        on_segments is called (from the engine's threads) with each run of newly committed
        segments, in order. Raises Overloaded when more than `max_inflight_audio_s` seconds
        of audio would be in flight, InvalidAudio for non-finite samples. The log-mel is
        computed here, in the caller's thread, not in the engine loop."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if not np.isfinite(audio).all():
            raise InvalidAudio("invalid_samples", "the audio has NaN or infinite samples")
        request = Request(id=request_id or str(next(self._ids)), audio=audio, options=options,
                          on_segments=on_segments)
        if not self.runner.model.is_multilingual:
            request.language = "en"
        else:
            request.language = options.language
        with self._cond:
            if self._closed:
                raise InternalError("the engine is shut down")
            self._admit_or_refuse(request.duration, admit_always)
            self._inflight_audio_s += request.duration
            self._inflight_requests += 1
        try:
            if options.mode != "sequential":
                started = time.perf_counter()
                request.mel = self.runner.mel(audio)
                request.content_frames = request.mel.shape[-1] - N_FRAMES
                self.stats["mel_s"] += time.perf_counter() - started
            if options.vad_filter:  # per-request CPU work: here, not in the engine loop
                started = time.perf_counter()
                request.speech = spans_in_frames(self.vad.speech(audio, options.vad))
                self.stats["vad_s"] += time.perf_counter() - started
        except BaseException:
            self._release(request)
            raise
        future: Future = Future()
        with self._cond:
            self._inbox.append((request, future))
            self._cond.notify()
        return future

    def transcribe(self, requests: Sequence[Tuple[np.ndarray, TranscriptionOptions]]) -> List[Transcript]:
        """Transcribe (audio, options) pairs together and wait for all (scripts and tests)."""
        futures = [self.submit(audio, options, admit_always=True) for audio, options in requests]
        return [f.result() for f in futures]

    def load(self) -> dict:
        """In-flight requests and streams, admitted audio seconds, and the window budget."""
        active = list(self._active)
        return {
            "requests": self._inflight_requests,
            "streams": sum(1 for r in active for s in r.streams if not s.done),
            "inflight_audio_s": round(self._inflight_audio_s, 3),
            "window_budget": self.window_budget,
        }

    def warmup(self) -> None:
        """Run two short synthetic clips with word timestamps through the engine, so the
        first real requests do not pay for lazy initialisation (numba compiles
        whisper.timing's DTW on first use, cuDNN picks its kernels)."""
        t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
        clip = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        stats = dict(self.stats)
        # vad_filter off: the VAD would (rightly) find no speech in a tone, and nothing would run
        self.transcribe([(clip, TranscriptionOptions(word_timestamps=True, vad_filter=False))] * 2)
        self.stats.update(stats)
        self.runner.warm_kernels()

    def close(self) -> None:
        """Stop the scheduler; requests not answered yet get an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)
        closed = InternalError("the engine was shut down before this request was done")
        with self._cond:
            arrived = [request for request, future in self._inbox]
            for request, future in self._inbox:
                self._futures[id(request)] = future
            self._inbox.clear()
        for request in arrived + list(self._active):
            self._fail(request, closed)
        self._finisher.shutdown(wait=True)

    # ------------------------------------------------------------------ admission

    def _admit_or_refuse(self, duration: float, admit_always: bool) -> None:
        cap = self.config.max_inflight_audio_s
        if admit_always or self._inflight_requests == 0 or self._inflight_audio_s + duration <= cap:
            return
        # seconds until enough audio has been transcribed, at the rate measured so far
        # (at least real time: before anything is measured that is the cautious guess)
        rate = max(1.0, self.stats["committed_audio_s"] / max(self.stats["step_s"], 1e-3))
        excess = self._inflight_audio_s + duration - cap
        retry_after = int(min(60, max(1, math.ceil(excess / max(rate, 1e-3)))))
        raise Overloaded(
            f"the server is transcribing {self._inflight_audio_s:.0f} s of audio, its limit is "
            f"{cap:.0f} s; retry in {retry_after} s", retry_after=retry_after,
        )

    def _release(self, request: Request) -> None:
        with self._cond:
            self._inflight_audio_s = max(0.0, self._inflight_audio_s - request.duration)
            self._inflight_requests -= 1
        request.mel = None

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._active and not self.runner.decoding and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                arrived = list(self._inbox)
                self._inbox.clear()
            sharing = len(self._active) + len(arrived)
            for request, future in arrived:
                self._futures[id(request)] = future
                try:
                    if request.options.mode == "sequential":
                        self._finish_sequential(request)
                    else:
                        self._admit(request, sharing)
                except Exception as exc:
                    logger.exception("request %s: admission failed", request.id)
                    self._fail(request, InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))
            if self._active or self.runner.decoding:
                try:
                    self._step()
                except Exception as exc:  # a bug outside the per-window guards: fail what is in flight
                    logger.exception("engine step failed")
                    self.runner.reset()
                    self._decoding.clear()
                    for request in list(self._active):
                        self._fail(request, InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))

    def _admit(self, r: Request, sharing: int = 1) -> None:
        """Cut a request into streams (its share of the window budget among `sharing`
        requests in flight) and add it to the pool."""
        c = self.config
        cuts = []
        if c.split_long and r.duration >= 2 * c.min_stream_seconds:
            n_pieces = min(int(r.duration // c.min_stream_seconds), max(1, c.window_budget // sharing))
            cuts = split_points(r.audio, n_pieces)
        o = r.options
        conditioned = o.condition_on_previous_text
        if conditioned is None:
            conditioned = c.condition_on_previous_text
        prompt = self.runner.tokenizer("en", o.task).encode(" " + o.prompt.strip()) if o.prompt else []
        r.streams = [
            Stream(request=r, piece=k, clip_start=a, clip_end=b, content_frames=r.content_frames,
                   temperatures=tuple(o.temperature),
                   word_timestamps=o.word_timestamps or o.hallucination_silence_threshold is not None,
                   hallucination_silence_threshold=o.hallucination_silence_threshold,
                   initial_prompt=list(prompt), condition_on_previous_text=conditioned,
                   speech=r.speech, long_pause=round(c.vad_long_pause_s * FRAMES_PER_SECOND),
                   min_window_speech=round(c.vad_min_window_speech_s * FRAMES_PER_SECOND))
            for k, (a, b) in enumerate(stream_clips(r.content_frames, cuts))
        ]
        if r.done:  # no audio frames at all
            self._finish(r)
        else:
            self._active.append(r)

    def _select(self) -> List[Stream]:
        """Streams to start a window for: up to the free places in the decode batch (and
        `new_windows_per_step`), one per request per round, in order of arrival. While a
        window is suspected of failing the batch, it runs alone."""
        decoding = len(self.runner.decoding)
        if self._suspects:
            suspects = [s for r in self._active for s in r.streams if id(s) in self._suspects]
            return suspects[:1] if decoding == 0 and suspects else []
        room = min(self.window_budget - decoding, self.config.new_windows_per_step)
        queues = [deque(s for s in r.streams if not s.done and id(s) not in self._decoding)
                  for r in self._active]
        # windows each request already has in the batch: a place that frees up goes to the
        # request holding the fewest, earlier arrivals first
        held = [sum(1 for s in r.streams if id(s) in self._decoding) for r in self._active]
        chosen: List[Stream] = []
        level = 0
        while len(chosen) < room and any(queues):
            for k, q in enumerate(queues):
                if q and held[k] <= level and len(chosen) < room:
                    chosen.append(q.popleft())
                    held[k] += 1
            level += 1
        return chosen

    def _step(self) -> None:
        """Start windows in the free places of the decode batch, decode every running
        window `tokens_per_step` tokens further, apply the windows that ended."""
        started = time.perf_counter()
        streams = self._select()
        waits = []
        for s in streams:
            if s.request.first_window_at is None:
                s.request.first_window_at = time.monotonic()
                waits.append(s.request.first_window_at - s.request.arrived)
        fallbacks = self.stats["fallback_windows"]
        if streams:
            self._start(streams)
        fallbacks = self.stats["fallback_windows"] - fallbacks
        rows = len(self.runner.decoding)
        touched = []
        if rows:
            ended = self._decode()
            touched = [s.request for s, _ in ended]
            self._apply(ended)
        for r in dict.fromkeys(touched):
            self._publish(r)
            if r.error is None and r.done:
                self._finish(r)
        self._active = [r for r in self._active if not r.done]
        elapsed = time.perf_counter() - started
        self.stats["steps"] += 1
        self.stats["step_s"] += elapsed
        self._steps_since_oom += 1
        if self.window_budget < self.config.window_budget and self._steps_since_oom >= BUDGET_RETRY_STEPS:
            # the memory may have been taken by something passing: try one window more
            self.window_budget += 1
            self._steps_since_oom = 0
            logger.info("window budget raised to %d after %d steps without running out of memory",
                        self.window_budget, BUDGET_RETRY_STEPS)
        if self.on_step is not None:
            load = self.load()
            try:
                self.on_step(StepReport(rows, elapsed, load["requests"], load["streams"], waits, fallbacks))
            except Exception:
                logger.debug("on_step failed", exc_info=True)

    def _start(self, streams: List[Stream]) -> None:
        """Encode the streams' windows and add them to the decode batch. A failing call is
        split in halves (an out-of-memory error also lowers the budget), down to one
        window, whose request alone then fails."""
        try:
            self._forward(streams)
        except Exception as exc:
            oom = is_out_of_memory(exc)
            message = describe_error(exc)
            del exc  # its traceback holds the failed call's tensors
            self._after_failure(oom, len(streams) + len(self.runner.decoding))
            if len(streams) == 1:
                if oom and self.runner.decoding:
                    return  # it did not fit beside the running windows: it stays in the pool
                self._fail(streams[0].request, self._window_error(streams[0].request, oom, message))
                return
            half = (len(streams) + 1) // 2
            self._start(streams[:half])
            self._start(streams[half:])

    def _forward(self, streams: List[Stream]) -> None:
        """Encoder outputs (kept ones for retried windows), languages of requests that did
        not give one, and the windows added to the decode batch."""
        runner = self.runner
        started = runner.clock()
        new = [s for s in streams if id(s) not in self._features]
        encoded = iter(runner.encode([s.request.mel[:, s.seek: s.seek + s.window_size] for s in new])
                       if new else [])
        features = torch.stack([self._features[id(s)] if id(s) in self._features else next(encoded)
                                for s in streams])
        languages: List[Optional[str]] = [s.request.language for s in streams]
        unknown = [i for i, lang in enumerate(languages) if lang is None]
        if unknown:
            detected = runner.detect_language(features[unknown],
                                              [streams[i].request.options.languages for i in unknown])
            first: Dict[int, str] = {}
            for i, lang in zip(unknown, detected):  # the request's first row decides
                languages[i] = first.setdefault(id(streams[i].request), lang)
        initial = []
        for s, lang in zip(streams, languages):
            tokenizer = runner.tokenizer(lang, s.request.options.task)
            prompt = s.prompt(runner.dims.n_text_ctx)
            initial.append(([tokenizer.sot_prev] + prompt if prompt else []) + list(tokenizer.sot_sequence))
        runner.start(features, initial, [s.temperature for s in streams],
                     [window_seed(s.request.options.seed, s) for s in streams], streams)
        # only now, with the windows in the batch, does the stream state change
        for s, window_features, lang in zip(streams, features, languages):
            self._features[id(s)] = window_features
            self._decoding.add(id(s))
            if s.request.language is None:
                s.request.language = lang
        self.stats["encode_s"] += runner.clock() - started
        self.stats["encoder_windows"] += len(new)
        self.stats["fallback_windows"] += len(streams) - len(new)

    def _decode(self) -> List[Tuple[Stream, object]]:
        """One chunk of tokens for the decode batch; the windows that ended. On a failure the
        batch is dropped and its windows go back to the pool (kept encoder outputs, same
        fallback level): after an out-of-memory error with a lower budget, after another
        error each alone, until the one at fault fails its request."""
        started = self.runner.clock()
        try:
            ended = self.runner.step(self.config.tokens_per_step)
        except Exception as exc:
            oom = is_out_of_memory(exc)
            message = describe_error(exc)
            del exc
            streams = self.runner.reset()
            for s in streams:
                self._decoding.discard(id(s))
            self._after_failure(oom, len(streams))
            if len(streams) == 1:
                self._suspects.discard(id(streams[0]))
                self._fail(streams[0].request, self._window_error(streams[0].request, oom, message))
            elif not oom:
                logger.error("decoding %d windows failed (%s): retrying them one at a time", len(streams), message)
                self._suspects.update(id(s) for s in streams)
            return []
        self.stats["decode_s"] += self.runner.clock() - started
        self.stats["decoded_windows"] += len(ended)
        self.stats["decoded_tokens"] += sum(len(result.tokens) for _, result in ended)
        for s, _ in ended:
            self._decoding.discard(id(s))
            self._suspects.discard(id(s))
        return ended

    def _after_failure(self, oom: bool, windows: int) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        if oom:
            self.stats["oom_splits"] += 1
            self._steps_since_oom = 0
            if windows > 1:
                self.window_budget = max(1, min(self.window_budget, windows // 2))
                logger.warning("out of memory with %d windows: step split, window budget now %d",
                               windows, self.window_budget)

    @staticmethod
    def _window_error(request: Request, oom: bool, message: str) -> RequestError:
        if oom:
            return OutOfMemory("Not enough device memory to transcribe this audio, even alone "
                               f"in a step ({message}). Retry later.")
        logger.error("request %s: window failed alone: %s", request.id, message)
        return InternalError(f"transcription failed: {message}")

    def _apply(self, ended: List[Tuple[Stream, object]]) -> None:
        """The windows that ended this step to their streams: each again one level hotter,
        or committed, the words of all that ask for word timestamps timed together."""
        proposals = []
        for s, result in ended:
            try:
                proposal = self._propose(s, result)
            except Exception as exc:
                logger.exception("request %s: applying a window failed", s.request.id)
                self._fail(s.request, InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))
                continue
            if proposal is not None:
                proposals.append((s, proposal))
        self._time_words([(s, p) for s, p in proposals if s.word_timestamps and p[0].segments])
        for s, (proposal, _, _) in proposals:
            if s.request.error is not None:
                continue
            try:
                seek = s.seek
                s.commit(proposal)
            except Exception as exc:
                logger.exception("request %s: applying a window failed", s.request.id)
                self._fail(s.request, InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))
                continue
            self.stats["committed_audio_s"] += max(0, s.seek - seek) * HOP_LENGTH / SAMPLE_RATE

    def _propose(self, s: Stream, result):
        """(proposal, encoder output, tokenizer) for a window's result, or None: it decodes
        again, hotter, from the next step on (or its request has failed)."""
        r = s.request
        if r.error is not None:
            return None
        chosen = s.record(result, self.thresholds)
        if chosen is None:
            return None
        features = self._features.pop(id(s))
        tokenizer = self.runner.tokenizer(r.language, r.options.task)
        return s.propose(chosen, self.thresholds, tokenizer), features, tokenizer

    def _time_words(self, proposals) -> None:
        """Word timestamps for these windows in one runner call; if it fails, each window
        alone, so only a request whose own window fails is failed."""
        def windows(items):
            return [AlignmentWindow(p.segments, features, s.window_size, tokenizer, s.last_speech_timestamp)
                    for s, (p, features, tokenizer) in items]

        if not proposals:
            return
        self.stats["word_timing_calls"] += 1
        self.stats["word_timed_windows"] += len(proposals)
        if len(proposals) > 1:
            try:
                self.runner.add_word_timestamps(windows(proposals))
                return
            except Exception:
                logger.exception("word timestamps of %d windows failed: timing them one at a time", len(proposals))
        for item in proposals:
            if all("words" in segment for segment in item[1][0].segments):
                continue  # timed before the failure (whisper moves segment edges: not twice)
            try:
                self.runner.add_word_timestamps(windows([item]))
            except Exception as exc:
                logger.exception("request %s: word timestamps failed", item[0].request.id)
                self._fail(item[0].request, InternalError(f"word timestamps failed: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ answers

    def _publish(self, r: Request) -> None:
        """Hand the request's newly committed segments to its listener."""
        if r.on_segments is None or r.error is not None:
            return
        first_id = r.segment_count()
        ready = r.ready_segments()
        if ready:
            try:
                r.on_segments([to_segment(d, first_id + k, False, r.duration) for k, d in enumerate(ready)])
            except Exception:
                logger.exception("request %s: segment listener failed", r.id)

    def _fail(self, r: Request, error: RequestError) -> None:
        if r.error is not None:
            return
        r.error = error
        for s in r.streams:
            self._features.pop(id(s), None)
            self._suspects.discard(id(s))
        self.stats["failed_requests"] += 1
        self._release(r)
        future = self._futures.pop(id(r), None)
        if future is not None:
            future.set_exception(error)
        if r in self._active:
            self._active.remove(r)

    def _finish(self, r: Request) -> None:
        """Build the answer beside the loop and resolve the request's future."""
        future = self._futures.pop(id(r), None)
        self._release(r)
        self.stats["finished_requests"] += 1
        self.stats["audio_s"] += r.duration
        self.stats["vad_skipped_audio_s"] += sum(s.skipped_frames for s in r.streams) / FRAMES_PER_SECOND
        self.stats["vad_skipped_windows"] += sum(s.skips for s in r.streams)
        tokenizer = self.runner.tokenizer(r.language, r.options.task)

        def answer():
            try:
                transcript = r.transcript(tokenizer, r.options.word_timestamps)
                if r.options.word_timestamps:
                    transcript = words_on_speech(transcript, r.audio)
                future.set_result(transcript)
            except Exception as exc:
                logger.exception("request %s: building the answer failed", r.id)
                future.set_exception(InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))

        self._finisher.submit(answer)

    def _finish_sequential(self, r: Request) -> None:
        """The seed's behaviour: openai-whisper's transcribe with its defaults, here in the
        engine thread so it never runs beside a step."""
        future = self._futures.pop(id(r), None)
        try:
            transcript = self.transcribe_sequential(r.audio, r.options, r.speech)
        except Exception as exc:
            self._release(r)
            logger.exception("request %s: sequential transcription failed", r.id)
            future.set_exception(InternalError(f"transcription failed: {type(exc).__name__}: {exc}"))
            return
        self._release(r)
        self.stats["finished_requests"] += 1
        self.stats["audio_s"] += r.duration
        if r.options.word_timestamps:
            transcript = words_on_speech(transcript, r.audio)
        if r.on_segments is not None:
            r.on_segments([replace(s, words=None) for s in transcript.segments])
        future.set_result(transcript)

    @torch.no_grad()
    def transcribe_sequential(self, audio: np.ndarray, options: TranscriptionOptions,
                              speech: Optional[List[Tuple[int, int]]] = None) -> Transcript:
        """openai-whisper's transcribe; with `speech` (VAD spans in mel frames) only over the
        runs of speech the batched engine would decode (its clip_timestamps)."""
        duration = len(audio) / SAMPLE_RATE
        clips = {}
        if speech is not None:
            c = self.config
            runs = speech_runs(speech, round(c.vad_long_pause_s * FRAMES_PER_SECOND),
                               round(c.vad_min_window_speech_s * FRAMES_PER_SECOND),
                               int(duration * FRAMES_PER_SECOND))
            if not runs:
                # nothing decoded, nothing detected: as the batched engine answers
                language = options.language or (None if self.sequential_model.is_multilingual else "en")
                return Transcript(text="", language=language, duration=duration, segments=[], task=options.task)
            clips = {"clip_timestamps": [t / FRAMES_PER_SECOND for run in runs for t in run]}
        temperature = options.temperature
        result = self.sequential_model.transcribe(
            audio, language=options.language, task=options.task, initial_prompt=options.prompt,
            temperature=temperature[0] if len(temperature) == 1 else tuple(temperature),
            word_timestamps=options.word_timestamps, fp16=bool(self.config.fp16),
            hallucination_silence_threshold=options.hallucination_silence_threshold, **clips,
            **({} if options.condition_on_previous_text is None
               else {"condition_on_previous_text": options.condition_on_previous_text}),
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

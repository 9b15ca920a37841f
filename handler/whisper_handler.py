"""TorchServe glue for Whisper: an asynchronous handler in front of the engine.

Everything that is not about TorchServe lives in plain modules beside this one (packed
flat into whisper.mar): audio decoding in `audio`, request options in `options`, the
continuous-batching engine in `engine`, response rendering in `formats`, errors in
`errors`, the handler's settings in `settings`.

The model config sets `asyncCommunication: true`, so TorchServe's worker (ts/async_service.py)
calls `handle` as a coroutine for each request as it arrives and writes each answer back as
soon as it is ready, in any order. Each request is validated and decoded (in a thread, off
the event loop), submitted to the engine, and awaited; with `stream=true` its segments go
out as server-sent events (TorchServe's intermediate responses) while it is decoded. Every
error is answered for its own request alone: an exception raised out of `handle` would
fail the request with a generic 503.
"""

import asyncio
import json
import logging
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http import HTTPStatus
from typing import List

import torch
from ts.async_service import AsyncService
from ts.metrics.metric_type_enum import MetricTypes
from ts.protocol.otf_message_handler import create_predict_response
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler

from audio import decode_audio
from checkpoint import describe, load_whisper
from cpu import cpu_description
from drain import DRAIN_DIR_ENV, Drain
from engine import Engine, EngineConfig
from scheduler import StepReport
from errors import InternalError, InvalidAudio, Overloaded, RequestError
from formats import error_body, render, usage
from options import AUDIO_FIELDS, parse_options
from settings import HandlerSettings

logger = logging.getLogger(__name__)

OPTION_HEADER_PREFIX = "x-whisper-"
# Set by the nginx proxy on OpenAI's routes (config/nginx-openai.conf): answer in OpenAI's shapes.
OPENAI_ROUTE_HEADER = "x-openai-route"
EVENT_STREAM = "text/event-stream"


def audio_bytes(request: dict) -> bytes:
    """The upload: a multipart field (file, data, audio) or the raw body; exactly one."""
    given = [name for name in AUDIO_FIELDS if request.get(name) not in (None, b"", bytearray())]
    parts = sum(len(request[name]) if isinstance(request[name], list) else 1 for name in given)
    if parts > 1:
        raise InvalidAudio(
            "multiple_files",
            f"one audio file per request, got {parts} ({', '.join(given)}); send each file as its own request",
        )
    for name in AUDIO_FIELDS:
        value = request.get(name)
        if isinstance(value, (bytes, bytearray)) and len(value) > 0:
            return bytes(value)
    # TorchServe parses JSON/text bodies for us; audio never arrives as either.
    for name in AUDIO_FIELDS:
        if request.get(name) not in (None, b"", bytearray()):
            raise InvalidAudio(
                "undecodable_audio",
                f"the '{name}' field is not binary audio; send the file as multipart "
                "(-F file=@audio.flac) or as a raw body with an audio Content-Type",
            )
    raise InvalidAudio(
        "empty_body",
        "no audio in the request: send it as a multipart field 'file' or as the request body",
    )


def _keep_repeated_fields(retrieve):
    """TorchServe turns a request's form fields into a dict, so a repeated field keeps only
    its last value. OpenAI's SDK repeats `timestamp_granularities[]` (word, segment): keep
    every value of a repeated field, as a list, which parse_options understands."""

    def retrieve_data_for_inference(batch):
        headers, input_batch, req_to_id_map = retrieve(batch)
        for request, fields in zip(batch, input_batch):
            names = [parameter["name"] for parameter in request["parameters"]]
            for name in {n for n in names if names.count(n) > 1}:
                fields[name] = [p["value"] for p in request["parameters"] if p["name"] == name]
        return headers, input_batch, req_to_id_map

    retrieve_data_for_inference.keeps_repeated_fields = True
    return retrieve_data_for_inference


if not getattr(Service.retrieve_data_for_inference, "keeps_repeated_fields", False):
    Service.retrieve_data_for_inference = staticmethod(_keep_repeated_fields(Service.retrieve_data_for_inference))


# The async worker writes final answers from its own thread; intermediate responses are
# written from the event loop. One lock keeps the two from interleaving on the socket.
_SOCKET_LOCK = threading.Lock()


def _send_responses_locked(self):
    while True:
        message = asyncio.run_coroutine_threadsafe(self.out_queue.get(), self.loop).result()
        with _SOCKET_LOCK:
            self.service.cl_socket.sendall(message)


AsyncService.send_responses = _send_responses_locked


def send_chunk(context, index: int, body: bytes) -> None:
    """One intermediate response (an HTTP chunk) of request `index`; the handler's return
    value is the last one."""
    message = create_predict_response({index: body}, {index: context.request_ids[index]},
                                      "Intermediate response", 200, context, ts_stream_next=True)
    with _SOCKET_LOCK:
        context.cl_socket.sendall(message)


def start_event_stream(context, index: int) -> None:
    """Headers of a server-sent event stream; once its first chunk is out, the status is 200."""
    context.set_response_content_type(index, EVENT_STREAM)
    context.set_response_header(index, "Cache-Control", "no-cache")
    context.set_response_header(index, "X-Accel-Buffering", "no")  # nginx: pass chunks on at once


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode("utf-8")


def request_options(request: dict, headers: dict) -> dict:
    """The request's option fields plus options sent as `X-Whisper-<Option>` headers.

    TorchServe passes multipart form fields to the handler but drops the query string,
    so a raw-body upload carries its options in headers (`X-Whisper-Response-Format: srt`).
    A name given both ways is kept twice, so parse_options reports it as a duplicate.
    """
    fields = {name: value for name, value in request.items()}
    for name, value in (headers or {}).items():
        if isinstance(name, str) and name.lower().startswith(OPTION_HEADER_PREFIX):
            option = name[len(OPTION_HEADER_PREFIX):].lower().replace("-", "_")
            fields[option] = [*_as_list(fields[option]), value] if option in fields else value
    return fields


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class WhisperHandler(BaseHandler):
    def initialize(self, context):
        started = time.perf_counter()
        self.context = context  # metrics are emitted through it, also from the metrics thread
        properties = context.system_properties
        self.settings = settings = HandlerSettings.from_yaml((context.model_yaml_config or {}).get("handler"))
        # a graceful stop: serve.sh marks the server draining, this worker reports what is in flight
        self.drain = Drain(os.environ.get(DRAIN_DIR_ENV))
        self.model_name = settings.model
        checkpoint = os.path.join(properties.get("model_dir"), settings.checkpoint_file)

        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(settings.cpu_threads or self._cpu_share(context))

        model = load_whisper(checkpoint, self.device)
        self.engine = Engine(
            model,
            EngineConfig(
                device=str(self.device),
                window_budget=settings.window_budget or None,
                cpu_bf16=settings.cpu_bf16,
                cpu_encoder=settings.engine_cpu_encoder,
                cuda_graphs=settings.cuda_graphs,
                split_long=settings.engine_split_long,
                window_mode=settings.window_mode,
                max_inflight_audio_s=settings.max_inflight_audio_s,
                max_sequential_waiting=settings.max_sequential_waiting,
            ),
        )
        self.model = self.engine.model  # moved/cast for the device by the engine
        # Compile the lazily built kernels (word-timestamp DTW, cuDNN) before the first request.
        self.engine.warmup()
        # the engine's step reports become metrics on a thread of their own
        threading.Thread(target=self._report_steps, name="whisper-metrics", daemon=True).start()
        # audio decoding, ffmpeg, log-mel and rendering: per-request work off the event loop
        self.executor = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="whisper-io")
        self.initialized = True

        logger.info(
            "whisper ready: model=%s checkpoint=%s device=%s python=%s torch=%s cuda=%s "
            "gpu=%s cpu=%s precision=%s encoder=%s threads=%s dims=%s engine=%s load_s=%.2f",
            self.model_name, os.path.basename(checkpoint), self.device, platform.python_version(),
            torch.__version__, torch.version.cuda,
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "none",
            cpu_description(), self.engine.config.precision, self.engine.config.cpu_encoder,
            torch.get_num_threads(), describe(self.model), self.engine.config,
            time.perf_counter() - started,
        )

    def _emit(self, name: str, metric_type, value: float, **dimensions) -> None:
        """One custom metric (declared in config/metrics.yaml). TorchServe matches label
        values by position, so they are sent in the order the metric declares them."""
        try:
            metric = self.context.metrics.get_metric(name, metric_type)
            labels = {"ModelName": self.context.model_name, "Level": "Model", **dimensions}
            metric.add_or_update(value, [labels[n] for n in metric.dimension_names])
        except Exception:  # metrics must never fail a request
            logger.debug("metric %s not emitted", name, exc_info=True)

    def _report_steps(self) -> None:
        """Emit the metrics of each engine step, as the engine reports them."""
        while True:
            self._on_step(self.engine.reports.get())

    def _on_step(self, step: StepReport) -> None:
        self._emit("WindowsPerStep", MetricTypes.HISTOGRAM, step.windows)
        self._emit("StepTime", MetricTypes.HISTOGRAM, step.seconds * 1000)
        self._emit("InflightRequests", MetricTypes.GAUGE, step.requests)
        self._emit("InflightStreams", MetricTypes.GAUGE, step.streams)
        for wait in step.first_window_waits:
            self._emit("FirstWindowWait", MetricTypes.HISTOGRAM, wait * 1000)
        if step.fallback_windows:
            self._emit("FallbackCount", MetricTypes.COUNTER, step.fallback_windows)

    @staticmethod
    def _cpu_share(context) -> int:
        """Cores per worker: the machine's cores split over this model's workers."""
        workers = int((context.model_yaml_config or {}).get("maxWorkers") or 1)
        return max(1, (os.cpu_count() or 1) // max(1, workers))

    async def handle(self, data: List[dict], context) -> List[bytes]:
        """Answer every request of the call on its own (async mode hands over one at a time)."""
        return list(await asyncio.gather(*(self._answer(i, request, context) for i, request in enumerate(data))))

    async def _answer(self, index: int, request: dict, context) -> bytes:
        request_id = context.get_request_id(index) or str(index)
        try:
            self.drain.enter()
        except RequestError as err:
            return self._error(index, request_id, context, err, False)
        try:
            return await self._transcribe(index, request_id, request, context)
        finally:
            self.drain.leave()

    async def _transcribe(self, index: int, request_id: str, request: dict, context) -> bytes:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        streaming = False
        try:
            headers = context.get_all_request_header(index) or {}
            options = parse_options(
                request_options(request, headers),
                model_name=self.model_name, multilingual=self.model.is_multilingual,
                languages=self.engine.languages, default_mode=self.settings.default_mode,
                openai_api=any(str(k).lower() == OPENAI_ROUTE_HEADER for k in headers),
            )
            audio = await loop.run_in_executor(self.executor, partial(
                decode_audio, audio_bytes(request), max_duration_s=self.settings.max_duration_s,
                ffmpeg_timeout_s=self.settings.ffmpeg_timeout_s))
            logger.info("request %s: audio %.2fs at %s Hz, %s ch, %s via %s, decode %.3fs",
                        request_id, audio.duration_s, audio.source_rate, audio.channels,
                        audio.source_format, audio.decoder, time.perf_counter() - started)
            submission = await loop.run_in_executor(self.executor, partial(
                self.engine.submit, audio.samples, options, request_id=request_id))
            if options.stream:
                streaming = True
                transcript = await self._stream(index, submission, context)
                body = sse(done_event(transcript))
            else:
                transcript = await asyncio.wrap_future(submission)
                body, content_type = await loop.run_in_executor(self.executor, render, transcript, options)
                context.set_response_content_type(index, content_type)
        except RequestError as err:
            return self._error(index, request_id, context, err, streaming)
        except Exception as err:  # a bug must not take anything else down
            logger.exception("request %s: failed", request_id)
            return self._error(index, request_id, context,
                               InternalError(f"transcription failed: {type(err).__name__}: {err}"), streaming)
        elapsed = time.perf_counter() - started
        logger.info("request %s: %.1fs audio in %.2fs (%.1fx real time)", request_id,
                    transcript.duration, elapsed, transcript.duration / elapsed if elapsed > 0 else 0.0)
        if self.settings.log_transcripts:
            logger.info("request %s: text=%r", request_id, transcript.text)
        self._emit("AudioSecondsProcessed", MetricTypes.COUNTER, transcript.duration)
        if transcript.duration > 0:
            self._emit("RealTimeFactor", MetricTypes.GAUGE, elapsed / transcript.duration)
        return body

    async def _stream(self, index, submission, context):
        """Send a `transcript.text.delta` event per committed segment as the engine commits
        it; return the transcript for the final `transcript.text.done` event."""
        k = 0
        while (segments := await asyncio.wrap_future(submission.segments.get(k))) is not None:
            k += 1
            events = b"".join(sse(delta_event(s)) for s in segments)
            if events:
                start_event_stream(context, index)
                send_chunk(context, index, events)
        transcript = await asyncio.wrap_future(submission)  # raises the request's error
        start_event_stream(context, index)
        return transcript

    def _error(self, index, request_id, context, err: RequestError, streaming: bool) -> bytes:
        self._emit("RequestErrors", MetricTypes.COUNTER, 1, ErrorType=err.code)
        logger.info("request %s: %d %s: %s", request_id, err.status, err.code, err.message)
        if streaming and context.get_response_content_type(index) == EVENT_STREAM:
            # the status line went out with the first event: end the stream with an error event
            return sse({"type": "error", "error": err.to_dict()})
        context.set_response_status(err.status, HTTPStatus(err.status).phrase, index)
        context.set_response_content_type(index, "application/json")
        if isinstance(err, Overloaded):
            context.set_response_header(index, "Retry-After", str(err.retry_after))
        return error_body(err)


def delta_event(segment) -> dict:
    """OpenAI's transcript.text.delta, with the segment's id, start and end added."""
    return {"type": "transcript.text.delta", "delta": segment.text, "id": segment.id,
            "start": round(segment.start, 3), "end": round(segment.end, 3)}


def done_event(transcript) -> dict:
    return {"type": "transcript.text.done", "text": transcript.text,
            "usage": usage(transcript)}

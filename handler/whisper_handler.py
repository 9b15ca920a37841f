"""TorchServe glue for Whisper: initialize / preprocess / inference / postprocess.

Everything that is not about TorchServe lives in plain modules beside this one (packed
flat into whisper.mar): audio decoding in `audio`, request options in `options`, the
batched engine in `engine`, response rendering in `formats`, errors in `errors`.

TorchServe hands `handle` a list of requests (dynamic batching). Each request keeps its
own slot through the three steps, so one bad upload gets its own 4xx while the others of
the batch are transcribed: an exception raised out of the handler would fail them all.
"""

import logging
from http import HTTPStatus
import os
import platform
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler

from audio import DecodedAudio, decode_audio
from checkpoint import describe, load_whisper
from engine import Engine, EngineConfig
from errors import InternalError, InvalidAudio, RequestError
from formats import Transcript, error_body, render
from oom import oom_injector, transcribe_splitting
from options import AUDIO_FIELDS, TranscriptionOptions, parse_options

logger = logging.getLogger(__name__)

OPTION_HEADER_PREFIX = "x-whisper-"
# handler.cpu_precision -> EngineConfig.cpu_bf16 (None: bf16 where the CPU has AMX)
CPU_PRECISIONS = {"auto": None, "bf16": True, "fp32": False}


def audio_bytes(request: dict) -> bytes:
    """The upload: a multipart field (file, data, audio) or the raw body."""
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
    @dataclass
    class Slot:
        """One request of a TorchServe batch on its way through the handler. (Nested:
        TorchServe refuses a handler module that defines more than one class.)"""

        index: int
        request_id: str
        audio: Optional[DecodedAudio] = None
        options: Optional[TranscriptionOptions] = None
        transcript: Optional[Transcript] = None
        error: Optional[RequestError] = None
        decode_s: float = 0.0

    def initialize(self, context):
        started = time.perf_counter()
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        self.settings = dict((context.model_yaml_config or {}).get("handler") or {})
        self.model_name = self.settings.get("model", "base")
        checkpoint = os.path.join(model_dir, self.settings.get("checkpoint", f"whisper_{self.model_name}.pth"))

        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            threads = int(self.settings.get("cpu_threads") or 0) or self._cpu_share(context)
            torch.set_num_threads(threads)

        self.model = load_whisper(checkpoint, self.device)
        self.engine = Engine(
            self.model,
            EngineConfig(
                device=str(self.device),
                window_budget=int(self.settings.get("window_budget") or 0) or None,
                cpu_bf16=self._cpu_bf16(),
                # None lets the engine pack on CPU (never on GPU); False turns packing off.
                pack_short=None if self.settings.get("pack_short_clips", False) else False,
            ),
        )
        self.model = self.engine.model  # moved/cast for the device by the engine
        # Compile the lazily built kernels (word-timestamp DTW, cuDNN) before the first request.
        self.engine.warmup()
        self.max_duration_s = float(self.settings.get("max_duration_s", 14400))
        self.ffmpeg_timeout_s = float(self.settings.get("ffmpeg_timeout_s", 120))
        self.default_mode = self.settings.get("default_mode", "batched")
        self.log_transcripts = bool(self.settings.get("log_transcripts", False))
        # Off unless a test configures it: fail engine calls above this much audio as OOM.
        self.run_engine = oom_injector(float(self.settings.get("fault_injection_oom_above_s") or 0))(
            self.engine.transcribe
        )
        self.initialized = True

        info = describe(self.model)
        logger.info(
            "whisper ready: model=%s checkpoint=%s device=%s python=%s torch=%s cuda=%s "
            "gpu=%s threads=%s dims=%s load_s=%.2f",
            self.model_name,
            os.path.basename(checkpoint),
            self.device,
            platform.python_version(),
            torch.__version__,
            torch.version.cuda,
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "none",
            torch.get_num_threads(),
            info,
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

    def _cpu_bf16(self):
        precision = str(self.settings.get("cpu_precision", "auto"))
        if precision not in CPU_PRECISIONS:
            raise ValueError(f"handler.cpu_precision must be one of {sorted(CPU_PRECISIONS)}, not {precision!r}")
        return CPU_PRECISIONS[precision]

    @staticmethod
    def _cpu_share(context) -> int:
        """Cores per worker: the machine's cores split over this model's workers."""
        workers = int((context.model_yaml_config or {}).get("maxWorkers") or 1)
        return max(1, (os.cpu_count() or 1) // max(1, workers))

    def preprocess(self, data: List[dict]) -> List["WhisperHandler.Slot"]:
        self.batch_started = time.perf_counter()
        slots = []
        for index, request in enumerate(data):
            slot = self.Slot(index=index, request_id=self.context.get_request_id(index) or str(index))
            started = time.perf_counter()
            try:
                slot.options = parse_options(
                    request_options(request, self.context.get_all_request_header(index)),
                    model_name=self.model_name,
                    multilingual=self.model.is_multilingual,
                    default_mode=self.default_mode,
                )
                slot.audio = decode_audio(
                    audio_bytes(request),
                    max_duration_s=self.max_duration_s,
                    ffmpeg_timeout_s=self.ffmpeg_timeout_s,
                )
            except RequestError as err:
                slot.error = err
            except Exception as err:  # a bug must not take the other requests down
                logger.exception("request %s: preprocessing failed", slot.request_id)
                slot.error = InternalError(f"preprocessing failed: {type(err).__name__}")
            slot.decode_s = time.perf_counter() - started
            if slot.audio is not None:
                logger.info(
                    "request %s: audio %.2fs at %s Hz, %s ch, %s via %s, decode %.3fs",
                    slot.request_id,
                    slot.audio.duration_s,
                    slot.audio.source_rate,
                    slot.audio.channels,
                    slot.audio.source_format,
                    slot.audio.decoder,
                    slot.decode_s,
                )
            else:
                logger.info("request %s: rejected %r", slot.request_id, slot.error)
            slots.append(slot)
        return slots

    def inference(self, slots: List["WhisperHandler.Slot"]) -> List["WhisperHandler.Slot"]:
        ready = [slot for slot in slots if slot.error is None]
        if not ready:
            return slots
        started = time.perf_counter()
        # Time each request spent in this handler call before transcription began.
        for _ in ready:
            self._emit("QueueToStartLatency", MetricTypes.HISTOGRAM, (started - self.batch_started) * 1000)
        stats_before = dict(self.engine.stats)
        try:
            # On out-of-memory the batch is halved and retried; a request that does not
            # fit alone gets its own 507 and the others keep their transcripts.
            transcripts = transcribe_splitting(
                [(slot.audio.samples, slot.options) for slot in ready],
                self.run_engine,
                after_oom=torch.cuda.empty_cache if self.device.type == "cuda" else None,
            )
        except RequestError as err:
            for slot in ready:
                slot.error = err
            return slots
        except Exception as err:
            logger.exception("batch of %d failed", len(ready))
            for slot in ready:
                slot.error = InternalError(f"transcription failed: {type(err).__name__}: {err}")
            return slots
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        elapsed = time.perf_counter() - started
        audio_s = sum(slot.audio.duration_s for slot in ready)
        delta = {k: round(v - stats_before.get(k, 0), 3) for k, v in self.engine.stats.items()}
        logger.info(
            "batch: %d requests, %.1fs audio in %.2fs (%.1fx real time), ids=%s, engine=%s",
            len(ready),
            audio_s,
            elapsed,
            audio_s / elapsed if elapsed > 0 else 0.0,
            ",".join(slot.request_id for slot in ready),
            delta,
        )
        for slot in ready:
            self._emit("AudioSecondsProcessed", MetricTypes.COUNTER, slot.audio.duration_s)
        if audio_s > 0:
            self._emit("RealTimeFactor", MetricTypes.GAUGE, elapsed / audio_s)
        if delta.get("encoder_passes"):
            windows_per_pass = delta.get("encoder_windows", 0) / delta["encoder_passes"]
            self._emit("WindowsPerBatch", MetricTypes.HISTOGRAM, windows_per_pass)
        self._emit("FallbackCount", MetricTypes.COUNTER, delta.get("fallback_windows", 0))
        for slot, transcript in zip(ready, transcripts):
            if isinstance(transcript, RequestError):
                slot.error = transcript
            else:
                slot.transcript = transcript
        return slots

    def postprocess(self, slots: List["WhisperHandler.Slot"]) -> List[bytes]:
        responses = []
        for slot in slots:
            if slot.error is None:
                try:
                    body, content_type = render(slot.transcript, slot.options)
                except Exception as err:
                    logger.exception("request %s: rendering failed", slot.request_id)
                    slot.error = InternalError(f"rendering failed: {type(err).__name__}")
            if slot.error is not None:
                body, content_type = error_body(slot.error), "application/json"
                self.context.set_response_status(slot.error.status, HTTPStatus(slot.error.status).phrase, slot.index)
                self._emit("RequestErrors", MetricTypes.COUNTER, 1, ErrorType=slot.error.code)
                logger.info("request %s: %d %s", slot.request_id, slot.error.status, slot.error.code)
            elif self.log_transcripts:
                logger.info("request %s: text=%r", slot.request_id, slot.transcript.text)
            self.context.set_response_content_type(slot.index, content_type)
            responses.append(body)
        return responses

"""The handler's settings: one home for the `handler:` keys of config/model-config.yaml,
their defaults, and the environment variables that override them at build time
(model-archiver/render_model_config.py).

    settings = HandlerSettings.from_yaml(context.model_yaml_config.get("handler"))
"""

from dataclasses import dataclass, fields
from typing import Mapping, Optional

CPU_PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the CPU has AMX or AVX-512 bf16
CPU_ENCODERS = ("auto", "torch", "onnxruntime")  # auto: onnxruntime where the precision is fp32
SPLIT_LONG = ("auto", "on", "off")  # auto: on a GPU (EngineConfig.split_long)
WINDOW_MODES = ("seek", "pauses")  # EngineConfig.window_mode


@dataclass(frozen=True)
class HandlerSettings:
    model: str = "base"
    checkpoint: str = ""  # file in the archive; "" = whisper_<model>.pth
    max_duration_s: float = 14400.0  # longer uploads get 413
    ffmpeg_timeout_s: float = 120.0
    default_mode: str = "batched"  # or "sequential" (whisper's transcribe)
    window_budget: int = 0  # windows per engine step; 0 = from the device
    max_inflight_audio_s: float = 28800.0  # audio admitted at once; beyond it 503 + Retry-After
    max_sequential_waiting: int = 1  # mode=sequential requests waiting behind the running one; beyond, 503
    cpu_threads: int = 0  # 0 = the worker's share of the cores
    cpu_precision: str = "auto"
    cpu_encoder: str = "auto"
    cuda_graphs: bool = True  # GPU: replay the decode step as CUDA graphs (off: eager)
    split_long: str = "auto"  # cut long files into pieces decoded side by side
    window_mode: str = "seek"  # seek: Whisper's windows; pauses: speech chunks cut at pauses, text only
    log_transcripts: bool = False  # transcripts are user data

    @classmethod
    def from_yaml(cls, values: Optional[Mapping]) -> "HandlerSettings":
        """Settings from the `handler:` block; unknown keys and bad values raise ValueError."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown handler settings {unknown}; known: {sorted(known)}")
        kwargs = {}
        for name, value in values.items():
            cast = type(known[name].default)
            try:
                kwargs[name] = _bool(value) if cast is bool else _number(value, cast) if cast in (int, float) else cast(value)
            except (TypeError, ValueError):
                raise ValueError(f"handler.{name} must be a {cast.__name__}, not {value!r}") from None
            if cast in (int, float) and (kwargs[name] < 0 or (name in POSITIVE and kwargs[name] == 0)):
                raise ValueError(f"handler.{name} must be {'above' if name in POSITIVE else 'at least'} 0, "
                                 f"not {value!r}")
        settings = cls(**kwargs)
        if settings.cpu_precision not in CPU_PRECISIONS:
            raise ValueError(f"handler.cpu_precision must be one of {CPU_PRECISIONS}, "
                             f"not {settings.cpu_precision!r}")
        if settings.cpu_encoder not in CPU_ENCODERS:
            raise ValueError(f"handler.cpu_encoder must be one of {CPU_ENCODERS}, not {settings.cpu_encoder!r}")
        if settings.split_long not in SPLIT_LONG:
            raise ValueError(f"handler.split_long must be one of {SPLIT_LONG}, not {settings.split_long!r}")
        if settings.window_mode not in WINDOW_MODES:
            raise ValueError(f"handler.window_mode must be one of {WINDOW_MODES}, not {settings.window_mode!r}")
        if settings.default_mode not in ("batched", "sequential"):
            raise ValueError(f"handler.default_mode must be batched or sequential, not {settings.default_mode!r}")
        return settings

    @property
    def checkpoint_file(self) -> str:
        return self.checkpoint or f"whisper_{self.model}.pth"

    @property
    def cpu_bf16(self) -> Optional[bool]:
        """EngineConfig.cpu_bf16: None lets the engine choose (by cpu.bf16_unit)."""
        return {"auto": None, "bf16": True, "fp32": False}[self.cpu_precision]

    @property
    def engine_split_long(self) -> Optional[bool]:
        """EngineConfig.split_long: None lets the engine choose (on a GPU)."""
        return {"auto": None, "on": True, "off": False}[self.split_long]

    @property
    def engine_cpu_encoder(self) -> Optional[str]:
        """EngineConfig.cpu_encoder: None lets the engine choose (by the precision)."""
        return None if self.cpu_encoder == "auto" else self.cpu_encoder


POSITIVE = ("max_duration_s", "ffmpeg_timeout_s", "max_inflight_audio_s")  # 0 is not a limit


def _number(value, cast):
    """int or float from YAML or the environment; an int setting takes no fraction."""
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if cast is int and not number.is_integer():
        raise ValueError(value)
    return cast(number)


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(value)


# Environment variable -> handler setting, applied by render_model_config.py at build time.
HANDLER_ENV = {
    "WHISPER_MAX_DURATION_S": "max_duration_s",
    "WHISPER_DEFAULT_MODE": "default_mode",
    "WHISPER_WINDOW_BUDGET": "window_budget",
    "WHISPER_MAX_INFLIGHT_AUDIO_S": "max_inflight_audio_s",
    "WHISPER_CPU_PRECISION": "cpu_precision",
    "WHISPER_CPU_ENCODER": "cpu_encoder",
    "WHISPER_CUDA_GRAPHS": "cuda_graphs",
    "WHISPER_SPLIT_LONG": "split_long",
    "WHISPER_WINDOW_MODE": "window_mode",
    "WHISPER_MAX_SEQUENTIAL_WAITING": "max_sequential_waiting",
}

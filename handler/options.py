"""Request options (form fields and X-Whisper-* headers) -> one validated TranscriptionOptions.

TorchServe hands the handler one dict per request: the raw body under "body" or multipart
audio under its field name, and every form field as a key of its own, with bytes or str
values (it drops the query string; the handler adds options sent as `X-Whisper-<Option>`
headers, whisper_handler.request_options). Every value is at most MAX_OPTION_CHARS long. Option names follow OpenAI's audio API where it has one:

    language, task, prompt, temperature, response_format, model,
    timestamp_granularities (also "timestamp_granularities[]", OpenAI's client form,
    repeated or comma-separated)

plus stream (true/false: answer with server-sent events, a delta per committed segment)
and this service's own: word_timestamps (true/false, same as granularity "word"), mode
("batched" | "sequential"), seed (the sampling seed of fallback temperatures, so the
same request always gets the same answer), condition_on_previous_text (true/false,
whisper.transcribe's option: prompt each window with the text before it) and
hallucination_silence_threshold (seconds, whisper.transcribe's option: skip silences
longer than this around segments whose words look invented; word timestamps are computed
for it even when the answer does not ask for them). Any other name is rejected with the
list of accepted ones, so a typo never silently falls back to a default.

Voice activity detection (vad.py) keeps non-speech away from the decoder: vad_filter
(true/false, default true) turns it off, and OpenAI's `chunking_strategy` sets it: "auto"
is the server's defaults, a {"type": "server_vad", "threshold", "prefix_padding_ms",
"silence_duration_ms"} object (JSON text, or the bracketed fields OpenAI's SDK sends in a
form: chunking_strategy[type]=server_vad, ...) maps onto VadOptions (threshold,
speech_pad_ms, min_silence_duration_ms); fields it leaves out keep the server's defaults.

OpenAI's newer parameters: `languages[]` (codes the language is detected among) is
supported; `chunking_strategy` as above;
`include[]`, `keywords[]`, `known_speaker_names[]` and `known_speaker_references[]` are
rejected with a 400 saying Whisper models do not support them (UNSUPPORTED).

temperature: one value means exactly that temperature, no fallback; a comma-separated list
is a fallback schedule; absent means openai-whisper's schedule (0.0, 0.2, ..., 1.0). On
OpenAI's routes (`openai_api`), 0 means that schedule too, as OpenAI's reference says
("use log probability to automatically increase the temperature"). Word timestamps are on
if either word_timestamps is true or the granularities include "word".
"""

import json
import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence, Tuple

from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from errors import InvalidOption, ModelNotLoaded
from vad import VadOptions

AUDIO_FIELDS = ("body", "file", "data", "audio")  # the upload itself, never an option
DEFAULT_TEMPERATURE = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's fallback schedule
RESPONSE_FORMATS = ("json", "verbose_json", "text", "srt", "vtt")
TASKS = ("transcribe", "translate")
MODES = ("batched", "sequential")
GRANULARITIES = ("segment", "word")
MODEL_ALIASES = ("whisper-1",)  # OpenAI's model name: means "the loaded model" here
MAX_PROMPT_CHARS = 1000
MAX_OPTION_CHARS = 4096  # any option's value (the prompt is the longest one that means anything)
MAX_NAME_SHOWN = 64  # characters of an unknown field's name repeated in the error
MAX_TEMPERATURES = 10
OPTIONS = (
    "language",
    "task",
    "prompt",
    "temperature",
    "response_format",
    "timestamp_granularities",
    "word_timestamps",
    "model",
    "mode",
    "stream",
    "seed",
    "languages",
    "chunking_strategy",
    "vad_filter",
    "condition_on_previous_text",
    "hallucination_silence_threshold",
)
# OpenAI parameters for its newer models that Whisper cannot honour: a clear 400, not "unknown"
UNSUPPORTED = ("include", "keywords", "known_speaker_names", "known_speaker_references")
MAX_SEED = 2**32 - 1
MAX_SILENCE_THRESHOLD_S = 30.0  # a window's length: a longer silence never fits in one
# chunking_strategy server_vad field -> (VadOptions field, lowest, highest)
SERVER_VAD = {
    "threshold": ("threshold", 0.0, 1.0),
    "prefix_padding_ms": ("speech_pad_ms", 0, 10_000),
    "silence_duration_ms": ("min_silence_duration_ms", 0, 10_000),
}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class TranscriptionOptions:
    language: Optional[str] = None  # ISO 639-1 code; None = detect
    task: str = "transcribe"
    prompt: Optional[str] = None
    temperature: Tuple[float, ...] = DEFAULT_TEMPERATURE  # one value, or a fallback schedule
    response_format: str = "json"
    word_timestamps: bool = False
    timestamp_granularities: Tuple[str, ...] = ("segment",)
    model: Optional[str] = None  # the loaded model's name when the request named one
    mode: str = "batched"
    stream: bool = False  # server-sent events: a delta per segment, then the whole text
    seed: int = 0  # seeds the sampling at temperatures above 0 (fixed by default)
    languages: Tuple[str, ...] = ()  # detect the language among these codes only; () = all
    vad_filter: bool = True  # skip non-speech (vad.py) instead of decoding it
    vad: VadOptions = field(default_factory=VadOptions)  # chunking_strategy's, else the defaults
    # prompt each window with the text before it (whisper.transcribe's option); None: the
    # server's default (EngineConfig.condition_on_previous_text)
    condition_on_previous_text: Optional[bool] = None
    # whisper's hallucination_silence_threshold (seconds): skip silences longer than this
    # around a suspected hallucination, judged by word timestamps (computed for it)
    hallucination_silence_threshold: Optional[float] = None
    openai_api: bool = False  # the request came through OpenAI's routes (the proxy says so)


def _text(name: str, value) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidOption(name, f"Option '{name}' is not valid UTF-8 text.") from None
    value = str(value).strip()
    if len(value) > MAX_OPTION_CHARS:
        raise InvalidOption(name, f"Option '{name}' is {len(value)} characters; the limit is {MAX_OPTION_CHARS}.")
    return value


def _shown(name: str) -> str:
    """A field name as the error repeats it: cut short, so a hostile name is not echoed."""
    return name if len(name) <= MAX_NAME_SHOWN else name[:MAX_NAME_SHOWN] + "..."


def _choice(name: str, value: str, allowed) -> str:
    value = value.lower()
    if value not in allowed:
        raise InvalidOption(
            name, f"Invalid {name} '{value}'; allowed values: {', '.join(allowed)}."
        )
    return value


def _bool(name: str, value: str) -> bool:
    value = value.lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise InvalidOption(name, f"Invalid {name} '{value}'; allowed values: true, false.")


def _language(value: str, languages: Sequence[str]) -> Optional[str]:
    value = value.lower()
    if value in ("", "auto"):
        return None
    code = value if value in LANGUAGES else TO_LANGUAGE_CODE.get(value)
    if code is None or code not in languages:
        if tuple(languages) == ("en",):
            allowed = "this model is English-only, allowed values: en"
        else:
            allowed = (f"allowed values: ISO 639-1 codes or English names of this model's "
                       f"languages ({', '.join(languages)}), or 'auto' to detect")
        raise InvalidOption("language", f"Invalid language '{value}'; {allowed}.")
    return code


def _seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise InvalidOption("seed", f"Invalid seed '{value}'; allowed values: an integer from 0 "
                            f"to {MAX_SEED}.")
    return seed


def _temperature(value: str) -> Tuple[float, ...]:
    parts = [p.strip() for p in value.split(",")]
    try:
        temps = tuple(float(p) for p in parts)
    except ValueError:
        temps = ()
    if not temps or len(temps) > MAX_TEMPERATURES or not all(0.0 <= t <= 1.0 for t in temps):
        # (NaN fails the range check too.)
        raise InvalidOption(
            "temperature",
            f"Invalid temperature '{value}'; allowed values: a number from 0 to 1, or up to "
            f"{MAX_TEMPERATURES} comma-separated numbers from 0 to 1 (a fallback schedule).",
        )
    return temps


def _chunking_strategy(value, fields: Mapping[str, str]) -> Optional[VadOptions]:
    """OpenAI's chunking_strategy: "auto" (None: the server's VAD defaults), or a server_vad
    object given as JSON text (`value`) or as bracketed form fields (`fields`)."""
    name = "chunking_strategy"
    if value is not None and fields:
        raise InvalidOption(name, "Option 'chunking_strategy' was given both as a value and as "
                            "chunking_strategy[...] fields.")
    if value is not None:
        if value.lower() == "auto":
            return None
        try:
            spec = json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays or objects
            spec = None
        if not isinstance(spec, dict):
            raise InvalidOption(name, f"Invalid chunking_strategy '{value}'; allowed values: auto, or a "
                                "JSON object {\"type\": \"server_vad\", \"threshold\": 0-1, "
                                "\"prefix_padding_ms\": 0-10000, \"silence_duration_ms\": 0-10000}.")
    else:
        spec = dict(fields)
    if spec.get("type") != "server_vad":
        raise InvalidOption(name, f"Invalid chunking_strategy type {spec.get('type')!r}; allowed: "
                            "server_vad (or the value auto).")
    unknown = sorted(set(spec) - set(SERVER_VAD) - {"type"})
    if unknown:
        raise InvalidOption(name, f"Unknown chunking_strategy field(s) {', '.join(map(_shown, unknown))}; accepted: "
                            f"type, {', '.join(SERVER_VAD)}.")
    vad = {}
    for key, (target, lo, hi) in SERVER_VAD.items():
        if key not in spec:
            continue
        raw = spec[key]
        try:
            number = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not lo <= number <= hi:  # NaN fails too
            raise InvalidOption(name, f"Invalid chunking_strategy {key} {raw!r}; allowed values: a "
                                f"number from {lo} to {hi}.")
        vad[target] = number if isinstance(lo, float) else int(round(number))
    return replace(VadOptions(), **vad)


def _model_key(name: str) -> str:
    # "openai/whisper-base", "whisper-base", "whisper_base" and "base" all name base.
    key = name.strip().lower()
    for prefix in ("openai/", "whisper-", "whisper_"):
        key = key[len(prefix):] if key.startswith(prefix) else key
    return key


def _model(value: str, model_name: str) -> str:
    if value.lower() in MODEL_ALIASES or _model_key(value) == _model_key(model_name):
        return model_name
    raise ModelNotLoaded(
        f"Model '{value}' is not loaded; this server serves '{model_name}' "
        f"(also accepted as: {', '.join(MODEL_ALIASES)})."
    )


def parse_options(
    fields: Mapping[str, object],
    *,
    model_name: str,
    multilingual: bool,
    languages: Optional[Sequence[str]] = None,
    default_mode: str = "batched",
    openai_api: bool = False,
) -> TranscriptionOptions:
    """Validate one request's fields (see the module docstring) into TranscriptionOptions.

    languages: the loaded model's own language codes (default: all of Whisper's for a
    multilingual model, "en" for an English-only one); default_mode is the server's
    configured mode, used when the request names none; openai_api: the request came
    through OpenAI's routes (set by the proxy, never by a request field).
    """
    if languages is None:
        languages = tuple(LANGUAGES) if multilingual else ("en",)
    if default_mode not in MODES:
        raise ValueError(f"default_mode must be one of {MODES}, not {default_mode!r}")
    values = {}  # option name -> list of its text values
    chunking = {}  # chunking_strategy[field] -> its text value (OpenAI's SDK sends objects so)
    for key, value in fields.items():
        if key in AUDIO_FIELDS:
            continue
        if key.startswith("chunking_strategy[") and key.endswith("]") and not key.endswith("[]"):
            chunking[key[len("chunking_strategy["):-1]] = _text("chunking_strategy", value)
            continue
        name = key[:-2] if key.endswith("[]") else key
        if name in UNSUPPORTED:
            raise InvalidOption(
                name, f"Option '{_shown(key)}' is not supported for Whisper models (OpenAI offers it for "
                f"its newer transcription models only)."
            )
        if name not in OPTIONS:
            raise InvalidOption(
                _shown(name), f"Unknown option '{_shown(key)}'; accepted options: {', '.join(OPTIONS)}."
            )
        items = value if isinstance(value, (list, tuple)) else [value]
        values.setdefault(name, []).extend(_text(name, item) for item in items)

    def one(name: str) -> Optional[str]:
        given = values.get(name)
        if not given:
            return None
        if len(given) > 1:
            raise InvalidOption(name, f"Option '{name}' was given more than once.")
        return given[0]

    kwargs = {"mode": default_mode, "openai_api": openai_api}
    if (value := one("language")) is not None:
        kwargs["language"] = _language(value, languages)
    if (value := one("task")) is not None:
        kwargs["task"] = _choice("task", value, TASKS)
        if kwargs["task"] == "translate" and not multilingual:
            raise InvalidOption(
                "task", "Invalid task 'translate'; this model is English-only, allowed "
                "values: transcribe."
            )
    if (value := one("prompt")) is not None:
        if len(value) > MAX_PROMPT_CHARS:
            raise InvalidOption(
                "prompt", f"Option 'prompt' is {len(value)} characters; the limit is "
                f"{MAX_PROMPT_CHARS}."
            )
        kwargs["prompt"] = value or None
    if (value := one("temperature")) is not None:
        kwargs["temperature"] = _temperature(value)
        if openai_api and kwargs["temperature"] == (0.0,):
            kwargs["temperature"] = DEFAULT_TEMPERATURE
    if (value := one("response_format")) is not None:
        kwargs["response_format"] = _choice("response_format", value, RESPONSE_FORMATS)
    if (value := one("mode")) is not None:
        kwargs["mode"] = _choice("mode", value, MODES)
    if (value := one("model")) is not None and value:
        kwargs["model"] = _model(value, model_name)
    if (value := one("stream")) is not None:
        kwargs["stream"] = _bool("stream", value)
    if (value := one("seed")) is not None:
        kwargs["seed"] = _seed(value)
    if (value := one("condition_on_previous_text")) is not None:
        kwargs["condition_on_previous_text"] = _bool("condition_on_previous_text", value)
    if (value := one("hallucination_silence_threshold")) is not None:
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not 0 < threshold <= MAX_SILENCE_THRESHOLD_S:  # NaN fails too
            raise InvalidOption(
                "hallucination_silence_threshold", f"Invalid hallucination_silence_threshold '{value}'; "
                f"allowed values: seconds above 0, at most {MAX_SILENCE_THRESHOLD_S:g}.")
        kwargs["hallucination_silence_threshold"] = threshold
    if (value := one("vad_filter")) is not None:
        kwargs["vad_filter"] = _bool("vad_filter", value)
    if (value := one("chunking_strategy")) is not None or chunking:
        vad = _chunking_strategy(value, chunking)
        if vad is not None:
            if not kwargs.get("vad_filter", True):
                raise InvalidOption("chunking_strategy", "chunking_strategy server_vad asks for voice "
                                    "activity detection, which vad_filter=false turns off.")
            kwargs["vad"] = vad
    hints = []
    for value in values.get("languages", []):
        for item in value.split(","):
            code = _language(item.strip(), languages) if item.strip() else None
            if code is not None and code not in hints:  # "auto" hints nothing
                hints.append(code)
    if hints:
        kwargs["languages"] = tuple(hints)

    granularities = []
    for value in values.get("timestamp_granularities", []):
        for item in value.split(","):
            if item.strip():
                item = _choice("timestamp_granularities", item.strip(), GRANULARITIES)
                if item not in granularities:
                    granularities.append(item)
    word_timestamps = "word" in granularities
    if (value := one("word_timestamps")) is not None:
        word_timestamps = word_timestamps or _bool("word_timestamps", value)
    if word_timestamps and "word" not in granularities:
        granularities.append("word")
    if granularities:
        kwargs["timestamp_granularities"] = tuple(sorted(granularities, key=GRANULARITIES.index))
    kwargs["word_timestamps"] = word_timestamps
    return TranscriptionOptions(**kwargs)

"""Request options (query string and form fields) -> one validated TranscriptionOptions.

TorchServe hands the handler one dict per request: the raw body under "body" or multipart
audio under its field name, and every query-string parameter and form field as a key of its
own, with bytes or str values. Option names follow OpenAI's audio API where it has one:

    language, task, prompt, temperature, response_format, model,
    timestamp_granularities (also "timestamp_granularities[]", OpenAI's client form,
    repeated or comma-separated)

plus stream (true/false: answer with server-sent events, a delta per committed segment)
and this service's own: word_timestamps (true/false, same as granularity "word"), mode
("batched" | "sequential") and seed (the sampling seed of fallback temperatures, so the
same request always gets the same answer). Any other name is rejected with the list of
accepted ones, so a typo never silently falls back to a default.

OpenAI's newer parameters: `languages[]` (codes the language is detected among) is
supported; `chunking_strategy` is accepted as "auto" (the server's own segmentation);
`include[]`, `keywords[]`, `known_speaker_names[]` and `known_speaker_references[]` are
rejected with a 400 saying Whisper models do not support them (UNSUPPORTED).

temperature: one value means exactly that temperature, no fallback; a comma-separated list
is a fallback schedule; absent means openai-whisper's schedule (0.0, 0.2, ..., 1.0). On
OpenAI's routes (`openai_api`), 0 means that schedule too, as OpenAI's reference says
("use log probability to automatically increase the temperature"). Word timestamps are on
if either word_timestamps is true or the granularities include "word".
"""

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from errors import InvalidOption, ModelNotLoaded

AUDIO_FIELDS = ("body", "file", "data", "audio")  # the upload itself, never an option
DEFAULT_TEMPERATURE = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's fallback schedule
RESPONSE_FORMATS = ("json", "verbose_json", "text", "srt", "vtt")
TASKS = ("transcribe", "translate")
MODES = ("batched", "sequential")
GRANULARITIES = ("segment", "word")
MODEL_ALIASES = ("whisper-1",)  # OpenAI's model name: means "the loaded model" here
MAX_PROMPT_CHARS = 1000
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
)
# OpenAI parameters for its newer models that Whisper cannot honour: a clear 400, not "unknown"
UNSUPPORTED = ("include", "keywords", "known_speaker_names", "known_speaker_references")
MAX_SEED = 2**32 - 1
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
    openai_api: bool = False  # the request came through OpenAI's routes (the proxy says so)


def _text(name: str, value) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidOption(name, f"Option '{name}' is not valid UTF-8 text.") from None
    return str(value).strip()


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
    for key, value in fields.items():
        if key in AUDIO_FIELDS:
            continue
        name = key[:-2] if key.endswith("[]") else key
        if name in UNSUPPORTED:
            raise InvalidOption(
                name, f"Option '{key}' is not supported for Whisper models (OpenAI offers it for "
                f"its newer transcription models only)."
            )
        if name not in OPTIONS:
            raise InvalidOption(
                name, f"Unknown option '{key}'; accepted options: {', '.join(OPTIONS)}."
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
    if (value := one("chunking_strategy")) is not None and value.lower() != "auto":
        raise InvalidOption(
            "chunking_strategy", f"Invalid chunking_strategy '{value}'; allowed values: auto "
            "(this server's own segmentation)."
        )
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

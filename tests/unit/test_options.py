"""parse_options: TorchServe request fields -> TranscriptionOptions, every rule."""

import dataclasses

import pytest
from whisper.tokenizer import LANGUAGES

from errors import InvalidOption, ModelNotLoaded
from options import (
    AUDIO_FIELDS,
    DEFAULT_TEMPERATURE,
    MAX_OPTION_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    OPTIONS,
    TranscriptionOptions,
    parse_options,
)
from vad import VadOptions


def parse(fields, model_name="base", multilingual=True, **kwargs):
    return parse_options(fields, model_name=model_name, multilingual=multilingual, **kwargs)


def rejects(fields, option, *, error=InvalidOption, **kwargs):
    with pytest.raises(error) as err:
        parse(fields, **kwargs)
    assert err.value.status == 400
    assert err.value.to_dict()["type"] == "invalid_request_error"
    if error is InvalidOption:
        assert err.value.code == "invalid_option" and err.value.option == option
        assert option in err.value.message
    return err.value.message


def test_defaults_and_audio_fields_are_skipped():
    options = parse({name: b"RIFF\x00\xff audio bytes" for name in AUDIO_FIELDS})
    assert options == TranscriptionOptions()
    assert options.temperature == DEFAULT_TEMPERATURE == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert (options.response_format, options.task, options.mode) == ("json", "transcribe", "batched")
    assert options.language is None and options.model is None and not options.word_timestamps
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.task = "translate"


def test_bytes_str_and_bytearray_values():
    options = parse(
        {"language": b"de", "task": bytearray(b"translate"), "prompt": " Hallo Welt ", "response_format": b"SRT"}
    )
    assert (options.language, options.task, options.prompt, options.response_format) == (
        "de", "translate", "Hallo Welt", "srt"
    )


def test_invalid_utf8_is_rejected():
    rejects({"prompt": b"\xff\xfe"}, "prompt")


def test_unknown_option_lists_the_accepted_ones():
    message = rejects({"languag": "en"}, "languag")
    assert all(name in message for name in OPTIONS)


@pytest.mark.parametrize(
    "value, code",
    [("en", "en"), ("EN", "en"), ("fr", "fr"), ("German", "de"), ("castilian", "es"), ("mandarin", "zh"), ("auto", None), ("", None)],
)
def test_language(value, code):
    assert parse({"language": value}).language == code


@pytest.mark.parametrize("value", ["xx", "klingon", "en-US", "eng"])
def test_unknown_language(value):
    message = rejects({"language": value}, "language")
    assert "ISO 639-1" in message and "en, zh, de" in message


def test_english_only_model():
    assert parse({"language": "english"}, multilingual=False).language == "en"
    assert "allowed values: en" in rejects({"language": "fr"}, "language", multilingual=False)
    assert "allowed values: transcribe" in rejects({"task": "translate"}, "task", multilingual=False)
    assert parse({"task": "transcribe"}, multilingual=False).task == "transcribe"


def test_task_allow_list():
    assert "transcribe, translate" in rejects({"task": "summarize"}, "task")


@pytest.mark.parametrize(
    "value, expected",
    [("0", (0.0,)), ("1", (1.0,)), ("0.7", (0.7,)), ("0,0.2,0.4", (0.0, 0.2, 0.4)), (b" 0.0 , 0.5 ", (0.0, 0.5))],
)
def test_temperature(value, expected):
    assert parse({"temperature": value}).temperature == expected


@pytest.mark.parametrize("value", ["-0.1", "1.5", "hot", "nan", "inf", "0,,0.2", "", ",".join(["0.1"] * 11)])
def test_bad_temperature(value):
    assert "from 0 to 1" in rejects({"temperature": value}, "temperature")


@pytest.mark.parametrize("value", ["json", "verbose_json", "text", "srt", "vtt"])
def test_response_formats(value):
    assert parse({"response_format": value}).response_format == value


def test_bad_response_format():
    message = rejects({"response_format": "xml"}, "response_format")
    assert "json, verbose_json, text, srt, vtt" in message


def test_prompt_limit():
    assert parse({"prompt": "x" * MAX_PROMPT_CHARS}).prompt == "x" * MAX_PROMPT_CHARS
    assert str(MAX_PROMPT_CHARS) in rejects({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt")
    assert parse({"prompt": ""}).prompt is None


@pytest.mark.parametrize(
    "fields",
    [
        {"timestamp_granularities[]": b"word"},
        {"timestamp_granularities[]": [b"segment", b"word"]},  # repeated, as OpenAI's client sends
        {"timestamp_granularities[]": "segment,word"},  # comma-separated
        {"timestamp_granularities": "word"},
        {"word_timestamps": "true"},
        {"word_timestamps": b"1", "timestamp_granularities": "segment"},
    ],
)
def test_word_timestamps(fields):
    options = parse(fields)
    assert options.word_timestamps
    assert "word" in options.timestamp_granularities


def test_segment_granularity_only():
    options = parse({"timestamp_granularities[]": [b"segment"], "word_timestamps": "false"})
    assert not options.word_timestamps and options.timestamp_granularities == ("segment",)


def test_bad_granularity_and_bool():
    assert "segment, word" in rejects({"timestamp_granularities[]": "char"}, "timestamp_granularities")
    assert "true, false" in rejects({"word_timestamps": "maybe"}, "word_timestamps")


@pytest.mark.parametrize("name", ["base", "BASE", "whisper-base", "whisper_base", "openai/whisper-base", "whisper-1", ""])
def test_model_aliases(name):
    assert parse({"model": name}).model == ("base" if name else None)


def test_english_model_names():
    assert parse({"model": "tiny.en"}, model_name="tiny.en").model == "tiny.en"
    assert parse({"model": "whisper-tiny.en"}, model_name="tiny.en").model == "tiny.en"


@pytest.mark.parametrize("name", ["large-v3", "tiny", "base.en", "gpt-4o-transcribe"])
def test_model_not_loaded(name):
    message = rejects({"model": name}, "model", error=ModelNotLoaded)
    assert name in message and "'base'" in message
    with pytest.raises(ModelNotLoaded) as err:
        parse({"model": name})
    assert err.value.code == "model_not_found"


def test_mode():
    assert parse({"mode": "sequential"}).mode == "sequential"
    assert parse({}, default_mode="sequential").mode == "sequential"
    assert parse({"mode": "batched"}, default_mode="sequential").mode == "batched"
    assert "batched, sequential" in rejects({"mode": "fast"}, "mode")
    with pytest.raises(ValueError):
        parse({}, default_mode="fast")


@pytest.mark.parametrize(
    "value, expected", [(b"true", True), ("1", True), ("ON", True), ("false", False), ("0", False)]
)
def test_stream(value, expected):
    assert parse({"stream": value}).stream is expected
    assert parse({}).stream is False


@pytest.mark.parametrize("value", ["maybe", "2", ""])
def test_bad_stream(value):
    assert "true, false" in rejects({"stream": value}, "stream")


@pytest.mark.parametrize("value, expected", [("0", 0), (b"42", 42), (" 7 ", 7), (str(MAX_SEED), MAX_SEED)])
def test_seed(value, expected):
    assert parse({"seed": value}).seed == expected
    assert parse({}).seed == 0


@pytest.mark.parametrize("value", ["-1", str(MAX_SEED + 1), "1.5", "lucky", ""])
def test_bad_seed(value):
    message = rejects({"seed": value}, "seed")
    assert f"from 0 to {MAX_SEED}" in message


def test_language_must_be_one_of_the_models_languages():
    languages = tuple(LANGUAGES)[:99]  # what a model without Cantonese (large-v3 added it) knows
    assert "yue" in LANGUAGES and "yue" not in languages
    assert parse({"language": "zh"}, languages=languages).language == "zh"
    message = rejects({"language": "yue"}, "language", languages=languages)
    assert "allowed values" in message and "(en, zh, de" in message and ", yue" not in message
    assert rejects({"language": "cantonese"}, "language", languages=languages)
    # with the full list the same code is accepted
    assert parse({"language": "yue"}, languages=tuple(LANGUAGES)).language == "yue"


def test_english_only_languages_list():
    assert parse({"language": "en"}, languages=("en",)).language == "en"
    message = rejects({"language": "de"}, "language", languages=("en",))
    assert "this model is English-only, allowed values: en" in message


def test_scalar_option_given_twice():
    assert "more than once" in rejects({"language": [b"en", b"de"]}, "language")


# --- OpenAI's parameters for newer models: one test per row of the README's table ------


def test_temperature_zero_is_the_fallback_ladder_on_openai_routes_only():
    assert parse({"temperature": "0"}, openai_api=True).temperature == DEFAULT_TEMPERATURE
    assert parse({"temperature": "0"}).temperature == (0.0,)  # native: exactly 0, no fallback
    assert parse({"temperature": "0.4"}, openai_api=True).temperature == (0.4,)
    assert parse({}, openai_api=True).openai_api and not parse({}).openai_api


@pytest.mark.parametrize("name", ["include[]", "keywords[]", "known_speaker_names[]", "known_speaker_references[]"])
def test_parameters_of_newer_openai_models_are_refused_by_name(name):
    message = rejects({name: "logprobs"}, name[:-2])
    assert name in message and "not supported for Whisper models" in message


def test_languages_hint_is_validated_and_kept_in_order():
    assert parse({"languages[]": ["de", "English", "de"]}).languages == ("de", "en")
    assert parse({"languages": "fr,es"}).languages == ("fr", "es")
    assert parse({"languages[]": "auto"}).languages == ()
    assert "this model's languages" in rejects({"languages[]": "xx"}, "language")


def test_vad_filter_defaults_on_and_takes_a_boolean():
    assert TranscriptionOptions().vad_filter and parse({}).vad_filter
    assert parse({"vad_filter": "false"}).vad_filter is False
    assert parse({"vad_filter": b"true"}).vad_filter is True
    assert "allowed values: true, false" in rejects({"vad_filter": "maybe"}, "vad_filter")


def test_chunking_strategy_auto_is_the_default_vad():
    assert parse({"chunking_strategy": "auto"}) == TranscriptionOptions()
    assert parse({"chunking_strategy": "AUTO"}).vad == VadOptions()


def test_chunking_strategy_server_vad_maps_onto_the_vad_options():
    spec = '{"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 300, "silence_duration_ms": 800}'
    vad = parse({"chunking_strategy": spec}).vad
    assert vad == VadOptions(threshold=0.7, speech_pad_ms=300, min_silence_duration_ms=800)
    # fields left out keep the server's defaults
    assert parse({"chunking_strategy": '{"type": "server_vad", "threshold": 0.3}'}).vad == VadOptions(threshold=0.3)
    assert parse({"chunking_strategy": '{"type": "server_vad"}'}).vad == VadOptions()


def test_chunking_strategy_as_the_bracketed_fields_of_openais_sdk():
    # openai-python flattens an object in a multipart form to chunking_strategy[field]=value
    fields = {"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": b"0.6",
              "chunking_strategy[silence_duration_ms]": "500"}
    assert parse(fields).vad == VadOptions(threshold=0.6, min_silence_duration_ms=500)
    assert "type" in rejects({"chunking_strategy[threshold]": "0.6"}, "chunking_strategy")


@pytest.mark.parametrize("spec, words", [
    ('{"type": "server_vad", "threshold": 1.5}', "threshold"),
    ('{"type": "server_vad", "threshold": -0.1}', "threshold"),
    ('{"type": "server_vad", "threshold": "NaN"}', "threshold"),
    ('{"type": "server_vad", "threshold": true}', "threshold"),
    ('{"type": "server_vad", "prefix_padding_ms": 10001}', "prefix_padding_ms"),
    ('{"type": "server_vad", "silence_duration_ms": -1}', "silence_duration_ms"),
    ('{"type": "server_vad", "silence_duration_ms": "long"}', "silence_duration_ms"),
    ('{"type": "server_vad", "create_response": true}', "create_response"),
    ('{"type": "semantic_vad"}', "semantic_vad"),
    ('{"threshold": 0.5}', "type"),
    ("[1, 2]", "allowed values: auto"),
    ("manual", "allowed values: auto"),
])
def test_chunking_strategy_is_validated_naming_the_field(spec, words):
    assert words in rejects({"chunking_strategy": spec}, "chunking_strategy")


def test_chunking_strategy_server_vad_conflicts_with_vad_filter_off():
    spec = '{"type": "server_vad"}'
    assert "vad_filter=false" in rejects({"chunking_strategy": spec, "vad_filter": "false"}, "chunking_strategy")
    assert not parse({"chunking_strategy": "auto", "vad_filter": "false"}).vad_filter


def test_condition_on_previous_text_is_a_boolean_or_the_servers_default():
    assert parse({}).condition_on_previous_text is None
    assert parse({"condition_on_previous_text": "false"}).condition_on_previous_text is False
    assert parse({"condition_on_previous_text": "TRUE"}).condition_on_previous_text is True
    assert "allowed values: true, false" in rejects({"condition_on_previous_text": "2"}, "condition_on_previous_text")


def test_hallucination_silence_threshold_is_seconds_within_a_window():
    assert parse({}).hallucination_silence_threshold is None
    assert parse({"hallucination_silence_threshold": "2"}).hallucination_silence_threshold == 2.0
    assert parse({"hallucination_silence_threshold": b"0.5"}).hallucination_silence_threshold == 0.5
    for bad in ("0", "-1", "31", "nan", "inf", "two"):
        message = rejects({"hallucination_silence_threshold": bad}, "hallucination_silence_threshold")
        assert "at most 30" in message


# ---------------------------------------------------------------- hostile values

HOSTILE = [
    "[" * 100_000 + "]" * 100_000,  # 200 kB of nesting (json.loads: RecursionError)
    '{"type": "server_vad", "threshold": ' + "[" * 3000 + "]" * 3000 + "}",
    "x" * 1_000_000,
    "1" * 5000,  # beyond Python's int() digit limit
    "NaN", "nan", "inf", "-inf", "1e309", "-1e309", "-0", "0x10", "1_000",
    "", " ", "\x00", "null", "None", "true", "[]", "{}", '{"type": null}',
    "\u202eevil", "😀" * 10, "é", "ｅｎ", "en\x00", "auto,auto", ",,,,",
    b"\xff\xfe\xfd",  # not UTF-8
    ["a", "b"],  # a repeated field
]


@pytest.mark.parametrize("name", [*OPTIONS, "chunking_strategy[threshold]", "timestamp_granularities[]",
                                  "include[]", "unknown_option", "x" * 10_000])
@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_every_option_takes_hostile_values_with_a_200_or_a_clear_400(name, value):
    """Nothing a client sends in an option ends in anything but options or a 400 with a
    code; the message stays short (no echo of a huge value)."""
    try:
        parse({name: value})
    except (InvalidOption, ModelNotLoaded) as err:
        assert err.status == 400 and err.code in ("invalid_option", "model_not_found")
        assert len(err.message) < MAX_OPTION_CHARS + 1000, len(err.message)

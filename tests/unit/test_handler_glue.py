"""The TorchServe glue's pure parts: how request fields and headers become options."""

import pytest
from ts.service import Service

import whisper_handler
from errors import InvalidAudio
from whisper_handler import audio_bytes, request_options


def test_repeated_form_fields_are_all_kept():
    batch = [
        {
            "requestId": b"a",
            "parameters": [
                {"name": "file", "contentType": "audio/flac", "value": b"audio"},
                {"name": "timestamp_granularities[]", "contentType": "", "value": b"word"},
                {"name": "timestamp_granularities[]", "contentType": "", "value": b"segment"},
            ],
        },
        {"requestId": b"b", "parameters": [{"name": "body", "contentType": "audio/wav", "value": b"wav"}]},
    ]
    _, fields, ids = Service.retrieve_data_for_inference(batch)
    assert fields[0] == {"file": b"audio", "timestamp_granularities[]": [b"word", b"segment"]}
    assert fields[1] == {"body": b"wav"}
    assert ids == {0: "a", 1: "b"}


def test_patch_is_applied_once():
    import importlib

    importlib.reload(whisper_handler)
    assert Service.retrieve_data_for_inference.keeps_repeated_fields
    assert not hasattr(Service.retrieve_data_for_inference.__closure__[0].cell_contents, "keeps_repeated_fields")


def test_options_from_headers():
    headers = {"X-Whisper-Response-Format": "srt", "x-whisper-language": "en", "Content-Type": "audio/flac"}
    assert request_options({"body": b"x"}, headers) == {"body": b"x", "response_format": "srt", "language": "en"}


def test_option_in_field_and_header_is_kept_twice():
    fields = request_options({"file": b"x", "response_format": b"vtt"}, {"X-Whisper-Response-Format": "text"})
    assert fields["response_format"] == [b"vtt", "text"]


def test_audio_bytes_from_each_field():
    assert audio_bytes({"body": bytearray(b"abc")}) == b"abc"
    assert audio_bytes({"file": b"abc", "language": b"en"}) == b"abc"
    assert audio_bytes({"audio": b"abc"}) == b"abc"


@pytest.mark.parametrize("request_fields", [{}, {"body": b""}, {"language": b"en"}])
def test_missing_audio_is_400(request_fields):
    with pytest.raises(InvalidAudio) as err:
        audio_bytes(request_fields)
    assert err.value.status == 400 and err.value.code == "empty_body"


def test_parsed_json_body_is_not_audio():
    with pytest.raises(InvalidAudio) as err:
        audio_bytes({"body": {"text": "hello"}})
    assert err.value.code == "undecodable_audio"

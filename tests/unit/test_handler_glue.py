"""The TorchServe glue's pure parts: how request fields and headers become options, and the
server-sent events of stream=true (OpenAI's transcript.text.delta / transcript.text.done)."""

import json

import pytest
from ts.service import Service

import whisper_handler
from errors import InvalidAudio, InvalidOption, Overloaded
from formats import Segment, Transcript
from whisper_handler import (
    EVENT_STREAM,
    WhisperHandler,
    audio_bytes,
    delta_event,
    done_event,
    request_options,
    sse,
    start_event_stream,
)


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


@pytest.mark.parametrize("request_fields", [{"file": [b"a", b"b"]}, {"file": b"a", "audio": b"b"}])
def test_more_than_one_audio_file_is_400(request_fields):
    with pytest.raises(InvalidAudio) as err:
        audio_bytes(request_fields)
    assert err.value.status == 400 and err.value.code == "multiple_files" and "2" in err.value.message


@pytest.mark.parametrize("request_fields", [{}, {"body": b""}, {"language": b"en"}])
def test_missing_audio_is_400(request_fields):
    with pytest.raises(InvalidAudio) as err:
        audio_bytes(request_fields)
    assert err.value.status == 400 and err.value.code == "empty_body"


def test_parsed_json_body_is_not_audio():
    with pytest.raises(InvalidAudio) as err:
        audio_bytes({"body": {"text": "hello"}})
    assert err.value.code == "undecodable_audio"


# ---------------------------------------------------------------- server-sent events


def test_sse_is_one_data_line_of_json():
    event = {"type": "transcript.text.delta", "delta": " Grüße,\nzwei Zeilen"}
    body = sse(event)
    assert body.startswith(b"data: ") and body.endswith(b"\n\n")
    assert body.count(b"\n") == 2  # the newline in the text is escaped: one event, one line
    assert json.loads(body[len(b"data: "):].decode("utf-8")) == event
    assert "Grüße".encode("utf-8") in body  # UTF-8, not \u escapes


def test_delta_event_carries_the_segments_text_id_and_times():
    segment = Segment(id=3, seek=0, start=1.23456, end=2.5, text=" Hello there.", tokens=[1, 2])
    assert delta_event(segment) == {"type": "transcript.text.delta", "delta": " Hello there.",
                                    "id": 3, "start": 1.235, "end": 2.5}


def test_done_event_carries_the_text_and_the_audio_duration():
    transcript = Transcript(text=" Hello there.", language="en", duration=11.00025)
    assert done_event(transcript) == {"type": "transcript.text.done", "text": " Hello there.",
                                      "usage": {"type": "duration", "seconds": 11.0}}


class FakeContext:
    """The parts of TorchServe's Context the handler's answers use."""

    def __init__(self):
        self.headers, self.content_types, self.status = {}, {}, None

    def set_response_content_type(self, index, value):
        self.content_types[index] = value

    def get_response_content_type(self, index):
        return self.content_types.get(index)

    def set_response_header(self, index, name, value):
        self.headers[(index, name)] = value

    def set_response_status(self, code, phrase, index):
        self.status = (code, phrase, index)


def test_event_stream_headers():
    context = FakeContext()
    start_event_stream(context, 1)
    assert EVENT_STREAM == "text/event-stream" and context.content_types == {1: EVENT_STREAM}
    assert context.headers == {(1, "Cache-Control"): "no-cache", (1, "X-Accel-Buffering"): "no"}


def test_error_before_the_first_event_is_a_plain_json_answer():
    context = FakeContext()
    body = WhisperHandler()._error(0, "r", context, Overloaded("busy", retry_after=7), streaming=True)
    assert context.status == (503, "Service Unavailable", 0)
    assert context.content_types[0] == "application/json" and context.headers[(0, "Retry-After")] == "7"
    assert json.loads(body)["message"] == "busy"


def test_error_after_events_went_out_ends_the_stream_with_an_error_event():
    context = FakeContext()
    start_event_stream(context, 0)  # the 200 and the first deltas are already on the wire
    body = WhisperHandler()._error(0, "r", context, InvalidOption("seed", "bad seed"), streaming=True)
    assert context.status is None and context.content_types[0] == EVENT_STREAM
    event = json.loads(body[len(b"data: "):])
    assert event == {"type": "error", "error": {"code": "invalid_option", "type": "invalid_request_error",
                                                "message": "bad seed"}}

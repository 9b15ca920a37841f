"""OpenAI's own Python SDK, pointed at the service through the nginx proxy (serve.sh --openai)."""

import pytest
import requests

from conftest import REPO
from scoring import normalize

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")

JFK = REPO / "samples" / "jfk.flac"
JFK_TEXT = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


@pytest.fixture(scope="module")
def client(service):
    # The SDK insists on a key; the service ignores it (token auth is off, see README).
    return openai.OpenAI(base_url=service.openai_url, api_key="unused", max_retries=0, timeout=300)


def transcribe(client, model="whisper-1", **kwargs):
    with open(JFK, "rb") as f:
        return client.audio.transcriptions.create(model=model, file=f, **kwargs)


def test_json(client):
    result = transcribe(client)
    assert normalize(result.text, "en") == normalize(JFK_TEXT, "en")


def test_text(client):
    result = transcribe(client, response_format="text")
    assert isinstance(result, str)
    assert normalize(result, "en") == normalize(JFK_TEXT, "en")


def test_srt(client):
    import srt

    result = transcribe(client, response_format="srt")
    cues = list(srt.parse(result))
    assert normalize(" ".join(c.content for c in cues), "en") == normalize(JFK_TEXT, "en")


def test_verbose_json_with_words(client):
    result = transcribe(
        client, response_format="verbose_json", timestamp_granularities=["word", "segment"], language="en"
    )
    assert result.language == "en"
    assert result.duration == pytest.approx(11.0, abs=0.05)
    assert result.segments and result.words
    assert [w.start for w in result.words] == sorted(w.start for w in result.words)
    assert normalize(" ".join(w.word for w in result.words), "en") == normalize(JFK_TEXT, "en")


def test_sdk_sees_bad_requests_as_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, model="no-such-model")
    assert "no-such-model" in str(err.value)


def test_proxy_answers_only_the_audio_routes(service):
    response = requests.get(f"{service.openai_url}/chat/completions", timeout=10)
    assert response.status_code == 404
    assert requests.get(service.openai_url.rsplit("/v1", 1)[0] + "/health", timeout=10).json()["status"] == "Healthy"

"""OpenAI's own Python SDK, pointed at the service through the nginx proxy (serve.sh --openai)."""

import re
import time

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
    assert result.language == "english"  # OpenAI names it
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


# --- OpenAI's shapes and parameters (README: "OpenAI's parameters and shapes") ---------


def test_verbose_json_names_the_language_and_carries_usage(client, service):
    result = transcribe(client, response_format="verbose_json")
    assert result.language == "english"  # whisper-1's answer; the native route keeps "en"
    assert isinstance(result.duration, float) and result.usage.seconds == pytest.approx(result.duration)
    assert all(isinstance(s.id, int) for s in result.segments)
    with open(JFK, "rb") as f:
        native = requests.post(f"{service.url}/predictions/whisper", files={"file": f},
                               data={"response_format": "verbose_json"}, timeout=120).json()
    assert native["language"] == "en" and native["usage"] == {"type": "duration", "seconds": 11.0}


def test_json_carries_usage(client):
    result = transcribe(client)
    assert result.usage.type == "duration" and result.usage.seconds == pytest.approx(11.0, abs=0.05)


def fallback_count(service) -> float:
    text = requests.get(f"{service.metrics_url}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^FallbackCount\{[^}]*\}\s+(\S+)$", text, re.M))


def settled_fallback_count(service) -> float:
    """The counter once the frontend has read the worker's last metric lines."""
    last = fallback_count(service)
    for _ in range(10):
        time.sleep(0.5)
        now = fallback_count(service)
        if now == last:
            return now
        last = now
    return last


@pytest.fixture(scope="module")
def noisy_jfk(tmp_path_factory, shared_audio):
    """JFK under loud white noise (about -5 dB SNR): tiny.en's first attempts fail Whisper's
    log-probability check, so the fallback ladder runs (checked by the metric below)."""
    import numpy as np
    import soundfile
    from audio import decode_audio

    audio = decode_audio((shared_audio / "jfk" / "jfk.flac").read_bytes()).samples  # 16 kHz mono
    noise = np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32) * audio.std() * 1.8
    path = tmp_path_factory.mktemp("noisy") / "noisy_jfk.wav"
    soundfile.write(path, audio + noise, 16000, subtype="FLOAT")
    return path


def test_temperature_zero_is_the_fallback_ladder_through_the_proxy(client, service, noisy_jfk):
    # vad_filter off: the fallback ladder is what is measured here, and the VAD hears no
    # speech in parts of this noise, so fewer windows would reach the decoder
    def sdk(**kwargs):
        with open(noisy_jfk, "rb") as f:
            return client.audio.transcriptions.create(model="whisper-1", file=f,
                                                      extra_body={"vad_filter": "false"}, **kwargs).text

    before = settled_fallback_count(service)
    default = sdk()
    after_default = settled_fallback_count(service)
    zero = sdk(temperature=0)
    after_zero = settled_fallback_count(service)
    assert after_default > before  # the ladder is used on this file
    assert after_zero - after_default == after_default - before  # temperature=0 ran the same ladder
    assert zero == default
    # the native route keeps temperature=0 as exactly 0: no fallback at all
    with open(noisy_jfk, "rb") as f:
        assert requests.post(f"{service.url}/predictions/whisper", files={"file": f},
                             data={"temperature": "0", "vad_filter": "false"}, timeout=120).ok
    assert settled_fallback_count(service) == after_zero


def test_include_logprobs_is_a_400_naming_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, include=["logprobs"])
    assert "include[]" in str(err.value) and "not supported for Whisper models" in str(err.value)


@pytest.mark.parametrize("field", ["keywords[]", "known_speaker_names[]", "known_speaker_references[]"])
def test_parameters_of_newer_models_are_refused_by_name(service, field):
    with open(JFK, "rb") as f:
        response = requests.post(f"{service.openai_url}/audio/transcriptions", files={"file": f},
                                 data={"model": "whisper-1", field: "Kennedy"}, timeout=60)
    assert response.status_code == 400 and field in response.json()["message"]


def test_chunking_strategy_auto_is_accepted(client):
    result = transcribe(client, chunking_strategy="auto")
    assert normalize(result.text, "en") == normalize(JFK_TEXT, "en")


@pytest.mark.slow
def test_languages_hint_restricts_detection(base_service, shared_audio):
    """languages[] on the multilingual model: detection picks among the given codes only."""
    german = shared_audio / "multilingual" / "de_picovoice.wav"
    url = f"{base_service.url}/predictions/whisper"
    with open(german, "rb") as f:
        free = requests.post(url, files={"file": f}, timeout=120).json()["language"]
    with open(german, "rb") as f:
        hinted = requests.post(url, files={"file": f}, data={"languages[]": ["fr", "es"]}, timeout=120).json()
    assert free == "de" and hinted["language"] in ("fr", "es")

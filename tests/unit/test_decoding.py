"""The batched decoder gives openai-whisper's decode() tokens, token for token, at
temperature 0 on real 30 s windows (tiny.en), for a batch and for rows with prompts."""

import pytest
import torch

from conftest import SHARED_AUDIO as AUDIO

whisper = pytest.importorskip("whisper")
from whisper.tokenizer import get_tokenizer  # noqa: E402

from decoding import TokenRules, decode_windows  # noqa: E402

FILES = ["jfk/jfk.flac", "english/mfa_acoustic_corpus.wav", "english/LJ002-0020.wav",
         "librispeech/test-clean/1221-135766-0001.wav"]


@pytest.fixture(scope="module")
def model(tiny_en_model):
    return tiny_en_model


@pytest.fixture(scope="module")
def mels():
    from audio import decode_audio

    out = []
    for name in FILES:
        samples = torch.from_numpy(decode_audio((AUDIO / name).read_bytes()).samples)
        out.append(whisper.log_mel_spectrogram(whisper.pad_or_trim(samples), 80))
    return torch.stack(out)


def test_matches_whisper_decode_token_for_token(model, mels):
    reference = whisper.decode(model, mels, whisper.DecodingOptions(temperature=0, fp16=False, language="en"))
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels)
    ours = decode_windows(model, features, [tokenizer.sot_sequence] * len(FILES), tokenizer, rules)
    for ref, got in zip(reference, ours):
        assert got.tokens == ref.tokens
        assert got.text == ref.text
        assert got.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)
        assert got.no_speech_prob == pytest.approx(ref.no_speech_prob, abs=1e-4)
    assert any(t >= tokenizer.timestamp_begin for t in ours[0].tokens)  # decoded with timestamps


def test_rows_with_prompts_of_different_lengths(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    prompt = "President Kennedy's inaugural address."
    reference = whisper.decode(
        model, mels[:2], whisper.DecodingOptions(temperature=0, fp16=False, language="en", prompt=prompt)
    )
    plain = whisper.decode(model, mels[2:3], whisper.DecodingOptions(temperature=0, fp16=False, language="en"))
    prompted = [tokenizer.sot_prev] + tokenizer.encode(" " + prompt) + list(tokenizer.sot_sequence)
    with torch.no_grad():
        features = model.encoder(mels[:3])
    ours = decode_windows(model, features, [prompted, prompted, tokenizer.sot_sequence], tokenizer, rules)
    assert [o.tokens for o in ours] == [r.tokens for r in reference] + [plain[0].tokens]


def test_sampling_at_temperature_keeps_timestamp_rules(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        features = model.encoder(mels[:2])
    ours = decode_windows(model, features, [tokenizer.sot_sequence] * 2, tokenizer, rules,
                          temperature=1.0, generator=generator, max_new_tokens=60)
    for row in ours:
        stamps = [t for t in row.tokens if t >= tokenizer.timestamp_begin]
        assert stamps and stamps[0] <= tokenizer.timestamp_begin + 50  # first <= 1.0 s
        assert stamps == sorted(stamps)
        assert row.temperature == 1.0 and len(row.tokens) <= 60

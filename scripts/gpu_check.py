#!/usr/bin/env python
"""The GPU checks and benchmark, prepared here and run in one call on a lent GPU machine.

That machine has PyTorch (and transformers) but no openai-whisper, Silero VAD, soundfile
or the weights, and a call carries at most 64 MiB, so `pack` writes everything the run
needs into one folder (default .gpu/, git-ignored):

  weights.pt   tiny.en's weights as int8 with one fp32 scale per row (1-D tensors as fp32)
  audio.npz    the English files of ../shared/audio decoded to 16 kHz int16, with references
  wheels/      openai-whisper, more-itertools, silero-vad (pure Python)

and `run` (scripts/gpu_check.sh installs the wheels first) prints one table:

  correctness  tiny.en (the unpacked weights) on the GPU in fp16 against the same weights
               on the CPU in fp32: the decode batch against whisper.decode token for token
               on the device, CUDA-graph steps against eager ones, fp16 against fp32
               LayerNorms, the engine's text per file and WER on both devices
  host syncs   torch.cuda's sync debug mode over a 16-token decode chunk with sampled rows
               (the one read of the rows' state at the chunk's end excluded): must be 0
  benchmark    base's and large-v3-turbo's shapes with random fp16 weights (no weights
               travel; every window decodes 100 tokens and moves 30 s, the work of a
               window of speech): the engine on 1, 16, 64 and 256 streams of 10+ minutes,
               and beside each Hugging Face transformers' WhisperForConditionalGeneration
               .generate on as many windows at once, 100 new tokens: RTFx, windows/s, ms
               per decode step, GPU memory peak
  end to end   the engine with tiny.en's real weights on 64 streams of 10+ minutes (the
               English files concatenated), and on one: RTFx

  gpu_check.py pack                                      # here, with the weights and audio
  bash scripts/gpu_check.sh                              # there (device tool, carry .gpu)
  gpu_check.py run --device cpu --quick                  # here: the same code on the CPU

The device tool call, from the repository root:
  run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=540)
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

WHEELS = ("openai-whisper==20250625", "more-itertools==11.2.1", "silero-vad==6.2.3")
LONG_STREAM_S = 600  # the end-to-end streams are at least this long


# --------------------------------------------------------------------------- pack (here)


def pack_weights(checkpoint_path: Path, out: Path) -> int:
    """Write the checkpoint's tensors as int8 rows with fp32 scales; returns bytes written."""
    import torch

    from checkpoint import read_checkpoint

    checkpoint = read_checkpoint(str(checkpoint_path))
    packed = {}
    for name, tensor in checkpoint["model_state_dict"].items():
        tensor = tensor.float()
        if tensor.dim() >= 2:
            rows = tensor.reshape(tensor.shape[0], -1)
            scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            packed[name] = {"int8": torch.round(rows / scale).to(torch.int8), "scale": scale,
                            "shape": list(tensor.shape)}
        else:
            packed[name] = {"fp32": tensor}
    torch.save({"dims": checkpoint["dims"], "alignment_heads": checkpoint.get("alignment_heads"),
                "packed": packed}, out)
    return out.stat().st_size


def unpack_weights(path: Path, out: Path) -> Path:
    """The packed file back to an openai-whisper checkpoint that checkpoint.load_whisper reads."""
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    state = {name: (p["fp32"] if "fp32" in p else (p["int8"].float() * p["scale"]).reshape(p["shape"]))
             for name, p in data["packed"].items()}
    checkpoint = {"dims": data["dims"], "model_state_dict": state}
    if data.get("alignment_heads") is not None:
        checkpoint["alignment_heads"] = data["alignment_heads"]
    torch.save(checkpoint, out)
    return out


def pack_audio(audio_dir: Path, out: Path) -> float:
    """The manifest's English files, decoded as the service decodes them, as int16."""
    import numpy as np

    from audio import decode_audio
    from scoring import read_manifest

    entries = read_manifest(audio_dir / "manifest.tsv", "en")
    arrays, meta = {}, []
    for k, e in enumerate(entries):
        samples = decode_audio((audio_dir / e.file).read_bytes()).samples
        arrays[f"a{k}"] = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)
        meta.append({"file": e.file, "reference": e.reference, "key": f"a{k}"})
    np.savez_compressed(out, meta=json.dumps(meta), **arrays)
    return sum(len(a) for a in arrays.values()) / 16000


def pack(args) -> int:
    out = args.dir
    out.mkdir(exist_ok=True)
    (out / "wheels").mkdir(exist_ok=True)
    print(f"weights: {pack_weights(args.model, out / 'weights.pt') / 2**20:.1f} MiB", flush=True)
    print(f"audio: {pack_audio(args.audio_dir, out / 'audio.npz'):.1f} s", flush=True)
    for requirement in WHEELS:
        name = requirement.split("==")[0].replace("-", "_")
        if not list((out / "wheels").glob(f"{name}-*.whl")):
            # openai-whisper is published as an sdist only: build its (pure Python) wheel
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out / "wheels"),
                            requirement], check=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB in all (a device call carries at most 64 MiB with the repository)")
    return 0


# --------------------------------------------------------------------------- run (there)


def timed(fn, device, repeat: int = 3) -> float:
    """Best of `repeat` seconds of fn() after one warm-up call."""
    import torch

    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def load_audio(path: Path):
    import numpy as np

    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    return [(m["file"], m["reference"], data[m["key"]].astype(np.float32) / 32767) for m in meta]


def check_correctness(checkpoint: Path, files, device, rows: dict) -> None:
    import torch
    import whisper

    from checkpoint import load_whisper
    from decode_checks import decode_windows
    from decoding import TokenRules
    from engine import Engine, EngineConfig
    from options import TranscriptionOptions
    from runner import ModelRunner
    from scoring import score

    model = ModelRunner(load_whisper(str(checkpoint), device), str(device),
                        torch.float16 if device.type == "cuda" else torch.float32).model  # the engine's layout
    tokenizer = whisper.tokenizer.get_tokenizer(False, language="en", task="transcribe")
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a)), 80)
                        for _, _, a in files[:8]]).to(device)
    fp16 = device.type == "cuda"
    with torch.no_grad():
        reference = whisper.decode(model, mels.to(next(model.parameters()).dtype),
                                   whisper.DecodingOptions(temperature=0, fp16=fp16, language="en"))
        features = model.encoder(mels.to(next(model.parameters()).dtype))
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, device)
    ours = decode_windows(model, features, [tokenizer.sot_sequence] * len(mels), tokenizer, rules)
    same = sum(r.tokens == o.tokens for r, o in zip(reference, ours))
    rows["decode batch = whisper.decode, token for token (8 windows)"] = f"{same}/{len(mels)}"
    if device.type == "cuda":
        eager = decode_windows(model, features, [tokenizer.sot_sequence] * len(mels), tokenizer, rules,
                               cuda_graphs=False)
        same = sum(e.tokens == o.tokens for e, o in zip(eager, ours))
        rows["CUDA-graph steps = eager steps, token for token (8 windows)"] = f"{same}/{len(mels)}"
        fp32_ln = ModelRunner(load_whisper(str(checkpoint), device), str(device), torch.float16,
                              low_precision_layernorm=False)
        fp32_ln_out = decode_windows(fp32_ln.model, features, [tokenizer.sot_sequence] * len(mels), tokenizer, rules)
        same = sum(a.tokens == o.tokens for a, o in zip(fp32_ln_out, ours))
        rows["fp16 LayerNorms = fp32 LayerNorms, token for token (8 windows)"] = f"{same}/{len(mels)}"

    texts = {}
    for where in ([device] if device.type == "cpu" else [device, torch.device("cpu")]):
        engine = Engine(load_whisper(str(checkpoint), where), EngineConfig(device=str(where), cpu_bf16=False))
        started = time.perf_counter()
        transcripts = engine.transcribe([(a, TranscriptionOptions()) for _, _, a in files])
        seconds = time.perf_counter() - started
        engine.close()
        texts[where.type] = [t.text for t in transcripts]
        scores = [score(ref, t.text) for (_, ref, _), t in zip(files, transcripts)]
        wer = sum(s.errors for s in scores) / sum(s.reference_length for s in scores)
        audio_s = sum(len(a) for _, _, a in files) / 16000
        rows[f"engine tiny.en (int8-packed weights) on {where.type}: WER, RTFx (all files at once)"] = \
            f"{100 * wer:.2f}%, {audio_s / seconds:.1f}x"
    if len(texts) == 2:
        equal = sum(a == b for a, b in zip(texts["cuda"], texts["cpu"]))
        rows["same text on cuda fp16 and cpu fp32 (files)"] = f"{equal}/{len(files)}"


def check_syncs(checkpoint: Path, files, device, rows: dict) -> None:
    import torch
    import whisper

    from checkpoint import load_whisper
    from decode_checks import syncs_in_token_loop
    from decoding import DecodeBatch, TokenRules

    model = load_whisper(str(checkpoint), device)
    tokenizer = whisper.tokenizer.get_tokenizer(False, language="en", task="transcribe")
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(files[0][2])), 80).to(device)
    with torch.no_grad():
        features = model.encoder(mel[None].to(next(model.parameters()).dtype)).expand(4, -1, -1)
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, device)
    temperatures = [0.0, 0.4, 0.8, 1.0]

    def sampled_batch():
        batch = DecodeBatch(model, tokenizer, rules)
        generators = [torch.Generator(device).manual_seed(k) if t > 0 else None for k, t in enumerate(temperatures)]
        batch.add(features, [tokenizer.sot_sequence] * 4, temperatures, generators, range(4))
        batch.horizon = max(batch.horizon, 16)
        return batch

    calls = syncs_in_token_loop(sampled_batch(), 16)
    rows["host syncs in a 16-token chunk, sampled rows (counted calls)"] = str(len(calls))
    if device.type == "cuda":
        # the per-chunk setup (the sampled rows' index, one small upload) and the end-of-chunk
        # read are outside: the mode is on inside every token step
        batch, caught = sampled_batch(), []
        token_step = batch._token_step

        def checked_token_step(*args):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return token_step(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        batch._token_step = checked_token_step
        try:
            batch.step(16)
        except RuntimeError as e:
            caught.append(str(e).splitlines()[0])
        rows["torch.cuda sync debug mode 'error' inside each of 16 token steps"] = caught[0] if caught else "no sync"


DIMS = {  # openai-whisper's ModelDimensions of the benchmarked shapes
    "base": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                 n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6),
    "turbo": dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                  n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=4),
}
TOKENS_PER_WINDOW = 100  # a 30 s window of speech decodes about this many tokens


def long_stream(files, seconds: float):
    """The files concatenated (repeated) to at least `seconds` of audio."""
    import numpy as np

    pieces, length = [], 0
    while length < seconds * 16000:
        for _, _, a in files:
            pieces.append(a)
            length += len(a)
    return np.concatenate(pieces)


def bench_engine(model, device, streams, audio, rows: dict, label: str) -> None:
    """The engine on `streams` copies of `audio` at once, at temperature 0 only (no
    fallbacks) and at most TOKENS_PER_WINDOW tokens per window. Random weights decide
    where a window ends and how far its timestamps move the seek, so the row gives the
    tokens decoded per window beside the rates."""
    import torch

    from engine import Engine, EngineConfig
    from options import TranscriptionOptions

    engine = Engine(model, EngineConfig(device=str(device), max_new_tokens=TOKENS_PER_WINDOW, cpu_bf16=False))
    options = TranscriptionOptions(language="en", temperature=(0.0,), condition_on_previous_text=False)
    # warm-up at the largest batch: kernels, the decode buffers at full size (growing them
    # drops the captured graphs) and the graphs of the shapes a long run goes through
    engine.transcribe([(audio[: 16000 * 60], options)] * max(streams))
    for n in streams:
        print(f"[benchmark] {label}: ours, {n} streams ...", file=sys.stderr, flush=True)
        before = dict(engine.stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        engine.transcribe([(audio, options)] * n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        stats = {k: engine.stats[k] - before[k]
                 for k in ("encoder_windows", "decoded_windows", "decoded_tokens", "decode_s", "steps")}
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        step_ms = 1000 * stats["decode_s"] / max(1, stats["steps"] * engine.config.tokens_per_step)
        rows[f"{label} ours, {n} streams of {len(audio) / 16000:.0f} s"] = (
            f"{n * len(audio) / 16000 / elapsed:.0f}x | {stats['encoder_windows'] / elapsed:.1f} | "
            f"{step_ms:.2f} | {memory:.1f} | {stats['decoded_tokens'] / max(1, stats['decoded_windows']):.0f}")
    graphs = len(engine.runner.batch.graphs)
    rows[f"{label} ours: window budget, CUDA graphs held"] = f"{engine.window_budget}, {graphs}"
    engine.close()


def bench_transformers(name: str, device, streams, rows: dict, label: str) -> None:
    """Hugging Face transformers' WhisperForConditionalGeneration with the same shape and
    random weights: generate on `n` windows at once, TOKENS_PER_WINDOW new tokens each."""
    import torch

    try:
        from transformers import WhisperConfig, WhisperForConditionalGeneration
        from transformers.generation import GenerationMixin
    except ImportError as e:
        rows[f"{label} transformers"] = f"not importable: {e}"
        return
    d = DIMS[name]
    config = WhisperConfig(vocab_size=d["n_vocab"], num_mel_bins=d["n_mels"], encoder_layers=d["n_audio_layer"],
                           decoder_layers=d["n_text_layer"], encoder_attention_heads=d["n_audio_head"],
                           decoder_attention_heads=d["n_text_head"], d_model=d["n_audio_state"],
                           encoder_ffn_dim=4 * d["n_audio_state"], decoder_ffn_dim=4 * d["n_text_state"],
                           max_source_positions=d["n_audio_ctx"], max_target_positions=d["n_text_ctx"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    hf = WhisperForConditionalGeneration(config).to(device, dtype).eval()
    sot = [50258, 50259, 50359]
    for n in streams:
        print(f"[benchmark] {label}: transformers, batch {n} ...", file=sys.stderr, flush=True)
        features = torch.randn(n, d["n_mels"], 3000, device=device, dtype=dtype)
        ids = torch.tensor([sot] * n, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                seconds = timed(lambda: GenerationMixin.generate(
                    hf, input_features=features, decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids),
                    max_new_tokens=TOKENS_PER_WINDOW, min_new_tokens=TOKENS_PER_WINDOW, do_sample=False),
                    device, repeat=1)
        except Exception as e:  # a report row, not a failed run
            rows[f"{label} transformers, batch {n}"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
            continue
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows[f"{label} transformers generate, batch {n}"] = (
            f"{30 * n / seconds:.0f}x | {n / seconds:.1f} | {1000 * seconds / TOKENS_PER_WINDOW:.2f} | {memory:.1f} | "
            f"{TOKENS_PER_WINDOW}")
    del hf


def check_benchmark(files, device, rows: dict, names, streams, seconds: float) -> None:
    """Per shape (random weights): the engine on 1..256 long streams beside transformers'
    batched generate at the same batch; rows: RTFx | windows/s | ms per decode step | GPU GiB."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    audio = long_stream(files, seconds)
    rows["benchmark columns"] = ("RTFx (transformers: 30 s per window) | windows/s | ms per decode step "
                                 "(all rows; transformers: per token incl. encoder) | GPU memory peak GiB | tokens/window")
    for name in names:
        torch.manual_seed(0)
        model = Whisper(ModelDimensions(**DIMS[name]))
        bench_engine(model, device, streams, audio, rows, name)
        del model
        bench_transformers(name, device, streams, rows, name)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_end_to_end(checkpoint: Path, files, device, rows: dict, streams: int, seconds: float) -> None:
    """tiny.en's real weights on long streams of speech: RTFx with real windows (fallbacks,
    timestamps, VAD), one stream and many."""
    from checkpoint import load_whisper
    from engine import Engine, EngineConfig
    from options import TranscriptionOptions

    long = long_stream(files, seconds)
    engine = Engine(load_whisper(str(checkpoint), device), EngineConfig(device=str(device), cpu_bf16=False))
    engine.warmup()
    for n in (1, streams):
        started = time.perf_counter()
        engine.transcribe([(long, TranscriptionOptions(language="en"))] * n)
        elapsed = time.perf_counter() - started
        rows[f"engine tiny.en: {n} streams of {len(long) / 16000:.0f} s (RTFx)"] = \
            f"{n * len(long) / 16000 / elapsed:.0f}x ({elapsed:.1f} s)"
    rows["engine window budget, stats"] = f"{engine.window_budget}, {json.dumps({k: round(v, 2) for k, v in engine.stats.items()})}"
    engine.close()


def run(args) -> int:
    import torch

    from cpu import cpu_description

    device = torch.device(args.device)
    rows = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
            "torch": torch.__version__}
    files = load_audio(args.dir / "audio.npz")
    if args.quick:
        files = files[:4]
    streams = (1, 2) if args.quick else (1, 16, 64, 256)
    names = ("base",) if args.quick else ("base", "turbo")
    seconds = 60 if args.quick else LONG_STREAM_S
    steps = [
        ("correctness", lambda: check_correctness(checkpoint, files, device, rows)),
        ("host syncs", lambda: check_syncs(checkpoint, files, device, rows)),
        ("benchmark", lambda: check_benchmark(files, device, rows, names, streams, seconds)),
        ("end to end", lambda: check_end_to_end(checkpoint, files, device, rows, 2 if args.quick else 64, seconds)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = unpack_weights(args.dir / "weights.pt", Path(tmp) / "tiny.en.pth")
        for name, step in steps:
            if args.only and name not in args.only:
                continue
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                step()
            except Exception as e:  # one failed check must not hide the others
                rows[f"{name}: FAILED"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"[{name}] {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print("| check | result |\n| --- | --- |")
    for key, value in rows.items():
        print(f"| {key} | {value} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the folder a GPU call carries")
    p.add_argument("--model", type=Path, default=REPO / "whisper-models" / "whisper_tiny.en.pth")
    p.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    p.add_argument("--dir", type=Path, default=REPO / ".gpu")
    r = sub.add_parser("run", help="run the checks (on the GPU machine, or here with --device cpu)")
    r.add_argument("--dir", type=Path, default=REPO / ".gpu")
    r.add_argument("--device", default="cuda")
    r.add_argument("--quick", action="store_true", help="4 files, small sizes, 2 short streams (a CPU try)")
    r.add_argument("--only", nargs="*", choices=["correctness", "host syncs", "benchmark", "end to end"])
    r.add_argument("--out", help="also write gpu_check.json here (on the device: $OUT)")
    args = parser.parse_args(argv)
    return pack(args) if args.command == "pack" else run(args)


if __name__ == "__main__":
    sys.exit(main())

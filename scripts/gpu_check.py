#!/usr/bin/env python
"""The GPU checks and benchmark, prepared here, rehearsed on the CPU, run in one call on a
lent GPU machine.

That machine (Python 3.12, torch 2.11+cu130, numpy, numba, tiktoken, transformers,
onnxruntime, scipy, regex) has no openai-whisper, Silero VAD, jiwer, soundfile, librosa,
TorchServe or weights, and a call carries at most 64 MiB, so `pack` writes everything the
run needs into one folder (default .gpu/, git-ignored):

  weights.pt   tiny.en's weights as int8 with one fp32 scale per row (1-D tensors as fp32)
  audio.npz    the English files of ../shared/audio decoded to 16 kHz int16, with references
  wheels/      openai-whisper, more-itertools, silero-vad, jiwer, click (pure Python) and
               rapidfuzz built for that machine's Python

and `run` (scripts/gpu_check.sh checks the imports and installs the wheels first) prints
the plan with its expected seconds, then each table row the moment it is measured (also
appended to rows.jsonl under --out, so a run cut short still returns every row done):

  correctness  tiny.en (the unpacked weights) on the GPU in fp16 against the same weights
               on the CPU in fp32: the decode batch against whisper.decode token for token
               on the device, CUDA-graph steps against eager ones (and how many steps the
               graphs replayed: 0 fails the row), fp16 against fp32 LayerNorms, the
               engine's WER on both devices
  host syncs   torch.cuda's sync debug mode over every token step of a 16-token chunk with
               greedy and sampled rows, eager and from graphs: must be 0
  benchmark    base's and large-v3-turbo's shapes with random fp16 weights (no weights
               travel; every window decodes 100 tokens and moves 30 s): the engine (VAD
               off, graphs captured and encoder warmed at the timed shapes first, phases
               timed apart) on 1, 64 and 256 long streams, and beside each Hugging Face
               transformers' WhisperForConditionalGeneration.generate on as many windows at
               once, 100 new tokens: RTFx, windows/s, ms per decode token step, encoder ms
               per window, GPU memory peak, graph-replayed share of the steps
  end to end   the engine with tiny.en's real weights (VAD on) on 16 streams of speech
               and on one: RTFx

Each step runs under a deadline from the plan; what does not fit says so in its row.

  gpu_check.py pack                               # here, with the weights and audio
  bash scripts/gpu_check.sh --rehearse            # here: the whole path on the CPU, with
                                                  # the GPU machine's absent modules blocked
  bash scripts/gpu_check.sh                       # there (device tool, carry .gpu)

The device tool call, from the repository root:
  run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=420)
"""

import argparse
import json
import os
import re
import site
import subprocess
import sys
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

WHEELS = ("openai-whisper==20250625", "more-itertools==11.2.1", "silero-vad==6.2.3", "jiwer==4.0.0",
          "click==8.5.1")
BINARY_WHEELS = ("rapidfuzz==3.14.6",)  # compiled: downloaded for the GPU machine's Python
GPU_PYTHON = "3.12"
# Distributions the GPU machine lacks that a careless import would pull in; the rehearsal
# hides them (with the carried wheels, everything else the run imports is there).
ABSENT_THERE = ("soundfile", "_soundfile", "_soundfile_data", "librosa", "soxr", "ts", "torchserve",
                "torch_model_archiver", "model_archiver", "yt_dlp", "faster_whisper", "ctranslate2", "av", "onnx",
                "psutil", "matplotlib", "openai", "srt", "webvtt", "webvtt_py")
HIDDEN = re.compile(rf"^({'|'.join(ABSENT_THERE)})([-_.].*)?$", re.IGNORECASE)
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
    wheels = out / "wheels"
    for requirement in WHEELS + BINARY_WHEELS:
        name = requirement.split("==")[0].replace("-", "_").lower()
        if any(p.name.lower().startswith(f"{name}-") for p in wheels.glob("*.whl")):
            continue
        if requirement in BINARY_WHEELS:
            tags = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
            command = ["download", "--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp",
                       *[arg for tag in tags for arg in ("--platform", tag)], "-d", str(wheels)]
        else:  # openai-whisper is published as an sdist only: build its (pure Python) wheel
            command = ["wheel", "-w", str(wheels)]
        subprocess.run([sys.executable, "-m", "pip", *command, "-q", "--no-deps", requirement], check=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB in all (a device call carries at most 64 MiB with the repository)")
    return 0


# --------------------------------------------------------------------------- run (there)


@dataclass(frozen=True)
class Plan:
    """What a run measures, and the seconds each step may take."""

    files: int  # correctness: windows decoded against whisper.decode (and files for WER: all)
    names: tuple  # benchmark model shapes
    streams: tuple  # benchmark stream counts
    stream_s: float  # benchmark stream length
    e2e_streams: int
    e2e_s: float
    seconds: dict  # step -> deadline after its start
    tokens_per_window: int = 100  # benchmark: a 30 s window of speech decodes about this many tokens

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


# On the card (an H100): the expected seconds of each step, with room. The benchmark's
# base rows at 5,000x and turbo's at 2,000x are 1 + 64 + 256 streams of 300 s each,
# plus graph capture (about 200 shapes) and transformers' generate at each batch.
DEVICE_PLAN = Plan(files=8, names=("base", "turbo"), streams=(1, 64, 256), stream_s=300, e2e_streams=16,
                   e2e_s=300, seconds={"correctness": 45, "host syncs": 15, "benchmark": 160, "end to end": 40})
# Here, on two cores: the same code paths at toy sizes.
REHEARSAL_PLAN = Plan(files=2, names=("base",), streams=(1, 2), stream_s=40, e2e_streams=2, e2e_s=40,
                      seconds={"correctness": 90, "host syncs": 30, "benchmark": 120, "end to end": 60},
                      tokens_per_window=24)


class Rows(dict):
    """The table: each row printed, and appended to `path` (json lines), when it is set."""

    def __init__(self, path=None):
        super().__init__()
        self.path = path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"| {key} | {value} |", flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({key: value}) + "\n")


class Deadline:
    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


REHEARSAL_SITE = "WHISPER_GPU_REHEARSAL_SITE"


def rehearse_in_isolation(argv, folder: Path) -> None:
    """Run this script again (exec) as the GPU machine would see it: without this
    interpreter's site machinery, over a folder of links to its site-packages with the
    distributions that machine lacks left out, so their imports (and importlib's probes
    for them) fail as they would there."""
    view = folder / "site-packages"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    hidden = set()
    for packages in site.getsitepackages():
        for entry in Path(packages).iterdir():
            if HIDDEN.match(entry.name):
                hidden.add(entry.name)
            elif not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    print(f"rehearsal: {len(hidden)} entries of site-packages hidden ({', '.join(sorted(hidden)[:8])}, ...)",
          file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=str(view), **{REHEARSAL_SITE: str(view)})
    os.execve(sys.executable, [sys.executable, "-S", str(Path(__file__).resolve()), *argv], env)


def engine_config(device, **overrides):
    """The engine's configuration for these checks: the device's own layout (on a CPU: fp32
    with torch's encoder, the GPU path's code)."""
    from engine import EngineConfig

    return EngineConfig(device=str(device), cpu_bf16=False, cpu_encoder="torch", **overrides)


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


def check_correctness(checkpoint: Path, files, device, rows: Rows, plan: Plan, deadline: Deadline) -> None:
    import torch
    import whisper

    from checkpoint import load_whisper
    from decode_checks import decode_windows
    from decoding import TokenRules
    from engine import Engine
    from options import TranscriptionOptions
    from runner import ModelRunner
    from scoring import score

    model = ModelRunner(load_whisper(str(checkpoint), device), str(device),
                        torch.float16 if device.type == "cuda" else torch.float32).model  # the engine's layout
    tokenizer = whisper.tokenizer.get_tokenizer(False, language="en", task="transcribe")
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a)), 80)
                        for _, _, a in files[:plan.files]]).to(device)
    fp16 = device.type == "cuda"
    with torch.no_grad():
        reference = whisper.decode(model, mels.to(next(model.parameters()).dtype),
                                   whisper.DecodingOptions(temperature=0, fp16=fp16, language="en"))
        features = model.encoder(mels.to(next(model.parameters()).dtype))
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, device)
    initial = [tokenizer.sot_sequence] * len(mels)
    counts = {}
    ours = decode_windows(model, features, initial, tokenizer, rules, capture_graphs=True, counts=counts)
    same = sum(r.tokens == o.tokens for r, o in zip(reference, ours))
    rows[f"decode batch = whisper.decode, token for token ({len(mels)} windows)"] = f"{same}/{len(mels)}"
    if device.type == "cuda":
        eager = decode_windows(model, features, initial, tokenizer, rules, cuda_graphs=False)
        same = sum(e.tokens == o.tokens for e, o in zip(eager, ours))
        verdict = "" if counts.get("graph_steps") else " FAIL: no step replayed a graph"
        rows[f"CUDA-graph steps = eager steps, token for token ({len(mels)} windows)"] = (
            f"{same}/{len(mels)}; {counts.get('graphs_held', 0)} graphs, {counts.get('graph_steps', 0)} steps "
            f"replayed, {counts.get('eager_steps', 0)} eager, {counts.get('capture_failures', 0)} failed captures"
            f"{verdict}")
        fp32_ln = ModelRunner(load_whisper(str(checkpoint), device), str(device), torch.float16,
                              low_precision_layernorm=False)
        fp32_ln_out = decode_windows(fp32_ln.model, features, initial, tokenizer, rules)
        same = sum(a.tokens == o.tokens for a, o in zip(fp32_ln_out, ours))
        rows[f"fp16 LayerNorms = fp32 LayerNorms, token for token ({len(mels)} windows)"] = f"{same}/{len(mels)}"

    texts = {}
    for where in ([device] if device.type == "cpu" else [device, torch.device("cpu")]):
        if deadline.passed():
            rows[f"engine tiny.en on {where.type}"] = "skipped: out of time"
            continue
        engine = Engine(load_whisper(str(checkpoint), where), engine_config(where))
        started = time.perf_counter()
        transcripts = engine.transcribe([(a, TranscriptionOptions()) for _, _, a in files])
        seconds = time.perf_counter() - started
        engine.close()
        texts[where.type] = [t.text for t in transcripts]
        scores = [score(ref, t.text) for (_, ref, _), t in zip(files, transcripts)]
        wer = sum(s.errors for s in scores) / sum(s.reference_length for s in scores)
        audio_s = sum(len(a) for _, _, a in files) / 16000
        rows[f"engine tiny.en (int8-packed weights) on {where.type}: WER, RTFx ({len(files)} files at once)"] = \
            f"{100 * wer:.2f}%, {audio_s / seconds:.1f}x"
    if len(texts) == 2:
        equal = sum(a == b for a, b in zip(texts["cuda"], texts["cpu"]))
        rows["same text on cuda fp16 and cpu fp32 (files)"] = f"{equal}/{len(files)}"


def check_syncs(checkpoint: Path, files, device, rows: Rows, plan: Plan, deadline: Deadline) -> None:
    """No host sync inside a chunk of tokens: counted calls on any device; on cuda also the
    sync debug mode over every token step, eager and while replaying graphs."""
    import torch
    import whisper

    from checkpoint import load_whisper
    from decode_checks import syncs_in_token_loop
    from decoding import DecodeBatch, TokenRules
    from runner import ModelRunner

    model = ModelRunner(load_whisper(str(checkpoint), device), str(device),
                        torch.float16 if device.type == "cuda" else torch.float32).model
    tokenizer = whisper.tokenizer.get_tokenizer(False, language="en", task="transcribe")
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(files[0][2])), 80).to(device)
    with torch.no_grad():
        features = model.encoder(mel[None].to(next(model.parameters()).dtype)).expand(4, -1, -1)
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, device)
    temperatures = [0.0, 0.4, 0.8, 1.0]

    def batch_of(graphs: bool):
        batch = DecodeBatch(model, tokenizer, rules, cuda_graphs=graphs)
        if graphs:
            batch.capture_graphs(len(temperatures), features.dtype)
        batch.add(features, [tokenizer.sot_sequence] * 4, temperatures, range(4), range(4))
        batch.horizon = max(batch.horizon, 16)
        return batch

    calls = syncs_in_token_loop(batch_of(False), 16)
    rows["host syncs in a 16-token chunk, sampled rows (counted calls)"] = str(len(calls))
    if device.type != "cuda":
        return
    for graphs in (False, True):
        batch, caught = batch_of(graphs), []
        # the per-chunk setup and the end-of-chunk read are outside: the mode is on around
        # every eager token step, or every graph replay
        calls = [(g, "replay") for g in batch.graphs.values()] if graphs else [(batch, "_token_step")]
        where = "replaying graphs" if graphs else "eager token steps"
        if not calls:
            rows[f"sync debug mode 'error' in 16 {where}, sampled rows"] = "FAIL: no graph captured"
            continue
        for owner, name in calls:
            def checked(*args, original=getattr(owner, name)):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return original(*args)
                finally:
                    torch.cuda.set_sync_debug_mode(0)

            setattr(owner, name, checked)
        try:
            batch.step(16)
        except RuntimeError as e:
            caught.append(str(e).splitlines()[0])
        rows[f"sync debug mode 'error' in 16 {where}, sampled rows"] = caught[0] if caught else "no sync"


DIMS = {  # openai-whisper's ModelDimensions of the benchmarked shapes
    "base": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                 n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6),
    "turbo": dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                  n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=4),
}


def long_stream(files, seconds: float):
    """The files concatenated (repeated) to at least `seconds` of audio."""
    import numpy as np

    pieces, length = [], 0
    while length < seconds * 16000:
        for _, _, a in files:
            pieces.append(a)
            length += len(a)
    return np.concatenate(pieces)


def random_whisper(name: str):
    """A model of `name`'s shape with random weights (every tensor initialised: whisper's
    decoder positional embedding is torch.empty)."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    model = Whisper(ModelDimensions(**DIMS[name]))
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    return model


def bench_engine(name: str, device, plan: Plan, audio, rows: Rows, deadline: Deadline) -> None:
    """The engine on `n` copies of `audio` at once, VAD off, at temperature 0 only (no
    fallbacks) and at most plan.tokens_per_window tokens per window. Before timing: the decode
    step's graphs are captured (engine warm-up) and the encoder runs at the largest batch.
    Random weights decide where a window ends and how far its timestamps move the seek, so
    the row gives the tokens decoded per window beside the rates."""
    import torch

    from engine import Engine
    from options import TranscriptionOptions

    engine = Engine(random_whisper(name), engine_config(device, max_new_tokens=plan.tokens_per_window,
                                                        timing_syncs=True))
    options = TranscriptionOptions(language="en", temperature=(0.0,), condition_on_previous_text=False,
                                   vad_filter=False)
    started = time.perf_counter()
    engine.warmup()
    engine.transcribe([(audio[: 16000 * 30], options)] * max(plan.streams))  # the encoder at the largest batch
    rows[f"{name} ours: warm-up (graphs captured, encoder at batch {max(plan.streams)})"] = (
        f"{time.perf_counter() - started:.1f} s, window budget {engine.window_budget}, "
        f"{engine.runner.graph_counts.get('graphs_held', 0)} graphs")
    for n in plan.streams:
        if deadline.passed():
            rows[f"{name} ours, {n} streams"] = "skipped: out of time"
            continue
        print(f"[benchmark] {name}: ours, {n} streams ...", file=sys.stderr, flush=True)
        before = dict(engine.stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        engine.transcribe([(audio, options)] * n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        stats = {k: engine.stats.get(k, 0) - before.get(k, 0)
                 for k in ("encoder_windows", "decoded_windows", "decoded_tokens", "decode_s", "encode_s", "steps",
                           "graph_steps", "eager_steps")}
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        token_steps = stats["graph_steps"] + stats["eager_steps"]
        step_ms = 1000 * stats["decode_s"] / max(1, token_steps)
        encode_ms = 1000 * stats["encode_s"] / max(1, stats["encoder_windows"])
        graphs = f"{100 * stats['graph_steps'] / max(1, token_steps):.0f}%"
        if device.type == "cuda" and not stats["graph_steps"]:
            graphs += " FAIL: no step replayed a graph"
        rows[f"{name} ours, {n} streams of {len(audio) / 16000:.0f} s"] = (
            f"{n * len(audio) / 16000 / elapsed:.0f}x | {stats['encoder_windows'] / elapsed:.1f} | {step_ms:.2f} | "
            f"{encode_ms:.1f} | {memory:.1f} | {stats['decoded_tokens'] / max(1, stats['decoded_windows']):.0f} | "
            f"{graphs}")
    engine.close()


def bench_transformers(name: str, device, plan: Plan, rows: Rows, deadline: Deadline) -> None:
    """Hugging Face transformers' WhisperForConditionalGeneration with the same shape and
    random weights: generate on `n` windows at once, plan.tokens_per_window new tokens each."""
    import torch

    try:
        from transformers import WhisperConfig, WhisperForConditionalGeneration
        from transformers.generation import GenerationMixin
    except ImportError as e:
        rows[f"{name} transformers"] = f"not importable: {e}"
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
    for n in plan.streams:
        if deadline.passed():
            rows[f"{name} transformers generate, batch {n}"] = "skipped: out of time"
            continue
        print(f"[benchmark] {name}: transformers, batch {n} ...", file=sys.stderr, flush=True)
        features = torch.randn(n, d["n_mels"], 3000, device=device, dtype=dtype)
        ids = torch.tensor([sot] * n, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                seconds = timed(lambda: GenerationMixin.generate(
                    hf, input_features=features, decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids),
                    max_new_tokens=plan.tokens_per_window, min_new_tokens=plan.tokens_per_window, do_sample=False),
                    device, repeat=1)
        except Exception as e:  # a report row, not a failed run
            rows[f"{name} transformers generate, batch {n}"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
            continue
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows[f"{name} transformers generate, batch {n}"] = (
            f"{30 * n / seconds:.0f}x | {n / seconds:.1f} | {1000 * seconds / plan.tokens_per_window:.2f} | | "
            f"{memory:.1f} | {plan.tokens_per_window} |")
    del hf


def check_benchmark(checkpoint: Path, files, device, rows: Rows, plan: Plan, deadline: Deadline) -> None:
    """Per shape (random weights): the engine on long streams beside transformers' batched
    generate at the same batch."""
    import torch

    audio = long_stream(files, plan.stream_s)
    rows["benchmark columns"] = ("RTFx (transformers: 30 s per window) | windows/s | ms per decode token step "
                                 "(all rows; transformers: per token incl. encoder) | encoder ms per window | "
                                 "GPU memory peak GiB | tokens/window | steps replayed from graphs")
    for name in plan.names:
        bench_engine(name, device, plan, audio, rows, deadline)
        bench_transformers(name, device, plan, rows, deadline)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_end_to_end(checkpoint: Path, files, device, rows: Rows, plan: Plan, deadline: Deadline) -> None:
    """tiny.en's real weights on long streams of speech: RTFx with real windows (fallbacks,
    timestamps, VAD), one stream and many."""
    from checkpoint import load_whisper
    from engine import Engine
    from options import TranscriptionOptions

    long = long_stream(files, plan.e2e_s)
    engine = Engine(load_whisper(str(checkpoint), device), engine_config(device))
    engine.warmup()
    for n in (1, plan.e2e_streams):
        if deadline.passed():
            rows[f"engine tiny.en: {n} streams"] = "skipped: out of time"
            continue
        started = time.perf_counter()
        engine.transcribe([(long, TranscriptionOptions(language="en"))] * n)
        elapsed = time.perf_counter() - started
        rows[f"engine tiny.en: {n} streams of {len(long) / 16000:.0f} s (RTFx)"] = \
            f"{n * len(long) / 16000 / elapsed:.0f}x ({elapsed:.1f} s)"
    rows["engine window budget, stats"] = \
        f"{engine.window_budget}, {json.dumps({k: round(v, 2) for k, v in engine.stats.items()})}"
    engine.close()


STEPS = {"correctness": check_correctness, "host syncs": check_syncs, "benchmark": check_benchmark,
         "end to end": check_end_to_end}


def run(args, argv) -> int:
    if args.rehearse and REHEARSAL_SITE not in os.environ:
        rehearse_in_isolation(argv, Path(args.out or args.dir / "rehearsal"))
    import torch

    from cpu import cpu_description

    plan = REHEARSAL_PLAN if args.rehearse else DEVICE_PLAN
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.jsonl").unlink(missing_ok=True)
    device = torch.device(args.device)
    steps = [name for name in STEPS if not args.only or name in args.only]
    print(f"plan: {', '.join(f'{name} <= {plan.seconds[name]} s' for name in steps)}; expected "
          f"{sum(plan.seconds[name] for name in steps)} s in all ({'rehearsal on ' + args.device if args.rehearse else args.device})",
          flush=True)
    print("| check | result |\n| --- | --- |", flush=True)
    rows = Rows(out / "rows.jsonl" if out else None)
    rows["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    rows["torch"] = torch.__version__
    if args.rehearse:  # the isolation works: what the GPU machine lacks cannot be found here either
        import importlib.util

        found = [name for name in ABSENT_THERE if name.isidentifier() and importlib.util.find_spec(name)]
        rows["rehearsal: modules absent on the GPU machine found here"] = \
            f"FAIL: {found}" if found else f"none of {len(ABSENT_THERE)}"
    files = load_audio(args.dir / "audio.npz")
    if args.rehearse:
        files = files[:4]
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = unpack_weights(args.dir / "weights.pt", Path(tmp) / "tiny.en.pth")
        for name in steps:
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                STEPS[name](checkpoint, files, device, rows, plan, Deadline(plan.seconds[name]))
            except Exception as e:  # one failed check must not hide the others
                rows[f"{name}: FAILED"] = f"{type(e).__name__}: {str(e)[:200]}"
            elapsed = time.perf_counter() - started
            rows[f"{name}: seconds"] = f"{elapsed:.1f} (planned {plan.seconds[name]})"
    rows["all steps: seconds"] = f"{time.perf_counter() - started_all:.1f}"
    failed = [key for key, value in rows.items() if "FAIL" in key or "FAIL" in str(value)]
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the folder a GPU call carries")
    p.add_argument("--model", type=Path, default=REPO / "whisper-models" / "whisper_tiny.en.pth")
    p.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    p.add_argument("--dir", type=Path, default=REPO / ".gpu")
    r = sub.add_parser("run", help="run the checks (on the GPU machine; here with --rehearse)")
    r.add_argument("--dir", type=Path, default=REPO / ".gpu")
    r.add_argument("--device", default="cuda")
    r.add_argument("--rehearse", action="store_true",
                   help="the rehearsal plan (toy sizes), the GPU machine's absent modules blocked")
    r.add_argument("--only", nargs="*", choices=list(STEPS))
    r.add_argument("--out", help="append each row to rows.jsonl here as it is measured (on the device: $OUT)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return pack(args) if args.command == "pack" else run(args, argv)


if __name__ == "__main__":
    sys.exit(main())

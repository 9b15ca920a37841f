#!/usr/bin/env python
"""Where the engine's time goes on this CPU: each phase of a request timed on its own.

For each precision (fp32, and bf16 unless --precisions says otherwise) it prints:

  mel            log-mel of a minute of audio (per request, in the submitting thread)
  vad            Silero VAD over the same minute (per request, in the submitting thread)
  encoder        seconds per 30 s window, encoded in the engine's pairs (fp32: also under
                 onnxruntime, the engine's choice there)
  decode step    milliseconds per token for 1, 4 and 16 rows decoding side by side
                 (one row: a request alone; 16: the CPU window budget full)
  top ops        torch's profiler over 8 decode tokens of 16 rows and over one encoder
                 pair: the operators that take the time

and the CPU model and flags: figures compare only within one run on one machine. To see
what a machine without AVX-512 would do, run it under
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2.

  profile_engine.py --model whisper-models/whisper_base.pth
  profile_engine.py --precisions fp32 --no-ops
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

AUDIO = "jfk/jfk.flac"


def best_of(fn, repeat: int) -> float:
    """Fastest of `repeat` timed calls, after one untimed call (lazy initialisation)."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def top_ops(fn, rows: int = 6) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    events = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "whisper-models" / "whisper_base.pth"))
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio",
                        help="holds jfk/jfk.flac (default: ../shared/audio)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per figure (the best is kept)")
    parser.add_argument("--no-ops", action="store_true", help="skip the operator profiles")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from audio import decode_audio
    from checkpoint import load_whisper
    from cpu import cpu_description
    from runner import ModelRunner
    from vad import SileroVad
    from whisper.audio import N_FRAMES

    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = load_whisper(args.model)
    clip = decode_audio((args.audio_dir / AUDIO).read_bytes()).samples
    minute = np.resize(clip, 60 * 16000)
    vad = SileroVad()
    mel_runner = ModelRunner(model, "cpu", torch.float32)
    print(f"[per request] mel of 60 s: {best_of(lambda: mel_runner.mel(minute), args.repeat):.3f} s", flush=True)
    print(f"[per request] vad of 60 s: {best_of(lambda: vad.speech(minute), 1):.3f} s", flush=True)

    for name in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        runner = ModelRunner(model, "cpu", dtype, encoder_batch=2)
        mel = runner.mel(clip)[:, :N_FRAMES]
        pair = [mel, mel]
        encode_s = best_of(lambda: runner.encode(pair), args.repeat) / 2
        print(f"[{name}] encoder: {encode_s:.3f} s per window", flush=True)
        if dtype == torch.float32:
            ort = ModelRunner(model, "cpu", dtype, encoder_batch=2, encoder_backend="onnxruntime")
            encode_s = best_of(lambda: ort.encode(pair), args.repeat) / 2
            print(f"[{name}] encoder under onnxruntime: {encode_s:.3f} s per window", flush=True)
        features = runner.encode([mel])
        initial = list(runner.tokenizer("en", "transcribe").sot_sequence)
        per_token = {}
        for rows in (1, 4, 16):
            def decode_16_tokens():
                runner.reset()
                runner.batch.add(features.expand(rows, -1, -1), [initial] * rows, [0.0] * rows, [0] * rows,
                                 list(range(rows)))
                runner.batch.horizon = 16  # decode 16 tokens whatever the rows sample
                started = time.perf_counter()
                runner.decode(16)
                return time.perf_counter() - started
            decode_16_tokens()
            per_token[rows] = 1000 * min(decode_16_tokens() for _ in range(args.repeat)) / 16
        print(f"[{name}] decode step: " + ", ".join(f"{r} rows {ms:.1f} ms/token ({ms / r:.2f} per row)"
                                                   for r, ms in per_token.items()), flush=True)
        if not args.no_ops:
            runner.reset()
            runner.batch.add(features.expand(16, -1, -1), [initial] * 16, [0.0] * 16, [0] * 16, list(range(16)))
            runner.batch.horizon = 8
            print(f"[{name}] decode, 16 rows, top ops: {top_ops(lambda: runner.decode(8))}")
            print(f"[{name}] encoder pair, top ops: {top_ops(lambda: runner.encode(pair))}", flush=True)
        runner.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())

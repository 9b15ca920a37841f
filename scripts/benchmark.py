#!/usr/bin/env python
"""Throughput of the batched engine against the sequential baseline, on one machine.

For each number of concurrent streams N (real audio files, cycled), the engine gets all
N requests in one call (as a TorchServe batch would hand them over), and the baseline
runs openai-whisper's transcribe on them one at a time. RTFx = audio seconds / wall
seconds. Prints a table with the ratio and the peak memory.

--compare faster-whisper adds the peer on CPU: each file once through the engine (all at
once) and through faster-whisper (its batched pipeline in int8 and float32, and its
sequential transcribe in int8), one file after another as its users call it, on the same
decoded audio, the same weights, in the same run: one table with RTFx and WER per system.

  benchmark.py --model whisper-models/whisper_base.pth --streams 1,4,16,64
  benchmark.py --model whisper-models/whisper_base.pth --streams 16 --compare faster-whisper
  benchmark.py --device cuda --streams 1,16,64,256
  benchmark.py --quick            # tiny.en, streams 1 and 4: a CI smoke run
"""

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def load_files(audio_dir: Path, max_seconds: float, language: str):
    """(manifest entry, samples) of the manifest's files of one language, in manifest order."""
    from audio import decode_audio
    from scoring import read_manifest

    entries = [e for e in read_manifest(audio_dir / "manifest.tsv", language) if e.duration <= max_seconds]
    return [(e, decode_audio((audio_dir / e.file).read_bytes()).samples) for e in entries]


def compare_peer(engine, files, model_path: str, threads: int, batch_size: int) -> None:
    """Each file once through the engine and through faster-whisper's settings; prints
    one table of RTFx and WER."""
    import peer
    from options import TranscriptionOptions
    from scoring import error_rate

    entries = [e for e, _ in files]
    audios = {e.file: samples for e, samples in files}
    audio_s = sum(len(a) for a in audios.values()) / 16000
    model_dir = peer.ct2_model_dir(peer.model_name_of(model_path))
    rows = []
    print("[peer table] engine ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    transcripts = engine.transcribe([(audios[e.file], TranscriptionOptions()) for e in entries])
    rows.append((f"this engine, {engine.config.precision}, all files at once", time.perf_counter() - started,
                 {e.file: t.text for e, t in zip(entries, transcripts)}))
    rows += peer.run_settings(model_dir, entries, audios, threads, batch_size)
    print(f"\n{len(entries)} files, {audio_s:.1f} s of audio; same weights: "
          f"{peer.same_weights(model_path, peer.model_name_of(model_path))}")
    print("| system | wall s | RTFx | WER |\n| --- | --- | --- | --- |")
    for name, seconds, texts in rows:
        print(f"| {name} | {seconds:.1f} | {audio_s / seconds:.1f} | {100 * error_rate(entries, texts):.2f}% |")


def measure(engine, requests, device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    if requests[0][1].mode == "sequential":
        for r in requests:
            engine.transcribe([r])
    else:
        engine.transcribe(requests)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    memory = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    return elapsed, memory, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "whisper-models" / "whisper_base.pth"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--streams", default="1,4,16,64", help="comma-separated stream counts")
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--files-language", default="en", help="manifest language of the files to use")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="skip longer files")
    parser.add_argument("--window-budget", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (both runs)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="engine: bf16 on cpu (auto: where the cpu has AMX or AVX-512 bf16)")
    parser.add_argument("--language", help="language given in every request (default: none, detect)")
    parser.add_argument("--skip-sequential", action="store_true", help="engine only (no baseline)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate engine and baseline this many times and keep each one's best "
                             "time (steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny.en, streams 1,4 (CI smoke run)")
    parser.add_argument("--phase-times", action="store_true",
                        help="cuda: wait for the device at each phase's edges so the printed encode/decode "
                             "seconds are exact (costs syncs; off, they include queued work)")
    parser.add_argument("--compare", choices=["faster-whisper"],
                        help="also run faster-whisper on each file once (cpu): one RTFx/WER table")
    parser.add_argument("--peer-batch-size", type=int, default=8, help="faster-whisper: batch_size (default 8, its own)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model = str(REPO / "whisper-models" / "whisper_tiny.en.pth")
        args.streams = "1,4"

    import torch
    import whisper

    from cpu import cpu_description
    from engine import Engine, EngineConfig
    from options import TranscriptionOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from checkpoint import load_whisper

        model = load_whisper(args.model, args.device)
    except ImportError:
        model = whisper.load_model(args.model, device=args.device)
    config = EngineConfig(
        device=args.device, window_budget=args.window_budget,
        cpu_bf16={"auto": None, "on": True, "off": False}[args.bf16], timing_syncs=args.phase_times,
    )
    engine = Engine(model, config)
    baseline = engine  # mode="sequential" runs the model as loaded (fp32 on cpu)
    files = load_files(args.audio_dir, args.max_seconds, args.files_language)
    print(f"model {Path(args.model).name} on {args.device} ({torch.get_num_threads()} threads), "
          f"{len(files)} files, config {engine.config}", file=sys.stderr)

    # warm-up: first calls pay for lazy initialisation
    engine.warmup()
    baseline.transcribe([(files[0][1], TranscriptionOptions(mode="sequential"))])

    rows = []
    for n in [int(s) for s in args.streams.split(",")]:
        audios = [files[i % len(files)][1] for i in range(n)]
        audio_s = sum(len(a) for a in audios) / 16000
        print(f"[{n} streams, {audio_s:.0f} s audio] engine ...", file=sys.stderr, flush=True)
        e_time = s_time = s_mem = e_cpu = s_cpu = None
        for attempt in range(args.repeat):
            stats_before = dict(engine.stats)
            t, e_mem, c = measure(engine, [(a, TranscriptionOptions(language=args.language)) for a in audios], args.device)
            e_time = t if e_time is None else min(e_time, t)
            e_cpu = c if e_cpu is None else min(e_cpu, c)
            windows = engine.stats["encoder_windows"] - stats_before["encoder_windows"]
            if not args.skip_sequential:
                print(f"[{n} streams] sequential ...", file=sys.stderr, flush=True)
                t, s_mem, c = measure(baseline, [(a, TranscriptionOptions(language=args.language, mode="sequential")) for a in audios], args.device)
                s_time = t if s_time is None else min(s_time, t)
                s_cpu = c if s_cpu is None else min(s_cpu, c)
        rows.append((n, audio_s, e_time, s_time, e_mem, s_mem, windows, e_cpu, s_cpu))
        print(f"[{n} streams] engine {audio_s / e_time:.1f}x"
              + (f", sequential {audio_s / s_time:.1f}x" if s_time else ""), file=sys.stderr, flush=True)
    print(f"engine phases: encode {engine.stats['encode_s']:.1f} s, decode {engine.stats['decode_s']:.1f} s, "
          f"steps {engine.stats['steps']}", file=sys.stderr)
    if args.compare:
        compare_peer(engine, files, args.model, torch.get_num_threads(), args.peer_batch_size)
    engine.close()

    unit = "GPU MiB" if args.device.startswith("cuda") else "RSS MiB"
    print(f"\ncpu: {cpu_description()}")
    print(f"\n{'streams':>7} {'audio s':>8} {'engine s':>9} {'engine RTFx':>12} {'seq s':>8} "
          f"{'seq RTFx':>9} {'ratio':>6} {'windows':>8} {'peak ' + unit:>14} {'cpu-s ratio':>12}")
    for n, audio_s, e_time, s_time, e_mem, s_mem, windows, e_cpu, s_cpu in rows:
        seq = f"{s_time:8.1f} {audio_s / s_time:9.1f} {s_time / e_time:5.2f}x" if s_time else f"{'-':>8} {'-':>9} {'-':>6}"
        # process cpu seconds: steadier than wall time when other jobs share the cores
        cpu = f"{s_cpu / e_cpu:11.2f}x" if s_cpu else f"{'-':>12}"
        print(f"{n:7d} {audio_s:8.1f} {e_time:9.1f} {audio_s / e_time:12.1f} {seq} {windows:8d} {e_mem:14.0f} {cpu}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Throughput through TorchServe with dynamic batching against batchSize 1, in one run.

Starts two private services with serve.sh on free loopback ports — the same model and
config except batchSize/maxBatchDelay — sends each the same closed-loop load with
bulk_request's machinery (N concurrent clients, files round-robin), and prints a table:

    python scripts/benchmark_service.py --model base --concurrency 16 --requests 64 \\
        ../shared/audio/librispeech ../shared/audio/english

Each service is stopped afterwards, whatever happens.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from bulk_request import run_load, summarize
from client import WhisperClient, expand_audio_paths
from local_service import start_service

REPO = Path(__file__).resolve().parents[1]


def measure(name: str, env: dict, args, files) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name.replace(' ', '')}-") as root:
        print(f"[{name}] starting TorchServe ({env})", file=sys.stderr)
        service = start_service(Path(root), model=args.model, extra_env=env)
        try:
            client = WhisperClient(service.url, timeout=args.timeout)
            # one warm-up request so both runs start with a loaded, warmed-up worker
            options = {"language": args.language} if args.language else {}
            client.transcribe(files[0], **options)
            records, wall = run_load(
                client, files, concurrency=args.concurrency, count=args.requests, duration_s=None, options=options
            )
        finally:
            service.stop()
    summary = summarize(records, wall)
    summary["name"] = name
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="audio files, directories or globs (default: samples/)")
    parser.add_argument("--model", default="base", help="tiny.en, base, ... (default: base)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="batchSize of the batched service")
    parser.add_argument("--max-batch-delay-ms", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--language", help="send this language with every request (default: detect)")
    args = parser.parse_args(argv)
    files = expand_audio_paths(args.paths or [REPO / "samples"])
    configs = {
        "batchSize 1": {"WHISPER_BATCH_SIZE": "1", "WHISPER_MAX_BATCH_DELAY_MS": "1"},
        f"batchSize {args.batch_size}": {
            "WHISPER_BATCH_SIZE": str(args.batch_size),
            "WHISPER_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
        },
    }
    results = [measure(name, env, args, files) for name, env in configs.items()]
    print(
        f"\nmodel {args.model}, {args.concurrency} concurrent clients, {args.requests} requests, "
        f"{len(files)} files, language {args.language or 'detected'}"
    )
    print(f"{'service':<14} {'ok':>4} {'failed':>6} {'req/s':>7} {'RTFx':>7} {'p50 s':>7} {'p90 s':>7}")
    for r in results:
        lat = r["latency_s"]
        print(
            f"{r['name']:<14} {r['ok']:>4} {r['failed']:>6} {r['requests_per_s']:>7.2f} {r['rtfx']:>7.2f} "
            f"{(lat['p50'] or 0):>7.2f} {(lat['p90'] or 0):>7.2f}"
        )
    ratio = results[1]["rtfx"] / max(results[0]["rtfx"], 1e-9)
    print(f"throughput ratio (batched / batchSize 1): {ratio:.2f}x")
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

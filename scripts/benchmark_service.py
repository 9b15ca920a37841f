#!/usr/bin/env python3
"""The serving engine's bars, measured through a real TorchServe in one run.

Starts one private service with serve.sh on free loopback ports (with the OpenAI proxy)
and measures, printing the CPU model and flags and one table at the end:

  head of line   a short clip alone, a long upload (~320 s, built by concatenating the
                 English files) alone, then the short clip sent 1 s after the long upload
                 started: the short clip's latency against alone (bar: within 3x) and the
                 long upload's (bar: not slowed more than 1.2x); and the same short clip
                 sent 2 s after a ~165 s upload with mode=sequential (bar: within 3x)
  throughput     the English files of the corpus (the long file included), each sent
                 `--rounds` times, one request at a time and then by `--concurrency`
                 clients: audio seconds per second of each, their ratio (bar: 1.7x), and
                 the WER of both against the manifest's references
  peer           (with faster-whisper installed, unless skipped) the same files, each once,
                 through faster-whisper on this CPU with the same weights while the service
                 idles: its batched pipeline in int8 and float32 and its sequential transcribe
                 in int8, as rows of the throughput table (CPU-speed bar: the service's
                 throughput at least the int8 batched pipeline's); and the JFK clip alone,
                 the service's answer time against faster-whisper's sequential transcribe
  streaming      a ~170 s file through OpenAI's SDK with stream=True: when the first
                 delta arrived against the whole answer (bar: before 60%), and whether the
                 done text equals the non-streamed text

    python scripts/benchmark_service.py --model base --audio ../shared/audio

The service is stopped afterwards, whatever happens.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

from bulk_request import load_references, run_load, score_records, summarize  # noqa: E402
from client import WhisperClient  # noqa: E402
from local_service import running_service  # noqa: E402
from cpu import cpu_description  # noqa: E402

SHORT_CLIP = "librispeech/test-clean/61-70968-0000.flac"  # 4.9 s
LONG_FILE = "long/librispeech_concat_16k.flac"  # 141.5 s


def load(path: Path) -> np.ndarray:
    from audio import decode_audio

    return decode_audio(path.read_bytes()).samples


def concatenate(paths, seconds: float, out: Path, gap_s: float = 0.5) -> Path:
    """The files joined with short gaps, repeated until at least `seconds` long."""
    gap = np.zeros(int(16000 * gap_s), dtype=np.float32)
    parts, total = [], 0.0
    while total < seconds:
        for path in paths:
            audio = load(path)
            parts += [audio, gap]
            total += len(audio) / 16000 + gap_s
            if total >= seconds:
                break
    soundfile.write(out, np.concatenate(parts), 16000, format="FLAC")
    return out


def english_files(audio_dir: Path) -> list:
    """The corpus's English files (jfk, librispeech, english/, the long file)."""
    files = sorted(p for sub in ("jfk", "librispeech", "english", "long")
                   for p in (audio_dir / sub).rglob("*") if p.is_file())
    return [p for p in files if p.suffix in (".flac", ".wav", ".mp3", ".ogg", ".opus")]


def timed(client: WhisperClient, path: Path, **options) -> float:
    started = time.monotonic()
    response = client.post(path.read_bytes(), filename=path.name, **options)
    if not response.ok:
        raise RuntimeError(f"{path.name}: {response.status_code} {response.text[:200]}")
    return time.monotonic() - started


def head_of_line(client, short: Path, long: Path, delay_s: float, **long_options) -> dict:
    short_alone = statistics.median(timed(client, short) for _ in range(3))
    long_alone = timed(client, long, **long_options)
    result = {}

    def send_long():
        result["long"] = timed(client, long, **long_options)

    thread = threading.Thread(target=send_long)
    thread.start()
    time.sleep(delay_s)
    result["short"] = timed(client, short)
    thread.join()
    return {
        "short alone s": short_alone, "short behind long s": result["short"],
        "short ratio": result["short"] / short_alone,
        "long alone s": long_alone, "long with short s": result["long"],
        "long ratio": result["long"] / long_alone,
    }


def throughput(client, files, references, concurrency: int, rounds: int) -> dict:
    rows = {}
    for clients in (1, concurrency):
        print(f"[throughput] {clients} client(s), {len(files) * rounds} requests", file=sys.stderr)
        records, wall = run_load(client, files, concurrency=clients, count=len(files) * rounds,
                                 duration_s=None, options={"response_format": "json"})
        summary = summarize(records, wall)
        wer = score_records(records, references, flag_wer=1.0)
        rows[clients] = {"rtfx": summary["rtfx"], "failed": summary["failed"],
                         "wer": wer["overall_wer"], "wall s": wall,
                         "p50 s": summary["latency_s"]["p50"], "max s": summary["latency_s"]["max"]}
    rows["ratio"] = rows[concurrency]["rtfx"] / rows[1]["rtfx"]
    return rows


def peer_rows(audio_dir: Path, files, model: str, threads: int) -> list:
    """(system, RTFx, WER) of faster-whisper's CPU settings on `files`, each once."""
    import peer
    from scoring import error_rate, read_manifest

    wanted = {str(p.relative_to(audio_dir)) for p in files}
    entries = [e for e in read_manifest(audio_dir / "manifest.tsv") if e.file in wanted]
    audios = {e.file: load(audio_dir / e.file) for e in entries}
    audio_s = sum(len(a) for a in audios.values()) / 16000
    return [(name, audio_s / seconds, error_rate(entries, texts))
            for name, seconds, texts in peer.run_settings(peer.ct2_model_dir(model), entries, audios, threads)]


def single_request(client: WhisperClient, path: Path, model: str, threads: int) -> dict:
    """Best of three answer times for one clip alone: the service (HTTP upload, decoding,
    transcription) and faster-whisper's sequential transcribe of the decoded samples."""
    from faster_whisper import WhisperModel

    import peer

    result = {"service s": min(timed(client, path) for _ in range(3))}
    audio = load(path)
    for compute_type in ("int8", "float32"):
        fw = WhisperModel(str(peer.ct2_model_dir(model)), device="cpu", compute_type=compute_type, cpu_threads=threads)
        times = []
        for _ in range(4):  # the first call pays for lazy initialisation
            started = time.monotonic()
            list(fw.transcribe(audio)[0])
            times.append(time.monotonic() - started)
        result[f"faster-whisper sequential {compute_type} s"] = min(times[1:])
        del fw
    return result


def streaming(openai_url: str, client: WhisperClient, path: Path) -> dict:
    from openai import OpenAI

    plain = client.transcribe(path)["text"]
    sdk = OpenAI(base_url=openai_url, api_key="unused", timeout=900)
    started = time.monotonic()
    first, deltas, done = None, 0, None
    with open(path, "rb") as f:
        for event in sdk.audio.transcriptions.create(model="whisper-1", file=f, stream=True):
            if event.type == "transcript.text.delta":
                deltas += 1
                first = first or time.monotonic() - started
            elif event.type == "transcript.text.done":
                done = event
    total = time.monotonic() - started
    return {"first delta s": first, "total s": total, "first / total": (first or total) / total,
            "deltas": deltas, "done text equals non-streamed": done is not None and done.text == plain}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", help="tiny.en, base, ... (default: base)")
    parser.add_argument("--audio", type=Path, default=REPO.parent / "shared" / "audio",
                        help="the shared corpus with manifest.tsv (default: ../shared/audio)")
    parser.add_argument("--precision", default="auto", help="handler cpu_precision: auto, fp32, bf16 (default: auto)")
    parser.add_argument("--encoder", default="auto", help="handler cpu_encoder: auto, torch, onnxruntime (default: auto)")
    parser.add_argument("--window-mode", default="seek", choices=["seek", "pauses"],
                        help="handler window_mode (default: seek)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="times each English file is sent per mode")
    parser.add_argument("--skip", nargs="*", default=[], choices=["head-of-line", "throughput", "peer", "streaming"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="faster-whisper's CPU threads (default: all cores)")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if not (args.audio / "manifest.tsv").exists():
        parser.error(f"no manifest.tsv in {args.audio}")

    print(f"cpu: {cpu_description()}")
    files = english_files(args.audio)
    references = load_references(args.audio / "manifest.tsv")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        tmp = Path(tmp)
        speech = [p for p in files if LONG_FILE not in str(p)]
        long_320 = concatenate([args.audio / LONG_FILE] + speech, 320, tmp / "long_320s.flac")
        long_170 = concatenate([args.audio / LONG_FILE, args.audio / "english/mfa_acoustic_corpus.wav"],
                               165, tmp / "long_170s.flac")
        seconds = {path: soundfile.info(str(path)).duration for path in (long_320, long_170)}
        env = {"WHISPER_CPU_PRECISION": args.precision, "WHISPER_CPU_ENCODER": args.encoder,
               "WHISPER_WINDOW_MODE": args.window_mode}
        print(f"[service] starting {args.model} ({env})", file=sys.stderr)
        with running_service(tmp / "service", model=args.model, extra_env=env, openai=True) as service:
            client = WhisperClient(service.url, timeout=args.timeout)
            client.transcribe(args.audio / "jfk/jfk.flac")  # warm
            if "head-of-line" not in args.skip:
                print("[head of line]", file=sys.stderr)
                results["head of line"] = head_of_line(client, args.audio / SHORT_CLIP, long_320, 1.0)
                results["head of line"]["long seconds"] = seconds[long_320]
                print("[head of line] behind mode=sequential", file=sys.stderr)
                results["behind sequential"] = head_of_line(client, args.audio / SHORT_CLIP, long_170, 2.0,
                                                            mode="sequential")
                results["behind sequential"]["long seconds"] = seconds[long_170]
            if "throughput" not in args.skip:
                results["throughput"] = throughput(client, files, references, args.concurrency, args.rounds)
            if "peer" not in args.skip:
                print("[peer] JFK alone", file=sys.stderr)
                results["single"] = single_request(client, args.audio / "jfk/jfk.flac", args.model, args.threads)
                if "throughput" in results:
                    results["peer"] = peer_rows(args.audio, files, args.model, args.threads)
            if "streaming" not in args.skip:
                print("[streaming]", file=sys.stderr)
                results["streaming"] = streaming(service.openai_url, client, long_170)
                results["streaming"]["seconds"] = seconds[long_170]

    print(f"\nmodel {args.model}, cpu_precision {args.precision}, cpu_encoder {args.encoder}, "
          f"window_mode {args.window_mode}; "
          f"cpu: {cpu_description()}\n")
    if "head of line" in results:
        h = results["head of line"]
        print("| head of line | alone s | with the other s | ratio | bar |\n| --- | --- | --- | --- | --- |")
        print(f"| short clip (4.9 s), sent 1 s after the long upload | {h['short alone s']:.2f} | "
              f"{h['short behind long s']:.2f} | {h['short ratio']:.2f}x | <= 3x |")
        print(f"| long upload ({h['long seconds']:.0f} s) | {h['long alone s']:.2f} | "
              f"{h['long with short s']:.2f} | {h['long ratio']:.2f}x | <= 1.2x |")
        q = results["behind sequential"]
        print(f"| short clip (4.9 s), sent 2 s after a {q['long seconds']:.0f} s mode=sequential upload | "
              f"{q['short alone s']:.2f} | {q['short behind long s']:.2f} | {q['short ratio']:.2f}x | <= 3x |")
        print(f"| the mode=sequential upload ({q['long seconds']:.0f} s) | {q['long alone s']:.2f} | "
              f"{q['long with short s']:.2f} | {q['long ratio']:.2f}x | |\n")
    if "throughput" in results:
        t = results["throughput"]
        print("| throughput | RTFx | WER | p50 s | max s | failed |\n| --- | --- | --- | --- | --- | --- |")
        for clients in (1, args.concurrency):
            r = t[clients]
            print(f"| {clients} client(s) | {r['rtfx']:.2f} | {100 * r['wer']:.2f}% | {r['p50 s']:.2f} | "
                  f"{r['max s']:.2f} | {r['failed']} |")
        for name, rtfx, wer in results.get("peer", []):
            print(f"| {name}, one file after another | {rtfx:.2f} | {100 * wer:.2f}% | | | |")
        print(f"\nthroughput ratio ({args.concurrency} clients / 1): **{t['ratio']:.2f}x** (bar: >= 1.7x)")
        if results.get("peer"):
            int8 = results["peer"][0][1]
            print(f"service with {args.concurrency} clients / faster-whisper int8 batched: "
                  f"**{t[args.concurrency]['rtfx'] / int8:.2f}x** (bar: >= 1x)")
        print()
    if "single" in results:
        single = results["single"]
        print("| JFK clip (11 s) alone, best of three | s |\n| --- | --- |")
        for name, seconds in single.items():
            print(f"| {name} | {seconds:.2f} |")
        print()
    if "streaming" in results:
        s = results["streaming"]
        print(f"streaming (OpenAI SDK, {s['seconds']:.0f} s file): first delta at {s['first delta s']:.2f} s of "
              f"{s['total s']:.2f} s ({100 * s['first / total']:.0f}%, bar: < 60%), {s['deltas']} deltas, "
              f"done text equals non-streamed: {s['done text equals non-streamed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

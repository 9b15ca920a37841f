#!/usr/bin/env python
"""Word error rate of the service or the engine on a manifest of real speech.

  evaluate.py MANIFEST --engine --model whisper-models/whisper_tiny.en.pth --compare
  evaluate.py MANIFEST --url http://127.0.0.1:8080 --language-filter en

--compare (engine only) runs the batched engine and openai-whisper's sequential
transcribe on the same model in one run and prints both WERs; it also reports, for the
long file(s) of the manifest, how many reference words the batched engine drops or
repeats beyond what the sequential transcribe does (the window-edge bar: <= 1%).
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

from scoring import ManifestEntry, Score, read_manifest, score  # noqa: E402


def load_audio(path: Path):
    from audio import decode_audio

    return decode_audio(path.read_bytes()).samples


def load_model(path: str, device: str):
    try:
        from checkpoint import load_whisper
    except ImportError:
        import whisper

        return whisper.load_model(path, device=device)
    return load_whisper(path, device)


def make_options(mode: str, language=None):
    from options import TranscriptionOptions

    return TranscriptionOptions(language=language, mode=mode)


def run_engine(engine, entries, audio_root: Path, mode: str, given_language: bool) -> Dict[str, str]:
    """Hand all files to the engine at once, as one TorchServe batch would."""
    requests = []
    for e in entries:
        language = e.language if given_language else None
        requests.append((load_audio(audio_root / e.file), make_options(mode, language)))
    started = time.perf_counter()
    if mode == "sequential":
        from tqdm import tqdm

        transcripts = [engine.transcribe([r])[0] for r in tqdm(requests, desc=mode, unit="file")]
    else:
        print(f"{mode}: {len(requests)} files in one engine call ...", file=sys.stderr, flush=True)
        transcripts = engine.transcribe(requests)
    elapsed = time.perf_counter() - started
    audio_s = sum(len(a) for a, _ in requests) / 16000
    print(f"{mode}: {audio_s:.1f} s of audio in {elapsed:.1f} s (RTFx {audio_s / elapsed:.1f})", file=sys.stderr)
    return {e.file: t.text for e, t in zip(entries, transcripts)}


def run_service(url: str, entries, audio_root: Path, token=None, mode=None) -> Dict[str, str]:
    from client import WhisperClient
    from tqdm import tqdm

    client = WhisperClient(url, token=token)
    texts = {}
    for e in tqdm(entries, desc="service", unit="file"):
        options = {"mode": mode} if mode else {}
        texts[e.file] = client.transcribe(audio_root / e.file, **options)["text"]
    return texts


def total(scores: List[Score]) -> float:
    return sum(s.errors for s in scores) / max(1, sum(s.reference_length for s in scores))


def print_table(entries: List[ManifestEntry], hypotheses: Dict[str, Dict[str, str]]) -> Dict[str, float]:
    names = list(hypotheses)
    header = f"{'file':<52} {'lang':>4} " + " ".join(f"{n:>11}" for n in names)
    print(header)
    print("-" * len(header))
    per_mode: Dict[str, List[Score]] = {n: [] for n in names}
    for e in entries:
        cells = []
        for n in names:
            s = score(e.reference, hypotheses[n][e.file], e.language)
            per_mode[n].append(s)
            cells.append(f"{100 * s.rate:10.1f}%")
        print(f"{e.file[-52:]:<52} {e.language:>4} " + " ".join(cells))
    print("-" * len(header))
    overall = {}
    for language in sorted({e.language for e in entries}):
        cells = []
        for n in names:
            scores = [s for s, e in zip(per_mode[n], entries) if e.language == language]
            overall[(n, language)] = total(scores)
            cells.append(f"{100 * total(scores):10.2f}%")
        unit = "CER" if language in ("zh", "ja") else "WER"
        print(f"{'overall ' + unit:<52} {language:>4} " + " ".join(cells))
    return overall


def edge_report(entries: List[ManifestEntry], hypotheses: Dict[str, Dict[str, str]]) -> None:
    """Dropped/repeated words on long files: deletions + insertions against the reference,
    batched beyond sequential, as a share of the reference words."""
    long_entries = [e for e in entries if e.duration > 60]
    if not long_entries or not {"batched", "sequential"} <= set(hypotheses):
        return
    print("\nlong files: deletions + insertions against the reference")
    for e in long_entries:
        b = score(e.reference, hypotheses["batched"][e.file], e.language)
        s = score(e.reference, hypotheses["sequential"][e.file], e.language)
        excess = max(0, (b.deletions + b.insertions) - (s.deletions + s.insertions))
        print(
            f"{e.file}: {b.reference_length} words; batched del {b.deletions} ins {b.insertions}; "
            f"sequential del {s.deletions} ins {s.insertions}; "
            f"excess {excess} = {100 * excess / max(1, b.reference_length):.2f}% (bar <= 1%)"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="manifest.tsv (file, duration_s, ..., reference_transcript)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="service base URL, e.g. http://127.0.0.1:8080")
    where.add_argument("--engine", action="store_true", help="run handler/engine.py in this process")
    parser.add_argument("--token", help="inference API token for --url")
    parser.add_argument("--model", default=str(REPO / "whisper-models" / "whisper_tiny.en.pth"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=["batched", "sequential"], default="batched")
    parser.add_argument("--compare", action="store_true", help="run batched and sequential (engine only)")
    parser.add_argument("--language-filter", help="only files of this language, e.g. en")
    parser.add_argument("--given-language", action="store_true", help="pass the manifest's language instead of detecting")
    parser.add_argument("--limit", type=int, help="only the first N files")
    parser.add_argument("--window-budget", type=int, help="engine: windows per forward pass")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="engine: bf16 on cpu (auto: where the cpu has AMX bf16)")
    parser.add_argument("--threads", type=int, help="engine: torch CPU threads")
    args = parser.parse_args(argv)

    entries = read_manifest(args.manifest, args.language_filter)[: args.limit]
    audio_root = args.manifest.parent
    hypotheses: Dict[str, Dict[str, str]] = {}
    if args.url:
        hypotheses[args.mode] = run_service(args.url, entries, audio_root, args.token, args.mode)
    else:
        import torch

        from engine import Engine, EngineConfig

        if args.threads:
            torch.set_num_threads(args.threads)
        config = EngineConfig(
            device=args.device, window_budget=args.window_budget,
            cpu_bf16={"auto": None, "on": True, "off": False}[args.bf16],
        )
        engine = Engine(load_model(args.model, args.device), config)
        try:
            modes = ["batched", "sequential"] if args.compare else [args.mode]
            for mode in modes:  # sequential runs the model as loaded (fp32 on cpu)
                hypotheses[mode] = run_engine(engine, entries, audio_root, mode, args.given_language)
            print(f"engine stats: {engine.stats}", file=sys.stderr)
        finally:
            engine.close()
    print()
    overall = print_table(entries, hypotheses)
    if "batched" in hypotheses and "sequential" in hypotheses and ("batched", "en") in overall:
        delta = 100 * (overall[("batched", "en")] - overall[("sequential", "en")])
        print(f"\nEnglish WER batched - sequential: {delta:+.2f} points (bar <= +0.5)")
    edge_report(entries, hypotheses)


if __name__ == "__main__":
    main()

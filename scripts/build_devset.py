#!/usr/bin/env python
"""Build the English dev set: the shared speech under the conditions users send it in.

  build_devset.py [--audio ../shared/audio] [--out downloads/devset]

Writes OUT/<condition>/<clip>.flac (the telephone ones as 8 kHz mu-law .wav) and
OUT/manifest.tsv (file, duration_s, source, condition, reference_transcript), which
scripts/evaluate.py reads like the shared manifest (it adds a WER row per condition). Deterministic: the same inputs give the same files (seeds from the names).

Every English clip of the shared manifest, except the long concatenation, under each of:

  clean                    as recorded
  noise-{0,5,10,20}dB      additive noise at that SNR against the speech's level; the
                           type (in the file's name) cycles over the clips: babble (four
                           other shared talkers, other languages included), pink, white,
                           brown, mains hum
  speed-0.9, speed-1.1     played slower/faster, pitch moving with it
  reverb                   a synthetic room, RT60 0.3, 0.5 or 0.8 s (cycling)
  telephone                band-passed to 300-3400 Hz, 8 kHz, mu-law
  quiet                    the speech at -30 dBFS

the long LibriSpeech concatenation (141.5 s) under clean, babble at 5 dB, pink noise at
10 dB, reverb and telephone, and two new long files: all short English clips one after
another in a shuffled order with pauses of 0.3 to 6 s, one with silent pauses, one with a
-60 dBFS noise floor and pink noise at 20 dB SNR over all of it.
"""

import argparse
import csv
import hashlib
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

import augment  # noqa: E402
from augment import SR  # noqa: E402

SNRS_DB = (0, 5, 10, 20)
NOISE_TYPES = ("babble", "pink", "white", "brown", "hum")
RT60S_S = (0.3, 0.5, 0.8)
LONG_CONDITIONS = ("clean", "reverb", "telephone")
LONG_NOISES = (("babble", 5), ("pink", 10))
TALKERS_IN_BABBLE = 4


@dataclass(frozen=True)
class Item:
    """One file of the set: `make()` gives (samples, reference); telephone ones are 8 kHz."""
    condition: str
    stem: str
    source: str  # the shared file(s) it is made of
    make: Callable[[], Tuple[np.ndarray, str]]

    @property
    def file(self) -> str:
        return f"{self.condition}/{self.stem}.{'wav' if self.condition == 'telephone' else 'flac'}"


@dataclass(frozen=True)
class Clip:
    file: str  # path in the shared manifest
    reference: str
    samples: np.ndarray  # float32, 16 kHz

    @property
    def stem(self) -> str:
        return Path(self.file).stem

    @property
    def is_long(self) -> bool:
        return self.file.startswith("long/")


def seed_of(*names) -> int:
    return zlib.crc32("/".join(map(str, names)).encode())


def read_clips(audio_dir: Path) -> List[Clip]:
    """Every clip of the shared manifest with a reference (all languages: babble uses them)."""
    from audio import decode_audio
    from scoring import read_manifest

    return [Clip(e.file, e.reference, decode_audio((audio_dir / e.file).read_bytes()).samples)
            for e in read_manifest(audio_dir / "manifest.tsv")]


def talkers_for(clip: Clip, clips: List[Clip], seed: int) -> List[np.ndarray]:
    """Babble talkers for `clip`: other shared clips, none from its own source (the long
    file is made of LibriSpeech utterances, so no LibriSpeech clip babbles under it)."""
    family = "librispeech" if clip.is_long or clip.file.startswith("librispeech/") else clip.file
    others = [c for c in clips if c.file != clip.file and not c.is_long
              and ("librispeech" if c.file.startswith("librispeech/") else c.file) != family]
    picks = np.random.default_rng(seed).choice(len(others), TALKERS_IN_BABBLE, replace=False)
    return [others[k].samples for k in picks]


def noise_of(kind: str, seconds: float, clip: Clip, clips: List[Clip], seed: int) -> np.ndarray:
    if kind == "babble":
        return augment.babble(seconds, talkers_for(clip, clips, seed), seed)
    if kind == "pink":
        return augment.coloured_noise(seconds, 1.0, seed)
    if kind == "brown":
        return augment.coloured_noise(seconds, 2.0, seed)
    if kind == "white":
        return augment.white_noise(seconds, 0.1, seed)
    if kind == "hum":
        return augment.hum(seconds, (50.0, 60.0)[seed % 2], seed)
    raise ValueError(f"unknown noise type {kind!r}")


def conditions_for(clip: Clip, index: int, clips: List[Clip]) -> Dict[str, Callable[[], np.ndarray]]:
    """{condition[/noise type]: a function making the clip under it}, the clip's share of the set."""
    x = clip.samples
    made: Dict[str, Callable[[], np.ndarray]] = {"clean": lambda: x}
    for k, snr in enumerate(SNRS_DB):
        kind = NOISE_TYPES[(index + k) % len(NOISE_TYPES)]
        made[f"noise-{snr}dB/{kind}"] = noisy(clip, clips, kind, snr)
    made["speed-0.9"] = lambda: augment.change_speed(x, 0.9)
    made["speed-1.1"] = lambda: augment.change_speed(x, 1.1)
    made["reverb"] = lambda: augment.reverberate(x, RT60S_S[index % len(RT60S_S)], seed_of(clip.file, "reverb"))
    made["telephone"] = lambda: augment.telephone(x)
    made["quiet"] = lambda: augment.set_level(x, -30.0)
    if clip.is_long:
        made = {name: make for name, make in made.items() if name in LONG_CONDITIONS}
        made.update({f"noise-{snr}dB/{kind}": noisy(clip, clips, kind, snr) for kind, snr in LONG_NOISES})
    return made


def noisy(clip: Clip, clips: List[Clip], kind: str, snr_db: float) -> Callable[[], np.ndarray]:
    seconds = len(clip.samples) / SR
    return lambda: augment.mix_at_snr(
        clip.samples, noise_of(kind, seconds, clip, clips, seed_of(clip.file, kind, snr_db)), snr_db)


def long_files(short: List[Clip]) -> Dict[str, Callable[[], tuple]]:
    """{name: a function making (samples, reference)} for the two shuffled concatenations."""
    def make(seed: int, floor_rms: float, pink_snr_db):
        rng = np.random.default_rng(seed)
        order = [short[k] for k in rng.permutation(len(short))]
        gaps = rng.uniform(0.3, 6.0, len(order) - 1)
        samples = augment.concatenate([c.samples for c in order], gaps, floor_rms, seed)
        if pink_snr_db is not None:
            samples = augment.mix_at_snr(samples, augment.coloured_noise(len(samples) / SR, 1.0, seed), pink_snr_db)
        return samples, " ".join(c.reference for c in order)

    return {
        "concat-silent-pauses": lambda: make(seed_of("concat-silent-pauses"), 0.0, None),
        "concat-noisy-room": lambda: make(seed_of("concat-noisy-room"), 0.001, 20),
    }


def plan(clips: List[Clip]) -> List[Item]:
    """The set's files, from all shared clips (English ones are degraded, the others babble)."""
    from scoring import language_of

    english = [c for c in clips if language_of(c.file) == "en"]
    items = []
    for index, clip in enumerate(english):
        for name, make in conditions_for(clip, index, clips).items():
            condition, _, kind = name.partition("/")
            stem = f"{clip.stem}-{kind}" if kind else clip.stem
            items.append(Item(condition, stem, clip.file, lambda make=make, clip=clip: (make(), clip.reference)))
    short = [c for c in english if not c.is_long]
    for name, make in long_files(short).items():
        items.append(Item("long", name, f"{len(short)} short English clips", make))
    return items


def write(path: Path, samples: np.ndarray, telephone: bool) -> float:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    if telephone:
        soundfile.write(path, samples, 8000, subtype="ULAW", format="WAV")
        return len(samples) / 8000
    soundfile.write(path, np.clip(samples, -1, 1), SR, subtype="PCM_16", format="FLAC")
    return len(samples) / SR


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", type=Path, default=REPO.parent / "shared" / "audio",
                        help="the shared audio folder with manifest.tsv (default ../shared/audio)")
    parser.add_argument("--out", type=Path, default=REPO / "downloads" / "devset",
                        help="output folder (default downloads/devset)")
    args = parser.parse_args(argv)
    if not (args.audio / "manifest.tsv").is_file():
        parser.error(f"no manifest.tsv in {args.audio}")
    from tqdm import tqdm

    rows = []
    for item in tqdm(plan(read_clips(args.audio)), desc="dev set", unit="file"):
        samples, reference = item.make()
        seconds = write(args.out / item.file, samples, item.condition == "telephone")
        rows.append({"file": item.file, "duration_s": f"{seconds:.2f}", "source": item.source,
                     "condition": item.condition, "reference_transcript": reference})
    manifest = args.out / "manifest.tsv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    words = sum(len(r["reference_transcript"].split()) for r in rows)
    seconds = sum(float(r["duration_s"]) for r in rows)
    digest = hashlib.sha256(b"".join((args.out / r["file"]).read_bytes() for r in rows)).hexdigest()[:16]
    print(f"{manifest}: {len(rows)} files, {seconds / 60:.1f} min, {words} reference words, "
          f"{len({r['condition'] for r in rows})} conditions; audio sha256 {digest}")


if __name__ == "__main__":
    main()

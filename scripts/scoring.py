"""Word and character error rates with openai-whisper's text normalizers.

English is scored by WER after `EnglishTextNormalizer`, other languages by WER after
`BasicTextNormalizer`, Chinese and Japanese by CER (no spaces between words).
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import jiwer
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

CHARACTER_LANGUAGES = {"zh", "ja", "yue", "th", "lo", "my"}

_english = EnglishTextNormalizer()
_basic = BasicTextNormalizer()


def language_of(path: str) -> str:
    """The language of a manifest file, from its folder or name (multilingual/de_..)."""
    parts = Path(path).parts
    if parts and parts[0] == "multilingual":
        return Path(path).name.split("_")[0]
    return "en"


def normalize(text: str, language: str) -> str:
    if language == "en":
        return _english(text)
    text = _basic(text)
    if language in CHARACTER_LANGUAGES:
        text = "".join(text.split())
    return text


@dataclass
class Score:
    errors: int  # substitutions + deletions + insertions
    reference_length: int  # words, or characters for zh/ja
    deletions: int = 0
    insertions: int = 0

    @property
    def rate(self) -> float:
        return self.errors / max(1, self.reference_length)


def score(reference: str, hypothesis: str, language: str = "en") -> Score:
    """Errors of `hypothesis` against `reference`, both normalized for `language`."""
    ref = normalize(reference, language)
    hyp = normalize(hypothesis, language)
    if language in CHARACTER_LANGUAGES:
        ref, hyp = " ".join(ref), " ".join(hyp)
    if not ref.split():
        return Score(len(hyp.split()), 0, 0, len(hyp.split()))
    out = jiwer.process_words(ref, hyp if hyp.split() else "")
    return Score(
        out.substitutions + out.deletions + out.insertions,
        out.substitutions + out.deletions + out.hits,
        out.deletions,
        out.insertions,
    )


@dataclass
class ManifestEntry:
    file: str
    duration: float
    reference: str
    condition: str = ""  # a dev set's condition (scripts/build_devset.py), "" in the shared manifest

    @property
    def language(self) -> str:
        return language_of(self.file)


def read_manifest(path, language: Optional[str] = None) -> List[ManifestEntry]:
    """Entries of a manifest.tsv with a reference transcript (optionally one language)."""
    entries = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            ref = (row.get("reference_transcript") or "").strip()
            if not ref:
                continue
            entry = ManifestEntry(row["file"], float(row.get("duration_s") or 0), ref, row.get("condition") or "")
            if language is None or entry.language == language:
                entries.append(entry)
    return entries


def error_rate(entries: List[ManifestEntry], texts: Dict[str, str]) -> float:
    """Errors over reference words of all `entries`, each scored against texts[entry.file]."""
    scores = [score(e.reference, texts[e.file], e.language) for e in entries]
    return sum(s.errors for s in scores) / max(1, sum(s.reference_length for s in scores))

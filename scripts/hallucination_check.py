#!/usr/bin/env python
"""Words where nobody spoke: non-speech and hard audio through the service or the engine.

  hallucination_check.py --engine [--model whisper-models/whisper_base.pth] [--vad-filter false]
                         [--window-mode pauses]
  hallucination_check.py --url http://127.0.0.1:8080 [--short] [--report out.json]

Cases, built from generated audio and ../shared/audio (--audio-dir):

  silence          60 s of digital silence
  white-60dB/-40dB/-20dB   60 s of white noise at those RMS levels
  rumble           60 s of 50 Hz hum over low-passed (brown) noise
  clicks           60 s of 120 sharp clicks at random times
  chords           60 s of synthetic piano-like chords (C Am F G, decaying harmonics)
  speech-gap       a speech clip, 90 s of white noise (-40 dB), another speech clip
  speech-tail      a speech clip followed by 30 s of digital silence
  speech-past-window  a 35.5 s recording: its last window holds a few seconds of audio

For each case it reports the words whose middle lies outside the known speech (with
--tolerance seconds of slack), the segments that start at or after the end of the audio,
and for the speech cases the WER against the manifest's references. Word timestamps are
asked for, so every word has a time. The exit status is 1 when any word was invented or
any segment starts past the end. --short makes the non-speech cases 20 s and the gap 40 s
(the test suite runs that).
"""

import argparse
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "handler"), str(REPO / "scripts")]

from augment import SR, chords, clicks, rumble, silence, white_noise  # noqa: E402

GAP_CLIPS = ("jfk/jfk.flac", "librispeech/test-clean/1089-134686-0000.flac")  # 11.0 s, 10.4 s
TAIL_CLIP = "jfk/jfk.flac"
PAST_WINDOW_CLIP = "english/OSR_us_000_0034_8k.wav"  # 35.5 s


@dataclass
class Case:
    name: str
    audio: np.ndarray  # float32, 16 kHz
    speech: List[Tuple[float, float]] = field(default_factory=list)  # seconds where someone speaks
    reference: str = ""  # what was said ("" for non-speech)

    @property
    def duration(self) -> float:
        return len(self.audio) / SR


@dataclass
class Result:
    case: str
    duration: float
    words: int  # words in the answer
    invented: List[str]  # words (with times) outside the speech
    past_end: List[str]  # segments starting at or after the end
    wer: Optional[float]  # speech cases
    seconds: float


# ---------------------------------------------------------------- the cases


def load_clip(audio_dir: Path, name: str) -> np.ndarray:
    from audio import decode_audio

    return decode_audio((audio_dir / name).read_bytes()).samples


def references(audio_dir: Path) -> Dict[str, str]:
    from scoring import read_manifest

    return {e.file: e.reference for e in read_manifest(audio_dir / "manifest.tsv")}


def cases(audio_dir: Path, seconds: float = 60.0, gap_s: float = 90.0, tail_s: float = 30.0,
          only: Optional[Sequence[str]] = None) -> List[Case]:
    """The check's cases (see the module docstring), the speech ones from `audio_dir`."""
    makers: Dict[str, Callable[[], Case]] = {
        "silence": lambda: Case("silence", silence(seconds)),
        "white-60dB": lambda: Case("white-60dB", white_noise(seconds, 0.001)),
        "white-40dB": lambda: Case("white-40dB", white_noise(seconds, 0.01)),
        "white-20dB": lambda: Case("white-20dB", white_noise(seconds, 0.1)),
        "rumble": lambda: Case("rumble", rumble(seconds)),
        "clicks": lambda: Case("clicks", clicks(seconds)),
        "chords": lambda: Case("chords", chords(seconds)),
    }

    def speech_gap() -> Case:
        refs = references(audio_dir)
        a, b = (load_clip(audio_dir, name) for name in GAP_CLIPS)
        gap = white_noise(gap_s, 0.01, seed=3)
        first, second_at = len(a) / SR, (len(a) + len(gap)) / SR
        speech = [(0.0, first), (second_at, second_at + len(b) / SR)]
        return Case("speech-gap", np.concatenate([a, gap, b]), speech, f"{refs[GAP_CLIPS[0]]} {refs[GAP_CLIPS[1]]}")

    def speech_tail() -> Case:
        clip = load_clip(audio_dir, TAIL_CLIP)
        return Case("speech-tail", np.concatenate([clip, silence(tail_s)]), [(0.0, len(clip) / SR)],
                    references(audio_dir)[TAIL_CLIP])

    def past_window() -> Case:
        clip = load_clip(audio_dir, PAST_WINDOW_CLIP)
        return Case("speech-past-window", clip, [(0.0, len(clip) / SR)], references(audio_dir)[PAST_WINDOW_CLIP])

    makers.update({"speech-gap": speech_gap, "speech-tail": speech_tail, "speech-past-window": past_window})
    unknown = sorted(set(only or ()) - set(makers))
    if unknown:
        raise ValueError(f"unknown cases {unknown}; known: {', '.join(makers)}")
    return [make() for name, make in makers.items() if not only or name in only]


# ---------------------------------------------------------------- judging an answer


def judge(case: Case, text: str, segments: List[dict], words: List[dict], seconds: float,
          tolerance: float = 1.0) -> Result:
    """segments: dicts with start, end, text; words: dicts with word, start, end."""
    from scoring import score

    def spoken(t: float) -> bool:
        return any(a - tolerance <= t <= b + tolerance for a, b in case.speech)

    invented = [f"{w['word'].strip()}@{w['start']:.1f}" for w in words
                if not spoken((w["start"] + w["end"]) / 2)]
    past_end = [f"{s['start']:.2f}-{s['end']:.2f}:{s['text'].strip()}" for s in segments
                if s["start"] >= case.duration]
    wer = score(case.reference, text).rate if case.reference else None
    return Result(case.name, round(case.duration, 2), len(text.split()), invented, past_end,
                  None if wer is None else round(wer, 4), round(seconds, 2))


def run_engine_case(engine, case: Case, request_options: dict) -> Result:
    from options import TranscriptionOptions

    started = time.perf_counter()
    options = TranscriptionOptions(word_timestamps=True, **request_options)
    transcript = engine.transcribe([(case.audio, options)])[0]
    segments = [dict(start=s.start, end=s.end, text=s.text) for s in transcript.segments]
    words = [dict(word=w.word, start=w.start, end=w.end) for s in transcript.segments for w in s.words or []]
    return judge(case, transcript.text, segments, words, time.perf_counter() - started)


def run_service_case(client, case: Case, request_options: dict) -> Result:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, case.audio, SR, format="WAV", subtype="PCM_16")
    started = time.perf_counter()
    body = client.transcribe(buffer.getvalue(), filename=f"{case.name}.wav", response_format="verbose_json",
                             timestamp_granularities=["word", "segment"], **request_options)
    elapsed = time.perf_counter() - started
    return judge(case, body["text"], body.get("segments", []), body.get("words", []), elapsed)


def print_table(results: List[Result]) -> None:
    print(f"{'case':<20} {'audio s':>8} {'words':>6} {'invented':>9} {'past end':>9} {'WER':>7} {'time s':>7}")
    for r in results:
        wer = "-" if r.wer is None else f"{100 * r.wer:.1f}%"
        print(f"{r.case:<20} {r.duration:>8.1f} {r.words:>6} {len(r.invented):>9} {len(r.past_end):>9} "
              f"{wer:>7} {r.seconds:>7.1f}")
    for r in results:
        if r.invented:
            print(f"  {r.case}: invented {' '.join(r.invented[:30])}{' ...' if len(r.invented) > 30 else ''}")
        for s in r.past_end:
            print(f"  {r.case}: past the end {s}")
    print(f"total: {sum(len(r.invented) for r in results)} invented words, "
          f"{sum(len(r.past_end) for r in results)} segments past the end")


def main(argv=None) -> int:
    from client import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--engine", action="store_true",
                        help="run handler/engine.py in this process instead of --url")
    parser.add_argument("--model", default=str(REPO / "whisper-models" / "whisper_tiny.en.pth"),
                        help="engine: checkpoint (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="engine: cpu or cuda")
    parser.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio",
                        help="real speech with manifest.tsv (default %(default)s)")
    parser.add_argument("--vad-filter", choices=["true", "false"], default="true", help="the request option")
    parser.add_argument("--window-mode", choices=["seek", "pauses"], default="seek",
                        help="--engine: the engine's window_mode setting (default seek)")
    parser.add_argument("--condition-on-previous-text", choices=["true", "false"],
                        help="the request option (default: the server's)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--short", action="store_true", help="20 s non-speech cases, a 40 s gap")
    parser.add_argument("--tolerance", type=float, default=1.0, help="seconds of slack around the speech")
    parser.add_argument("--report", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)

    only = [c.strip() for c in args.cases.split(",")] if args.cases else None
    seconds, gap_s = (20.0, 40.0) if args.short else (60.0, 90.0)
    try:
        todo = cases(args.audio_dir, seconds=seconds, gap_s=gap_s, only=only)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    request_options = {"vad_filter": args.vad_filter == "true"}
    if args.condition_on_previous_text:
        request_options["condition_on_previous_text"] = args.condition_on_previous_text == "true"
    engine = client = None
    if args.engine:
        from checkpoint import load_whisper
        from engine import Engine, EngineConfig

        config = EngineConfig(device=args.device, window_mode=args.window_mode)
        engine = Engine(load_whisper(args.model, args.device), config)
        run = lambda case: run_engine_case(engine, case, request_options)  # noqa: E731
    else:
        from client import reachable_client_or_exit

        client = reachable_client_or_exit(args)
        run = lambda case: run_service_case(client, case, request_options)  # noqa: E731
    results = []
    try:
        for k, case in enumerate(todo, 1):
            result = run(case)
            results.append(result)
            print(f"[{k}/{len(todo)}] {case.name}: {result.words} words, {len(result.invented)} invented, "
                  f"{len(result.past_end)} past the end ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if engine is not None:
            print(f"engine stats: {engine.stats}", file=sys.stderr)
            engine.close()
    print_table(results)
    if args.report:
        args.report.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if any(r.invented or r.past_end for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

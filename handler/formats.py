"""Transcription result types and their rendering as json, verbose_json, text, srt and vtt.

The dataclasses here are shared with the engine (`from formats import Segment, Transcript,
Word`); `render` turns a Transcript into a response body and its content type.
"""

import json
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from whisper.tokenizer import LANGUAGES

CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
}


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float = 0.0


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: List[int] = field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: Optional[List[Word]] = None


@dataclass(frozen=True)
class Transcript:
    text: str
    language: Optional[str]
    duration: float
    segments: List[Segment] = field(default_factory=list)
    task: str = "transcribe"


def format_timestamp(seconds: float, decimal_marker: str = ".") -> str:
    """HH:MM:SS.mmm (vtt) or HH:MM:SS,mmm (srt); hours are not capped at 99."""
    milliseconds = max(0, round(seconds * 1000.0))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1_000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both formats, and "-->" inside a vtt cue breaks parsing,
    # so collapse line breaks and make the arrow harmless.
    return " ".join(text.split()).replace("-->", "->")


def _cues(transcript: Transcript):
    """(start, end, text) per segment that has text, with end >= start."""
    for segment in transcript.segments:
        text = _cue_text(segment.text)
        if text:
            yield segment.start, max(segment.start, segment.end), text


def render_srt(transcript: Transcript) -> str:
    blocks = []
    for index, (start, end, text) in enumerate(_cues(transcript), start=1):
        blocks.append(
            f"{index}\n{format_timestamp(start, ',')} --> {format_timestamp(end, ',')}\n{text}\n"
        )
    # An empty transcript is an empty (still valid) subtitle file.
    return "\n".join(blocks)


def render_vtt(transcript: Transcript) -> str:
    lines = ["WEBVTT", ""]
    for start, end, text in _cues(transcript):
        lines += [f"{format_timestamp(start)} --> {format_timestamp(end)}", text, ""]
    return "\n".join(lines)


def _rounded(value: float) -> float:
    return round(float(value), 3)


def usage(transcript: Transcript) -> dict:
    """OpenAI's usage object for audio models billed by duration."""
    return {"type": "duration", "seconds": _rounded(transcript.duration)}


def language_name(code: Optional[str]) -> Optional[str]:
    """OpenAI's whisper-1 answers the language's English name ("english"), not its code."""
    return LANGUAGES.get(code, code) if code else code


def render_json(transcript: Transcript, language_names: bool = False) -> dict:
    """The service's default shape: text plus language, duration, plain segments and usage."""
    return {
        "text": transcript.text,
        "language": language_name(transcript.language) if language_names else transcript.language,
        "duration": _rounded(transcript.duration),
        "segments": [
            {"id": s.id, "start": _rounded(s.start), "end": _rounded(s.end), "text": s.text}
            for s in transcript.segments
        ],
        "usage": usage(transcript),
    }


def render_verbose_json(transcript: Transcript, word_timestamps: bool = False,
                        language_names: bool = False) -> dict:
    """OpenAI's verbose_json: segments with decoding statistics, words when asked, usage."""
    segments = []
    for s in transcript.segments:
        segments.append(
            {
                "id": s.id,
                "seek": s.seek,
                "start": _rounded(s.start),
                "end": _rounded(s.end),
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": float(s.temperature),
                "avg_logprob": float(s.avg_logprob),
                "compression_ratio": float(s.compression_ratio),
                "no_speech_prob": float(s.no_speech_prob),
            }
        )
    body = {
        "task": transcript.task,
        "language": language_name(transcript.language) if language_names else transcript.language,
        "duration": _rounded(transcript.duration),
        "text": transcript.text,
        "segments": segments,
        "usage": usage(transcript),
    }
    if word_timestamps:
        # OpenAI lists words at the top level, across all segments.
        body["words"] = [
            {"word": w.word, "start": _rounded(w.start), "end": _rounded(w.end)}
            for s in transcript.segments
            for w in (s.words or [])
        ]
    return body


def render(transcript: Transcript, options) -> Tuple[bytes, str]:
    """Body and content type for `options.response_format` (a TranscriptionOptions)."""
    response_format = getattr(options, "response_format", "json")
    content_type = CONTENT_TYPES[response_format]
    names = bool(getattr(options, "openai_api", False))  # OpenAI's routes: language names
    if response_format == "json":
        body = json.dumps(render_json(transcript, names), ensure_ascii=False)
    elif response_format == "verbose_json":
        words = bool(getattr(options, "word_timestamps", False))
        body = json.dumps(render_verbose_json(transcript, words, names), ensure_ascii=False)
    elif response_format == "text":
        body = transcript.text.strip() + "\n"
    elif response_format == "srt":
        body = render_srt(transcript)
    else:
        body = render_vtt(transcript)
    return body.encode("utf-8"), content_type


def error_body(err) -> bytes:
    """{"code", "type", "message"}: the shape TorchServe's own errors have, so a client
    reads every error of the service the same way (OpenAI's SDK shows it as the message)."""
    return json.dumps(err.to_dict(), ensure_ascii=False).encode("utf-8")

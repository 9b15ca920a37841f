"""Small HTTP client for the Whisper TorchServe service, shared by every script.

    client = WhisperClient("http://127.0.0.1:8080")
    client.transcribe("jfk.flac")["text"]
    client.transcribe("jfk.flac", response_format="srt")          # -> str
    client.transcribe(data, filename="a.wav", timestamp_granularities=["word"])

Options use OpenAI's names and travel as multipart form fields (or as the query string
of a raw upload). Errors from the service, or from reaching it, raise `ClientError`.
"""

import argparse
import glob
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import requests

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 300.0
MODEL_NAME = "whisper"

# extensions that `expand_audio_paths` picks up from directories and globs
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac"}
)
# response formats whose body is plain text rather than JSON
TEXT_FORMATS = frozenset({"text", "srt", "vtt"})

# mimetypes does not know every audio container on every system
_AUDIO_CONTENT_TYPES = {
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".m4a": "audio/mp4",
    ".webm": "audio/webm",
    ".mp4": "audio/mp4",
    ".aac": "audio/aac",
}

AudioInput = Union[str, os.PathLike, bytes, bytearray]


class ClientError(Exception):
    """A request that did not succeed.

    status is the HTTP status, or None when no response came back (code is then
    "timeout" or "connection_error"); code and message come from the server's JSON body.
    """

    def __init__(self, status: Optional[int], code: Any, message: str, type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else self.code
        return f"{self.message} ({where})"


def content_type_for(filename: str) -> str:
    ext = Path(filename).suffix.lower()
    return _AUDIO_CONTENT_TYPES.get(ext) or mimetypes.guess_type(filename)[0] or "application/octet-stream"


def option_fields(options: dict) -> list[tuple[str, str]]:
    """Options as (name, value) form fields: lists repeat as `name[]`, None is left out."""
    fields = []
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            # OpenAI's clients send array options as repeated `name[]` fields
            key = name if name.endswith("[]") else name + "[]"
            fields.extend((key, _field_value(v)) for v in value)
        else:
            fields.append((name, _field_value(value)))
    return fields


def option_headers(options: dict) -> dict[str, str]:
    """Options as `X-Whisper-<Option>` headers (for raw uploads): lists comma-separated."""
    headers = {}
    for name, value in options.items():
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        header = "X-Whisper-" + "-".join(part.capitalize() for part in name.rstrip("[]").split("_"))
        headers[header] = ",".join(_field_value(v) for v in values)
    return headers


def _field_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def error_from_response(response: requests.Response) -> ClientError:
    """The ClientError for a non-2xx response, keeping the server's own message."""
    code, type_, message = response.status_code, None, None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("code", code)
        type_ = body.get("type")
        message = body.get("message")
    if not message:
        message = response.text.strip()[:500] or response.reason or "request failed"
    return ClientError(response.status_code, code, message, type_)


class WhisperClient:
    """Client for one service. Safe to share between threads (one Session per thread)."""

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        model: str = MODEL_NAME,
    ):
        self.url = (url or os.environ.get("WHISPER_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("WHISPER_TOKEN") or None
        self.timeout = timeout
        self.model = model
        self._local = threading.local()

    @property
    def predictions_url(self) -> str:
        return f"{self.url}/predictions/{self.model}"

    @property
    def session(self) -> requests.Session:
        # requests.Session is not thread-safe; each thread keeps its own connection pool
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self.token:
                session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def post(
        self,
        audio: AudioInput,
        *,
        filename: Optional[str] = None,
        raw: bool = False,
        stream: bool = False,
        timeout: Optional[float] = None,
        **options,
    ) -> requests.Response:
        """POST audio and return the HTTP response whatever its status.

        raw=True sends the audio as the request body with an audio Content-Type and the
        options as `X-Whisper-<Option>` headers (TorchServe drops query strings);
        otherwise a multipart form with the audio in `file`.
        Raises ClientError only when no response arrives (timeout, connection refused).
        """
        data, filename = read_audio(audio, filename)
        if raw:
            kwargs = dict(data=data, headers={"Content-Type": content_type_for(filename), **option_headers(options)})
        else:
            kwargs = dict(files={"file": (filename, data, content_type_for(filename))}, data=option_fields(options))
        try:
            return self.session.post(
                self.predictions_url,
                timeout=timeout if timeout is not None else self.timeout,
                stream=stream,
                **kwargs,
            )
        except requests.Timeout as e:
            raise ClientError(None, "timeout", f"no answer from {self.url} within {timeout or self.timeout:g} s") from e
        except requests.ConnectionError as e:
            raise ClientError(None, "connection_error", f"cannot reach {self.url}: {_reason(e)}") from e

    def transcribe(self, audio: AudioInput, *, filename: Optional[str] = None, raw: bool = False, **options):
        """Transcribe audio: parsed JSON for json/verbose_json, str for text/srt/vtt."""
        response = self.post(audio, filename=filename, raw=raw, **options)
        if not response.ok:
            raise error_from_response(response)
        if options.get("response_format") in TEXT_FORMATS:
            return response.text
        try:
            return response.json()
        except ValueError as e:
            raise ClientError(response.status_code, "invalid_response", f"expected JSON, got {response.text[:200]!r}") from e

    def ping(self) -> dict:
        """TorchServe's health check: {"status": "Healthy"} when the service is up."""
        try:
            response = self.session.get(f"{self.url}/ping", timeout=min(self.timeout, 10.0))
        except requests.RequestException as e:
            raise ClientError(None, "connection_error", f"cannot reach {self.url}: {_reason(e)}") from e
        if not response.ok:
            raise error_from_response(response)
        return response.json()


def _reason(error: Exception) -> str:
    """The innermost useful part of a requests/urllib3 connection error."""
    text = str(error)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200] if text else type(error).__name__


def read_audio(audio: AudioInput, filename: Optional[str] = None) -> tuple[bytes, str]:
    """(bytes, filename) for a path or raw bytes."""
    if isinstance(audio, (bytes, bytearray)):
        return bytes(audio), filename or "audio"
    path = Path(audio)
    return path.read_bytes(), filename or path.name


def expand_audio_paths(args: Iterable[Union[str, os.PathLike]]) -> list[Path]:
    """Files named on a command line: directories and globs expand to audio files.

    A file named explicitly is kept whatever its extension; directories (recursively) and
    glob patterns keep only AUDIO_EXTENSIONS. Order is kept, duplicates dropped.
    Raises FileNotFoundError for a path or pattern that matches nothing.
    """
    found: list[Path] = []
    for arg in map(str, args):
        path = Path(arg)
        if path.is_dir():
            found.extend(_audio_files_in(path))
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            files = []
            for match in map(Path, matches):
                if match.is_dir():
                    files.extend(_audio_files_in(match))
                elif match.is_file() and match.suffix.lower() in AUDIO_EXTENSIONS:
                    files.append(match)
            if not files:
                raise FileNotFoundError(f"no audio files match {arg}")
            found.extend(files)
        else:
            raise FileNotFoundError(f"no such file or directory: {arg}")
    unique = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _audio_files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def audio_duration(path: Union[str, os.PathLike]) -> Optional[float]:
    """Duration in seconds from the file header (soundfile, else ffprobe); None if unknown."""
    try:
        import soundfile

        info = soundfile.info(str(path))
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except Exception:
        pass  # not a format libsndfile reads (m4a, webm, ...): ask ffprobe
    if shutil.which("ffprobe") is None:
        return None
    try:
        result = subprocess.run(
            ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return float(result.stdout.strip())
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--url, --token and --timeout, defaulting to WHISPER_URL / WHISPER_TOKEN."""
    group = parser.add_argument_group("service")
    group.add_argument(
        "--url", default=os.environ.get("WHISPER_URL", DEFAULT_URL),
        help="inference API base URL (env WHISPER_URL; default %(default)s)",
    )
    group.add_argument(
        "--token", default=os.environ.get("WHISPER_TOKEN"),
        help="inference key, sent as 'Authorization: Bearer' (env WHISPER_TOKEN, which keeps it out of ps)",
    )
    group.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for each response (default %(default)s)",
    )
    return parser


def audio_paths_or_exit(paths) -> list[Path]:
    """expand_audio_paths for a script's arguments: a missing path ends the script (exit 2)."""
    try:
        return expand_audio_paths(paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def reachable_client_or_exit(args: argparse.Namespace) -> "WhisperClient":
    """client_from_args, checked with /ping: an unreachable service ends the script (exit 1)."""
    client = client_from_args(args)
    try:
        client.ping()
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return client


def client_from_args(args: argparse.Namespace) -> WhisperClient:
    return WhisperClient(args.url, token=args.token or None, timeout=args.timeout)


def to_json(body: Any) -> str:
    return json.dumps(body, indent=2, ensure_ascii=False)

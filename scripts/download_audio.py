#!/usr/bin/env python3
"""Fetch the audio of a web video or media URL, ready to send to the service.

    python scripts/download_audio.py https://www.youtube.com/watch?v=... --out downloads/
    python scripts/download_audio.py https://example.org/talk.mp4 --format wav --transcribe

Works for any site yt-dlp supports and for direct links to media files (yt-dlp's generic
extractor). The best audio stream is downloaded and converted with ffmpeg to --format
(flac by default: lossless and small, and the service reads it without ffmpeg).
Prints one saved path per line; with --transcribe, each file's transcript follows.

Exit status: 0 when every URL was saved (and transcribed), 1 otherwise; errors are one
line each on stderr.
"""

import argparse
import re
import shutil
import sys
from pathlib import Path

FORMATS = ("flac", "wav", "mp3")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DownloadFailed(Exception):
    pass


class _QuietLogger:
    """Keeps yt-dlp's own messages off the terminal; errors are reported by main() once."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def debug(self, message):
        if self.verbose:
            print(message, file=sys.stderr)

    info = debug

    def warning(self, message):
        if self.verbose:
            print(message, file=sys.stderr)

    def error(self, message):
        pass


def one_line(error: Exception) -> str:
    """yt-dlp's error text without 'ERROR:', colours, or its bug-report boilerplate."""
    text = _ANSI.sub("", str(error)).strip()
    text = text.splitlines()[0] if text else type(error).__name__
    text = re.sub(r"^ERROR:\s*", "", text)
    text = text.split("; please report this issue")[0]
    text = re.sub(r"\s*\(caused by .*\)$", "", text)  # the same reason again, as a repr
    return text.strip()


class _Progress:
    """A tqdm bar per download, driven by yt-dlp's progress hook."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, status: dict):
        if not self.enabled:
            return
        from tqdm import tqdm

        if status["status"] == "downloading":
            total = status.get("total_bytes") or status.get("total_bytes_estimate")
            if self.bar is None:
                name = Path(status.get("filename") or "download").name
                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=name[:40], file=sys.stderr, leave=False)
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.n = status.get("downloaded_bytes") or 0
            self.bar.refresh()
        elif status["status"] in ("finished", "error") and self.bar is not None:
            self.bar.close()
            self.bar = None


def ydl_options(out_dir: Path, audio_format: str, *, playlist: bool, progress: bool, verbose: bool) -> dict:
    return {
        "format": "bestaudio/best",
        "outtmpl": {"default": str(out_dir / "%(title).80B [%(id)s].%(ext)s")},
        "restrictfilenames": True,
        "noplaylist": not playlist,
        "postprocessors": [{"key": "FFmpegExtractAudio", "preferredcodec": audio_format}],
        "logger": _QuietLogger(verbose),
        "quiet": True,
        "no_warnings": not verbose,
        "noprogress": True,
        "progress_hooks": [_Progress(progress)],
        "socket_timeout": 30,
        "extractor_retries": 0,
        "retries": 2,
    }


def saved_paths(info: dict) -> list[Path]:
    """Final file paths (after conversion) of an extract_info result, playlists included."""
    if info is None:
        return []
    if info.get("entries") is not None:
        return [p for entry in info["entries"] for p in saved_paths(entry)]
    downloads = info.get("requested_downloads") or [info]
    return [Path(d["filepath"]) for d in downloads if d.get("filepath")]


def download(url: str, out_dir: Path, audio_format: str = "flac", *, playlist: bool = False, progress: bool = True, verbose: bool = False) -> list[Path]:
    """Download the audio of url into out_dir; returns the saved files. Raises DownloadFailed."""
    import yt_dlp

    if shutil.which("ffmpeg") is None:
        raise DownloadFailed("ffmpeg is required to extract audio (e.g. apt-get install ffmpeg)")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with yt_dlp.YoutubeDL(ydl_options(out_dir, audio_format, playlist=playlist, progress=progress, verbose=verbose)) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.YoutubeDLError as e:
        raise DownloadFailed(one_line(e)) from e
    paths = saved_paths(info)
    if not paths:
        raise DownloadFailed(f"no audio found at {url}")
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    from client import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("urls", nargs="+", metavar="URL")
    parser.add_argument("--out", type=Path, default=Path("downloads"), help="directory for the files (default %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="flac", help="audio format to save (default %(default)s)")
    parser.add_argument("--playlist", action="store_true", help="download every item of a playlist URL")
    parser.add_argument("--transcribe", action="store_true", help="send each file to the service and print its text")
    parser.add_argument("--language", help="with --transcribe: language code (default: detect)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", "-v", action="store_true", help="show yt-dlp's own messages")
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    client = None
    if args.transcribe:
        from client import ClientError, client_from_args

        client = client_from_args(args)
    failed = 0
    for url in args.urls:
        try:
            paths = download(url, args.out, args.format, playlist=args.playlist, progress=not args.quiet, verbose=args.verbose)
        except DownloadFailed as e:
            print(f"error: {url}: {e}", file=sys.stderr)
            failed += 1
            continue
        for path in paths:
            print(path, flush=True)
            if client is None:
                continue
            try:
                text = client.transcribe(path, language=args.language)["text"]
            except ClientError as e:
                print(f"error: {path}: {e}", file=sys.stderr)
                failed += 1
                continue
            print(f"  {text.strip()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

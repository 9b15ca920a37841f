#!/usr/bin/env python3
"""Transcribe audio files with the running service and print the result.

    python scripts/test_client.py samples/jfk.flac
    python scripts/test_client.py /work/shared/audio/english --response-format srt --output subs/
    python scripts/test_client.py talk.mp3 --word-timestamps --json

Exit status: 0 when every file was transcribed, 1 when any failed (the server's message
goes to stderr), 2 for usage errors.
"""

import argparse
import sys
from pathlib import Path

from client import ClientError, add_common_args, audio_paths_or_exit, client_from_args, to_json

EXTENSIONS = {"json": ".json", "verbose_json": ".json", "text": ".txt", "srt": ".srt", "vtt": ".vtt"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="audio files, directories or globs")
    parser.add_argument("--language", help="language code, e.g. en (default: detect)")
    parser.add_argument("--task", choices=["transcribe", "translate"])
    parser.add_argument("--response-format", choices=list(EXTENSIONS), help="default json (verbose_json with --word-timestamps)")
    parser.add_argument(
        "--word-timestamps", action="store_true",
        help="ask for word-level timestamps (listed in verbose_json)",
    )
    parser.add_argument("--prompt", help="text to condition the first window on")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--raw", action="store_true", help="send the audio as the request body, not a form")
    parser.add_argument("--json", action="store_true", help="print the whole response, not only the text")
    parser.add_argument(
        "--output", type=Path,
        help="write the response to this file (one input) or into this directory (several)",
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.response_format is None:
        # words only appear in verbose_json, as in OpenAI's API
        args.response_format = "verbose_json" if args.word_timestamps else "json"
    return args


def request_options(args: argparse.Namespace) -> dict:
    options = dict(
        language=args.language,
        task=args.task,
        prompt=args.prompt,
        temperature=args.temperature,
        response_format=args.response_format,
    )
    if args.word_timestamps:
        options["timestamp_granularities"] = ["segment", "word"]
    return options


def render(response, as_json: bool) -> str:
    """What to print or save: text formats as they came, JSON as its text or in full."""
    if isinstance(response, str):
        return response
    if as_json:
        return to_json(response) + "\n"
    return response.get("text", "").strip() + "\n"


def output_path(args: argparse.Namespace, audio: Path, several: bool) -> Path | None:
    if args.output is None:
        return None
    if not several and not args.output.is_dir():
        return args.output
    return args.output / (audio.stem + EXTENSIONS[args.response_format])


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = audio_paths_or_exit(args.paths)
    client = client_from_args(args)
    options = request_options(args)
    several = len(paths) > 1
    if several and args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)

    failed = 0
    for i, path in enumerate(paths):
        try:
            response = client.transcribe(path, raw=args.raw, **options)
        except ClientError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
            if e.status is None:  # service unreachable: the other files would fail alike
                return 1
            continue
        # save the full response; print the transcript unless --json asks for all of it
        target = output_path(args, path, several)
        if target is not None:
            target.write_text(render(response, as_json=True), encoding="utf-8")
        if several:
            print(("\n" if i else "") + f"==> {path} <==")
        sys.stdout.write(render(response, as_json=args.json))
        sys.stdout.flush()
    if args.output is not None:
        print(f"saved to {args.output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

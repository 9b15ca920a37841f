#!/usr/bin/env python3
"""Load-test the service: many concurrent requests, a summary, per-request records.

    python scripts/bulk_request.py /work/shared/audio/english --concurrency 8 --requests 64
    python scripts/bulk_request.py a.wav b.flac --duration 60 --report run.csv --plot run.png
    python scripts/bulk_request.py /work/shared/audio/librispeech \\
        --expect /work/shared/audio/manifest.tsv --report run.json

Files are reused round-robin until --requests have been sent (default: each file once) or
--duration seconds have passed; --concurrency requests are in flight at any time (closed
loop: each worker sends its next request when the last one is answered).
--expect compares every answer with the manifest's reference transcript (word error rate
after whisper's text normalizers) and flags answers that are far off, which is how swapped
or truncated responses show up under load.

Exit status: 0 when every request succeeded (and no answer was flagged), 1 otherwise.
"""

import argparse
import csv
import itertools
import json
import math
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Union

from tqdm import tqdm

from client import (
    TEXT_FORMATS,
    ClientError,
    WhisperClient,
    add_common_args,
    audio_duration,
    audio_paths_or_exit,
    error_from_response,
    reachable_client_or_exit,
)


@dataclass
class Record:
    """One request as it happened."""

    index: int
    file: str
    status: Union[int, str]  # HTTP status code, or "timeout" / "connection_error" when none came back
    latency_s: float
    audio_duration_s: Optional[float]
    text_length: Optional[int]
    bytes_sent: int
    started_at: float  # seconds since the start of the run
    error: Optional[str] = None
    text: Optional[str] = None
    language: Optional[str] = None
    wer: Optional[float] = None  # only with --expect

    @property
    def ok(self) -> bool:
        return self.status == 200


RECORD_FIELDS = [f.name for f in fields(Record)]


# ---------------------------------------------------------------------------- planning


def plan_requests(files: list, count: int) -> list:
    """The first `count` requests of a round-robin over files."""
    return list(itertools.islice(itertools.cycle(files), count))


class RequestPlan:
    """Thread-safe source of (index, file) bounded by a count or a deadline (or both)."""

    def __init__(self, files: list, count: Optional[int] = None, deadline: Optional[float] = None):
        self._next = enumerate(itertools.islice(itertools.cycle(files), count))
        self._deadline = deadline
        self._lock = threading.Lock()

    def take(self):
        """The next (index, file), or None when the run is over."""
        with self._lock:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                return None
            return next(self._next, None)


# ---------------------------------------------------------------------------- running


def send_one(client: WhisperClient, index: int, path: Path, payload: bytes, duration: Optional[float], t0: float, options: dict) -> Record:
    started = time.monotonic()
    status, error, text, language, sent = None, None, None, None, len(payload)
    try:
        response = client.post(payload, filename=path.name, **options)  # returns with the whole body read
        latency = time.monotonic() - started
        status = response.status_code
        sent = len(response.request.body or b"")
        if response.ok:
            text, language = response_text(response, options.get("response_format"))
        else:
            error = error_from_response(response).message
    except ClientError as e:
        latency = time.monotonic() - started
        status, error = (e.status if e.status is not None else str(e.code)), e.message
    return Record(
        index=index,
        file=str(path),
        status=status,
        latency_s=round(latency, 4),
        audio_duration_s=duration,
        text_length=len(text) if text is not None else None,
        bytes_sent=sent,
        started_at=round(started - t0, 4),
        error=error,
        text=text,
        language=language,
    )


def response_text(response, response_format: Optional[str]) -> tuple[str, Optional[str]]:
    """(transcript, language) of a successful response."""
    if response_format in TEXT_FORMATS:
        return response.text, None
    try:
        body = response.json()
    except ValueError:
        return response.text, None
    return body.get("text", ""), body.get("language")


def run_load(
    client: WhisperClient,
    files: list[Path],
    *,
    concurrency: int,
    count: Optional[int],
    duration_s: Optional[float],
    options: dict,
    progress: bool = True,
) -> tuple[list[Record], float]:
    """Send the requests with `concurrency` workers; returns (records, wall seconds)."""
    payloads = {path: path.read_bytes() for path in files}
    durations = {path: audio_duration(path) for path in files}
    records: list[Record] = []
    failed = 0
    lock = threading.Lock()
    bar = tqdm(total=count, unit="req", disable=not progress, dynamic_ncols=True, desc="requests")

    t0 = time.monotonic()
    plan = RequestPlan(files, count, t0 + duration_s if duration_s else None)

    def worker():
        nonlocal failed
        while (item := plan.take()) is not None:
            index, path = item
            record = send_one(client, index, path, payloads[path], durations[path], t0, options)
            with lock:
                records.append(record)
                failed += not record.ok
                bar.update(1)
                bar.set_postfix(failed=failed, refresh=False)

    threads = [threading.Thread(target=worker, name=f"bulk-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        bar.close()
    wall = time.monotonic() - t0
    records.sort(key=lambda r: r.index)
    return records, wall


# ---------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> Optional[float]:
    """q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def latency_stats(values: list[float]) -> dict:
    if not values:
        return {k: None for k in ("min", "p50", "p90", "p99", "max", "mean")}
    return {
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def summarize(records: list[Record], wall_s: float) -> dict:
    ok = [r for r in records if r.ok]
    audio_s = sum(r.audio_duration_s or 0.0 for r in ok)
    sent = sum(r.bytes_sent for r in records)
    wall = max(wall_s, 1e-9)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "by_status": dict(sorted(Counter(r.status for r in records).items(), key=lambda kv: str(kv[0]))),
        "latency_s": latency_stats([r.latency_s for r in ok]),
        "wall_s": wall_s,
        "requests_per_s": len(records) / wall,
        "audio_s": audio_s,
        "audio_s_per_s": audio_s / wall,
        "rtfx": audio_s / wall,  # real-time factor: seconds of audio transcribed per second
        "bytes_sent": sent,
        "mb_sent_per_s": sent / wall / 1e6,
    }


def format_summary(summary: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f} ms"

    lat = summary["latency_s"]
    statuses = ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items()) or "-"
    rows = [
        ("requests", f"{summary['requests']} ({summary['ok']} ok, {summary['failed']} failed)"),
        ("by status", statuses),
        ("latency min / p50 / p90", f"{ms(lat['min'])} / {ms(lat['p50'])} / {ms(lat['p90'])}"),
        ("latency p99 / max", f"{ms(lat['p99'])} / {ms(lat['max'])}"),
        ("wall time", f"{summary['wall_s']:.2f} s"),
        ("requests/s", f"{summary['requests_per_s']:.2f}"),
        ("audio s/s (RTFx)", f"{summary['audio_s_per_s']:.2f}  ({summary['audio_s']:.1f} s of audio)"),
        ("sent", f"{summary['bytes_sent'] / 1e6:.2f} MB ({summary['mb_sent_per_s']:.2f} MB/s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Reference:
    text: str
    file: str  # as written in the manifest
    language: Optional[str] = None  # the manifest's `language` column, if it has one


@dataclass
class References:
    """Reference transcripts of a manifest, found by path or, failing that, by file name."""

    by_path: dict  # resolved path -> Reference
    by_name: dict  # file name -> Reference, or None when the name is ambiguous

    def get(self, path) -> Optional[Reference]:
        path = Path(path)
        found = self.by_path.get(path.resolve())
        return found if found is not None else self.by_name.get(path.name)


def load_references(manifest: Path) -> References:
    """Read a TSV manifest with columns `file` and `reference_transcript` (or `text`)."""
    by_path, by_name = {}, {}
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t")
        columns = rows.fieldnames or []
        text_column = next((c for c in ("reference_transcript", "reference", "text") if c in columns), None)
        if "file" not in columns or text_column is None:
            raise ValueError(f"{manifest}: needs a 'file' and a 'reference_transcript' column")
        for row in rows:
            reference = Reference(row[text_column], row["file"], row.get("language") or None)
            by_path[(manifest.parent / row["file"]).resolve()] = reference
            name = Path(row["file"]).name
            by_name[name] = None if name in by_name else reference
    return References(by_path, by_name)


def reference_language(reference: Reference, answered: Optional[str]) -> str:
    """Which normalizer to score with: the manifest's say first, then the service's."""
    from scoring import language_of

    if reference.language:
        return reference.language
    from_path = language_of(reference.file)  # "en" unless under multilingual/
    return from_path if from_path != "en" else answered or "en"


def score_records(records: list[Record], references: References, flag_wer: float) -> dict:
    """Set each answered record's WER against its reference; per-file and overall WER."""
    from scoring import score  # the engine's scoring helper: whisper's normalizers + jiwer

    per_file: dict[str, dict] = {}
    flagged, missing = [], set()
    total_errors = total_words = 0
    for record in records:
        if not record.ok or record.text is None:
            continue
        reference = references.get(record.file)
        if reference is None:
            missing.add(record.file)
            continue
        result = score(reference.text, record.text, reference_language(reference, record.language))
        errors, words = result.errors, result.reference_length
        record.wer = errors / words if words else float(errors > 0)
        stats = per_file.setdefault(record.file, {"requests": 0, "errors": 0, "words": 0, "max_wer": 0.0})
        stats["requests"] += 1
        stats["errors"] += errors
        stats["words"] += words
        stats["max_wer"] = max(stats["max_wer"], record.wer)
        total_errors += errors
        total_words += words
        if record.wer > flag_wer:
            flagged.append({"index": record.index, "file": record.file, "wer": record.wer, "text": record.text, "reference": reference.text})
    for stats in per_file.values():
        stats["wer"] = stats["errors"] / stats["words"] if stats["words"] else None
    return {
        "overall_wer": total_errors / total_words if total_words else None,
        "flag_wer": flag_wer,
        "files": per_file,
        "flagged": flagged,
        "without_reference": sorted(missing),
    }


def format_wer(report: dict) -> str:
    lines = ["", f"{'WER':>7}  {'max':>6}  requests  file"]
    for file, stats in sorted(report["files"].items()):
        wer = "-" if stats["wer"] is None else f"{stats['wer']:.1%}"
        lines.append(f"{wer:>7}  {stats['max_wer']:>6.1%}  {stats['requests']:>8}  {file}")
    overall = "-" if report["overall_wer"] is None else f"{report['overall_wer']:.2%}"
    lines.append(f"overall WER {overall}")
    for item in report["flagged"]:
        lines.append(f"FLAGGED request {item['index']} {item['file']}: WER {item['wer']:.0%}: {item['text']!r}")
    if report["without_reference"]:
        lines.append(f"no reference for {len(report['without_reference'])} file(s), e.g. {report['without_reference'][0]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- output


def write_report(path: Path, summary: dict, records: list[Record], wer: Optional[dict] = None) -> None:
    """Records (and, in JSON, the summary and WER report) as JSON or CSV by extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
            writer.writeheader()
            writer.writerows(asdict(r) for r in records)
    elif path.suffix.lower() == ".json":
        report = {"summary": summary, "records": [asdict(r) for r in records]}
        if wer is not None:
            report["wer"] = wer
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    else:
        raise ValueError(f"report must end in .json or .csv: {path}")


def read_report(path: Path) -> list[dict]:
    """The records of a report written by write_report (CSV values come back as strings)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return json.loads(path.read_text(encoding="utf-8"))["records"]


def plot_latency(path: Path, records: list[Record]) -> None:
    """PNG: latency histogram and latency over time (failed requests in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    bad = [r for r in records if not r.ok]
    fig, (hist, timeline) = plt.subplots(1, 2, figsize=(12, 4.5))
    hist.hist([r.latency_s for r in ok], bins=min(50, max(5, len(ok) // 2)), color="tab:blue")
    hist.set(title="latency of successful requests", xlabel="seconds", ylabel="requests")
    timeline.scatter([r.started_at for r in ok], [r.latency_s for r in ok], s=8, label="ok")
    if bad:
        timeline.scatter([r.started_at for r in bad], [r.latency_s for r in bad], s=12, c="tab:red", marker="x", label="failed")
    timeline.set(title="latency over the run", xlabel="request sent at (s)", ylabel="latency (s)")
    timeline.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="FILE", help="audio files, directories or globs")
    parser.add_argument("--concurrency", "-c", type=int, default=4, help="requests in flight (default %(default)s)")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--requests", "-n", type=int, help="number of requests (default: each file once)")
    bound.add_argument("--duration", type=float, help="send requests for this many seconds")
    parser.add_argument("--response-format", default="json", choices=["json", "verbose_json", "text", "srt", "vtt"])
    parser.add_argument("--language", help="language option sent with every request")
    parser.add_argument("--raw", action="store_true", help="send audio as the request body instead of a form")
    parser.add_argument("--report", type=Path, help="write per-request records to out.json or out.csv")
    parser.add_argument("--plot", type=Path, help="write a latency PNG (histogram and over time)")
    parser.add_argument("--expect", type=Path, metavar="MANIFEST_TSV", help="score answers against reference transcripts")
    parser.add_argument(
        "--flag-wer", type=float, default=0.5,
        help="with --expect, flag (and fail on) answers whose WER exceeds this (default %(default)s)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    if args.report and args.report.suffix.lower() not in (".json", ".csv"):
        parser.error("--report must end in .json or .csv")
    if args.expect and not args.expect.is_file():
        parser.error(f"--expect: no such file: {args.expect}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    files = audio_paths_or_exit(args.paths)
    references = load_references(args.expect) if args.expect else None
    client = reachable_client_or_exit(args)

    count = args.requests if args.requests or args.duration else len(files)
    options = {"response_format": args.response_format, "language": args.language}
    if args.raw:
        options["raw"] = True
    print(
        f"{count or 'as many'} requests over {len(files)} file(s), concurrency {args.concurrency}"
        + (f", for {args.duration:g} s" if args.duration else "")
        + f" -> {client.predictions_url}",
        file=sys.stderr,
    )
    records, wall = run_load(
        client, files, concurrency=args.concurrency, count=count, duration_s=args.duration,
        options=options, progress=not args.quiet,
    )
    summary = summarize(records, wall)
    print(format_summary(summary))

    wer = None
    if references is not None:
        wer = score_records(records, references, args.flag_wer)
        summary["overall_wer"] = wer["overall_wer"]
        print(format_wer(wer))
    for record in records:
        if not record.ok:
            print(f"failed: request {record.index} {record.file}: {record.status}: {record.error}", file=sys.stderr)
            break  # one example is enough; the report has them all
    if args.report:
        write_report(args.report, summary, records, wer)
        print(f"report: {args.report}", file=sys.stderr)
    if args.plot:
        plot_latency(args.plot, records)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 1 if summary["failed"] or (wer and wer["flagged"]) else 0


if __name__ == "__main__":
    sys.exit(main())

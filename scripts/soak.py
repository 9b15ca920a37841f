#!/usr/bin/env python3
"""Soak test: mixed good and bad uploads for a while, then check that nothing leaked.

    python scripts/soak.py                                  # 300 s, 8 clients, 127.0.0.1:8080
    python scripts/soak.py --duration 45 --concurrency 4 --bad --tmp-dir .run/tmp
    python scripts/soak.py --good a.flac b.wav --max-requests 200

Runs against a service on this machine only (it reads the worker's memory and file
descriptors from /proc). Good files default to the English entries of the shared audio
manifest (WHISPER_SHARED_AUDIO or ../shared/audio) plus JFK re-encoded as an mp4 whose
index comes last (which the service must decode through a private temp dir); --bad mixes
in broken uploads, each with the 4xx it must get.

Checks, each printed as PASS/FAIL (exit status 1 when any fails):
- every request was answered exactly once (no timeouts, no connection errors)
- good uploads: all 200 and correct (WER against the manifest reference <= --max-wer; a
  --good file that is not in the manifest only has to come back 200 with a text)
- bad uploads: each got its expected status and a JSON error body
- the workers were not replaced, and their RSS stayed flat after the warm-up (the median of
  the last quarter of samples within --rss-tolerance of the first quarter's)
- no file-descriptor leak in the workers or the frontend (counted before and after)
- no temporary files left: --tmp-dir (the service's TMPDIR, <WHISPER_RUN_DIR>/tmp) and
  /tmp/whisper-audio-* list the same after as before
"""

import argparse
import glob
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlparse

import numpy as np
import psutil
import requests
import soundfile as sf
from tqdm import tqdm

from client import WhisperClient, expand_audio_paths
from scoring import score

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = Path(os.environ.get("WHISPER_SHARED_AUDIO", REPO.parent / "shared" / "audio"))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Manifest files a small English model handles well and quickly (the long and the
# multilingual ones are left out: they test accuracy, not endurance).
DEFAULT_GOOD_DIRS = ("jfk", "librispeech", "english")
MAX_DEFAULT_GOOD_S = 40.0


@dataclass
class Upload:
    name: str
    data: bytes
    expect_status: int  # 200 for good uploads
    reference: Optional[str] = None  # good uploads: what was said


@dataclass
class Outcome:
    request_id: int
    upload: str
    good: bool
    status: Optional[int]  # None when no answer came back
    latency_s: float
    error: Optional[str] = None  # why it counts as failed
    wer: Optional[float] = None


# --- what to send ----------------------------------------------------------------------


def read_manifest(root: Path) -> Dict[str, str]:
    import csv

    with open(root / "manifest.tsv", newline="", encoding="utf-8") as f:
        return {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}


def good_uploads(paths: List[str]) -> List[Upload]:
    manifest = read_manifest(SHARED_AUDIO) if (SHARED_AUDIO / "manifest.tsv").exists() else {}
    if paths:
        files = expand_audio_paths(paths)
    else:
        if not manifest:
            raise SystemExit(f"no manifest at {SHARED_AUDIO}: set WHISPER_SHARED_AUDIO or pass --good FILES")
        files = [
            SHARED_AUDIO / name
            for name, row in manifest.items()
            if name.split("/")[0] in DEFAULT_GOOD_DIRS and float(row["duration_s"]) <= MAX_DEFAULT_GOOD_S
        ]
    uploads = []
    for path in files:
        try:
            key = str(Path(path).resolve().relative_to(SHARED_AUDIO.resolve()))
        except ValueError:
            key = None
        row = manifest.get(key) if key else None
        reference = row["reference_transcript"] if row else None
        uploads.append(Upload(Path(path).name, Path(path).read_bytes(), 200, reference))
    jfk = SHARED_AUDIO / "jfk" / "jfk.flac"
    if not paths and shutil.which("ffmpeg") and "jfk/jfk.flac" in manifest:
        # mp4 muxers put the index ("moov") last unless told otherwise: the service has to
        # write this one to a private temp dir, the path a temp-file leak would show on.
        with tempfile.TemporaryDirectory() as tmp:
            m4a = Path(tmp) / "jfk.m4a"
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(jfk), "-c:a", "aac", "-b:a", "48k",
                            str(m4a)], check=True, capture_output=True, timeout=60)
            uploads.append(Upload("jfk-index-at-end.m4a", m4a.read_bytes(), 200,
                                  manifest["jfk/jfk.flac"]["reference_transcript"]))
    if not uploads:
        raise SystemExit("no good files to send")
    return uploads


def wav(samples: np.ndarray, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype=subtype)
    return buffer.getvalue()


def bad_uploads() -> List[Upload]:
    rng = np.random.default_rng(7)
    noise = bytearray(rng.bytes(50_000))
    noise[0] = 0x5A  # not an MPEG frame sync: plain random bytes
    nan = np.zeros(16000, np.float32)
    nan[100] = np.nan
    uploads = [
        Upload("empty", b"", 400),
        Upload("random-bytes", bytes(noise), 400),
        Upload("notes.txt", b"not audio at all\n" * 100, 400),
        Upload("zero-samples.wav", wav(np.zeros(0, np.float32), "PCM_16"), 400),
        Upload("nan.wav", wav(nan, "FLOAT"), 400),
        Upload("truncated-header.wav", wav(np.zeros(1600, np.float32), "PCM_16")[:30], 400),
    ]
    if shutil.which("ffmpeg"):
        video = subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=5", "-t", "1",
             "-f", "matroska", "pipe:1"], capture_output=True, timeout=60,
        )
        if video.returncode == 0:
            uploads.append(Upload("video-without-audio.mkv", video.stdout, 415))
    return uploads


# --- the service's processes -------------------------------------------------------------


def worker_pids(management_url: str) -> List[int]:
    response = requests.get(f"{management_url}/models/whisper", timeout=10)
    response.raise_for_status()
    return sorted(w["pid"] for w in response.json()[0]["workers"] if w.get("pid"))


def frontend_pid(workers: List[int]) -> Optional[int]:
    """TorchServe's frontend (java) is the parent of its Python workers."""
    for pid in workers:
        try:
            parent = psutil.Process(pid).parent()
        except psutil.Error:
            continue
        if parent is not None:
            return parent.pid
    return None


def fd_count(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_mb(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def temp_listing(dirs: List[str]) -> set:
    entries = set(glob.glob("/tmp/whisper-audio-*"))
    for directory in dirs:
        if os.path.isdir(directory):
            entries |= {os.path.join(directory, name) for name in os.listdir(directory)}
    return entries


# --- the run ---------------------------------------------------------------------------


class Plan:
    """Hands out uploads until the deadline or the request budget is reached."""

    def __init__(self, good: List[Upload], bad: List[Upload], deadline: float, max_requests: Optional[int], seed: int):
        self.good, self.bad = good, bad
        self.deadline, self.max_requests = deadline, max_requests
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.issued = 0

    def next(self):
        with self.lock:
            if time.monotonic() >= self.deadline or (self.max_requests and self.issued >= self.max_requests):
                return None
            self.issued += 1
            # About one bad upload in four when there are any.
            pool = self.bad if self.bad and self.random.random() < 0.25 else self.good
            return self.issued, self.random.choice(pool)


def check_outcome(upload: Upload, request_id: int, response, latency: float, max_wer: float) -> Outcome:
    good = upload.expect_status == 200
    outcome = Outcome(request_id, upload.name, good, response.status_code, latency)
    if response.status_code != upload.expect_status:
        outcome.error = f"expected {upload.expect_status}, got {response.status_code}: {response.text[:200]}"
        return outcome
    try:
        body = response.json()
    except ValueError:
        outcome.error = f"not JSON: {response.text[:200]!r}"
        return outcome
    if not good:
        if not (isinstance(body, dict) and body.get("code") and body.get("message")):
            outcome.error = f"error body without code/message: {body}"
        return outcome
    if upload.reference is not None:
        outcome.wer = score(upload.reference, body.get("text", "")).rate
        if outcome.wer > max_wer:
            outcome.error = f"WER {outcome.wer:.2f} > {max_wer}: {body.get('text', '')[:200]!r}"
    elif not isinstance(body.get("text"), str):
        outcome.error = f"no text in {body}"
    return outcome


def run(args) -> int:
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"--url must be on this machine (127.0.0.1), not {host}: the checks read /proc")
    management_url = args.management_url
    good = good_uploads(args.good)
    bad = bad_uploads() if args.bad else []
    client = WhisperClient(args.url, timeout=args.timeout)

    pids = worker_pids(management_url)
    if not pids:
        raise SystemExit("the model has no workers")
    frontend = frontend_pid(pids)
    # Warm the workers up (first requests allocate), then take the "before" counts.
    for upload in good[:2]:
        client.post(upload.data, filename=upload.name)
    time.sleep(1)
    fds_before = {pid: fd_count(pid) for pid in pids + ([frontend] if frontend else [])}
    temp_before = temp_listing(args.tmp_dir)

    started = time.monotonic()
    plan = Plan(good, bad, started + args.duration, args.max_requests, args.seed)
    outcomes: Dict[int, List[Outcome]] = {}
    lock = threading.Lock()
    samples = []  # (seconds since start, {pid: rss MB})
    stop = threading.Event()
    bar = tqdm(total=int(args.duration), unit="s", desc="soak", disable=args.no_progress, dynamic_ncols=True,
               file=sys.stderr)

    def sampler():
        while not stop.is_set():
            now = time.monotonic() - started
            samples.append((now, {pid: rss_mb(pid) for pid in worker_pids(management_url)}))
            with lock:
                done = sum(len(v) for v in outcomes.values())
                failed = sum(1 for v in outcomes.values() for o in v if o.error)
            bar.n = min(int(now), int(args.duration))
            bar.set_postfix(requests=done, failed=failed, refresh=True)
            stop.wait(args.sample_every)

    def client_loop():
        while True:
            item = plan.next()
            if item is None:
                client.session.close()  # this thread's connection: counted in the fd check
                return
            request_id, upload = item
            t0 = time.monotonic()
            try:
                response = client.post(upload.data, filename=upload.name)
                outcome = check_outcome(upload, request_id, response, time.monotonic() - t0, args.max_wer)
            except Exception as err:  # timeouts and connection errors count, and are kept
                outcome = Outcome(request_id, upload.name, upload.expect_status == 200, None,
                                  time.monotonic() - t0, f"no answer: {err}")
            with lock:
                outcomes.setdefault(request_id, []).append(outcome)

    sampler_thread = threading.Thread(target=sampler, daemon=True)
    sampler_thread.start()
    clients = [threading.Thread(target=client_loop, daemon=True) for _ in range(args.concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    stop.set()
    sampler_thread.join()
    bar.n = int(args.duration)
    bar.close()
    wall_s = time.monotonic() - started

    # Let closed connections and finished decodes settle before counting again.
    client.session.close()
    time.sleep(args.settle)
    pids_after = worker_pids(management_url)
    fds_after = {pid: fd_count(pid) for pid in fds_before}
    temp_after = temp_listing(args.tmp_dir)

    checks = []

    def check(name: str, ok: bool, detail: str):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    all_outcomes = [o for v in outcomes.values() for o in v]
    duplicates = [rid for rid, v in outcomes.items() if len(v) != 1]
    missing = sorted(set(range(1, plan.issued + 1)) - set(outcomes))
    no_answer = [o for o in all_outcomes if o.status is None]
    check("every request answered exactly once", not duplicates and not missing and not no_answer,
          f"{plan.issued} sent, {len(all_outcomes)} answered, {len(no_answer)} without answer, "
          f"{len(duplicates)} duplicated, {len(missing)} missing")
    good_out = [o for o in all_outcomes if o.good]
    good_failed = [o for o in good_out if o.error]
    wers = [o.wer for o in good_out if o.wer is not None]
    check("good uploads: all 200 and correct", good_out and not good_failed,
          f"{len(good_out)} good, {len(good_failed)} failed, mean WER "
          f"{statistics.mean(wers) if wers else float('nan'):.3f} (max allowed {args.max_wer})"
          + "".join(f"\n      {o.upload}: {o.error}" for o in good_failed[:5]))
    bad_out = [o for o in all_outcomes if not o.good]
    bad_failed = [o for o in bad_out if o.error]
    check("bad uploads: expected 4xx with a JSON error", not bad_failed,
          f"{len(bad_out)} bad, {len(bad_failed)} wrong" + "".join(f"\n      {o.upload}: {o.error}" for o in bad_failed[:5]))
    check("workers not replaced", pids_after == pids, f"before {pids}, after {pids_after}")

    rss_series = [s[1].get(pids[0]) for s in samples if s[0] >= args.warmup and s[1].get(pids[0]) is not None]
    if len(rss_series) >= 8:
        quarter = max(2, len(rss_series) // 4)
        first, last = statistics.median(rss_series[:quarter]), statistics.median(rss_series[-quarter:])
        growth = (last - first) / first
        check("worker RSS flat after warm-up", growth <= args.rss_tolerance,
              f"{len(rss_series)} samples after {args.warmup:g} s: first quarter median {first:.0f} MB, "
              f"last quarter {last:.0f} MB ({growth:+.1%}; min {min(rss_series):.0f}, max {max(rss_series):.0f})")
    else:
        check("worker RSS flat after warm-up", False,
              f"only {len(rss_series)} RSS samples after the {args.warmup:g} s warm-up: run longer")

    leaks = {pid: (fds_before[pid], fds_after[pid]) for pid in fds_before
             if fds_after[pid] is None or fds_before[pid] is None or fds_after[pid] > fds_before[pid] + args.fd_slack}
    check("no file-descriptor leak", not leaks,
          "; ".join(f"{'frontend' if pid == frontend else 'worker'} {pid}: {b} -> {a}"
                    for pid, (b, a) in ((p, (fds_before[p], fds_after[p])) for p in fds_before)))
    left = sorted(temp_after - temp_before)
    check("no temporary files left", not left, f"{len(left)} new: {left[:5]}" if left else
          f"{len(temp_after)} entries before and after in {args.tmp_dir or []} and /tmp/whisper-audio-*")

    statuses = Counter(o.status for o in all_outcomes)
    latencies = sorted(o.latency_s for o in all_outcomes if o.status is not None)
    print(f"soak: {wall_s:.0f} s, {args.concurrency} clients, {len(all_outcomes)} requests "
          f"({len(good_out)} good, {len(bad_out)} bad), statuses {dict(statuses)}, "
          f"p50 {latencies[len(latencies) // 2] if latencies else float('nan'):.2f} s, "
          f"max {latencies[-1] if latencies else float('nan'):.2f} s")
    for c in checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}")
    if args.report:
        Path(args.report).write_text(json.dumps({
            "wall_s": wall_s, "requests": len(all_outcomes), "statuses": {str(k): v for k, v in statuses.items()},
            "checks": checks, "rss_samples": samples,
            "outcomes": [o.__dict__ for o in all_outcomes],
        }, indent=1))
    return 0 if all(c["ok"] for c in checks) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("WHISPER_URL", "http://127.0.0.1:8080"),
                        help="inference API on this machine (default %(default)s)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="management API, to find the worker processes (default %(default)s)")
    parser.add_argument("--duration", type=float, default=300, help="seconds to keep sending (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once (default %(default)s)")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--good", nargs="+", default=[], metavar="FILES",
                        help="good audio files or directories (default: English files of the shared manifest)")
    parser.add_argument("--bad", action="store_true", help="mix in broken uploads (about one in four)")
    parser.add_argument("--max-wer", type=float, default=0.35,
                        help="highest word error rate a good answer may have (default %(default)s)")
    parser.add_argument("--tmp-dir", action="append", default=[],
                        help="the service's TMPDIR (<WHISPER_RUN_DIR>/tmp), checked for leftovers; repeatable")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before RSS must be flat (default: a third of --duration, at most 60)")
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth (default %(default)s)")
    parser.add_argument("--fd-slack", type=int, default=3, help="extra fds tolerated after the run (default %(default)s)")
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before the after-counts")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one request may take (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the request mix")
    parser.add_argument("--report", help="write the outcomes and checks as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 3)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Open-loop load: send requests at a fixed (or Poisson) rate, whatever the service does.

    python scripts/request_train.py samples/jfk.flac --rate 2 --duration 30
    python scripts/request_train.py /work/shared/audio/english --rate 5 --duration 60 --poisson --report train.json

Unlike bulk_request.py (a closed loop that waits for each answer before sending the next),
arrivals here follow a schedule planned up front: a scheduler thread fires each request at
its planned time into a large pool and never waits for responses, so a slow service shows
up as growing queueing time, timeouts and 503s instead of a lower sending rate.
Time to first byte is when the response headers arrive (TorchServe sends them only when the
answer is ready, so it is queueing plus inference); latency includes reading the body.

The run stops by itself: no new requests after --duration, and requests still open
--timeout seconds after their start are counted as timeouts.
Exit status: 0 when every request was answered with 200, 1 otherwise.
"""

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from tqdm import tqdm

from bulk_request import latency_stats
from client import (
    ClientError,
    WhisperClient,
    add_common_args,
    audio_paths_or_exit,
    error_from_response,
    reachable_client_or_exit,
)


def arrival_schedule(rate: float, duration_s: float, poisson: bool = False, seed: Optional[int] = None) -> list[float]:
    """Planned send times in seconds from the start, all before duration_s.

    Fixed rate: one request every 1/rate seconds starting at 0. Poisson: exponential gaps
    with mean 1/rate (a seeded generator, so a run can be repeated).
    """
    if rate <= 0 or duration_s <= 0:
        return []
    if not poisson:
        count = int(round(rate * duration_s, 9))  # round: 0.1 * 30 is 3.0000000000000004
        times = [i / rate for i in range(count + 1)]
        return [t for t in times if t < duration_s]
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


@dataclass
class Arrival:
    """One scheduled request and what became of it."""

    index: int
    file: str
    planned_at: float  # seconds from the start of the run
    sent_at: Optional[float] = None  # later than planned_at when the pool was full
    status: Union[int, str] = "not_sent"  # HTTP status, "timeout", "connection_error" or "not_sent"
    ttfb_s: Optional[float] = None
    latency_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == 200


def fire(client: WhisperClient, arrival: Arrival, payload: bytes, options: dict, clock=time.monotonic) -> Arrival:
    started = clock()
    try:
        # stream=True: post() returns when the headers arrive, before the body is read
        response = client.post(payload, filename=Path(arrival.file).name, stream=True, **options)
        arrival.ttfb_s = round(clock() - started, 4)
        with response:
            response.content  # noqa: B018 - read the body inside the clock
            arrival.latency_s = round(clock() - started, 4)
        arrival.status = response.status_code
        if not response.ok:
            arrival.error = error_from_response(response).message
    except ClientError as e:
        arrival.status, arrival.error = (e.status if e.status is not None else str(e.code)), e.message
        arrival.latency_s = round(clock() - started, 4)
    except Exception as e:  # a read timeout while streaming the body, a reset connection
        arrival.status = "timeout" if "timed out" in str(e).lower() else "connection_error"
        arrival.error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        arrival.latency_s = round(clock() - started, 4)
    return arrival


def run_train(
    client: WhisperClient,
    files: list[Path],
    schedule: list[float],
    *,
    options: dict,
    max_in_flight: int = 256,
    progress: bool = True,
    clock=time.monotonic,
    sleep=time.sleep,
) -> tuple[list[Arrival], float]:
    """Fire the schedule; returns (arrivals, wall seconds until the last answer or timeout).
    `clock` and `sleep` keep the time (a test passes its own)."""
    payloads = {path: path.read_bytes() for path in files}
    arrivals = [Arrival(i, str(files[i % len(files)]), round(t, 4)) for i, t in enumerate(schedule)]
    bar = tqdm(total=len(arrivals), unit="req", disable=not progress, dynamic_ncols=True, desc="answers")
    lock = threading.Lock()
    answered = Counter()

    def done(future):
        arrival = future.result()
        with lock:
            answered[arrival.ok] += 1
            bar.update(1)
            bar.set_postfix(failed=answered[False], refresh=False)

    # the pool is sized for every request that can be open at once, so sending never waits
    pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="train")
    futures = []
    t0 = clock()
    try:
        for arrival in arrivals:
            delay = t0 + arrival.planned_at - clock()
            if delay > 0:
                sleep(delay)
            arrival.sent_at = round(clock() - t0, 4)  # handed to its own thread, which sends at once
            future = pool.submit(fire, client, arrival, payloads[Path(arrival.file)], options, clock)
            future.add_done_callback(done)
            futures.append(future)
        # requests time out on their own (client timeout); this only guards against a hang
        wait(futures, timeout=client.timeout + 30)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    wall = clock() - t0
    return arrivals, wall


def summarize(arrivals: list[Arrival], duration_s: float, wall_s: float) -> dict:
    sent = [a for a in arrivals if a.sent_at is not None]
    ok = [a for a in arrivals if a.ok]
    lags = [a.sent_at - a.planned_at for a in sent]
    statuses = Counter(a.status for a in arrivals)
    return {
        "planned": len(arrivals),
        "sent": len(sent),
        "ok": len(ok),
        "failed": len(arrivals) - len(ok),
        "timeouts": statuses.get("timeout", 0),
        "service_unavailable_503": statuses.get(503, 0),
        "by_status": dict(sorted(statuses.items(), key=lambda kv: str(kv[0]))),
        "duration_s": duration_s,
        "wall_s": wall_s,
        "offered_rate": len(arrivals) / duration_s,
        "sent_rate": len(sent) / duration_s,
        # answers per second over the whole run, including the drain after the last send
        "achieved_rate": len(ok) / max(wall_s, 1e-9),
        "max_send_lag_s": max(lags, default=None),
        "ttfb_s": latency_stats([a.ttfb_s for a in ok]),
        "latency_s": latency_stats([a.latency_s for a in ok]),
    }


def format_summary(summary: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f} ms"

    def stats(s):
        return f"{ms(s['p50'])} / {ms(s['p90'])} / {ms(s['p99'])} / {ms(s['max'])}"

    rows = [
        ("requests", f"{summary['planned']} planned, {summary['sent']} sent, {summary['ok']} ok, {summary['failed']} failed"),
        ("by status", ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items()) or "-"),
        ("timeouts / 503s", f"{summary['timeouts']} / {summary['service_unavailable_503']}"),
        ("offered rate", f"{summary['offered_rate']:.2f} req/s over {summary['duration_s']:g} s"),
        ("achieved rate", f"{summary['achieved_rate']:.2f} ok/s over {summary['wall_s']:.1f} s"),
        ("max send lag", ms(summary["max_send_lag_s"])),
        ("ttfb p50/p90/p99/max", stats(summary["ttfb_s"])),
        ("latency p50/p90/p99/max", stats(summary["latency_s"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="FILE", help="audio files, directories or globs (used round-robin)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds to keep sending")
    parser.add_argument("--poisson", action="store_true", help="exponential gaps instead of a fixed interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson schedule (default %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="most requests open at once (default %(default)s)")
    parser.add_argument("--response-format", default="json", choices=["json", "verbose_json", "text", "srt", "vtt"])
    parser.add_argument("--report", type=Path, help="write the summary and every request to this JSON file")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_common_args(parser)
    parser.set_defaults(timeout=120.0)  # TorchServe's default responseTimeout
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    files = audio_paths_or_exit(args.paths)
    client = reachable_client_or_exit(args)
    schedule = arrival_schedule(args.rate, args.duration, args.poisson, args.seed)
    kind = "Poisson" if args.poisson else "fixed"
    print(f"{len(schedule)} requests at {args.rate:g}/s ({kind}) for {args.duration:g} s -> {client.predictions_url}", file=sys.stderr)

    arrivals, wall = run_train(
        client, files, schedule, options={"response_format": args.response_format},
        max_in_flight=args.max_in_flight, progress=not args.quiet,
    )
    summary = summarize(arrivals, args.duration, wall)
    print(format_summary(summary))
    failed = next((a for a in arrivals if not a.ok), None)
    if failed is not None:
        print(f"failed: request {failed.index} {failed.file}: {failed.status}: {failed.error}", file=sys.stderr)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        report = {"summary": summary, "requests": [asdict(a) for a in arrivals]}
        args.report.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"report: {args.report}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

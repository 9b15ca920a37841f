"""The scheduler and the engine loop without a model (tests/fake_runner.py stands in for the
runner): arrivals, fairness, budgets and pieces, admission and 503, out-of-memory splits
and the budget, failure bisection, fallback requeue, determinism, streaming order, close.

The fake runner logs every window it starts (with the decode call it joined before) and
every decode call; in lockstep mode a decode call runs only when the test allows it, so a
test decides which step an arrival meets. Nothing waits on time.
"""

import numpy as np
import pytest

from engine import Engine, EngineConfig
from errors import InternalError, OutOfMemory, Overloaded
from fake_runner import FakeRunner
from fault_runner import FaultInjectingRunner
from options import TranscriptionOptions
from scheduler import (BUDGET_RETRY_STEPS, Admission, Failure, Scheduler, SchedulerConfig, WindowJob,
                       WindowStatus)
from stream import Request

OPTIONS = TranscriptionOptions(vad_filter=False)
SECOND = 16000


def audio(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SECOND), dtype=np.float32)


def engine(runner=None, **config) -> Engine:
    return Engine(None, EngineConfig(**{"window_budget": 4, "new_windows_per_step": 4, **config}),
                  runner=runner or FakeRunner())


def windows_of(transcript):
    """(request serial, window start in frames) of each segment, from the fake's text."""
    out = []
    for s in transcript.segments:
        r, seek = s.text.split()
        out.append((int(r[1:]), int(seek[1:])))
    return out


def started_at(runner, serial):
    """The decode calls before which each window of request `serial` started."""
    return [call for call, job in runner.started if job.request == serial]


# ---------------------------------------------------------------------------- arrivals


def test_an_arrival_during_a_step_joins_the_next_step():
    runner = FakeRunner(lockstep=True, steps=lambda job: 3)
    e = engine(runner)
    try:
        long = e.submit(audio(100), OPTIONS)  # four 30 s windows, one after the other
        runner.wait_for_decode_call(0)  # step 1 is decoding the long one's first window
        short = e.submit(audio(5), OPTIONS)
        runner.allow(100)
        assert windows_of(short.result(10)) == [(1, 0)]
        assert started_at(runner, 1) == [1]  # it joined before decode call 1: the next step
        assert not long.done() or long.result().segments  # it did not wait for the long one
        assert [w for w in windows_of(long.result(10))] == [(0, 0), (0, 3000), (0, 6000), (0, 9000)]
        # the short one took 3 decode calls, as alone; the long one 12
        assert max(call for call, job in runner.started if job.request == 0) == 9
    finally:
        runner.allow(1000)
        e.close()


def test_requests_arriving_together_start_in_the_same_step():
    runner = FakeRunner()
    e = engine(runner, new_windows_per_step=2)
    with e._cond:  # the loop cannot take its inbox meanwhile
        subs = [e.submit(audio(5), OPTIONS) for _ in range(3)]
    for s in subs:
        s.result(10)
    e.close()
    # at most new_windows_per_step join per step (their encoder pass delays the step)
    assert [call for call, _ in runner.started] == [0, 0, 1]
    assert runner.decoded[0] == [job.window_id for _, job in runner.started[:2]]


# ---------------------------------------------------------------------------- fairness, pieces


def test_a_freed_place_goes_to_the_request_holding_fewest():
    """Budget 2; a long request cut into two pieces holds both places; three short ones
    arrive: each place that frees up goes to a short one, not to the long one's next window."""
    runner = FakeRunner(lockstep=True, steps=lambda job: 2)
    e = engine(runner, window_budget=2, split_long=True, min_stream_seconds=30)
    try:
        long = e.submit(audio(120), OPTIONS)
        runner.wait_for_decode_call(0)
        shorts = [e.submit(audio(5), OPTIONS) for _ in range(3)]
        runner.allow(1000)
        for s in shorts:
            s.result(10)
        long.result(10)
    finally:
        runner.allow(1000)
        e.close()
    request_of = {job.window_id: job.request for _, job in runner.started}
    assert [request_of[i] for i in runner.decoded[0]] == [0, 0]  # the two pieces fill the budget
    assert max(len(ids) for ids in runner.decoded) <= 2
    short_start = {k: started_at(runner, k)[0] for k in (1, 2, 3)}
    for call, ids in enumerate(runner.decoded):
        waiting = [k for k, c in short_start.items() if c > call]
        if call >= 2 and waiting:  # a place has freed up since the short ones arrived
            assert [request_of[i] for i in ids].count(0) <= 1, (call, ids, short_start)
    # each short one waits for one place to free up (a window of 2 calls), not for the long one
    # the first place that frees goes to the long one's round-robin turn and a short one,
    # each later one to the next short one as soon as the one before it ends
    assert short_start == {1: 2, 2: 4, 3: 6}


def test_long_requests_arriving_together_share_the_budget_in_pieces():
    runner = FakeRunner()
    e = engine(runner, window_budget=4, split_long=True, min_stream_seconds=30)
    with e._cond:
        subs = [e.submit(audio(240), OPTIONS) for _ in range(2)]
    transcripts = [s.result(10) for s in subs]
    e.close()
    first = [job for call, job in runner.started if call == 0]
    assert sorted(job.request for job in first) == [0, 0, 1, 1]  # two pieces each: 4 // 2
    cut = max(job.seek for job in first)
    assert 0 < cut < 24000
    # the second piece starts at the cut; the windows of both, in order, each once
    for t in transcripts:
        seeks = [seek for _, seek in windows_of(t)]
        assert seeks == sorted(seeks) and len(set(seeks)) == len(seeks) and cut in seeks


def test_a_request_alone_is_cut_into_at_most_its_budget():
    runner = FakeRunner()
    e = engine(runner, window_budget=3, split_long=True, min_stream_seconds=30)
    e.submit(audio(600), OPTIONS).result(10)
    e.close()
    assert len([job for call, job in runner.started if call == 0]) == 3


# ---------------------------------------------------------------------------- admission


def test_admission_refuses_beyond_the_cap_with_retry_after():
    runner = FakeRunner(lockstep=True)
    e = engine(runner, max_inflight_audio_s=5)
    try:
        first = e.submit(audio(11), OPTIONS)  # alone: admitted however long
        with pytest.raises(Overloaded) as raised:
            e.submit(audio(1.5), OPTIONS)
        assert raised.value.status == 503 and 1 <= raised.value.retry_after <= 60
        assert e.load()["requests"] == 1
        forced = e.submit(audio(1.5), OPTIONS, admit_always=True)
        runner.allow(100)
        first.result(10), forced.result(10)
        assert e.wait_idle(10)
        assert e.load() == {"requests": 0, "streams": 0, "inflight_audio_s": 0.0, "window_budget": 4}
        e.submit(audio(1.5), OPTIONS).result(10)  # nothing in flight now
    finally:
        runner.allow(1000)
        e.close()


def test_admission_counts_are_released_on_failure_too():
    admission = Admission(cap=10)
    admission.admit(8)
    with pytest.raises(Overloaded):
        admission.admit(3)
    admission.release(8)
    admission.admit(3)
    assert (admission.requests, admission.audio_s) == (1, 3)


# ---------------------------------------------------------------------------- failures


def test_a_start_that_fails_is_bisected_down_to_the_window_at_fault():
    runner = FakeRunner(fail_start=lambda job: job.request == 1)
    e = engine(runner)
    with e._cond:
        subs = [e.submit(audio(5), OPTIONS) for _ in range(4)]
    with pytest.raises(InternalError) as raised:
        subs[1].result(10)
    assert raised.value.status == 500 and "bad window" in raised.value.message
    assert [windows_of(subs[k].result(10)) for k in (0, 2, 3)] == [[(0, 0)], [(2, 0)], [(3, 0)]]
    e.close()
    assert e.stats["failed_requests"] == 1 and e.stats["finished_requests"] == 3
    assert e.stats["oom_splits"] == 0 and e.window_budget == 4


def test_a_decode_chunk_that_fails_is_retried_one_window_at_a_time():
    runner = FakeRunner(steps=lambda job: 2)
    e = engine(runner)
    runner.fail_decode = lambda ids: any(e.scheduler.window(i) and e.scheduler.window(i).request.id == "marked"
                                         for i in ids)
    with e._cond:
        subs = [e.submit(audio(5), OPTIONS, request_id="marked" if k == 1 else None) for k in range(3)]
    with pytest.raises(InternalError):
        subs[1].result(10)
    assert windows_of(subs[0].result(10)) == [(0, 0)] and windows_of(subs[2].result(10)) == [(2, 0)]
    e.close()
    # the failed chunk held all three; then each window ran alone, the marked one failing alone
    assert sorted(len(ids) for ids in runner.decoded[:1]) == [3]
    alone = [ids for ids in runner.decoded[1:] if ids]
    assert all(len(ids) == 1 for ids in alone[:3])
    assert e.stats["failed_requests"] == 1 and e.window_budget == 4


def test_out_of_memory_splits_the_step_and_lowers_the_budget():
    runner = FaultInjectingRunner(FakeRunner(), oom_above_windows=1)
    e = engine(runner)
    with e._cond:
        subs = [e.submit(audio(5), OPTIONS) for _ in range(4)]
    assert [windows_of(s.result(10)) for s in subs] == [[(k, 0)] for k in range(4)]
    e.close()
    assert runner.injected >= 1 and e.stats["oom_splits"] >= 1
    assert e.window_budget == 1 and e.stats["failed_requests"] == 0
    assert max(len(ids) for ids in runner.inner.decoded) == 1


def test_out_of_memory_of_one_window_alone_is_507():
    class Oom(FakeRunner):
        def start(self, jobs):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    e = engine(Oom())
    with pytest.raises(OutOfMemory) as raised:
        e.submit(audio(2), OPTIONS).result(10)
    e.close()
    assert raised.value.status == 507 and e.stats["oom_splits"] == 1 and e.stats["failed_requests"] == 1


def test_a_lowered_budget_grows_by_one_after_enough_clean_steps():
    s = Scheduler(SchedulerConfig(window_budget=8, new_windows_per_step=8, tokens_per_step=8))
    job = WindowJob(0, 0, 0, 3000, False, "en", (), "transcribe", (), 0.0, 0)
    assert s.start_failed([job] * 2, Failure(oom=True, message="oom"), decoding=6) == [[job], [job]]
    assert s.window_budget == 4
    for _ in range(BUDGET_RETRY_STEPS - 1):
        s.end_step(0, 0, 0.0)
    assert s.window_budget == 4
    s.end_step(0, 0, 0.0)
    assert s.window_budget == 5


# ---------------------------------------------------------------------------- fallback, determinism


def test_a_window_that_fails_the_checks_goes_round_again_hotter_without_reencoding():
    runner = FakeRunner(avg_logprob=lambda job: -2.0 if job.temperature < 0.4 else -0.2)
    e = engine(runner)
    t = e.submit(audio(5), TranscriptionOptions(vad_filter=False, temperature=(0.0, 0.2, 0.4, 0.6))).result(10)
    e.close()
    assert [job.temperature for _, job in runner.started] == [0.0, 0.2, 0.4]
    assert [job.encoded for _, job in runner.started] == [False, True, True]
    assert len({job.window_id for _, job in runner.started}) == 1
    assert e.stats["encoder_windows"] == 1 and e.stats["fallback_windows"] == 2
    assert t.segments[0].temperature == 0.4


def test_a_request_gets_the_same_jobs_alone_and_among_neighbours():
    """What the runner is asked to decode for a request (place, prompt, temperature, seed)
    does not depend on what else is in flight."""
    def jobs_of(runner, serial):
        return [(j.seek, j.size, j.prompt, j.temperature, j.seed) for _, j in runner.started if j.request == serial]

    options = TranscriptionOptions(vad_filter=False, seed=7, temperature=(0.6, 1.0))
    alone = FakeRunner(avg_logprob=lambda job: -2.0 if job.temperature < 1 else -0.2)
    e = engine(alone)
    e.submit(audio(70), options).result(10)
    e.close()
    crowd = FakeRunner(avg_logprob=alone.avg_logprob)
    e = engine(crowd, window_budget=3)
    with e._cond:
        subs = [e.submit(audio(40 + 10 * k), TranscriptionOptions(vad_filter=False, seed=k)) for k in range(3)]
        target = e.submit(audio(70), options)
    target.result(10), [s.result(10) for s in subs]
    e.close()
    assert jobs_of(alone, 0) == jobs_of(crowd, 3) and len(jobs_of(alone, 0)) == 6


# ---------------------------------------------------------------------------- streaming, close


def test_segments_are_fed_in_order_pieces_waiting_for_earlier_ones():
    runner = FakeRunner(steps=lambda job: 1 if job.seek >= 4500 else 3)  # the second piece runs ahead
    e = engine(runner, split_long=True, min_stream_seconds=30)
    submission = e.submit(audio(90), OPTIONS)
    transcript = submission.result(10)
    e.close()
    batches = []
    while (batch := submission.segments.get(len(batches)).result(1)) is not None:
        batches.append(batch)
    segments = [s for b in batches for s in b]
    assert [s.id for s in segments] == list(range(len(transcript.segments)))
    assert [(s.start, s.text) for s in segments] == [(s.start, s.text) for s in transcript.segments]
    starts = [s.start for s in segments]
    assert starts == sorted(starts)


def test_close_fails_what_is_in_flight_and_stops_the_thread():
    runner = FakeRunner(lockstep=True)
    e = engine(runner)
    queued = e.submit(audio(5), OPTIONS)
    runner.wait_for_decode_call(0)
    with e._cond:
        waiting = e.submit(audio(5), OPTIONS)
        runner.allow(1)
        e._closed = True  # as close() does, before the loop can take the second one
        e._cond.notify_all()
    e.close()
    for s in (queued, waiting):
        assert s.done()
    assert isinstance(waiting.exception(), InternalError)
    assert waiting.segments.get(0).result(1) is None
    assert not e._thread.is_alive()
    with pytest.raises(InternalError):
        e.submit(audio(1), OPTIONS)


def test_windows_have_an_explicit_status():
    runner = FakeRunner(lockstep=True, steps=lambda job: 2)
    e = engine(runner, window_budget=1)
    try:
        with e._cond:
            a, b = e.submit(audio(5), OPTIONS), e.submit(audio(5), OPTIONS)
        runner.wait_for_decode_call(0)
        statuses = sorted(w.status.value for r in e.scheduler.requests for w in r.windows if w)
        assert statuses == [WindowStatus.DECODING.value, WindowStatus.WAITING.value]
        runner.allow(100)
        a.result(10), b.result(10)
    finally:
        runner.allow(1000)
        e.close()


def test_a_request_without_audio_frames_is_answered_at_once():
    e = engine()
    t = e.submit(np.zeros(0, dtype=np.float32), OPTIONS).result(10)
    e.close()
    assert t.segments == [] and t.text == ""


def test_requests_are_answered_with_request_ids():
    assert Request(id="x", serial=0, audio=audio(1), options=OPTIONS).duration == 1.0

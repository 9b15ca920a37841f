"""handler/oom.py: split a batch on out-of-memory, one 507 for the item that never fits."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "handler")]

from errors import OutOfMemory, RequestError  # noqa: E402
from oom import (  # noqa: E402
    InjectedOutOfMemory,
    audio_seconds,
    is_out_of_memory,
    oom_injector,
    transcribe_splitting,
)


class Recorder:
    """A `run` that transcribes items to text, and fails when a call is over budget."""

    def __init__(self, budget: float, error=InjectedOutOfMemory):
        self.budget = budget
        self.error = error
        self.calls = []

    def __call__(self, items):
        self.calls.append(list(items))
        if sum(items) > self.budget:
            raise self.error(f"{sum(items)} > {self.budget}")
        return [f"text of {item}" for item in items]


def test_fits_in_one_call():
    run = Recorder(budget=100)
    assert transcribe_splitting([11, 11, 11, 11], run) == ["text of 11"] * 4
    assert run.calls == [[11, 11, 11, 11]]


def test_empty_batch_does_not_call_run():
    run = Recorder(budget=100)
    assert transcribe_splitting([], run) == []
    assert run.calls == []


def test_halves_until_each_part_fits():
    # The example: 4 x 11 s with a 12 s budget -> 44 fails, 22 + 22 fail, singles pass.
    run = Recorder(budget=12)
    assert transcribe_splitting([11, 11, 11, 11], run) == ["text of 11"] * 4
    assert run.calls == [[11, 11, 11, 11], [11, 11], [11], [11], [11, 11], [11], [11]]


def test_item_that_never_fits_gets_507_and_the_others_keep_their_results():
    run = Recorder(budget=12)
    results = transcribe_splitting([11, 11, 30, 11], run)
    assert results[0] == results[1] == results[3] == "text of 11"
    assert isinstance(results[2], OutOfMemory)
    assert isinstance(results[2], RequestError)
    assert results[2].status == 507
    assert results[2].to_dict()["code"] == "out_of_memory"
    assert results[2].to_dict()["type"] == "server_error"
    assert "even alone" in results[2].message and "30 > 12" in results[2].message


def test_results_stay_in_input_order_with_odd_sizes():
    items = [5, 1, 7, 2, 9, 3, 4]
    run = Recorder(budget=9)
    results = transcribe_splitting(items, run)
    assert results == [f"text of {item}" for item in items]


def test_every_item_too_big():
    run = Recorder(budget=1)
    results = transcribe_splitting([2, 3, 4], run)
    assert [r.status for r in results] == [507, 507, 507]
    # Each item is tried alone exactly once.
    assert sorted(map(tuple, (c for c in run.calls if len(c) == 1))) == [(2,), (3,), (4,)]


def test_number_of_calls_is_bounded():
    # n items that each fit alone but never two together: at most 2n - 1 calls.
    n = 13
    run = Recorder(budget=1)
    assert transcribe_splitting([1] * n, run) == ["text of 1"] * n
    assert len(run.calls) == 2 * n - 1


def test_other_errors_propagate_without_retry():
    calls = []

    def run(items):
        calls.append(items)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        transcribe_splitting([1, 2, 3], run)
    assert len(calls) == 1


def test_request_errors_from_run_propagate():
    def run(items):
        raise RequestError("bad options")

    with pytest.raises(RequestError):
        transcribe_splitting([1, 2], run)


def test_custom_is_oom_decides_what_to_split_on():
    run = Recorder(budget=3, error=KeyError)
    results = transcribe_splitting([2, 2], run, is_oom=lambda exc: isinstance(exc, KeyError))
    assert results == ["text of 2", "text of 2"]
    with pytest.raises(InjectedOutOfMemory):
        transcribe_splitting([2, 2], Recorder(budget=3), is_oom=lambda exc: False)


def test_after_oom_runs_once_per_failed_call_before_the_retry():
    events = []
    run = Recorder(budget=12)

    def traced(items):
        events.append(("run", len(items)))
        return run(items)

    transcribe_splitting([11, 11, 11, 11], traced, after_oom=lambda: events.append(("free",)))
    assert events == [
        ("run", 4), ("free",),
        ("run", 2), ("free",), ("run", 1), ("run", 1),
        ("run", 2), ("free",), ("run", 1), ("run", 1),
    ]


def test_wrong_number_of_results_is_an_error():
    with pytest.raises(ValueError, match="2 results for 3 items"):
        transcribe_splitting([1, 2, 3], lambda items: items[:2])


def test_accepts_any_sequence_and_returns_a_list():
    results = transcribe_splitting((1, 2), lambda items: tuple(f"r{i}" for i in items))
    assert results == ["r1", "r2"]


@pytest.mark.parametrize(
    "exc, expected",
    [
        (InjectedOutOfMemory("x"), True),
        (MemoryError(), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),  # only RuntimeErrors carry torch's OOM message
        (RequestError("x"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_is_out_of_memory(exc, expected):
    assert is_out_of_memory(exc) is expected


def test_torch_out_of_memory_error_is_recognised():
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))


def test_a_real_cpu_allocation_failure_is_split():
    """A real allocator failure, not a raised fake: a call with more than one item asks
    for 32 TiB at once and fails; the single items fit and succeed."""
    torch = pytest.importorskip("torch")
    huge = 1 << 43  # float32 elements: 32 TiB

    def run(items):
        buffer = torch.empty(huge if len(items) > 1 else 16, dtype=torch.float32)
        return [f"ok {item} {buffer.numel()}" for item in items]

    try:
        torch.empty(huge, dtype=torch.float32)
    except RuntimeError as exc:
        assert is_out_of_memory(exc), exc
    else:  # an overcommitting kernel handed out 32 TiB of address space: nothing to test
        pytest.skip("the allocator does not fail on a 32 TiB request here")
    assert transcribe_splitting(["a", "b", "c"], run) == ["ok a 16", "ok b 16", "ok c 16"]


def test_audio_seconds_of_handler_items():
    samples = np.zeros(16000 * 11, dtype=np.float32)

    class Decoded:
        duration_s = 3.5

    assert audio_seconds((samples, object())) == pytest.approx(11.0)
    assert audio_seconds(samples) == pytest.approx(11.0)
    assert audio_seconds(Decoded()) == 3.5


def jfk_items(*seconds):
    return [(np.zeros(int(16000 * s), dtype=np.float32), {"i": i}) for i, s in enumerate(seconds)]


def test_injector_raises_only_above_the_limit():
    seen = []

    def run(items):
        seen.append(len(items))
        return [item[1]["i"] for item in items]

    wrapped = oom_injector(12)(run)
    assert wrapped(jfk_items(11)) == [0]
    assert wrapped(jfk_items(6, 6)) == [0, 1]  # exactly the limit passes
    with pytest.raises(InjectedOutOfMemory, match=r"22\.0 s of audio"):
        wrapped(jfk_items(11, 11))
    assert seen == [1, 2]  # the failing call never reached run


@pytest.mark.parametrize("limit", [0, None, -1])
def test_injector_off(limit):
    def run(items):
        return items

    assert oom_injector(limit)(run) is run


def test_injector_with_splitting_reproduces_the_e2e_scenario():
    """4 x 11 s and a 30 s file with the injector at 12 s: every 11 s item is transcribed,
    the 30 s one alone gets 507, and run only ever sees calls within the limit."""
    seen = []

    def run(items):
        total = sum(audio_seconds(item) for item in items)
        assert total <= 12
        seen.append(total)
        return [f"transcript {item[1]['i']}" for item in items]

    run_limited = oom_injector(12)(run)
    results = transcribe_splitting(jfk_items(11, 11, 30, 11), run_limited)
    assert results[0] == "transcript 0" and results[1] == "transcript 1" and results[3] == "transcript 3"
    assert isinstance(results[2], OutOfMemory) and results[2].status == 507
    assert "InjectedOutOfMemory" in results[2].message
    assert seen == pytest.approx([11, 11, 11])
    # And with the four 11 s requests of the issue: all four transcribed.
    assert transcribe_splitting(jfk_items(11, 11, 11, 11), run_limited) == [f"transcript {i}" for i in range(4)]


def test_deep_recursion_is_not_a_problem():
    n = 1000
    run = Recorder(budget=1)
    assert transcribe_splitting([1] * n, run) == ["text of 1"] * n

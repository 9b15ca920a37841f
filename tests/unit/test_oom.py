"""handler/oom.py: which errors count as out of memory (the engine splits a step on them;
the splitting itself is tested with the engine)."""

import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "handler")]

from errors import RequestError  # noqa: E402
from oom import is_out_of_memory  # noqa: E402


@pytest.mark.parametrize(
    "exc, expected",
    [
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
    # its message is deliberately not one of the recognised texts: the class decides
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("no room on the device"))


def test_a_real_cpu_allocation_failure_is_recognised():
    """A real allocator failure, not a raised fake: 32 TiB at once."""
    torch = pytest.importorskip("torch")
    try:
        torch.empty(1 << 43, dtype=torch.float32)
    except RuntimeError as exc:
        assert is_out_of_memory(exc), exc
    else:  # an overcommitting kernel handed out 32 TiB of address space: nothing to test
        pytest.skip("the allocator does not fail on a 32 TiB request here")

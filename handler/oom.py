"""Out-of-memory handling: split the batch and retry, so one OOM costs one request, not all.

A batch that runs out of device memory is split in halves and each half is retried, down
to single requests; a single request that still does not fit gets `OutOfMemory` (507) as
its own result while every other request keeps its transcript.

    results = transcribe_splitting(items, engine.transcribe, is_out_of_memory,
                                   after_oom=torch.cuda.empty_cache)

`oom_injector` fakes the condition for tests (config `fault_injection_oom_above_s`): it
wraps `run` so that any call carrying more than a given number of audio seconds raises
`InjectedOutOfMemory`, which `is_out_of_memory` treats like the real thing.

Plain logic: no TorchServe, and torch only if it is already imported.
"""

import sys
from typing import Callable, List, Optional, Sequence, TypeVar, Union

from errors import OutOfMemory, RequestError

SAMPLE_RATE = 16000  # of the samples the handler passes on (audio.SAMPLE_RATE)

Item = TypeVar("Item")
Result = TypeVar("Result")


class InjectedOutOfMemory(RuntimeError):
    """A fake out-of-memory error raised by `oom_injector` (fault injection in tests)."""


# Messages of the RuntimeErrors torch raised for OOM before it had OutOfMemoryError,
# and still raises on CPU, where there is no dedicated class.
OOM_MESSAGES = (
    "CUDA out of memory",
    "out of memory",
    "DefaultCPUAllocator: can't allocate memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError (CUDA), allocator failures, and injected ones."""
    if isinstance(exc, (InjectedOutOfMemory, MemoryError)):
        return True
    torch = sys.modules.get("torch")  # no import: a process without torch has no torch OOM
    if torch is not None:
        oom_class = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if oom_class is not None and isinstance(exc, oom_class):
            return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def transcribe_splitting(
    items: Sequence[Item],
    run: Callable[[List[Item]], Sequence[Result]],
    is_oom: Callable[[BaseException], bool] = is_out_of_memory,
    after_oom: Optional[Callable[[], None]] = None,
) -> List[Union[Result, RequestError]]:
    """`run(items)`, halving the batch on OOM; results (or OutOfMemory) in input order.

    `run` takes a list of items and returns one result per item. An exception for which
    `is_oom` is false is not ours to handle and propagates. `after_oom` runs after each
    OOM, before the retry (on CUDA: release the cached blocks the failed call left).
    """
    items = list(items)
    if not items:
        return []
    try:
        results = list(run(items))
    except Exception as exc:
        if not is_oom(exc):
            raise
        failure = exc
    else:
        if len(results) != len(items):
            raise ValueError(f"run returned {len(results)} results for {len(items)} items")
        return results
    # Drop our reference to the exception first: its traceback holds the frames, and with
    # them the tensors, of the failed call.
    message = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}".rstrip(": ")
    del failure
    if after_oom is not None:
        after_oom()
    if len(items) == 1:
        return [
            OutOfMemory(
                "Not enough device memory to transcribe this audio, even alone in its batch "
                f"({message}). Send a shorter file or retry later."
            )
        ]
    half = (len(items) + 1) // 2
    return transcribe_splitting(items[:half], run, is_oom, after_oom) + transcribe_splitting(
        items[half:], run, is_oom, after_oom
    )


def audio_seconds(item) -> float:
    """Seconds of audio in one handler item: (samples, options), samples, or .duration_s."""
    if hasattr(item, "duration_s"):
        return float(item.duration_s)
    samples = item[0] if isinstance(item, tuple) else item
    return len(samples) / SAMPLE_RATE


def oom_injector(
    limit_audio_s: Optional[float], seconds: Callable[[object], float] = audio_seconds
) -> Callable[[Callable], Callable]:
    """A wrapper for `run` that raises InjectedOutOfMemory when one call carries more than
    `limit_audio_s` seconds of audio in total. A limit of 0 or None returns `run` as is."""

    def wrap(run: Callable[[List], Sequence]) -> Callable[[List], Sequence]:
        if not limit_audio_s or limit_audio_s <= 0:
            return run

        def run_with_limit(items: List) -> Sequence:
            total = sum(seconds(item) for item in items)
            if total > limit_audio_s:
                raise InjectedOutOfMemory(
                    f"injected out of memory: {total:.1f} s of audio in one call, "
                    f"limit {limit_audio_s:g} s"
                )
            return run(items)

        return run_with_limit

    return wrap

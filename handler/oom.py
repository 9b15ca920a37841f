"""Recognising out-of-memory errors, real or injected.

The engine splits a step that runs out of device memory in halves, retries each half and
lowers its window budget for the steps that follow; one window that does not fit alone
fails only its own request (507). `InjectedOutOfMemory` fakes the condition for tests
(handler setting `fault_injection_oom_above_windows`); `is_out_of_memory` treats it like
the real thing.

Plain logic: no TorchServe, and torch only if it is already imported.
"""

import sys


class InjectedOutOfMemory(RuntimeError):
    """A fake out-of-memory error (fault injection in tests)."""


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

"""Recognising out-of-memory errors.

The scheduler splits a step that runs out of device memory in halves, retries each half
and lowers its window budget for the steps that follow; one window that does not fit alone
fails only its own request (507). Tests inject the condition with a runner that raises
torch's own OutOfMemoryError (tests/fault_runner.py).

Plain logic: no TorchServe, and torch only if it is already imported.
"""

import sys

# Messages of the RuntimeErrors torch raised for OOM before it had OutOfMemoryError,
# and still raises on CPU, where there is no dedicated class.
OOM_MESSAGES = (
    "CUDA out of memory",
    "out of memory",
    "DefaultCPUAllocator: can't allocate memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError (CUDA), allocator failures and MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # no import: a process without torch has no torch OOM
    if torch is not None:
        oom_class = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if oom_class is not None and isinstance(exc, oom_class):
            return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)

"""A model runner that fails on purpose, for tests of the engine's failure paths.

`FaultInjectingRunner` wraps any runner (the real ModelRunner or tests' FakeRunner) and
raises torch's own OutOfMemoryError from a call that would hold more than
`oom_above_windows` windows (starting windows: those in the decode batch plus the new
ones; word timing: the windows of the call). Unit tests pass it to `Engine(runner=...)`;
the end-to-end tests put it into a real TorchServe worker through
tests/fault_injection/sitecustomize.py.
"""

import torch


class FaultInjectingRunner:
    def __init__(self, inner, oom_above_windows: int):
        self.inner = inner
        self.oom_above_windows = oom_above_windows
        self.injected = 0  # errors raised so far

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _check(self, windows: int) -> None:
        if self.oom_above_windows and windows > self.oom_above_windows:
            self.injected += 1
            raise torch.OutOfMemoryError(f"injected out of memory: {windows} windows in one call, "
                                         f"limit {self.oom_above_windows}")

    def start(self, jobs):
        self._check(len(self.inner.decoding) + len(jobs))
        return self.inner.start(jobs)

    def time_words(self, jobs):
        self._check(len(jobs))
        return self.inner.time_words(jobs)

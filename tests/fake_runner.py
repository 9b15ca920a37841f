"""A stand-in for the model runner, for tests of the scheduler and the engine loop without
a model (tests/unit/test_scheduler.py).

It has the ModelRunner's interface (add_audio, start, decode, reset, time_words,
tokenizer, ...) and scripted behaviour: a window ends after `steps(job)` decode calls with
one segment over the whole window, whose text names the request and the window's start
(" r3 s1500"), so a transcript shows which windows were decoded; `avg_logprob(job)` can
send windows down the fallback ladder; `fail_start(job)` / `fail_decode(window_ids)`
raise. Every call is logged. In lockstep mode each decode call waits until the test lets
it run (`allow`), so a test decides exactly which step an arrival meets.
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from whisper.tokenizer import get_tokenizer

from decoding import DecodedWindow
from runner import StartOutput

TOKENIZER = get_tokenizer(False)  # English-only, as tiny.en; a tokenizer is not a model
N_FRAMES = 3000


@dataclass
class Row:
    job: object
    steps_left: int
    index: int = 0  # the row's place in the order of joining (for logs)


@dataclass
class FakeRunner:
    steps: Callable = lambda job: 2  # decode calls until a window ends
    avg_logprob: Callable = lambda job: -0.2
    fail_start: Callable = lambda job: False
    fail_decode: Callable = lambda window_ids: False
    lockstep: bool = False
    n_text_ctx: int = 448
    is_multilingual: bool = False
    languages: tuple = ("en",)
    model: object = None
    started: List[tuple] = field(default_factory=list)  # (decode call index, job) per started window
    decoded: List[List[int]] = field(default_factory=list)  # window ids per decode call
    word_calls: List[List[int]] = field(default_factory=list)

    def __post_init__(self):
        self._rows: Dict[int, Row] = {}
        self._encoded = set()
        self._frames: Dict[int, int] = {}
        self._cond = threading.Condition()
        self._allowed = 0
        self._waiting = 0  # decode calls waiting to be allowed

    # -------------------------------------------------------------- lockstep

    def allow(self, n: int = 1) -> None:
        """Let `n` more decode calls run (lockstep)."""
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    def wait_for_decode_call(self, index: int, timeout: float = 10.0) -> None:
        """Wait until decode call `index` (0-based) is waiting to be allowed, or has run."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.decoded) + self._waiting > index, timeout):
                raise TimeoutError(f"decode call {index} never came ({len(self.decoded)} ran)")

    def wait_decodes(self, n: int, timeout: float = 10.0) -> None:
        """Wait until `n` decode calls have run."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.decoded) >= n, timeout):
                raise TimeoutError(f"{len(self.decoded)} decode calls ran, not {n}")

    # -------------------------------------------------------------- the runner's interface

    def add_audio(self, serial: int, audio) -> int:
        frames = len(audio) // 160 + N_FRAMES
        self._frames[serial] = frames
        return frames

    def release(self, windows=(), requests=()) -> None:
        for w in windows:
            self._encoded.discard(w)
        for r in requests:
            self._frames.pop(r, None)

    def start(self, jobs) -> StartOutput:
        if any(self.fail_start(job) for job in jobs):
            raise ValueError("bad window")
        encoded = sum(1 for job in jobs if job.window_id not in self._encoded)
        for job in jobs:
            self._encoded.add(job.window_id)
            self._rows[job.window_id] = Row(job, self.steps(job), len(self.started))
            self.started.append((len(self.decoded), job))
        return StartOutput({job.window_id: job.language or "en" for job in jobs}, encoded)

    @property
    def decoding(self) -> List[int]:
        return list(self._rows)

    def decode(self, tokens: int):
        with self._cond:
            if self.lockstep:
                self._waiting += 1
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._allowed > 0)
                self._allowed -= 1
                self._waiting -= 1
            ids = list(self._rows)
            try:
                if self.fail_decode(ids):
                    raise ValueError("bad window")
                ended = []
                for window_id in ids:
                    row = self._rows[window_id]
                    row.steps_left -= 1
                    if row.steps_left <= 0:
                        ended.append((window_id, self._result(row.job)))
                        del self._rows[window_id]
                return ended
            finally:
                self.decoded.append(ids)
                self._cond.notify_all()

    def _result(self, job) -> DecodedWindow:
        text = TOKENIZER.encode(f" r{job.request} s{job.seek}")
        end = TOKENIZER.timestamp_begin + min(1500, round(job.size / 2))
        tokens = [TOKENIZER.timestamp_begin, *text, end]
        logprob = self.avg_logprob(job)
        return DecodedWindow(tokens, TOKENIZER.decode(text).strip(), logprob * len(tokens), logprob, 0.1,
                             job.temperature, 1.0)

    def reset(self) -> List[int]:
        ids = list(self._rows)
        self._rows.clear()
        return ids

    def time_words(self, jobs):
        self.word_calls.append([job.window_id for job in jobs])
        out = []
        for job in jobs:
            segments = []
            for s in job.segments:
                s = dict(s)
                s["words"] = [dict(word=w, start=s["start"], end=s["end"], probability=0.9)
                              for w in s["text"].split()]
                segments.append(s)
            out.append(segments)
        return out

    def tokenizer(self, language: Optional[str], task: str):
        return TOKENIZER

    graph_counts = {}

    def bind_thread(self) -> None:
        pass

    def reset_counts(self) -> None:
        pass

    def clock(self) -> float:
        return time.perf_counter()

    def warm_kernels(self) -> None:
        pass

"""A worker's part in a graceful stop: serve.sh marks the server as draining, the worker
refuses new requests and reports how many it still has in flight.

serve.sh (on SIGTERM, Ctrl-C or --stop) creates the file `draining` in the folder named by
WHISPER_DRAIN_DIR; a watcher thread here notices it within `poll_s`, from then on
`enter` raises Draining (503 with Retry-After, so clients go elsewhere) and the worker
writes its count of requests in flight to `worker-<pid>` in that folder whenever it
changes. serve.sh stops TorchServe once every worker has written 0 (or its bound passes).
Plain logic: no TorchServe.
"""

import os
import threading
from typing import Optional

from errors import Draining

DRAIN_DIR_ENV = "WHISPER_DRAIN_DIR"
DRAINING_FILE = "draining"
RETRY_AFTER_S = 5  # what a refused client is told: long enough for the load balancer to route elsewhere


class Drain:
    """Counts a worker's requests in flight; refuses new ones once the server drains."""

    def __init__(self, folder: Optional[str], poll_s: float = 0.25):
        self.folder = folder
        self.inflight = 0
        self.draining = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if folder:
            threading.Thread(target=self._watch, args=(poll_s,), name="whisper-drain", daemon=True).start()

    def enter(self) -> None:
        """Count a request in, or raise Draining (the mark is looked for here too: a request
        that comes right after it is refused even before the watcher has seen it)."""
        with self._lock:
            if not self.draining.is_set() and self.folder and os.path.exists(self._marker):
                self._start_draining()
            if self.draining.is_set():
                raise Draining("the server is shutting down and takes no new requests; retry (another "
                               "replica will answer)", retry_after=RETRY_AFTER_S)
            self.inflight += 1

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1
            if self.draining.is_set():
                self._report()

    def close(self) -> None:
        self._stop.set()

    @property
    def _marker(self) -> str:
        return os.path.join(self.folder, DRAINING_FILE)

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s) and not self.draining.is_set():
            if os.path.exists(self._marker):
                with self._lock:
                    if not self.draining.is_set():
                        self._start_draining()

    def _start_draining(self) -> None:
        self._report()  # first: whoever waits on `draining` finds the report written
        self.draining.set()

    def _report(self) -> None:
        """worker-<pid> := the count in flight (written whole: a reader never sees half)."""
        path = os.path.join(self.folder, f"worker-{os.getpid()}")
        with open(path + ".tmp", "w") as f:
            f.write(str(self.inflight))
        os.replace(path + ".tmp", path)

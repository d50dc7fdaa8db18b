"""A worker thread for a device's blocking work (disk I/O that may wait on the disk).

The event loop must never wait on a disk: a read the page cache cannot serve, a write
the file system throttles, or an fdatasync would stall every function the server
serves, the IOMMU included. A device hands such work to its `IoWorker`: `submit(job,
done)` runs `job()` in the worker's thread and then `done(result)` back on the event
loop (through the transport's thread-safe `call_soon`). The system calls the jobs make
(`preadv`, `pwritev`, `fdatasync`) release the GIL, so the loop goes on serving
messages, translating and copying on the other core meanwhile.

One thread, jobs in submission order: a FLUSH submitted after a write runs after it, so
a flush always covers every write that was handed to the worker before it (and every
write completed inline, which is in the page cache already). `quiesce` waits until
every submitted job has run (device reset, shutdown, tests); `close` stops the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Job = Callable[[], Any]
Done = Callable[[Any], None]
CallSoon = Callable[[Callable[[], None]], None]


class IoWorker:
    """One lazily started daemon thread running jobs in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Job, Done, CallSoon] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._outstanding = 0

    def submit(self, job: Job, done: Done, call_soon: CallSoon) -> None:
        """Run `job()` in the worker, then `done(result)` through `call_soon`."""
        with self._idle:
            self._outstanding += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((job, done, call_soon))

    @property
    def busy(self) -> bool:
        return self._outstanding > 0

    def quiesce(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run and posted its `done`; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self) -> None:
        """Finish the submitted jobs and stop the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done, call_soon = item
            try:
                result = job()
            except Exception:  # our bug: the job must turn its errors into a result
                log.exception("%s: job %r failed", self.name, job)
                result = None
            try:
                call_soon(lambda done=done, result=result: done(result))
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()

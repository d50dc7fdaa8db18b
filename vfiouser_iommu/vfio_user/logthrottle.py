"""Rate-limited logging of what a client does wrong.

Every rejected message is worth a log line, until a broken or hostile client sends a
million of them: one line each filled 54 MB of log for 1 M fuzzed messages (issue 14).
A `LogThrottle` logs the first `burst` messages of each *kind* (say, "DMA_MAP failed
with EINVAL") per `interval` seconds, counts the rest, and says how many it suppressed
when the window ends (at the next message of that kind) or when `flush()` is called
(the server flushes when a client disconnects). So the log grows by at most
`burst + 1` lines per kind per interval, however fast the client sends.

A function's throttle outlives its connections: a client that reconnects does not get
a fresh burst. A kind is a short label ("DMA_MAP failures (EINVAL)") built from a small set
(command names, errno names), never from raw client data; beyond `MAX_KINDS` distinct
kinds the rest share one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

LOG_BURST = 10          # lines per kind per interval
LOG_INTERVAL = 60.0     # seconds
MAX_KINDS = 64          # distinct kinds tracked per throttle
_OTHER = "messages of other kinds"


class _Window:
    __slots__ = ("start", "logged", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0


class LogThrottle:
    """At most `burst` lines per kind per `interval`, plus one count of the rest."""

    def __init__(self, logger: logging.Logger, name: str, *, burst: int = LOG_BURST,
                 interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.name = name
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def log(self, kind: Hashable, level: int, msg: str, *args: object,
            exc_info: bool = False) -> None:
        """Log `msg % args` at `level` unless `kind` has used up its burst."""
        now = self.clock()
        kind, window = self._window(kind, now)
        if now - window.start >= self.interval:
            self._summarise(kind, window)
            window.start, window.logged = now, 0
        if window.logged >= self.burst:
            window.suppressed += 1
            return
        window.logged += 1
        if window.logged == self.burst:
            msg += " (more like this suppressed for %ds)"
            args += (int(self.interval),)
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Say how many lines each kind suppressed since its last summary."""
        for kind, window in self._windows.items():
            self._summarise(kind, window)

    def suppressed(self) -> int:
        """Lines suppressed and not yet summarised, over every kind."""
        return sum(w.suppressed for w in self._windows.values())

    def _window(self, kind: Hashable, now: float) -> tuple[Hashable, _Window]:
        window = self._windows.get(kind)
        if window is None:
            if len(self._windows) >= MAX_KINDS - 1:
                kind = _OTHER
                window = self._windows.get(kind)
            if window is None:
                window = self._windows[kind] = _Window(now)
        return kind, window

    def _summarise(self, kind: Hashable, window: _Window) -> None:
        if window.suppressed:
            self.logger.warning("%s: %d more %s suppressed", self.name, window.suppressed,
                                kind)
            window.suppressed = 0

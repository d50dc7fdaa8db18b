"""The vfio-user server: one process, one event loop, one UNIX socket per PCI function.

Each function listens on its own socket (mode 0600; a vfio-user connection serves
exactly one device) and accepts one client at a time; a second client is refused while
the first is connected. All sockets, connections and deferred callbacks share one
`selectors` loop, so no client request ever waits behind another function's work.
SIGTERM and SIGINT stop the loop cleanly: connections are closed (dropping their DMA
maps and eventfds) and the socket files removed.

Other file descriptors can join the same loop with `watch(fileobj, events, callback)`
(the control socket does), so that everything the process serves shares one thread
and nothing needs a lock.

What clients may cost is bounded (limits.py). When accept() finds the fd table full
anyway (something else used the fds), the server closes a reserve fd, accepts the
client, refuses it, and reopens the reserve; if even that fails, it stops watching the
listening sockets for `ACCEPT_RETRY` seconds instead of spinning on them.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from ..pci.function import NUM_IRQS, PciFunction
from .dma import DmaMapBudget
from .limits import dma_map_limits, ensure_fds, fds_needed
from .logthrottle import LogThrottle
from .session import Session
from .wire import DmaLayout

log = logging.getLogger(__name__)

# Seconds the listening sockets are left alone after accept() failed for want of fds.
ACCEPT_RETRY = 1.0
# accept() errors that mean "no fd or memory for the new connection", not "go away".
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class FunctionPort:
    """A function's listening socket and its current session; the function's host."""

    def __init__(self, server: Server, function: PciFunction, path: Path) -> None:
        self.server = server
        self.function = function
        self.path = path
        self.session: Session | None = None
        # Outlives connections, so that reconnecting gets a client no fresh burst.
        self.throttle = LogThrottle(log, function.name)
        self.listener = _listen(path)
        function.attach(self)

    # FunctionHost
    def trigger(self, irq_index: int, vector: int) -> bool:
        session = self.session
        return session is not None and not session.closed and session.trigger(irq_index, vector)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.server.call_soon(callback)

    def watch_fd(self, fd: int, callback: Callable[[], None] | None) -> None:
        if callback is None:
            self.server.unwatch(fd)
        else:
            self.server.watch(fd, selectors.EVENT_READ, lambda events: callback())


class Server:
    """Serves PCI functions over vfio-user until stopped."""

    def __init__(self, *, dma_layout: DmaLayout = DmaLayout.SPEC,
                 max_dma_maps: int | None = None) -> None:
        """`max_dma_maps` overrides the per-client DMA map bound (limits.py), which is
        otherwise the VMA budget shared among the functions."""
        self.selector = selectors.DefaultSelector()
        self.ports: dict[Path, FunctionPort] = {}
        self.dma_layout = dma_layout
        self._max_dma_maps_override = max_dma_maps
        self.max_dma_maps = 0
        self.dma_budget = DmaMapBudget(0)
        self._soon: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._reserve_fd: int | None = _open_reserve()
        self._accept_paused = False
        self._running = False
        self._loop_thread: int | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    # -- setup ---------------------------------------------------------------------------
    def add_function(self, function: PciFunction, socket_path: str | os.PathLike) -> FunctionPort:
        path = Path(socket_path)
        port = FunctionPort(self, function, path)
        self.ports[path] = port
        self.selector.register(port.listener, selectors.EVENT_READ, ("accept", port))
        self._set_dma_map_limits()
        log.info("%s listening on %s", function.name, path)
        return port

    def watch(self, fileobj, events: int, callback: Callable[[int], None]) -> None:
        """Call `callback(ready_events)` from the loop whenever `fileobj` is ready for
        `events` (selectors.EVENT_READ and/or EVENT_WRITE, not 0); watching a watched
        file again changes its events. The callback runs on the loop, so it must not
        block; an exception it raises is logged and the loop goes on."""
        try:
            self.selector.modify(fileobj, events, ("watch", callback))
        except KeyError:
            self.selector.register(fileobj, events, ("watch", callback))

    def unwatch(self, fileobj) -> None:
        """Stop watching `fileobj` (no error if it is not watched)."""
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _set_dma_map_limits(self) -> None:
        per_client, total = dma_map_limits(len(self.ports))
        if self._max_dma_maps_override is not None:
            per_client = self._max_dma_maps_override
            total = max(total, per_client * len(self.ports))
        self.max_dma_maps = per_client
        self.dma_budget.limit = total

    def fds_needed(self) -> int:
        """The fds serving these functions may take (limits.fds_needed)."""
        return fds_needed(sum(p.function.irq_count(i) for i in range(NUM_IRQS))
                          for p in self.ports.values())

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` from the loop soon; safe from other threads too."""
        self._soon.append(callback)
        if threading.get_ident() != self._loop_thread:
            self._wake()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` from the loop after `delay` seconds (loop thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq),
                                      callback))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # -- running ---------------------------------------------------------------------------
    def serve_forever(self, *, handle_signals: bool = True) -> None:
        """Run the loop until `stop()` or SIGTERM/SIGINT; then close everything."""
        previous = {}
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        ensure_fds(self.fds_needed())
        self._running = True
        self._loop_thread = threading.get_ident()
        try:
            while self._running:
                self.run_once(None if not self._soon else 0)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        self.stop()

    def stop(self) -> None:
        self._running = False
        self._wake()

    def run_once(self, timeout: float | None = 0) -> None:
        """Handle whatever is ready (waiting at most `timeout`), then deferred calls."""
        if self._timers:
            until = max(self._timers[0][0] - time.monotonic(), 0)
            timeout = until if timeout is None else min(timeout, until)
        for key, events in self.selector.select(timeout):
            kind, port = key.data
            _DISPATCH[kind](self, key, events, port)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            self._soon.append(heapq.heappop(self._timers)[2])
        for _ in range(len(self._soon)):
            callback = self._soon.popleft()
            try:
                callback()
            except Exception:
                log.exception("deferred callback %r failed", callback)

    def _on_wake(self, key, events, port) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _on_watch(self, key, events, callback: Callable[[int], None]) -> None:
        try:
            callback(events)
        except Exception:
            log.exception("watcher of %r failed", key.fileobj)

    def _on_accept(self, key, events, port: FunctionPort) -> None:
        try:
            conn, _ = port.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in _OUT_OF_FDS:
                self._refuse_without_fds(port, e)
            else:  # ECONNABORTED and the like: that client is gone already
                log.info("%s: accept failed: %s", port.function.name, e)
            return
        if port.session is not None and not port.session.closed:
            # The previous client may have left without our having read its EOF yet.
            port.session.on_readable()
            if port.session.closed:
                self._forget(port, port.session.sock)
        if port.session is not None and not port.session.closed:
            port.throttle.log("refused second clients", logging.WARNING,
                              "%s: second client refused (one client per socket)",
                              port.function.name)
            conn.close()
            return
        conn.setblocking(False)
        session = Session(conn, port.function, call_soon=self.call_soon,
                          want_write=self._want_write, dma_layout=self.dma_layout,
                          max_dma_maps=self.max_dma_maps, dma_budget=self.dma_budget,
                          throttle=port.throttle)
        port.session = session
        self.selector.register(conn, selectors.EVENT_READ, ("session", port))
        log.info("%s: client connected", port.function.name)

    def _refuse_without_fds(self, port: FunctionPort, error: OSError) -> None:
        """accept() found no fd: refuse the waiting client with the reserve fd, or
        stop watching the listeners for a while (a readable listener we cannot accept
        from would spin the loop)."""
        refused = False
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            try:
                conn, _ = port.listener.accept()
                conn.close()
                refused = True
            except OSError:
                pass
            self._reserve_fd = _open_reserve()
        port.throttle.log("clients refused for want of fds", logging.WARNING,
                          "%s: out of file descriptors (%s): %s", port.function.name,
                          error.strerror, "client refused" if refused else
                          f"not accepting for {ACCEPT_RETRY:g}s")
        if not refused or self._reserve_fd is None:
            self._pause_accepting()

    def _pause_accepting(self) -> None:
        if self._accept_paused:
            return
        self._accept_paused = True
        for port in self.ports.values():
            try:
                self.selector.unregister(port.listener)
            except (KeyError, ValueError):
                pass
        self.call_later(ACCEPT_RETRY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self._reserve_fd is None:
            self._reserve_fd = _open_reserve()
        for port in self.ports.values():
            if port.listener.fileno() >= 0:
                self.selector.register(port.listener, selectors.EVENT_READ, ("accept", port))

    def _on_session(self, key, events, port: FunctionPort) -> None:
        session = port.session
        if session is None or session.sock is not key.fileobj:
            return
        if events & selectors.EVENT_WRITE:
            session.on_writable()
        if events & selectors.EVENT_READ and not session.closed:
            session.on_readable()
        if session.closed:
            self._forget(port, key.fileobj)

    def _want_write(self, session: Session, on: bool) -> None:
        """Watch for writability while output is queued; stop reading a backlogged one."""
        events = selectors.EVENT_READ if not session.backlogged else 0
        events |= selectors.EVENT_WRITE if on else 0
        try:
            key = self.selector.get_key(session.sock)
        except (KeyError, ValueError):
            return
        self.selector.modify(session.sock, events, key.data)

    def _forget(self, port: FunctionPort, sock) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        if port.session is not None and port.session.sock is sock:
            port.session = None

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        for port in self.ports.values():
            port.throttle.flush()
            if port.session is not None:
                sock = port.session.sock
                port.session.close()
                self._forget(port, sock)
            try:
                self.selector.unregister(port.listener)
            except (KeyError, ValueError):
                pass
            port.listener.close()
            try:
                port.path.unlink()
            except FileNotFoundError:
                pass
        self.ports.clear()
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None


_DISPATCH = {
    "wake": Server._on_wake,
    "watch": Server._on_watch,
    "accept": Server._on_accept,
    "session": Server._on_session,
}


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _listen(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0600, that appears only once it listens.

    Binding under a temporary name and renaming means a client polling for the path
    never finds a socket that is not yet accepting.
    """
    tmp = path.with_name(f".{path.name}~")
    if len(os.fsencode(tmp)) >= 108:
        raise ValueError(f"socket path too long for sun_path: {path}")
    for stale in (tmp, path):
        if stale.is_socket():
            stale.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(tmp))
    finally:
        os.umask(old_umask)
    sock.listen(1)
    sock.setblocking(False)
    os.rename(tmp, path)
    return sock


def serve(functions: Iterable[tuple[PciFunction, str | os.PathLike]], **kwargs) -> None:
    """Serve `(function, socket_path)` pairs until SIGTERM."""
    server = Server(**kwargs)
    for function, path in functions:
        server.add_function(function, path)
    server.serve_forever()

"""A function's own file descriptors in the server's loop (`FunctionHost.watch_fd`, what
virtio-net's tap uses, built on `Server.watch`): callbacks run while the fd is
readable, stop when unwatched, and a busy fd never starves a client's requests."""

from __future__ import annotations

import socket
import threading
import time

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.endpoints.testdev import IommuTestDev


def in_loop(s, fn) -> None:
    """Run `fn` on the server's loop thread and wait for it."""
    done = threading.Event()
    s.server.call_soon(lambda: (fn(), done.set()))
    assert done.wait(5)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_callback_runs_while_readable_and_stops_when_unwatched(served):
    s = served()
    r, w = socket.socketpair()
    r.setblocking(False)
    got = []

    def on_readable():
        got.append(r.recv(1))  # one byte per call: the loop must come back for the rest

    in_loop(s, lambda: s.functions["dev"].host.watch_fd(r.fileno(), on_readable))
    w.send(b"abc")
    assert wait_for(lambda: b"".join(got) == b"abc")
    in_loop(s, lambda: s.functions["dev"].host.watch_fd(r.fileno(), None))
    w.send(b"d")
    s.sync()
    time.sleep(0.1)
    assert b"".join(got) == b"abc"
    in_loop(s, lambda: s.functions["dev"].host.watch_fd(r.fileno(), None))  # twice is harmless
    r.close()
    w.close()


def test_a_busy_fd_does_not_starve_a_client(served):
    s = served({"dev": IommuTestDev()})
    r, w = socket.socketpair()
    r.setblocking(False)
    calls = []

    def slow_drain():
        calls.append(r.recv(1))  # a device that always has more to do

    w.send(bytes(100_000))
    in_loop(s, lambda: s.functions["dev"].host.watch_fd(r.fileno(), slow_drain))
    client = s.connect()
    client.negotiate()
    for _ in range(20):
        assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert len(calls) < 100_000
    in_loop(s, lambda: s.functions["dev"].host.watch_fd(r.fileno(), None))
    r.close()
    w.close()

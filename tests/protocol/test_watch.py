"""Server.watch: other file descriptors served from the same loop (the control socket's
hook), without disturbing the vfio-user functions."""

import selectors
import socket
import threading

from vfiouser_iommu.endpoints import testdev


def test_watched_socket_is_served_on_the_loop_thread(served):
    s = served()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    got, threads, done = [], [], threading.Event()

    def on_ready(events):
        threads.append(threading.get_ident())
        got.append(ours.recv(100))
        done.set()

    s.server.call_soon(lambda: s.server.watch(ours, selectors.EVENT_READ, on_ready))
    theirs.send(b"ping")
    assert done.wait(5)
    assert got == [b"ping"] and threads == [s.thread.ident]
    s.server.call_soon(lambda: s.server.unwatch(ours))
    s.sync()
    theirs.send(b"again")
    s.sync()
    assert got == [b"ping"]
    s.server.unwatch(ours)  # twice is fine
    ours.close()
    theirs.close()


def test_watch_again_changes_the_events(served):
    s = served()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    seen, writable = [], threading.Event()

    def on_ready(events):
        seen.append(events)
        if events & selectors.EVENT_WRITE:
            writable.set()
            s.server.watch(ours, selectors.EVENT_READ, on_ready)

    s.server.call_soon(lambda: s.server.watch(ours, selectors.EVENT_READ, on_ready))
    s.sync()
    assert not seen  # nothing to read yet
    s.server.call_soon(lambda: s.server.watch(
        ours, selectors.EVENT_READ | selectors.EVENT_WRITE, on_ready))
    assert writable.wait(5)
    s.sync()
    assert seen == [selectors.EVENT_WRITE]  # and not again: back to read only
    s.server.call_soon(lambda: s.server.unwatch(ours))
    s.sync()
    ours.close()
    theirs.close()


def test_a_failing_watcher_is_logged_and_the_functions_keep_serving(served, caplog):
    s = served()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    calls = []

    def broken(events):
        calls.append(ours.recv(100))
        raise RuntimeError("watcher bug")

    s.server.call_soon(lambda: s.server.watch(ours, selectors.EVENT_READ, broken))
    s.sync()
    theirs.send(b"x")
    client = s.connect()
    client.negotiate()
    assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert calls == [b"x"]
    assert "watcher of" in caplog.text and "watcher bug" in caplog.text
    client.close()
    s.server.call_soon(lambda: s.server.unwatch(ours))
    s.sync()
    ours.close()
    theirs.close()

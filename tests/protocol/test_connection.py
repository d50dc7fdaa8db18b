"""Connections: two functions at once, reconnect, one client per socket, socket mode,
and SIGTERM shutting the real `serve` command down cleanly."""

import os
import signal
import stat
import subprocess
import sys
import time

from served import RAM_BASE, open_fds

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.endpoints.testdev import IommuTestDev


def test_two_functions_served_at_once(served, ram):
    s = served({"a": IommuTestDev(), "b": IommuTestDev()})
    a, b = s.connect("a"), s.connect("b")
    a.negotiate()
    b.negotiate()
    a.writel(0, testdev.DMA_LEN, 1)
    b.writel(0, testdev.DMA_LEN, 2)
    assert (a.readl(0, testdev.DMA_LEN), b.readl(0, testdev.DMA_LEN)) == (1, 2)
    # A client that breaks its connection does not disturb the other function.
    b.send_raw(b"\0" * 8)
    b.close()
    assert a.readl(0, testdev.DMA_LEN) == 1


def test_client_waiting_mid_message_does_not_block_the_other(served):
    s = served({"a": IommuTestDev(), "b": IommuTestDev()})
    a, b = s.connect("a"), s.connect("b")
    a.negotiate()
    b.negotiate()
    a.send_raw(b"\x01\x00\x09\x00")  # a header's first bytes, then nothing
    assert b.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE


def test_reconnect_keeps_device_state_and_drops_mappings(served, ram):
    s = served()
    function = s.functions["dev"]
    fd, _ = ram
    before = open_fds()
    for round_ in range(3):
        client = s.connect()
        client.negotiate()
        client.dma_map(RAM_BASE, 0x1000, fd)
        client.set_irqs(2, 0, 1, 0x24, fds=[fd_ := os.eventfd(0)])
        os.close(fd_)
        client.writel(0, testdev.DMA_LEN, round_ + 1)
        client.close()
        s.sync()
        s.sync()
        assert not function.memory.regions
        assert open_fds() <= before
    client = s.connect()
    client.negotiate()
    assert client.readl(0, testdev.DMA_LEN) == 3
    client.close()


def test_second_client_is_refused_while_the_first_is_connected(served):
    s = served()
    first = s.connect()
    first.negotiate()
    second = s.connect()
    second.sock.settimeout(2)
    assert second.sock.recv(1) == b""
    assert first.device_info()[1] == 9


def test_sockets_are_private(served):
    s = served()
    mode = os.stat(s.paths["dev"]).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_sigterm_stops_serve_and_removes_the_sockets(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfiouser_iommu", "serve", "--socket-dir", str(tmp_path),
         "--endpoint", "iommu-testdev@03.0", "--endpoint", "iommu-testdev@04.0,vectors=8"],
        stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].strip().endswith("03.0.sock") and lines[1].strip().endswith("04.0.sock")
        from vfiouser_iommu.vfio_user.client import Client

        with Client(tmp_path / "04.0.sock") as client:
            client.negotiate()
            assert client.irq_info(2)[1] == 8
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(tmp_path.glob("*.sock"))


def test_client_that_does_not_read_its_replies_blocks_nobody(served):
    """Replies queue up in the server (never a blocking send) up to a bound, after which
    it stops reading that client's requests; the other function is served meanwhile,
    and the slow client gets every reply, in order, once it reads."""
    import threading

    from vfiouser_iommu.vfio_user import wire
    from vfiouser_iommu.vfio_user.session import OUT_BACKLOG

    s = served({"a": IommuTestDev(), "b": IommuTestDev()})
    slow, other = s.connect("a", timeout=30), s.connect("b")
    slow.negotiate()
    other.negotiate()
    request = wire.REGION_ACCESS.pack(0, 0, 0x1000)
    n = 4 * OUT_BACKLOG // 0x1000  # far more replies than the bound and the socket hold

    def send_all():
        for i in range(n):
            slow.send(wire.Command.REGION_READ, request, msg_id=i & 0xFFFF)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    session = s.server.ports[s.paths["a"]].session
    deadline = time.monotonic() + 10
    while not session.backlogged and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.backlogged
    assert other.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    for i in range(n):
        reply = slow.wait_reply(i & 0xFFFF)
        assert len(reply.payload) == 16 + 0x1000
    sender.join(10)

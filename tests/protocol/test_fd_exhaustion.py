"""File descriptors: no client can exhaust the server's (issue 14 item 1).

Each DMA_MAP kept one fd open (Python's mmap keeps a dup). With `ulimit -n 1024` about
1010 maps filled the table, and the next connection to another function made
`accept()` raise EMFILE out of the loop: traceback, exit 1, every socket gone. These
tests run the real `serve` (or a server) in a child process with a lowered
RLIMIT_NOFILE.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from vfiouser_iommu.lab.stack import start_server_process
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.client import Client
from vfiouser_iommu.vfio_user.wire import Command

NOFILE = 1024
MAPS = 1100  # the reproducer: more maps than fds
PAGE = 0x1000
RW = wire.DMA_MAP_READ | wire.DMA_MAP_WRITE


def _limit_fds():
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _map_own_memfd(client: Client, addr: int) -> int:
    fd = os.memfd_create("dma")
    try:
        os.ftruncate(fd, PAGE)
        payload = wire.DMA_MAP.pack(wire.DMA_MAP.size, RW, 0, addr, PAGE)
        return client.errno_of(Command.DMA_MAP, payload, fds=[fd])
    finally:
        os.close(fd)


@pytest.fixture
def limited_serve(tmp_path, monkeypatch):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    sockets = tmp_path / "sockets"
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen",
                        lambda *a, **k: real_popen(*a, preexec_fn=_limit_fds, **k))
    proc = start_server_process(
        sockets, ["iommu-testdev@02.0", f"virtio-blk@03.0,disk={disk}", "virtio-rng@04.0"],
        iommu="01.0", stderr=subprocess.PIPE)
    monkeypatch.undo()
    yield proc, sockets
    if proc.poll() is None:
        proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert b"Traceback" not in err, err.decode(errors="replace")[-3000:]


def test_more_maps_than_fds_neither_kills_nor_starves_the_server(limited_serve):
    proc, sockets = limited_serve
    iommu = Client(sockets / "01.0.sock", timeout=20)
    advertised = iommu.negotiate()["capabilities"]["max_dma_maps"]
    results = [_map_own_memfd(iommu, 0x8000_0000 + i * 0x10000) for i in range(MAPS)]
    held = min(MAPS, advertised)
    # Every map up to what the server advertised is held, the rest is ENOSPC.
    assert results[:held] == [0] * held
    assert set(results[held:]) <= {errno.ENOSPC}
    others = [Client(sockets / f"0{n}.0.sock", timeout=20) for n in (2, 3, 4)]
    for client in others:
        client.negotiate()
        assert client.device_info()[1] == 9
    assert iommu.device_info()[1] == 9
    assert proc.poll() is None
    for client in [iommu, *others]:
        client.close()


_EXHAUST = textwrap.dedent("""
    import errno, os, resource, socket, sys, threading, time
    from vfiouser_iommu.endpoints.testdev import IommuTestDev
    from vfiouser_iommu.vfio_user import Server
    from vfiouser_iommu.vfio_user.client import Client

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    server = Server()
    path = sys.argv[1]
    server.add_function(IommuTestDev(), path)
    turns = [0]
    run_once = server.run_once
    def counted(timeout=0):
        turns[0] += 1
        run_once(timeout)
    server.run_once = counted
    thread = threading.Thread(target=server.serve_forever,
                              kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE
    # Leave the client its own socket, and nothing for the server to accept with.
    os.close(hog.pop())
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.settimeout(10)
    refused = client.recv(1) == b""          # the server closes what it cannot serve
    before = turns[0]
    time.sleep(1)
    spun = turns[0] - before
    for fd in hog[:64]:
        os.close(fd)
    time.sleep(1.5)                           # the server retries accepting
    with Client(path) as c:
        c.negotiate()
        served = c.device_info()[1] == 9
    server.stop()
    thread.join(5)
    print(refused, spun, served, thread.is_alive())
""")


def test_accept_without_fds_refuses_the_client_and_does_not_spin(tmp_path):
    out = subprocess.run([sys.executable, "-c", _EXHAUST, str(tmp_path / "dev.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    refused, spun, served, alive = out.stdout.split()
    assert refused == "True"
    assert int(spun) < 100, f"{spun} loop turns in a second with nothing to do"
    assert served == "True" and alive == "False"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]

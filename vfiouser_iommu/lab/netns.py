"""Test networks: a private network namespace holding a tap, made and removed with pyroute2.

`TapNetwork` makes a network namespace named `vfu-net-<pid>-<n>` (under /run/netns, as
`ip netns add` does), a persistent tap inside it with an IPv4 address, link up. A
virtio-net endpoint attaches to that tap (`endpoint_spec`); QEMU's own virtio-net can
get the tap as an open file (`open_tap_fd`). Addresses live only in that namespace,
which has no route anywhere else: nothing a test sends can leave it.

Removing the namespace destroys the tap with it (once no process holds the tap open).
The name carries the creating process's PID so that `remove_leftovers` can tell a
namespace left behind by a crashed run (its PID is gone) from one a concurrent run is
using; test fixtures call it before making their own.

Entering the namespace (to configure it, or to open sockets there) is done by the
calling thread for the duration of a `with network_namespace(name)` block; sockets
opened inside keep working after the block.

Also here, for tests and benchmarks: `TcpPeer` (a TCP sink or source in the namespace)
and `UdpCounter` (counts datagrams arriving there), served from threads;
`in_namespace_argv` (run a program inside a namespace, as `ip netns exec` does) and
`boot_reference_net` (QEMU's own riscv-iommu-pci + virtio-net-pci on the tap).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vfiouser_iommu.endpoints.virtio.tap import network_namespace, open_tap

PREFIX = "vfu-net-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-\d+$")
_counter = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def our_namespaces() -> list[str]:
    """Every namespace named by this module, from any run."""
    from pyroute2 import netns

    return sorted(n for n in netns.listnetns() if _NAME.match(n))


def remove_leftovers() -> list[str]:
    """Remove namespaces of ours whose creating process is gone; their names."""
    from pyroute2 import netns

    removed = []
    for name in our_namespaces():
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                netns.remove(name)
            except OSError:
                continue
            removed.append(name)
    return removed


@dataclass
class TapNetwork:
    """A namespace with one tap: `address`/`prefixlen` on the tap, `guest_address` for
    the guest on the other end of the wire."""

    tap: str = "tap0"
    address: str = "10.0.2.2"
    guest_address: str = "10.0.2.15"
    prefixlen: int = 24
    mtu: int = 1500
    netns: str = ""

    def __post_init__(self) -> None:
        self.netns = self.netns or f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self._created = False

    def create(self) -> TapNetwork:
        from pyroute2 import IPRoute, netns

        netns.create(self.netns)
        self._created = True
        try:
            with network_namespace(self.netns), IPRoute() as ipr:
                # The netlink socket and the tun ioctl both act in this thread's
                # namespace, so the tap is born inside it and never appears outside.
                ipr.link("add", ifname=self.tap, kind="tuntap", mode="tap")
                index = ipr.link_lookup(ifname=self.tap)[0]
                ipr.link("set", index=index, mtu=self.mtu)
                ipr.addr("add", index=index, address=self.address, prefixlen=self.prefixlen)
                ipr.link("set", index=index, state="up")
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove the namespace (and with it the tap); safe to call twice."""
        from pyroute2 import netns

        if self._created and self.netns in netns.listnetns():
            netns.remove(self.netns)
        self._created = False

    @property
    def exists(self) -> bool:
        from pyroute2 import netns

        return self.netns in netns.listnetns()

    def tap_exists(self) -> bool:
        from pyroute2 import IPRoute

        if not self.exists:
            return False
        with network_namespace(self.netns), IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=self.tap))

    def __enter__(self) -> TapNetwork:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()

    def endpoint_spec(self, addr: str, **options: str) -> str:
        """`virtio-net@addr,tap=...,netns=...` for serve / lab boot --endpoint."""
        extra = "".join(f",{k}={v}" for k, v in options.items())
        return f"virtio-net@{addr},tap={self.tap},netns={self.netns}{extra}"

    def open_tap_fd(self) -> int:
        """The tap as an open file (for QEMU's `-netdev tap,fd=N`)."""
        fd, _ = open_tap(self.tap, self.netns)
        return fd

    def inside(self):
        """`with net.inside(): socket.socket(...)` makes sockets in the namespace."""
        return network_namespace(self.netns)


# What `ip netns exec NAME ARGV...` does for our purposes, without needing iproute2:
# enter the namespace (never creating it), then become ARGV.
_ENTER_AND_EXEC = ("import os, sys\n"
                   "from pyroute2 import netns\n"
                   "netns.setns(sys.argv[1] if '/' in sys.argv[1] else "
                   "os.path.join(netns.NETNS_RUN_DIR, sys.argv[1]), flags=0)\n"
                   "os.execv(sys.argv[2], sys.argv[2:])\n")


def in_namespace_argv(netns: str, argv: list[str]) -> list[str]:
    """An argv that runs `argv` inside network namespace `netns`."""
    return [sys.executable, "-c", _ENTER_AND_EXEC, netns, *map(str, argv)]


def boot_reference_net(lab, net: TapNetwork, script: str, timeout: float,
                       echo: TextIO | None = sys.stdout, files: dict[str, bytes] | None = None,
                       net_options: str = ""):
    """Boot a guest on QEMU's riscv-iommu-pci with QEMU's own virtio-net-pci (02.0) on
    `net`'s tap (`net_options`: more device properties); QEMU runs inside the
    namespace to open the tap by name."""
    from vfiouser_iommu.lab.boot import (
        guest_initramfs,
        kernel_args,
        machine_args,
        reference_net_args,
        run_guest,
    )

    with tempfile.TemporaryDirectory(prefix="vfiouser-iommu-") as tmp:
        initrd = guest_initramfs(lab, script, files=files).write(Path(tmp) / "initrd.gz")
        argv = (machine_args(lab) + kernel_args(lab, initrd)
                + reference_net_args(net.tap, net_options=net_options))
        return run_guest(in_namespace_argv(net.netns, argv), timeout, echo)


class TcpPeer:
    """One TCP connection's far end, inside a namespace, served from a thread.

    `sink`: read `size` bytes, answer their MD5 (hex, newline) and close. `source`:
    send `size` bytes of a seeded pseudo-random pattern and close. After `join`,
    `md5`, `nbytes` and `seconds` (the sink: first byte to last; the source: first
    byte to the peer's close) describe what went through;
    `error` says what went wrong, if anything. Nothing here blocks forever: the socket
    has a timeout.
    """

    def __init__(self, net: TapNetwork, port: int, mode: str, size: int,
                 timeout: float = 300.0) -> None:
        import socket
        import threading

        if mode not in ("sink", "source"):
            raise ValueError(f"mode {mode!r}: sink or source")
        self.mode, self.size = mode, size
        self.md5 = ""
        self.nbytes = 0
        self.seconds = 0.0
        self.error = ""
        with net.inside():
            self._listener = socket.create_server((net.address, port))
        self._listener.settimeout(timeout)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import hashlib
        import random
        import socket
        import time

        digest = hashlib.md5()
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(self._listener.gettimeout())
                started = None
                if self.mode == "sink":
                    while self.nbytes < self.size:
                        chunk = conn.recv(1 << 16)
                        if not chunk:
                            break
                        started = started or time.monotonic()
                        digest.update(chunk)
                        self.nbytes += len(chunk)
                    self.seconds = time.monotonic() - (started or time.monotonic())
                    conn.sendall(digest.hexdigest().encode() + b"\n")
                else:
                    rng = random.Random(self.size)
                    started = time.monotonic()
                    while self.nbytes < self.size:
                        chunk = rng.randbytes(min(1 << 16, self.size - self.nbytes))
                        conn.sendall(chunk)
                        digest.update(chunk)
                        self.nbytes += len(chunk)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # the peer closes once it has read everything
                    self.seconds = time.monotonic() - started
                self.md5 = digest.hexdigest()
        except OSError as e:
            self.error = f"{self.mode}: {e}"
        finally:
            self._listener.close()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def mbytes_per_second(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0


class UdpCounter:
    """Counts the datagrams that reach `port` inside a namespace, from a thread, until
    `idle` seconds pass without one (after the first) or `stop()`. `count`, `seconds`
    (first datagram to last) and `rate` describe what arrived."""

    def __init__(self, net: TapNetwork, port: int, idle: float = 2.0,
                 timeout: float = 300.0) -> None:
        import socket
        import threading

        self.count = 0
        self.seconds = 0.0
        self._idle, self._timeout = idle, timeout
        self._stopped = threading.Event()
        with net.inside():
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._sock.bind((net.address, port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import time

        first = last = 0.0
        deadline = time.monotonic() + self._timeout
        self._sock.settimeout(0.5)
        try:
            while not self._stopped.is_set() and time.monotonic() < deadline:
                try:
                    self._sock.recv(2048)
                except TimeoutError:
                    if self.count and time.monotonic() - last > self._idle:
                        break
                    continue
                last = time.monotonic()
                first = first or last
                self.count += 1
        finally:
            self.seconds = last - first
            self._sock.close()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

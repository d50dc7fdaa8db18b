"""Opening an existing Linux tap device, possibly inside another network namespace.

The tap must already exist (made by `ip tuntap add` or pyroute2, with its addresses and
link state set by whoever made it): attaching to it with TUNSETIFF would otherwise
create a fresh, unconfigured one, which is never what a user meant. The file
descriptor is opened with IFF_VNET_HDR and a 12-byte header (the `virtio_net_hdr` of
VIRTIO_F_VERSION_1) and no offloads (TUNSETOFFLOAD 0), so the tap never hands us a
frame with a partial checksum or a GSO frame until `set_offload` says the reader
takes them (linux/if_tun.h, drivers/net/tun.c).

**Network namespaces.** A tap is found by name in the caller's network namespace. With
`netns`, the calling thread enters that namespace (setns(2), through pyroute2's netns
module), opens the tap, reads its MTU, and returns to its own namespace. The open file
stays bound to the tap in the other namespace, so the server itself, its sockets and
everything else it opens remain in the namespace it started in. `netns` is a name
under /run/netns (as `ip netns` makes) or a path such as /proc/PID/ns/net. Entering a
namespace needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
SIOCGIFMTU = 0x8921
# TUNSETOFFLOAD flags: which offloaded frames the tap may hand us.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_SIZE = 12
IFNAMSIZ = 16


class TapError(ValueError):
    """The tap cannot be opened as asked (a user's configuration error)."""


@contextlib.contextmanager
def network_namespace(netns: str | None) -> Iterator[None]:
    """Run the body in network namespace `netns` (this thread only), then come back."""
    if not netns:
        yield
        return
    from pyroute2 import netns as pyroute2_netns

    path = netns if "/" in netns else os.path.join(pyroute2_netns.NETNS_RUN_DIR, netns)
    if not os.path.exists(path):
        raise TapError(f"no network namespace {netns!r} ({path} does not exist)")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            # flags=0: never create the namespace (pyroute2's default would).
            pyroute2_netns.setns(path, flags=0)
        except OSError as e:
            raise TapError(f"cannot enter network namespace {netns!r}: "
                           f"{os.strerror(e.errno or errno.EPERM)}") from None
        try:
            yield
        finally:
            pyroute2_netns.setns(home, flags=0)
    finally:
        os.close(home)


def open_tap(name: str, netns: str | None = None) -> tuple[int, int]:
    """Attach to the existing tap `name` (in `netns`); (non-blocking fd, MTU)."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise TapError(f"bad interface name {name!r}")
    where = f" in network namespace {netns!r}" if netns else ""
    with network_namespace(netns):
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise TapError(f"no interface {name!r}{where}; create the tap first "
                           f"(e.g. `ip tuntap add dev {name} mode tap`)") from None
        fd = _attach(name, where)
        try:
            mtu = _mtu(name)
        except OSError as e:
            os.close(fd)
            raise TapError(f"cannot read the MTU of {name!r}{where}: {e.strerror}") from None
    return fd, mtu


def set_offload(fd: int, flags: int) -> None:
    """Tell the tap which offloads the reader accepts (TUN_F_*): it then hands over
    frames with partial checksums or GSO frames of those kinds, and no others."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def _attach(name: str, where: str) -> int:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(f"cannot open {TUN_DEVICE}: {e.strerror}") from None
    try:
        ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        set_offload(fd, 0)
    except OSError as e:
        os.close(fd)
        why = {errno.EINVAL: "it is not a tap device (or is a multiqueue one)",
               errno.EBUSY: "another process has it open",
               errno.EPERM: "permission denied"}.get(e.errno, e.strerror)
        raise TapError(f"cannot attach to {name!r}{where}: {why}") from None
    return fd


def _mtu(name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s.fileno(), SIOCGIFMTU, struct.pack("16si12x", name.encode(), 0))
    return struct.unpack_from("i", ifr, 16)[0]

"""virtio-net (virtio 1.2 section 5.1) on a packet file descriptor: a Linux tap.

Two queues, receiveq1 (0) and transmitq1 (1); no control queue, one queue pair. The
backend is a non-blocking file descriptor that carries one frame per read or write,
each preceded by the 12-byte `virtio_net_hdr` (a tap opened with IFF_VNET_HDR and a
header size of 12, see `tap.py`; a datagram socket in unit tests).

- **Transmit.** The transport hands us each chain the driver makes available; its
  readable bytes are header + frame. Header and frame go to the backend with one
  `writev`, and the chain is returned at once with 0 bytes written.
- **Receive.** Chains of the receive queue are *kept* (`handle` returns None) in the
  order the driver made them available. While we keep at least one, the backend is
  watched from the server's event loop; each readable event moves at most `RX_BUDGET`
  frames into kept chains and completes them as one batch (one interrupt at most).
  With no chain kept the backend is not watched, so an idle or full receive queue
  costs nothing: frames wait in the tap's own queue (which drops when it is full, as
  a real wire would) until the driver adds buffers and notifies us.

**Offloads** (when the backend can take them: `set_offload` is given, and
`offload=on`). The tap's kernel driver does the work, so we only pass headers through,
and check that each says nothing the driver did not negotiate:
- transmit: CSUM (NEEDS_CSUM frames), HOST_TSO4/6 and HOST_ECN (GSO frames up to 64
  KiB): the driver's header goes to the tap with only the flags it may set (num_buffers
  cleared), and the kernel validates csum_start/offset and the GSO fields (a frame it
  refuses is dropped);
- receive: GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN are told to the tap (TUNSETOFFLOAD)
  when the driver accepts them, so the tap hands over only frames of those kinds, and
  MRG_RXBUF lets a frame (up to 64 KiB with TSO) span several receive chains
  (num_buffers says how many). Without MRG_RXBUF a frame must fit one chain.

Every byte of both directions moves through the function's `DmaView`: with our IOMMU
in front, each ring and buffer access is translated for the endpoint's requester ID.

Choices where the spec leaves one (docs/virtio.md):
- Features offered: MAC, MTU (the tap's), and the offloads above. Not offered: UFO and
  USO, STATUS (the link is always up), CTRL_VQ and everything needing it.
- FEATURES_OK is refused for combinations section 5.1.3.1 forbids (TSO without CSUM...).
- A received frame too large for the chain at the head of the queue (no MRG_RXBUF), or
  for the whole queue (MRG_RXBUF), is dropped (counted). With MRG_RXBUF, a frame that
  needs more chains than we keep waits for the driver to add some.
- Transmit: flag bits other than NEEDS_CSUM (with CSUM negotiated) are ignored and
  cleared (section 5.1.6.2.2); a GSO type not negotiated drops the frame. Receive: a
  tap header with a GSO type or NEEDS_CSUM the driver did not negotiate drops the
  frame; the tap's DATA_VALID is cleared when GUEST_CSUM is not negotiated.
- A receive buffer that faults (DmaError) completes the frame's first chain with
  length 0: Linux counts a length error and drops it. A transmit buffer that faults
  drops the frame. Rings that fault are the transport's business (DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable

from ...memory import DmaError, DmaView
from .device import VirtioDevice
from .layouts import VIRTIO_NET_HDR, virtio_net_config
from .virtqueue import DescriptorChain, pieces

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
CLASS_NETWORK_ETHERNET = 0x020000  # what QEMU's virtio-net-pci reports

# Feature bits (section 5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15

OFFLOAD_FEATURES = [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO4,
                    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_MRG_RXBUF]

# Section 5.1.3.1: a feature -> the features of which it needs at least one.
REQUIRES = {
    VIRTIO_NET_F_GUEST_TSO4: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_TSO6: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_ECN: (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
    VIRTIO_NET_F_GUEST_UFO: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_HOST_TSO4: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_TSO6: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_ECN: (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
    VIRTIO_NET_F_HOST_UFO: (VIRTIO_NET_F_CSUM,),
}

# virtio_net_hdr fields (section 5.1.6)
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80

# TUNSETOFFLOAD flags (linux/if_tun.h), for the driver's receive features
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_OFFLOADS = ((VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM), (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6), (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN))

RX_QUEUE, TX_QUEUE = 0, 1
QUEUE_SIZE = 256
HDR_SIZE = VIRTIO_NET_HDR.size
ETH_HEADER = 14 + 4             # destination, source, ethertype, and one VLAN tag
MAX_MTU = 65535 - ETH_HEADER
MAX_GSO_FRAME = 65536 + ETH_HEADER
RX_BUDGET = 64                  # frames moved per readable event
LOG_INTERVAL = 10.0             # seconds between two log lines about dropped frames


class VirtioNet(VirtioDevice):
    """An Ethernet device whose wire is the packet file descriptor `fd`.

    `set_offload(tun_flags)` tells the backend which offloaded frames it may hand over
    (a tap's TUNSETOFFLOAD); without it (or with `offload=False`) no offload is offered.
    """

    device_id = VIRTIO_ID_NET
    class_code = CLASS_NETWORK_ETHERNET
    num_queues = 2
    queue_max_size = QUEUE_SIZE
    name = "virtio-net"

    def __init__(self, fd: int, mac: bytes, mtu: int = 1500, *, label: str = "",
                 set_offload: Callable[[int], None] | None = None,
                 offload: bool = True) -> None:
        super().__init__()
        if len(mac) != 6:
            raise ValueError(f"MAC address of {len(mac)} bytes")
        if not 68 <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} outside 68..{MAX_MTU}")
        os.set_blocking(fd, False)
        self.fd = fd
        self.mac = mac
        self.mtu = mtu
        self.label = label or self.name
        self._set_offload = set_offload if offload else None
        self.rx_chains: deque[DescriptorChain] = deque()
        self.stats: Counter[str] = Counter()
        self._watching = False
        self._pending = 0               # bytes of a read frame waiting for buffers
        self._scheduled = False
        self._room = HDR_SIZE + (MAX_GSO_FRAME if self._set_offload else mtu + ETH_HEADER)
        self._rx_buffer = bytearray(self._room + 1)  # one more: to see oversize frames
        self._rx_view = memoryview(self._rx_buffer)
        self._last_log = 0.0
        self._config = virtio_net_config.build(
            dict(mac=mac, status=0, max_virtqueue_pairs=1, mtu=mtu))
        self._negotiated_view()

    def close(self) -> None:
        self._watch(False)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- features (section 5.1.3) ------------------------------------------------------------
    def device_features(self) -> int:
        offered = [VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU]
        if self._set_offload is not None:
            offered += OFFLOAD_FEATURES
        return sum(1 << bit for bit in offered)

    def features_ok(self, features: int) -> bool:
        for feature, needs in REQUIRES.items():
            if features >> feature & 1 and not any(features >> n & 1 for n in needs):
                log.info("%s: features %#x refused: bit %d without any of %s", self.label,
                         features, feature, needs)
                return False
        return True

    def activate(self, features: int) -> None:
        super().activate(features)
        self._negotiated_view()
        if self._set_offload is not None:
            self._tell_backend(sum(flag for bit, flag in TUN_OFFLOADS if self._has(bit)))

    def reset(self) -> None:
        if self.stats:
            log.info("%s: reset; since the last one: %s", self.label, self.summary())
            self.stats.clear()
        had_offloads = self.driver_features and self._set_offload is not None
        super().reset()
        self._negotiated_view()
        self.rx_chains.clear()
        self._pending = 0
        self._watch(False)
        if had_offloads:
            self._tell_backend(0)

    def _has(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def _negotiated_view(self) -> None:
        """What the negotiated features allow, precomputed for the per-frame checks."""
        self.mergeable = self._has(VIRTIO_NET_F_MRG_RXBUF)
        self._rx_flags = (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID
                          if self._has(VIRTIO_NET_F_GUEST_CSUM) else 0)
        self._tx_flags = HDR_F_NEEDS_CSUM if self._has(VIRTIO_NET_F_CSUM) else 0
        self._rx_gso = _gso_types(self._has(VIRTIO_NET_F_GUEST_TSO4),
                                  self._has(VIRTIO_NET_F_GUEST_TSO6),
                                  self._has(VIRTIO_NET_F_GUEST_ECN))
        self._tx_gso = _gso_types(self._has(VIRTIO_NET_F_HOST_TSO4),
                                  self._has(VIRTIO_NET_F_HOST_TSO6),
                                  self._has(VIRTIO_NET_F_HOST_ECN))
        tso = len(self._tx_gso) > 1
        self._tx_room = HDR_SIZE + (MAX_GSO_FRAME if tso else self.mtu + ETH_HEADER)

    def _tell_backend(self, tun_flags: int) -> None:
        try:
            self._set_offload(tun_flags)
        except OSError as e:
            log.warning("%s: TUNSETOFFLOAD %#x failed: %s", self.label, tun_flags, e)

    def config(self) -> bytes:
        return self._config

    def handle(self, queue: int, chain: DescriptorChain, dma: DmaView) -> int | None:
        if queue == RX_QUEUE:
            self.rx_chains.append(chain)
            if self._pending:
                self._schedule()     # a frame waits for buffers: try it again
            else:
                self._watch(True)
            return None
        self._transmit(chain, dma)
        return 0

    # -- transmit (section 5.1.6.2) ----------------------------------------------------------
    def _transmit(self, chain: DescriptorChain, dma: DmaView) -> None:
        length = chain.readable_length
        if length < HDR_SIZE + 14 or length > self._tx_room:
            self._drop("tx_malformed", f"transmit chain of {length} bytes")
            return
        try:
            data = b"".join(dma.read(a, n) for a, n in pieces(chain.readable, 0, length))
        except DmaError as e:
            self._drop("tx_dma_errors", f"transmit buffer: {e}")
            return
        gso_type = data[1]
        if gso_type not in self._tx_gso:
            self._drop("tx_malformed", f"gso_type {gso_type:#x} not negotiated")
            return
        # Only NEEDS_CSUM means anything on transmit, and only with CSUM; other bits are
        # ignored (section 5.1.6.2.2) and never reach the tap: DATA_VALID there would
        # tell the namespace's stack not to verify the frame's checksum.
        flags = bytes((data[0] & self._tx_flags,))
        try:
            # The driver's header with those flags, num_buffers (meaningless here) cleared.
            os.writev(self.fd, (flags, memoryview(data)[1:HDR_SIZE - 2], b"\0\0",
                                memoryview(data)[HDR_SIZE:]))
        except OSError as e:
            # EIO: the tap's link is down; EAGAIN: its queue is full; EINVAL: the kernel
            # refused the header's checksum or GSO fields. A wire drops.
            self._drop("tx_dropped", f"tap write: {errno.errorcode.get(e.errno, e.errno)}")
            return
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += length - HDR_SIZE

    # -- receive (section 5.1.6.3) -----------------------------------------------------------
    def _watch(self, on: bool) -> None:
        if on != self._watching and self.fd >= 0:
            self._watching = on
            self.context.watch(self.fd, self._receive if on else None)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.context.call_soon(self._receive)

    def _receive(self) -> None:
        """Fill kept chains with up to RX_BUDGET frames (a waiting one first)."""
        self._scheduled = False
        dma = self.context.dma
        used: list[tuple[int, int]] = []
        for _ in range(RX_BUDGET):
            if not self._pending:
                if not self.rx_chains or not self._read():
                    break
            count = self._chains_for(self._pending)
            if count is None:
                break                      # wait for the driver to add buffers
            if count:
                used += self._fill(count, dma)
            self._pending = 0
        if used and not self.context.complete(RX_QUEUE, used):
            self.rx_chains.clear()
            self._pending = 0
        self._watch(bool(self.rx_chains) and not self._pending)

    def _read(self) -> bool:
        """Read one frame into the buffer (`_pending` bytes); False if there is none."""
        try:
            n = os.readv(self.fd, (self._rx_buffer,))
        except BlockingIOError:
            return False
        except OSError as e:
            self._drop("rx_errors", f"tap read: {e}")
            return False
        if n < HDR_SIZE + 14 or n > self._room:
            self._drop("rx_malformed", f"frame of {n - HDR_SIZE} bytes from the tap")
            return True                    # dropped; _pending stays 0
        flags, gso_type = self._rx_buffer[0], self._rx_buffer[1]
        if gso_type not in self._rx_gso or flags & HDR_F_NEEDS_CSUM & ~self._rx_flags:
            self._drop("rx_malformed", f"tap header flags {flags:#x} gso_type {gso_type:#x}")
            return True
        self._rx_buffer[0] = flags & self._rx_flags  # DATA_VALID needs GUEST_CSUM
        self._pending = n
        return True

    def _chains_for(self, n: int) -> int | None:
        """How many kept chains frame of `n` bytes takes: 0 to drop it, None to wait."""
        if not n:
            return 0
        if not self.rx_chains:
            return None
        if not self.mergeable:
            if n <= self.rx_chains[0].writable_length:
                return 1
            self._drop("rx_too_big", f"frame of {n - HDR_SIZE} bytes, receive buffers of "
                       f"{self.rx_chains[0].writable_length - HDR_SIZE}")
            return 0
        room = 0
        for count, chain in enumerate(self.rx_chains, 1):
            room += chain.writable_length
            if room >= n:
                return count
        if len(self.rx_chains) >= self.context.queue_size(RX_QUEUE):
            self._drop("rx_too_big", f"frame of {n - HDR_SIZE} bytes, the whole receive "
                       f"queue holds {room - HDR_SIZE}")
            return 0
        return None

    def _fill(self, count: int, dma: DmaView) -> list[tuple[int, int]]:
        """Write the pending frame into the first `count` kept chains; their used
        elements. A fault returns the first chain empty and keeps the others."""
        n = self._pending
        self._rx_buffer[HDR_SIZE - 2:HDR_SIZE] = count.to_bytes(2, "little")  # num_buffers
        chains = [self.rx_chains.popleft() for _ in range(count)]
        view, done, used = self._rx_view, 0, []
        try:
            for chain in chains:
                take = min(chain.writable_length, n - done)
                for addr, length in pieces(chain.writable, 0, take):
                    dma.write(addr, view[done:done + length])
                    done += length
                used.append((chain.head, take))
        except DmaError as e:
            self._drop("rx_dma_errors", f"receive buffer: {e}")
            self.rx_chains.extendleft(reversed(chains[1:]))
            return [(chains[0].head, 0)]
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += n - HDR_SIZE
        return used

    def _drop(self, counter: str, why: str) -> None:
        """Count a dropped frame; log at most one line per LOG_INTERVAL per device."""
        self.stats[counter] += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            log.warning("%s: frame dropped (%s); totals: %s", self.label, why,
                        self.summary())

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.stats.items())) or "no traffic"


def _gso_types(tso4: bool, tso6: bool, ecn: bool) -> frozenset[int]:
    """The gso_type values a header may carry with these features (section 5.1.6)."""
    types = {GSO_NONE} | ({GSO_TCPV4} if tso4 else set()) | ({GSO_TCPV6} if tso6 else set())
    if ecn:
        types |= {t | GSO_ECN for t in types if t != GSO_NONE}
    return frozenset(types)

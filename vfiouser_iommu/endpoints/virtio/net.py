"""virtio-net (virtio 1.2 section 5.1) on a packet file descriptor: a Linux tap.

Two queues, receiveq1 (0) and transmitq1 (1); no control queue, one queue pair. The
backend is a non-blocking file descriptor that carries one frame per read or write,
each preceded by the 12-byte `virtio_net_hdr` (a tap opened with IFF_VNET_HDR and a
header size of 12, see `tap.py`; a datagram socket in unit tests).

- **Transmit.** The transport hands us each chain the driver makes available; its
  readable bytes are header + frame. The frame goes to the backend with a header that
  asks for nothing (no checksum, no segmentation: we offer neither), and the chain is
  returned at once with 0 bytes written.
- **Receive.** Chains of the receive queue are *kept* (`handle` returns None) in the
  order the driver made them available. While we keep at least one, the backend is
  watched from the server's event loop; each readable event moves at most `RX_BUDGET`
  frames into kept chains and completes them as one batch (one interrupt at most).
  With no chain kept the backend is not watched, so an idle or full receive queue
  costs nothing: frames wait in the tap's own queue (which drops when it is full, as
  a real wire would) until the driver adds buffers and notifies us.

Every byte of both directions moves through the function's `DmaView`: with our IOMMU
in front, each ring and buffer access is translated for the endpoint's requester ID.

Choices where the spec leaves one (docs/virtio.md):
- Features: MAC and MTU (the tap's MTU, so the driver's buffers fit every frame).
  Not offered: checksum and segmentation offloads (CSUM, GUEST_CSUM, *_TSO*, *_UFO),
  MRG_RXBUF (each frame fits one receive chain, since frames are at most MTU + 14 +
  4 bytes), STATUS (the link is always up), CTRL_VQ and everything needing it.
- A received frame larger than the chain at the head of the receive queue is
  dropped (counted); the chain stays for the next frame.
- A receive buffer that faults (DmaError) completes its chain with length 0: Linux
  counts it as a length error and drops it. A transmit buffer that faults drops the
  frame. Rings that fault are the transport's business (DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter, deque

from ...memory import DmaError, DmaView
from .device import VirtioDevice
from .layouts import VIRTIO_NET_HDR, virtio_net_config
from .virtqueue import DescriptorChain, pieces

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
CLASS_NETWORK_ETHERNET = 0x020000  # what QEMU's virtio-net-pci reports

VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5

RX_QUEUE, TX_QUEUE = 0, 1
QUEUE_SIZE = 256
HDR_SIZE = VIRTIO_NET_HDR.size
ETH_HEADER = 14 + 4             # destination, source, ethertype, and one VLAN tag
MAX_MTU = 65535 - ETH_HEADER
RX_BUDGET = 64                  # frames moved per readable event
ZERO_HDR = bytes(HDR_SIZE)
# A received frame's header: no flags, no GSO, num_buffers 1 (section 5.1.6.4).
RX_HDR = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)
LOG_INTERVAL = 10.0             # seconds between two log lines about dropped frames


class VirtioNet(VirtioDevice):
    """An Ethernet device whose wire is the packet file descriptor `fd`."""

    device_id = VIRTIO_ID_NET
    class_code = CLASS_NETWORK_ETHERNET
    num_queues = 2
    queue_max_size = QUEUE_SIZE
    name = "virtio-net"

    def __init__(self, fd: int, mac: bytes, mtu: int = 1500, *, label: str = "") -> None:
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
        self.rx_chains: deque[DescriptorChain] = deque()
        self.stats: Counter[str] = Counter()
        self._watching = False
        self._frame_room = HDR_SIZE + mtu + ETH_HEADER
        self._rx_buffer = bytearray(self._frame_room + 1)  # one more: to see oversize
        self._rx_view = memoryview(self._rx_buffer)
        self._last_log = 0.0
        self._config = virtio_net_config.build(
            dict(mac=mac, status=0, max_virtqueue_pairs=1, mtu=mtu))

    def close(self) -> None:
        self._watch(False)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def device_features(self) -> int:
        return 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MTU

    def config(self) -> bytes:
        return self._config

    def reset(self) -> None:
        if self.stats:
            log.info("%s: reset; since the last one: %s", self.label, self.summary())
            self.stats.clear()
        super().reset()
        self.rx_chains.clear()
        self._watch(False)

    def handle(self, queue: int, chain: DescriptorChain, dma: DmaView) -> int | None:
        if queue == RX_QUEUE:
            self.rx_chains.append(chain)
            self._watch(True)
            return None
        self._transmit(chain, dma)
        return 0

    # -- transmit (section 5.1.6.2) ----------------------------------------------------------
    def _transmit(self, chain: DescriptorChain, dma: DmaView) -> None:
        length = chain.readable_length
        if length < HDR_SIZE or length - HDR_SIZE > self._frame_room - HDR_SIZE:
            self._drop("tx_malformed", f"transmit chain of {length} bytes")
            return
        try:
            data = b"".join(dma.read(a, n) for a, n in pieces(chain.readable, HDR_SIZE,
                                                              length - HDR_SIZE))
        except DmaError as e:
            self._drop("tx_dma_errors", f"transmit buffer: {e}")
            return
        try:
            os.writev(self.fd, (ZERO_HDR, data))
        except OSError as e:
            # EIO: the tap's link is down; EAGAIN: its queue is full. A wire drops.
            self._drop("tx_dropped", f"tap write: {errno.errorcode.get(e.errno, e.errno)}")
            return
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += len(data)

    # -- receive (section 5.1.6.3) -----------------------------------------------------------
    def _watch(self, on: bool) -> None:
        if on != self._watching and self.fd >= 0:
            self._watching = on
            self.context.watch(self.fd, self._receive if on else None)

    def _receive(self) -> None:
        """The backend is readable: fill kept chains with up to RX_BUDGET frames."""
        dma = self.context.dma
        used: list[tuple[int, int]] = []
        for _ in range(RX_BUDGET):
            if not self.rx_chains:
                break
            try:
                n = os.readv(self.fd, (self._rx_buffer,))
            except BlockingIOError:
                break
            except OSError as e:
                self._drop("rx_errors", f"tap read: {e}")
                break
            written = self._fill(self.rx_chains[0], n, dma)
            if written is not None:
                used.append((self.rx_chains.popleft().head, written))
        if used and not self.context.complete(RX_QUEUE, used):
            self.rx_chains.clear()
        if not self.rx_chains:
            self._watch(False)

    def _fill(self, chain: DescriptorChain, n: int, dma: DmaView) -> int | None:
        """Write the frame of `n` bytes (header included) read into the buffer to
        `chain`; the used length, or None if the frame was dropped and the chain kept."""
        if n < HDR_SIZE + 14 or n > self._frame_room:
            self._drop("rx_malformed", f"frame of {n - HDR_SIZE} bytes from the tap")
            return None
        if n > chain.writable_length:
            self._drop("rx_too_big", f"frame of {n - HDR_SIZE} bytes, receive buffers of "
                       f"{chain.writable_length - HDR_SIZE}")
            return None
        # The tap's header may say DATA_VALID or carry GSO fields: we negotiated
        # neither, so the driver gets a plain one (section 5.1.6.4.1).
        self._rx_buffer[:HDR_SIZE] = RX_HDR
        view, done = self._rx_view, 0
        try:
            for addr, length in pieces(chain.writable, 0, n):
                dma.write(addr, view[done:done + length])
                done += length
        except DmaError as e:
            self._drop("rx_dma_errors", f"receive buffer: {e}")
            return 0
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += n - HDR_SIZE
        return n

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

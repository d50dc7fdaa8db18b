"""A PCI function as a device model sees it, independent of any transport.

In the spirit of libvfio-user's device API: a function declares its configuration
identity and capabilities, its memory BARs (with read/write callbacks), how many
interrupts of each kind it has, and hooks for reset and DMA map changes. The vfio-user
server (or a unit test) serves it through the `FunctionHost` it attaches.

Region and IRQ indices are VFIO's (linux/vfio.h): regions 0-5 BARs, 6 ROM, 7 config,
8 VGA; IRQs 0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ. The MSI-X table and PBA (PCI 3.0
section 6.8.2) are served here, not by the endpoint: QEMU emulates the table itself,
but forwards PBA reads, and a test client reaches both.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Protocol

from ..memory import DmaView, GuestMemory
from .config import (
    MSIX_ENTRY_SIZE,
    BarSpec,
    ConfigSpace,
    MsixSpec,
    PciIdentity,
)

log = logging.getLogger(__name__)

REGION_CONFIG = 7
NUM_REGIONS = 9
IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_ERR, IRQ_REQ = range(5)
NUM_IRQS = 5

MSIX_VECTOR_CONTROL_MASKED = 1


class RegionAccessError(Exception):
    """A region access the function refuses; `errno` goes back to the client."""

    def __init__(self, error: int, why: str):
        super().__init__(why)
        self.errno = error


class FunctionHost(Protocol):
    """What serves a function: the vfio-user server, or a test double."""

    def trigger(self, irq_index: int, vector: int) -> bool:
        """Signal interrupt `vector` of `irq_index`; False if nothing can carry it."""

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` from the event loop after the current message."""

    def watch_fd(self, fd: int, callback: Callable[[], None] | None) -> None:
        """Run `callback` from the event loop whenever `fd` is readable; None stops it.

        For a device's own file descriptors (a tap); the callback must not block and
        should bound its work per call: the loop calls it again while `fd` stays readable.
        """


class DetachedHost:
    """The host of a function that nobody serves: interrupts go nowhere."""

    def trigger(self, irq_index: int, vector: int) -> bool:
        return False

    def call_soon(self, callback: Callable[[], None]) -> None:
        callback()

    def watch_fd(self, fd: int, callback: Callable[[], None] | None) -> None:
        pass


class PciFunction:
    """Base class of every function we serve.

    Subclasses pass their identity, BARs and capabilities to `__init__`, implement
    `mmio_read`/`mmio_write` for their BARs, and may override `on_reset`,
    `on_dma_map`/`on_dma_unmap` and `on_disconnect`.
    """

    def __init__(self, identity: PciIdentity, bars: dict[int, BarSpec], *,
                 msix: MsixSpec | None = None, pm: bool = True, pcie: bool = False,
                 interrupt_pin: int = 0) -> None:
        self.identity = identity
        self.config = ConfigSpace(identity, bars, msix=msix, pm=pm, pcie=pcie,
                                  interrupt_pin=interrupt_pin)
        self.memory = GuestMemory()
        self.dma: DmaView = DmaView(self.memory)
        self.host: FunctionHost = DetachedHost()
        self.name = type(self).__name__
        self._msix_table = bytearray()
        self._msix_pending = 0
        self._intx_asserted = False
        self._reset_msix()

    # -- wiring --------------------------------------------------------------------------
    def attach(self, host: FunctionHost) -> None:
        self.host = host

    def set_dma_view(self, view: DmaView) -> None:
        """Give this function a different DMA view (an IOMMU's, for its requester ID)."""
        self.dma = view

    # -- what the transport asks ---------------------------------------------------------
    def region_size(self, index: int) -> int:
        if index == REGION_CONFIG:
            return self.config.size
        bar = self.config.bars.get(index)
        return bar.size if bar is not None else 0

    def irq_count(self, index: int) -> int:
        if index == IRQ_MSIX:
            return self.config.msix.vectors if self.config.msix else 0
        if index == IRQ_INTX:
            return 1 if self.config.read_int(0x3D, 1) else 0
        return 0

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Bytes of region `index`; the range has been checked against its size."""
        if index == REGION_CONFIG:
            return self.config.read(offset, count)
        out = bytearray()
        for off, size in _split(offset, count):
            out += self._bar_read(index, off, size).to_bytes(size, "little")
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == REGION_CONFIG:
            self.config.write(offset, data)
            return
        pos = 0
        for off, size in _split(offset, len(data)):
            self._bar_write(index, off, size, int.from_bytes(data[pos:pos + size], "little"))
            pos += size

    def reset(self) -> None:
        """Function-level reset: config space, MSI-X state, then the device's own."""
        self.config.reset()
        self._reset_msix()
        self._intx_asserted = False
        self.on_reset()

    def dma_mapped(self, gpa: int, size: int) -> None:
        self.on_dma_map(gpa, size)

    def dma_unmapped(self, gpa: int, size: int) -> None:
        self.on_dma_unmap(gpa, size)

    def disconnected(self) -> None:
        self.on_disconnect()

    def msix_vector_ready(self, vector: int) -> None:
        """The transport can now carry `vector`: deliver it if it was pending."""
        bit = 1 << vector
        if self._msix_pending & bit and self.host.trigger(IRQ_MSIX, vector):
            self._msix_pending &= ~bit

    @property
    def intx_asserted(self) -> bool:
        return self._intx_asserted

    # -- what the device model does --------------------------------------------------
    def raise_msix(self, vector: int) -> None:
        """Signal MSI-X `vector`; it stays pending in the PBA if nothing carries it."""
        msix = self.config.msix
        if msix is None or not 0 <= vector < msix.vectors:
            raise ValueError(f"{self.name}: no MSI-X vector {vector}")
        if not self.config.msix_enabled:
            log.debug("%s: MSI-X vector %d raised while MSI-X is disabled", self.name, vector)
            return
        if self.config.msix_function_masked or not self.host.trigger(IRQ_MSIX, vector):
            self._msix_pending |= 1 << vector

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx line (level-triggered; the transport automasks it)."""
        self._intx_asserted = asserted
        self.config.set_interrupt_status(asserted)
        if asserted and not self.config.command & (1 << 10):
            self.host.trigger(IRQ_INTX, 0)

    # -- hooks for subclasses --------------------------------------------------------------
    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """Writes to unimplemented BAR offsets are ignored, as on real hardware."""

    def on_reset(self) -> None:
        """Reset the device's own state."""

    def on_dma_map(self, gpa: int, size: int) -> None:
        """Guest memory [gpa, gpa+size) became addressable."""

    def on_dma_unmap(self, gpa: int, size: int) -> None:
        """Guest memory [gpa, gpa+size) goes away: drop every slice into it now."""

    def on_disconnect(self) -> None:
        """The client left; mappings and interrupts are already gone."""

    # -- MSI-X table and PBA -----------------------------------------------------------------
    def _reset_msix(self) -> None:
        msix = self.config.msix
        if msix is None:
            return
        self._msix_table = bytearray(msix.table_size)
        for v in range(msix.vectors):
            self._msix_table[v * MSIX_ENTRY_SIZE + 12] = MSIX_VECTOR_CONTROL_MASKED
        self._msix_pending = 0

    def _msix_window(self, bar: int, offset: int) -> tuple[str, int] | None:
        msix = self.config.msix
        if msix is None or bar != msix.bir:
            return None
        if msix.table_offset <= offset < msix.table_offset + msix.table_size:
            return "table", offset - msix.table_offset
        if msix.pba_offset <= offset < msix.pba_offset + msix.pba_size:
            return "pba", offset - msix.pba_offset
        return None

    def _bar_read(self, bar: int, offset: int, size: int) -> int:
        window = self._msix_window(bar, offset)
        if window is None:
            return self.mmio_read(bar, offset, size) & ((1 << (8 * size)) - 1)
        kind, off = window
        if kind == "table":
            return int.from_bytes(self._msix_table[off:off + size], "little")
        return (self._msix_pending >> (8 * off)) & ((1 << (8 * size)) - 1)

    def _bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        window = self._msix_window(bar, offset)
        if window is None:
            self.mmio_write(bar, offset, size, value)
        elif window[0] == "table":
            off = window[1]
            self._msix_table[off:off + size] = value.to_bytes(size, "little")
        # PBA writes are ignored (PCI 3.0 section 6.8.2.10: read-only).


def _split(offset: int, count: int) -> list[tuple[int, int]]:
    """Cut an access into naturally aligned pieces of 8, 4, 2 or 1 bytes."""
    pieces = []
    end = offset + count
    while offset < end:
        size = 8
        while size > 1 and (offset % size or offset + size > end):
            size //= 2
        pieces.append((offset, size))
        offset += size
    return pieces


def check_region_access(function: PciFunction, index: int, offset: int, count: int) -> None:
    """Raise RegionAccessError(EINVAL) unless [offset, offset+count) lies in the region."""
    if not 0 <= index < NUM_REGIONS:
        raise RegionAccessError(errno.EINVAL, f"no region {index}")
    size = function.region_size(index)
    if offset >= size or count > size - offset:
        raise RegionAccessError(errno.EINVAL,
                                f"region {index} access {offset:#x}+{count:#x} outside {size:#x}")

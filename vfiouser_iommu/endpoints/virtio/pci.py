"""The modern virtio-over-PCI transport (virtio 1.2 section 4.1), as a `PciFunction`.

A `VirtioPciFunction` serves one `VirtioDevice`. BAR0 (16 KiB) holds the four
structures its vendor-specific capabilities point at, one page each; BAR2 holds the
MSI-X table and PBA, with one vector for configuration changes and one per queue:

| BAR0 offset | structure | capability |
|---|---|---|
| 0x0000 | `virtio_pci_common_cfg` (0x40 bytes) | VIRTIO_PCI_CAP_COMMON_CFG |
| 0x1000 | ISR status (1 byte) | VIRTIO_PCI_CAP_ISR_CFG |
| 0x2000 | device-specific configuration | VIRTIO_PCI_CAP_DEVICE_CFG |
| 0x3000 | queue notify, 4 bytes per queue | VIRTIO_PCI_CAP_NOTIFY_CFG |

No legacy interface: device ID 0x1040 + virtio device ID, revision 1. A queue notify
is a posted write; the queues are served later from the event loop, at most
`STEP_BUDGET` chains per queue per step, so one notify never stalls the loop. Chains a
device completes later (`VirtioDevice.handle` returned None) come back through
`complete`/`complete_soon`. Each step publishes what it completed with one used-index
write and at most one interrupt per queue (virtqueue.py, `Rings`).

Choices where the spec leaves one (docs/virtio.md has the list):
- FEATURES_OK is refused unless the driver accepts VIRTIO_F_VERSION_1 and
  VIRTIO_F_ACCESS_PLATFORM: every DMA of ours goes through the IOMMU, so a driver that
  hands out physical addresses would silently DMA to the wrong place.
- A broken ring (unreadable, or a malformed chain) sets DEVICE_NEEDS_RESET and sends a
  configuration-change interrupt (section 2.1.2); the queues stop until a reset.
- Queue settings written while the queue is enabled, and queue sizes that are not a
  power of two up to the maximum, are ignored. An MSI-X vector number the function does
  not have reads back VIRTIO_MSI_NO_VECTOR (section 4.1.5.1.2).
- DMA does not wait for Bus Master Enable (as the iommu-testdev endpoint).
- No VIRTIO_PCI_CAP_PCI_CFG capability: our config space has no read side effects to
  serve it with, and Linux maps the BAR instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...memory import DmaError
from ...pci.config import BarSpec, MsixSpec, PciIdentity
from ...pci.function import PciFunction
from .device import (
    TRANSPORT_FEATURES,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceNeedsReset,
    VirtioDevice,
)
from .layouts import (
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    field_offsets,
    virtio_pci_cap,
    virtio_pci_common_cfg,
    virtio_pci_notify_cap,
)
from .virtqueue import VIRTIO_MSI_NO_VECTOR, Rings, SplitVirtqueue, VirtqueueError

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040
SUBSYSTEM_ID = 0x1100  # QEMU's, for modern devices (section 4.1.2.1: >= 0x40)

BAR_STRUCTURES = 0
BAR_MSIX = 2
COMMON_CFG = 0x0000
ISR_CFG = 0x1000
DEVICE_CFG = 0x2000
NOTIFY_CFG = 0x3000
STRUCTURE_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
COMMON_CFG_SIZE = virtio_pci_common_cfg.sizeof()

# Device status bits (section 2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

ISR_QUEUE = 1
ISR_CONFIG = 2

REQUIRED_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
STEP_BUDGET = 32

# virtio_pci_common_cfg offsets, as the construct definition lays them out
CC = field_offsets(virtio_pci_common_cfg)
_ADDRESS_FIELDS = {CC["queue_desc"]: "desc", CC["queue_driver"]: "driver",
                   CC["queue_device"]: "device"}


class VirtioPciFunction(PciFunction):
    """A virtio device behind the modern PCI transport."""

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.queues = [SplitVirtqueue(i, device.queue_max_size)
                       for i in range(device.num_queues)]
        # chains the device completed later, per queue, not yet in the used ring
        self._done: list[list[tuple[int, int]]] = [[] for _ in self.queues]
        self._publishing = False
        vectors = 1 + device.num_queues
        super().__init__(
            PciIdentity(VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device.device_id,
                        device.class_code, revision_id=1,
                        subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID, subsystem_id=SUBSYSTEM_ID),
            {BAR_STRUCTURES: BarSpec(4 * STRUCTURE_SIZE), BAR_MSIX: BarSpec(0x1000)},
            msix=MsixSpec(vectors, bir=BAR_MSIX, table_offset=0, pba_offset=0x800),
            interrupt_pin=1)
        self.name = device.name
        device.bind(self)
        self._add_capabilities()
        self._scheduled = False
        self._kicked = 0  # bitmask of the queues the next step serves
        self._mmio_reads = self._read_handlers()
        self._mmio_writes = self._write_handlers()
        self.on_reset()

    def _add_capabilities(self) -> None:
        structures = [(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG, COMMON_CFG_SIZE),
                      (VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG, 1)]
        if self.device.config():
            structures.append((VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG, len(self.device.config())))
        for cfg_type, offset, length in structures:
            self.config.add_vendor_capability(_cap(cfg_type, offset, length))
        notify = _cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_CFG,
                      NOTIFY_OFF_MULTIPLIER * len(self.queues), virtio_pci_notify_cap.sizeof())
        self.config.add_vendor_capability(
            notify + NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"))

    # -- state -------------------------------------------------------------------------------
    def on_reset(self) -> None:
        """Device reset (section 2.4): a status write of 0, or a function-level reset.

        Work the device still has in flight finishes first (its DMA must not land
        after the reset); its completions are then dropped.
        """
        self.device.quiesce()
        for done in self._done:
            done.clear()
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        for vq in self.queues:
            vq.reset()
        if self.intx_asserted:
            self.set_intx(False)
        self.device.reset()

    def on_disconnect(self) -> None:
        """The client left with its mappings: a reconnecting driver starts from reset."""
        self.on_reset()

    def on_dma_unmap(self, gpa: int, size: int) -> None:
        """Guest memory goes away: I/O in flight into it (a worker's views) ends first."""
        self.device.quiesce()

    @property
    def device_features(self) -> int:
        return TRANSPORT_FEATURES | self.device.device_features()

    @property
    def running(self) -> bool:
        """The device may consume buffers (section 3.1.1: only after DRIVER_OK)."""
        ok = FEATURES_OK | DRIVER_OK
        return self.status & (ok | DEVICE_NEEDS_RESET | FAILED) == ok

    def _negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    # -- BAR0 ---------------------------------------------------------------------------------
    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if bar != BAR_STRUCTURES:
            return 0
        base = offset & ~(STRUCTURE_SIZE - 1)
        handler = self._mmio_reads.get(base)
        return handler(offset - base, size) if handler else 0

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != BAR_STRUCTURES:
            return
        base = offset & ~(STRUCTURE_SIZE - 1)
        handler = self._mmio_writes.get(base)
        if handler:
            handler(offset - base, size, value)

    def _read_handlers(self) -> dict[int, Callable[[int, int], int]]:
        return {COMMON_CFG: self._common_read, ISR_CFG: self._isr_read,
                DEVICE_CFG: self._device_cfg_read}

    def _write_handlers(self) -> dict[int, Callable[[int, int, int], None]]:
        return {COMMON_CFG: self._common_write, NOTIFY_CFG: self._notify_write}

    def _isr_read(self, offset: int, size: int) -> int:
        """Reading the ISR status clears it and deasserts INTx (section 4.1.4.5)."""
        if offset:
            return 0
        value, self.isr = self.isr, 0
        if self.intx_asserted:
            self.set_intx(False)
        return value

    def _device_cfg_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.device.config()[offset:offset + size], "little")

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        index = offset // NOTIFY_OFF_MULTIPLIER
        if index < len(self.queues) and self.running:
            self._kick(1 << index)

    # -- common configuration (section 4.1.4.3) -------------------------------------------------
    def _common_read(self, offset: int, size: int) -> int:
        if size == 8 and offset in _ADDRESS_FIELDS:
            return self._common_read(offset, 4) | self._common_read(offset + 4, 4) << 32
        getter = _COMMON_READS.get((offset, size))
        return getter(self) if getter else 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if size == 8 and offset in _ADDRESS_FIELDS:
            self._common_write(offset, 4, value & 0xFFFFFFFF)
            self._common_write(offset + 4, 4, value >> 32)
            return
        setter = _COMMON_WRITES.get((offset, size))
        if setter:
            setter(self, value)

    def _selected(self) -> SplitVirtqueue | None:
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    def _queue_get(self, attr: str, absent: int = 0) -> int:
        vq = self._selected()
        return getattr(vq, attr) if vq is not None else absent

    def _configurable(self) -> SplitVirtqueue | None:
        vq = self._selected()
        return vq if vq is not None and not vq.enabled else None

    def _device_feature(self) -> int:
        return (self.device_features >> (32 * self.device_feature_select)) & 0xFFFFFFFF \
            if self.device_feature_select < 2 else 0

    def _driver_feature(self) -> int:
        return (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF \
            if self.driver_feature_select < 2 else 0

    def _set_driver_feature(self, value: int) -> None:
        if self.status & FEATURES_OK or self.driver_feature_select >= 2:
            return
        shift = 32 * self.driver_feature_select
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | value << shift

    def _valid_vector(self, vector: int) -> int:
        msix = self.config.msix
        return vector if msix is not None and vector < msix.vectors else VIRTIO_MSI_NO_VECTOR

    def _set_msix_config(self, value: int) -> None:
        self.msix_config = self._valid_vector(value)

    def _set_queue_msix_vector(self, value: int) -> None:
        vq = self._selected()
        if vq is not None:
            vq.msix_vector = self._valid_vector(value)

    def _set_queue_size(self, value: int) -> None:
        vq = self._configurable()
        if vq is not None and 0 < value <= vq.max_size and not value & (value - 1):
            vq.size = value

    def _set_queue_enable(self, value: int) -> None:
        vq = self._configurable()
        if vq is not None and value == 1:
            vq.enabled = True

    def _set_queue_address(self, offset: int, value: int) -> None:
        vq = self._configurable()
        if vq is None:
            return
        base = offset & ~7
        attr = _ADDRESS_FIELDS[base]
        shift = 32 if offset != base else 0
        old = getattr(vq, attr)
        setattr(vq, attr, (old & ~(0xFFFFFFFF << shift)) | value << shift)

    # -- device status (sections 2.1, 3.1.1) -----------------------------------------------------
    def _set_status(self, value: int) -> None:
        if value == 0:
            self.on_reset()
            return
        new = value & ~DEVICE_NEEDS_RESET
        if new & FEATURES_OK and not self.status & FEATURES_OK and not self._accept_features():
            new &= ~FEATURES_OK
        was_running = self.running
        self.status = new | (self.status & DEVICE_NEEDS_RESET)
        if self.running and not was_running:
            self._kick()

    def _accept_features(self) -> bool:
        features = self.driver_features
        if features & ~self.device_features or features & REQUIRED_FEATURES != REQUIRED_FEATURES:
            log.info("%s: driver features %#x refused (offered %#x)", self.name, features,
                     self.device_features)
            return False
        if not self.device.features_ok(features):
            return False
        self.device.activate(features)
        return True

    def needs_reset(self, why: str) -> None:
        """Stop the queues and tell the driver (section 2.1.2)."""
        log.warning("%s: device needs reset: %s", self.name, why)
        if self.status & DEVICE_NEEDS_RESET:
            return
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self._interrupt(self.msix_config, ISR_CONFIG)

    # -- queue processing -------------------------------------------------------------------
    def _kick(self, queues: int = -1) -> None:
        """Serve the queues of bitmask `queues` (all by default) from the loop soon."""
        self._kicked |= queues
        if not self._scheduled:
            self._scheduled = True
            self.host.call_soon(self._step)

    def _step(self) -> None:
        """Serve up to STEP_BUDGET chains of each notified queue; come back if more wait.

        Only the queues notified since the last step are looked at: with one queue per
        vCPU, a notify of one must not cost a look at the others' rings.
        """
        self._scheduled = False
        kicked, self._kicked = self._kicked, 0
        more = 0
        for vq in self.queues:
            if kicked >> vq.index & 1 and vq.enabled and self.running and self._serve(vq):
                more |= 1 << vq.index
        if more and self.running:
            self._kick(more)

    def _serve(self, vq: SplitVirtqueue) -> bool:
        """One step of `vq`: take what is available, publish what completed."""
        event_idx = self._negotiated(VIRTIO_F_EVENT_IDX)
        indirect = self._negotiated(VIRTIO_F_INDIRECT_DESC)
        dma, handle, index = self.dma, self.device.handle, vq.index
        done = self._done[index]
        try:
            rings = vq.rings(dma, event_idx=event_idx)
            for _ in range(min(rings.pending(), STEP_BUDGET)):
                chain = rings.pop(indirect)
                written = handle(index, chain, dma)
                if written is not None:
                    done.append((chain.head, written))
            self._publish(vq, rings)  # first: the driver's interrupt goes out sooner
            if event_idx:
                rings.set_avail_event()
                # A chain published before the driver saw the new avail_event was not
                # notified (section 2.7.10): look again.
                more = rings.pending() > 0
            else:
                # Without EVENT_IDX every later chain comes with a notification.
                more = vq.known_pending > 0
        except (DmaError, VirtqueueError, DeviceNeedsReset) as e:
            self.needs_reset(f"queue {vq.index}: {e}")
            return False
        return more

    def _publish(self, vq: SplitVirtqueue, rings: Rings) -> None:
        """Put the queue's completed chains in the used ring, publish, interrupt once."""
        done = self._done[vq.index]
        if not done:
            return
        old_used = vq.used_idx
        for head, written in done:
            rings.push(head, written)
        done.clear()
        rings.publish()
        if rings.needs_interrupt(old_used):
            self._interrupt(vq.msix_vector, ISR_QUEUE)

    # -- DeviceContext: chains a device kept, and the file descriptors it watches ------------
    def complete(self, queue: int, used: list[tuple[int, int]]) -> bool:
        """Push chains the device kept back then, published together (one used.idx
        write after all their elements, so a frame spread over several chains is never
        seen in part); one notification for the batch."""
        vq = self.queues[queue]
        if not (self.running and vq.enabled):
            return False
        self._done[queue].extend(used)
        try:
            self._publish(vq, vq.rings(self.dma, event_idx=self._negotiated(VIRTIO_F_EVENT_IDX)))
        except DmaError as e:
            self.needs_reset(f"queue {queue}: {e}")
            return False
        return True

    def complete_soon(self, queue: int, head: int, written: int) -> None:
        """On the loop: the device finished chain `head`; published with the others
        that complete before the loop comes back to us."""
        if not (self.running and self.queues[queue].enabled):
            return
        self._done[queue].append((head, written))
        if not self._publishing:
            self._publishing = True
            self.host.call_soon(self._publish_completed)

    def _publish_completed(self) -> None:
        self._publishing = False
        if not self.running:
            return
        event_idx = self._negotiated(VIRTIO_F_EVENT_IDX)
        for vq in self.queues:
            if self._done[vq.index]:
                try:
                    self._publish(vq, vq.rings(self.dma, event_idx=event_idx))
                except DmaError as e:
                    self.needs_reset(f"queue {vq.index}: {e}")
                    return

    def watch(self, fd: int, callback: Callable[[], None] | None) -> None:
        self.host.watch_fd(fd, callback)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.host.call_soon(callback)

    def queue_size(self, queue: int) -> int:
        return self.queues[queue].size

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        """Sections 4.1.5.3-4: MSI-X when enabled (none for NO_VECTOR), else ISR + INTx."""
        if self.config.msix_enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.raise_msix(vector)
            return
        self.isr |= isr_bit
        self.set_intx(True)


def _cap(cfg_type: int, offset: int, length: int, cap_len: int | None = None) -> bytes:
    cap_len = cap_len or virtio_pci_cap.sizeof()
    return virtio_pci_cap.build(dict(cap_vndr=0x09, cap_next=0, cap_len=cap_len,
                                     cfg_type=cfg_type, bar=BAR_STRUCTURES, id=0,
                                     offset=offset, length=length))


_COMMON_READS: dict[tuple[int, int], Callable[[VirtioPciFunction], int]] = {
    (CC["device_feature_select"], 4): lambda f: f.device_feature_select,
    (CC["device_feature"], 4): VirtioPciFunction._device_feature,
    (CC["driver_feature_select"], 4): lambda f: f.driver_feature_select,
    (CC["driver_feature"], 4): VirtioPciFunction._driver_feature,
    (CC["config_msix_vector"], 2): lambda f: f.msix_config,
    (CC["num_queues"], 2): lambda f: len(f.queues),
    (CC["device_status"], 1): lambda f: f.status,
    (CC["config_generation"], 1): lambda f: 0,
    (CC["queue_select"], 2): lambda f: f.queue_select,
    (CC["queue_size"], 2): lambda f: f._queue_get("size"),
    (CC["queue_msix_vector"], 2): lambda f: f._queue_get("msix_vector", VIRTIO_MSI_NO_VECTOR),
    (CC["queue_enable"], 2): lambda f: int(f._queue_get("enabled")),
    (CC["queue_notify_off"], 2): lambda f: f._queue_get("index"),
    (CC["queue_notify_data"], 2): lambda f: f._queue_get("index"),
}
for _off, _attr in _ADDRESS_FIELDS.items():
    _COMMON_READS[(_off, 4)] = lambda f, a=_attr: f._queue_get(a) & 0xFFFFFFFF
    _COMMON_READS[(_off + 4, 4)] = lambda f, a=_attr: f._queue_get(a) >> 32

_COMMON_WRITES: dict[tuple[int, int], Callable[[VirtioPciFunction, int], None]] = {
    (CC["device_feature_select"], 4): lambda f, v: setattr(f, "device_feature_select", v),
    (CC["driver_feature_select"], 4): lambda f, v: setattr(f, "driver_feature_select", v),
    (CC["driver_feature"], 4): VirtioPciFunction._set_driver_feature,
    (CC["config_msix_vector"], 2): VirtioPciFunction._set_msix_config,
    (CC["device_status"], 1): VirtioPciFunction._set_status,
    (CC["queue_select"], 2): lambda f, v: setattr(f, "queue_select", v),
    (CC["queue_size"], 2): VirtioPciFunction._set_queue_size,
    (CC["queue_msix_vector"], 2): VirtioPciFunction._set_queue_msix_vector,
    (CC["queue_enable"], 2): VirtioPciFunction._set_queue_enable,
}
for _off in _ADDRESS_FIELDS:
    for _half in (0, 4):
        _COMMON_WRITES[(_off + _half, 4)] = \
            lambda f, v, o=_off + _half: f._set_queue_address(o, v)

"""An endpoint register-compatible with QEMU's `iommu-testdev` (1b36:0005).

QEMU's device (hw/misc/iommu-testdev.c) is a DMA engine for IOMMU tests: BAR0 (4 KiB)
holds a DMA address, a length and a doorbell; reading offset 0 runs the armed DMA,
which writes the pattern 0x12345678 (little-endian, repeated) through the device's DMA
address space and reads it back at a physical address, bypassing the IOMMU, to check
that the translation landed where expected. The same test drives both devices.

BAR0 (32-bit accesses):

| off  | name          | |
|------|---------------|--|
| 0x00 | DMA_TRIGGER   | read: run the armed DMA; reads 0 |
| 0x04 | DMA_GVA_LO    | DMA (IO virtual) address, low / high word |
| 0x08 | DMA_GVA_HI    | |
| 0x0c | DMA_LEN       | bytes; 0 -> 0xdead0001; above 1 MiB -> 0xdead0001 (ours) |
| 0x10 | DMA_RESULT    | 0 ok, 0xffffffff idle, 0xfffffffe busy (armed), 0xdead0001-6 |
| 0x14 | DMA_DBELL     | bit 0: 1 arms (result busy), 0 disarms (result idle) |
| 0x18 | DMA_ATTRS     | QEMU's Arm security attributes: bit 0 secure, 2:1 space, 3 valid |
| 0x1c | DMA_GPA_LO    | physical read-back address, low / high word |
| 0x20 | DMA_GPA_HI    | |

Extensions (offsets QEMU's device leaves unused; it reads them as 0 and drops writes):

| off  | name          | |
|------|---------------|--|
| 0x24 | DMA_PASID     | bits 19:0 process ID, bit 31 valid (the request carries a PASID) |
| 0x28 | DMA_CTRL      | bit 0 privileged; bits 2:1 direction: 0 write + verify (QEMU's), |
|      |               | 1 read, 2 write only, 3 execute (instruction fetch read) |
| 0x2c | DMA_MSIX      | bit 31 enable: raise MSI-X vector bits 10:0 when a DMA finishes |
| 0x30 | DMA_DATA      | first 4 bytes read by the last read or execute DMA |
| 0x34 | MSI_ADDR_LO   | message address of the completion MSI, low / high word |
| 0x38 | MSI_ADDR_HI   | |
| 0x3c | MSI_DATA      | message data (32 bits) |
| 0x40 | MSI_CTRL      | bit 0 enable: when a DMA finishes, write MSI_DATA to MSI_ADDR |
| 0x44 | MSI_RESULT    | 0 the last MSI write went out, 0xdead0002 the IOMMU faulted it, |
|      |               | 0xffffffff none sent since reset |

The completion MSI (MSI_CTRL.enable) is the PCI way: a posted 32-bit DMA write of
MSI_DATA to MSI_ADDR by the device, so the IOMMU translates it for the device's
requester ID like any other write (MSI address translation, spec §3.3 step 18, MSI page
tables, MRIF mode). An address outside guest RAM (an IMSIC interrupt file) leaves the
server as a vfio-user DMA_WRITE, on the same connection and after every earlier
non-RAM write of the device, so it never overtakes the DMA it signals. It replaces
nothing: DMA_MSIX still raises the MSI-X vector through QEMU's table.

Result codes follow QEMU: a failed DMA access (translation fault, unmapped memory) is
0xdead0002 for every direction; a failed physical read-back is 0xdead0003.

Choices QEMU's device leaves open: DMA does not require Bus Master Enable (QEMU's
uses the IOMMU address space directly, which ignores it); lengths above 1 MiB fail
with 0xdead0001 instead of allocating gigabytes. The MSI-X table (4 vectors) is at
BAR0+0x800, the PBA at BAR0+0xc00.
"""

from __future__ import annotations

import logging

from ..memory import DmaAttrs, DmaError, MemoryAccessError
from ..pci.config import BarSpec, MsixSpec, PciIdentity
from ..pci.function import PciFunction

log = logging.getLogger(__name__)

VENDOR_ID = 0x1B36  # Red Hat
DEVICE_ID = 0x0005  # PCI_DEVICE_ID_REDHAT_TEST
CLASS_OTHERS = 0x00FF00  # QEMU: class_id PCI_CLASS_OTHERS (0xff) = base 0x00, subclass 0xff
BAR0_SIZE = 0x1000

DMA_TRIGGER = 0x00
DMA_GVA_LO = 0x04
DMA_GVA_HI = 0x08
DMA_LEN = 0x0C
DMA_RESULT = 0x10
DMA_DBELL = 0x14
DMA_ATTRS = 0x18
DMA_GPA_LO = 0x1C
DMA_GPA_HI = 0x20
DMA_PASID = 0x24
DMA_CTRL = 0x28
DMA_MSIX = 0x2C
DMA_DATA = 0x30
MSI_ADDR_LO = 0x34
MSI_ADDR_HI = 0x38
MSI_DATA = 0x3C
MSI_CTRL = 0x40
MSI_RESULT = 0x44
MSI_ENABLE = 1 << 0

RESULT_OK = 0
RESULT_IDLE = 0xFFFFFFFF
RESULT_BUSY = 0xFFFFFFFE
ERR_BAD_LEN = 0xDEAD0001
ERR_TX_FAIL = 0xDEAD0002
ERR_RD_FAIL = 0xDEAD0003
ERR_MISMATCH = 0xDEAD0004
ERR_NOT_ARMED = 0xDEAD0005
ERR_BAD_ATTRS = 0xDEAD0006

WRITE_PATTERN = 0x12345678
DBELL_ARM = 1

ATTRS_SECURE = 1 << 0
ATTRS_SPACE_SHIFT = 1
ATTRS_SPACE_VALID = 1 << 3
ATTRS_SPACE_SECURE = 0
ATTRS_SPACE_NONSECURE = 1
ATTRS_RESET = ATTRS_SPACE_NONSECURE << ATTRS_SPACE_SHIFT

PASID_VALID = 1 << 31
PASID_MASK = (1 << 20) - 1
CTRL_PRIV = 1 << 0
CTRL_DIR_SHIFT = 1
DIR_WRITE_VERIFY, DIR_READ, DIR_WRITE, DIR_EXECUTE = range(4)
MSIX_ENABLE = 1 << 31
MSIX_VECTOR_MASK = 0x7FF

MAX_DMA_LEN = 1 << 20
MSIX_VECTORS = 4


def pattern(length: int) -> bytes:
    """What the DMA writes: 0x12345678 little-endian, repeated, cut to `length`."""
    return (WRITE_PATTERN.to_bytes(4, "little") * ((length + 3) // 4))[:length]


class IommuTestDev(PciFunction):
    """iommu-testdev over vfio-user, with PASID, privilege, direction and MSI-X."""

    def __init__(self, *, msix_vectors: int = MSIX_VECTORS, pcie: bool = False) -> None:
        super().__init__(
            PciIdentity(VENDOR_ID, DEVICE_ID, CLASS_OTHERS, revision_id=0,
                        subsystem_vendor_id=0x1AF4, subsystem_id=0x1100),
            {0: BarSpec(BAR0_SIZE)},
            msix=MsixSpec(msix_vectors, bir=0, table_offset=0x800, pba_offset=0xC00),
            pcie=pcie)
        self.name = "iommu-testdev"
        self.on_reset()

    def on_reset(self) -> None:
        self.gva = 0
        self.gpa = 0
        self.length = 0
        self.result = RESULT_IDLE
        self.armed = False
        self.attrs = ATTRS_RESET
        self.pasid = 0
        self.ctrl = 0
        self.msix = 0
        self.data = 0
        self.msi_addr = 0
        self.msi_data = 0
        self.msi_ctrl = 0
        self.msi_result = RESULT_IDLE

    # -- registers ---------------------------------------------------------------------------
    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if size != 4:
            return 0
        if offset == DMA_TRIGGER:
            self.run_dma()
            return 0
        getter = _READS.get(offset)
        return getter(self) if getter else 0

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        setter = _WRITES.get(offset) if size == 4 else None
        if setter:
            setter(self, value & 0xFFFFFFFF)

    def _doorbell(self, value: int) -> None:
        self.armed = bool(value & DBELL_ARM)
        self.result = RESULT_BUSY if self.armed else RESULT_IDLE

    # -- the DMA engine -------------------------------------------------------------------------
    @property
    def request_attrs(self) -> DmaAttrs:
        return DmaAttrs(pasid=self.pasid & PASID_MASK if self.pasid & PASID_VALID else None,
                        privileged=bool(self.ctrl & CTRL_PRIV),
                        execute=self.direction == DIR_EXECUTE)

    @property
    def direction(self) -> int:
        return (self.ctrl >> CTRL_DIR_SHIFT) & 3

    def run_dma(self) -> None:
        """What a read of DMA_TRIGGER does."""
        if not self.armed:
            self.result = ERR_NOT_ARMED
            return
        self.result = self._dma()
        self.armed = False
        log.debug("%s: DMA %#x+%#x dir %d -> %#x", self.name, self.gva, self.length,
                  self.direction, self.result)
        if self.msi_ctrl & MSI_ENABLE:
            self._send_msi()
        if self.msix & MSIX_ENABLE:
            self._raise_completion(self.msix & MSIX_VECTOR_MASK)

    def _send_msi(self) -> None:
        """The completion MSI: a 32-bit DMA write through the device's DMA view."""
        try:
            self.dma.write(self.msi_addr, self.msi_data.to_bytes(4, "little"))
        except DmaError as e:
            log.info("%s: completion MSI write failed: %s", self.name, e)
            self.msi_result = ERR_TX_FAIL
            return
        self.msi_result = RESULT_OK

    def _raise_completion(self, vector: int) -> None:
        msix = self.config.msix
        if msix is not None and vector < msix.vectors:
            self.raise_msix(vector)
        else:
            log.warning("%s: completion vector %d does not exist", self.name, vector)

    def _dma(self) -> int:
        if not 0 < self.length <= MAX_DMA_LEN:
            return ERR_BAD_LEN
        if _attrs_inconsistent(self.attrs):
            return ERR_BAD_ATTRS
        return _DIRECTIONS[self.direction](self)

    def _write_verify(self) -> int:
        expected = pattern(self.length)
        result = self._write_pattern()
        if result != RESULT_OK:
            return result
        try:
            seen = self.memory.read(self.gpa, self.length)
        except MemoryAccessError as e:
            log.info("%s: read-back failed: %s", self.name, e)
            return ERR_RD_FAIL
        return RESULT_OK if seen == expected else ERR_MISMATCH

    def _write_pattern(self) -> int:
        try:
            self.dma.write_as(self.gva, pattern(self.length), self.request_attrs)
        except DmaError as e:
            log.info("%s: DMA write failed: %s", self.name, e)
            return ERR_TX_FAIL
        return RESULT_OK

    def _read(self) -> int:
        try:
            data = self.dma.read_as(self.gva, self.length, self.request_attrs)
        except DmaError as e:
            log.info("%s: DMA read failed: %s", self.name, e)
            return ERR_TX_FAIL
        self.data = int.from_bytes(data[:4], "little")
        return RESULT_OK


def _attrs_inconsistent(attrs: int) -> bool:
    """QEMU's check: a valid security space must agree with the secure bit."""
    if not attrs & ATTRS_SPACE_VALID:
        return False
    space = (attrs >> ATTRS_SPACE_SHIFT) & 3
    if space not in (ATTRS_SPACE_SECURE, ATTRS_SPACE_NONSECURE):
        return False
    return bool(attrs & ATTRS_SECURE) != (space == ATTRS_SPACE_SECURE)


def _set_lo(name: str):
    def setter(dev: IommuTestDev, value: int) -> None:
        setattr(dev, name, (getattr(dev, name) & ~0xFFFFFFFF) | value)
    return setter


def _set_hi(name: str):
    def setter(dev: IommuTestDev, value: int) -> None:
        setattr(dev, name, (getattr(dev, name) & 0xFFFFFFFF) | (value << 32))
    return setter


def _set(name: str):
    def setter(dev: IommuTestDev, value: int) -> None:
        setattr(dev, name, value)
    return setter


_READS = {
    DMA_GVA_LO: lambda d: d.gva & 0xFFFFFFFF,
    DMA_GVA_HI: lambda d: d.gva >> 32,
    DMA_LEN: lambda d: d.length,
    DMA_RESULT: lambda d: d.result,
    DMA_ATTRS: lambda d: d.attrs,
    DMA_GPA_LO: lambda d: d.gpa & 0xFFFFFFFF,
    DMA_GPA_HI: lambda d: d.gpa >> 32,
    DMA_PASID: lambda d: d.pasid,
    DMA_CTRL: lambda d: d.ctrl,
    DMA_MSIX: lambda d: d.msix,
    DMA_DATA: lambda d: d.data,
    MSI_ADDR_LO: lambda d: d.msi_addr & 0xFFFFFFFF,
    MSI_ADDR_HI: lambda d: d.msi_addr >> 32,
    MSI_DATA: lambda d: d.msi_data,
    MSI_CTRL: lambda d: d.msi_ctrl,
    MSI_RESULT: lambda d: d.msi_result,
}

_WRITES = {
    DMA_GVA_LO: _set_lo("gva"),
    DMA_GVA_HI: _set_hi("gva"),
    DMA_LEN: _set("length"),
    DMA_RESULT: _set("result"),
    DMA_DBELL: IommuTestDev._doorbell,
    DMA_ATTRS: _set("attrs"),
    DMA_GPA_LO: _set_lo("gpa"),
    DMA_GPA_HI: _set_hi("gpa"),
    DMA_PASID: lambda d, v: setattr(d, "pasid", v & (PASID_VALID | PASID_MASK)),
    DMA_CTRL: lambda d, v: setattr(d, "ctrl", v & 0x7),
    DMA_MSIX: lambda d, v: setattr(d, "msix", v & (MSIX_ENABLE | MSIX_VECTOR_MASK)),
    MSI_ADDR_LO: _set_lo("msi_addr"),
    MSI_ADDR_HI: _set_hi("msi_addr"),
    MSI_DATA: _set("msi_data"),
    MSI_CTRL: lambda d, v: setattr(d, "msi_ctrl", v & MSI_ENABLE),
}

_DIRECTIONS = {
    DIR_WRITE_VERIFY: IommuTestDev._write_verify,
    DIR_READ: IommuTestDev._read,
    DIR_WRITE: IommuTestDev._write_pattern,
    DIR_EXECUTE: IommuTestDev._read,
}


def build(options: dict[str, str]) -> IommuTestDev:
    """An `iommu-testdev` from `KIND@SS.F,opt=val` options: `vectors=N`, `pcie=on|off`."""
    unknown = set(options) - {"vectors", "pcie"}
    if unknown:
        raise ValueError(f"iommu-testdev: unknown options {sorted(unknown)}")
    pcie = options.get("pcie", "off")
    if pcie not in ("on", "off"):
        raise ValueError("iommu-testdev: pcie=on|off")
    return IommuTestDev(msix_vectors=int(options.get("vectors", str(MSIX_VECTORS)), 0),
                        pcie=pcie == "on")

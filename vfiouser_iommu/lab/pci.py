"""A small PCI enumerator for qtest sessions on QEMU's riscv64 `virt` machine.

Config space is reached through the host bridge's ECAM window; BARs are given
addresses from the bridge's 32-bit MMIO window (and its PIO window for I/O BARs) the
way firmware would: size by writing all-ones, align to the size, enable decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from vfiouser_iommu.lab.qtest import QTest

# QEMU hw/riscv/virt.c memory map.
VIRT_ECAM = 0x3000_0000
VIRT_PIO = 0x0300_0000
VIRT_PIO_SIZE = 0x1_0000
VIRT_MMIO = 0x4000_0000
VIRT_MMIO_SIZE = 0x4000_0000

PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_CAP_PTR = 0x34
PCI_CAP_ID_MSIX = 0x11


@dataclass
class Bar:
    index: int
    addr: int
    size: int
    is_io: bool
    is_64: bool


class PciDevice:
    def __init__(self, bus: PciBus, busnr: int, devfn: int):
        self.bus = bus
        self.busnr = busnr
        self.devfn = devfn
        self.bars: dict[int, Bar] = {}

    @property
    def qt(self) -> QTest:
        return self.bus.qt

    @property
    def rid(self) -> int:
        return self.busnr << 8 | self.devfn

    @property
    def slot_function(self) -> str:
        return f"{self.devfn >> 3:02x}.{self.devfn & 7}"

    def _cfg(self, offset: int) -> int:
        return self.bus.ecam + (self.rid << 12) + offset

    def config_readb(self, offset: int) -> int:
        return self.qt.readb(self._cfg(offset))

    def config_readw(self, offset: int) -> int:
        return self.qt.readw(self._cfg(offset))

    def config_readl(self, offset: int) -> int:
        return self.qt.readl(self._cfg(offset))

    def config_writeb(self, offset: int, value: int) -> None:
        self.qt.writeb(self._cfg(offset), value)

    def config_writew(self, offset: int, value: int) -> None:
        self.qt.writew(self._cfg(offset), value)

    def config_writel(self, offset: int, value: int) -> None:
        self.qt.writel(self._cfg(offset), value)

    @property
    def vendor_id(self) -> int:
        return self.config_readw(0)

    @property
    def device_id(self) -> int:
        return self.config_readw(2)

    def capabilities(self) -> list[tuple[int, int]]:
        """(id, offset) of each standard capability."""
        caps, ptr, seen = [], self.config_readb(PCI_CAP_PTR) & 0xFC, set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            caps.append((self.config_readb(ptr), ptr))
            ptr = self.config_readb(ptr + 1) & 0xFC
        return caps

    def find_capability(self, cap_id: int) -> int | None:
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)

    def assign_bars(self) -> dict[int, Bar]:
        """Size every BAR and give it an address; returns {index: Bar}."""
        index = 0
        while index < 6:
            reg = 0x10 + 4 * index
            original = self.config_readl(reg)
            self.config_writel(reg, 0xFFFF_FFFF)
            probe = self.config_readl(reg)
            is_io = bool(original & 1)
            is_64 = not is_io and (original >> 1) & 3 == 2
            if is_64:
                self.config_writel(reg + 4, 0xFFFF_FFFF)
                probe |= self.config_readl(reg + 4) << 32
                mask = ~(probe & ~0xF) & 0xFFFF_FFFF_FFFF_FFFF
            else:
                mask = ~(probe & (~0x3 if is_io else ~0xF)) & 0xFFFF_FFFF
            size = mask + 1 if probe & ~0xF else 0
            if size:
                addr = self.bus.allocate(size, is_io)
                self.config_writel(reg, addr & 0xFFFF_FFFF)
                if is_64:
                    self.config_writel(reg + 4, addr >> 32)
                self.bars[index] = Bar(index, addr, size, is_io, is_64)
            else:
                self.config_writel(reg, original)
            index += 2 if is_64 else 1
        return self.bars

    def enable(self, memory: bool = True, master: bool = True, io: bool = False) -> None:
        cmd = self.config_readw(PCI_COMMAND)
        cmd |= (PCI_COMMAND_MEMORY if memory else 0) | (PCI_COMMAND_MASTER if master else 0)
        cmd |= PCI_COMMAND_IO if io else 0
        self.config_writew(PCI_COMMAND, cmd)

    # -- MSI-X -----------------------------------------------------------------------------
    def msix_table(self) -> tuple[int, int]:
        """(guest address of the MSI-X table, number of vectors); BARs must be assigned."""
        cap = self.find_capability(PCI_CAP_ID_MSIX)
        if cap is None:
            raise LookupError("device has no MSI-X capability")
        count = (self.config_readw(cap + 2) & 0x7FF) + 1
        table = self.config_readl(cap + 4)
        return self.bars[table & 7].addr + (table & ~7), count

    def msix_enable(self, enable: bool = True) -> None:
        cap = self.find_capability(PCI_CAP_ID_MSIX)
        if cap is None:
            raise LookupError("device has no MSI-X capability")
        ctrl = self.config_readw(cap + 2)
        ctrl = (ctrl | 0x8000) if enable else (ctrl & ~0x8000)
        self.config_writew(cap + 2, ctrl & ~0x4000)

    def msix_set_vector(self, vector: int, addr: int, data: int, masked: bool = False) -> None:
        table, _ = self.msix_table()
        entry = table + 16 * vector
        self.qt.writel(entry, addr & 0xFFFF_FFFF)
        self.qt.writel(entry + 4, addr >> 32)
        self.qt.writel(entry + 8, data)
        self.qt.writel(entry + 12, 1 if masked else 0)


class PciBus:
    """Bus 0 of the virt machine's PCIe host bridge, seen through qtest."""

    def __init__(self, qt: QTest, ecam: int = VIRT_ECAM, mmio: int = VIRT_MMIO,
                 mmio_size: int = VIRT_MMIO_SIZE, pio: int = VIRT_PIO,
                 pio_size: int = VIRT_PIO_SIZE):
        self.qt = qt
        self.ecam = ecam
        self._mmio_next, self._mmio_end = mmio, mmio + mmio_size
        self._pio_next, self._pio_end = 0x1000, pio_size  # port numbers; CPU sees pio+port
        self.pio_base = pio

    def allocate(self, size: int, is_io: bool) -> int:
        if is_io:
            addr = (self._pio_next + size - 1) & ~(size - 1)
            if addr + size > self._pio_end:
                raise MemoryError("PCI I/O window exhausted")
            self._pio_next = addr + size
            return addr
        addr = (self._mmio_next + size - 1) & ~(size - 1)
        if addr + size > self._mmio_end:
            raise MemoryError("PCI MMIO window exhausted")
        self._mmio_next = addr + size
        return addr

    def devices(self) -> list[PciDevice]:
        found = []
        for devfn in range(256):
            if devfn & 7 and not found_multifunction(self, devfn):
                continue
            if self.qt.readw(self.ecam + (devfn << 12)) != 0xFFFF:
                found.append(PciDevice(self, 0, devfn))
        return found

    def find(self, vendor: int, device: int, index: int = 0) -> PciDevice:
        matches = [d for d in self.devices() if d.vendor_id == vendor and d.device_id == device]
        if len(matches) <= index:
            raise LookupError(f"no PCI device {vendor:04x}:{device:04x} (#{index})")
        return matches[index]

    def at(self, slot: int, function: int = 0) -> PciDevice:
        dev = PciDevice(self, 0, slot << 3 | function)
        if dev.vendor_id == 0xFFFF:
            raise LookupError(f"no PCI device at 00:{slot:02x}.{function}")
        return dev


def found_multifunction(bus: PciBus, devfn: int) -> bool:
    """Functions 1-7 exist only if function 0 says it is multi-function."""
    header = bus.qt.readb(bus.ecam + ((devfn & ~7) << 12) + 0x0E)
    return header != 0xFF and bool(header & 0x80)

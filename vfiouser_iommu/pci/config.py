"""PCI configuration space of one function: a type 0 header and a capability list.

Models PCI Local Bus 3.0 section 6 (type 0 header, BARs, capability list) and the
capabilities we offer: power management (PCI PM 1.2 section 3), MSI-X (PCI 3.0 section
6.8.2) and PCI Express (PCIe base 4.0 section 7.5.3). Every byte carries three masks:
read-only (the default), read-write (`wmask`) and write-1-to-clear (`w1cmask`), so a
write from the client changes only what the hardware would let it change.

QEMU's vfio-user client emulates the BARs, the ROM BAR and the MSI-X capability body
itself but still forwards every config write to us ("let it filter"), so those bytes
behave here like real hardware too: a BAR keeps its type bits and size alignment, the
ROM BAR reads back 0 (no ROM).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

CONFIG_SPACE_SIZE = 256
PCIE_CONFIG_SPACE_SIZE = 4096

# -- layouts (PCI 3.0 section 6.1, PCI PM 1.2 section 3.2, PCI 3.0 section 6.8.2.1,
#    PCIe 4.0 section 7.5.3) -----------------------------------------------------------

pci_header_type0 = Struct(
    "vendor_id" / Int16ul,
    "device_id" / Int16ul,
    "command" / Int16ul,
    "status" / Int16ul,
    "revision_id" / Int8ul,
    "class_code" / Bytes(3),  # prog-if, subclass, base class
    "cache_line_size" / Int8ul,
    "latency_timer" / Int8ul,
    "header_type" / Int8ul,
    "bist" / Int8ul,
    "bar" / Int32ul[6],
    "cardbus_cis" / Int32ul,
    "subsystem_vendor_id" / Int16ul,
    "subsystem_id" / Int16ul,
    "expansion_rom" / Int32ul,
    "capabilities_pointer" / Int8ul,
    "reserved" / Bytes(7),
    "interrupt_line" / Int8ul,
    "interrupt_pin" / Int8ul,
    "min_gnt" / Int8ul,
    "max_lat" / Int8ul,
)

pci_pm_cap = Struct(
    "cap_id" / Int8ul,
    "next" / Int8ul,
    "pmc" / Int16ul,
    "pmcsr" / Int16ul,
    "pmcsr_bse" / Int8ul,
    "data" / Int8ul,
)

pci_msix_cap = Struct(
    "cap_id" / Int8ul,
    "next" / Int8ul,
    "message_control" / Int16ul,
    "table_offset_bir" / Int32ul,
    "pba_offset_bir" / Int32ul,
)

pcie_cap = Struct(
    "cap_id" / Int8ul,
    "next" / Int8ul,
    "pcie_capabilities" / Int16ul,
    "device_capabilities" / Int32ul,
    "device_control" / Int16ul,
    "device_status" / Int16ul,
    "link_capabilities" / Int32ul,
    "link_control" / Int16ul,
    "link_status" / Int16ul,
    "slot_capabilities" / Int32ul,
    "slot_control" / Int16ul,
    "slot_status" / Int16ul,
    "root_control" / Int16ul,
    "root_capabilities" / Int16ul,
    "root_status" / Int32ul,
    "device_capabilities2" / Int32ul,
    "device_control2" / Int16ul,
    "device_status2" / Int16ul,
    "link_capabilities2" / Int32ul,
    "link_control2" / Int16ul,
    "link_status2" / Int16ul,
    "slot_capabilities2" / Int32ul,
    "slot_control2" / Int16ul,
    "slot_status2" / Int16ul,
)


VENDOR_SPECIFIC_CAP_ID = 0x09


class CapId(enum.IntEnum):
    PM = 0x01
    PCIE = 0x10
    MSIX = 0x11


# Header offsets
VENDOR_ID = 0x00
COMMAND = 0x04
STATUS = 0x06
BAR0 = 0x10
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40

# COMMAND bits we implement: I/O, memory, bus master, parity error response, SERR#,
# INTx disable. The others are hardwired to 0 on PCIe functions.
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_WMASK = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | (1 << 6) | (1 << 8) | (1 << 10)
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
# Master/target abort, SERR, parity: RW1C (PCI 3.0 section 6.2.3).
STATUS_W1CMASK = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)

BAR_MEM_64 = 0b100
BAR_MEM_PREFETCH = 0b1000

MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_FUNCTION_MASK = 1 << 14
MSIX_ENTRY_SIZE = 16

PM_CSR_POWER_STATE = 0b11
PM_CSR_NO_SOFT_RESET = 1 << 3
PM_CSR_PME_STATUS = 1 << 15

PCIE_TYPE_ENDPOINT = 0x0
PCIE_TYPE_RC_INTEGRATED = 0x9


@dataclass(frozen=True)
class BarSpec:
    """A memory BAR: `size` a power of two >= 16 bytes (PCI 3.0 section 6.2.5.1)."""

    size: int
    is_64bit: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size < 16 or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two >= 16")
        if not self.is_64bit and self.size > 1 << 31:
            raise ValueError("a 32-bit BAR cannot be larger than 2 GiB")

    @property
    def type_bits(self) -> int:
        return (BAR_MEM_64 if self.is_64bit else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True)
class MsixSpec:
    """Where the MSI-X table and PBA live: BAR `bir`, at byte offsets inside it."""

    vectors: int
    bir: int = 0
    table_offset: int = 0x800
    pba_offset: int = 0xC00

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= 2048:
            raise ValueError("MSI-X has 1..2048 vectors")
        if self.table_offset % 8 or self.pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets are QWORD aligned")

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8


@dataclass(frozen=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    class_code: int  # base class << 16 | subclass << 8 | prog-if
    revision_id: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0


WriteHook = Callable[[int, int], None]


class ConfigSpace:
    """The bytes of one function's configuration space and what a write may change."""

    def __init__(self, identity: PciIdentity, bars: dict[int, BarSpec], *,
                 msix: MsixSpec | None = None, pm: bool = True, pcie: bool = False,
                 interrupt_pin: int = 0, size: int = CONFIG_SPACE_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.bars = dict(bars)
        self.msix = msix
        self.capabilities: dict[CapId, int] = {}
        self._hooks: list[tuple[int, int, WriteHook]] = []
        self._build_header(identity, interrupt_pin)
        self._build_bars()
        self._next_cap = FIRST_CAPABILITY
        if pm:
            self._add_pm()
        if msix is not None:
            self._add_msix(msix)
        if pcie:
            self._add_pcie()
        self._reset_image = bytes(self.data)

    # -- construction ----------------------------------------------------------------
    def _set(self, offset: int, size: int, value: int, *, wmask: int = 0, w1c: int = 0) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = w1c.to_bytes(size, "little")

    def _build_header(self, ident: PciIdentity, interrupt_pin: int) -> None:
        header = pci_header_type0.build(dict(
            vendor_id=ident.vendor_id, device_id=ident.device_id, command=0, status=0,
            revision_id=ident.revision_id, class_code=ident.class_code.to_bytes(3, "little"),
            cache_line_size=0, latency_timer=0, header_type=0, bist=0, bar=[0] * 6,
            cardbus_cis=0, subsystem_vendor_id=ident.subsystem_vendor_id,
            subsystem_id=ident.subsystem_id, expansion_rom=0, capabilities_pointer=0,
            reserved=bytes(7), interrupt_line=0, interrupt_pin=interrupt_pin, min_gnt=0,
            max_lat=0))
        self.data[:len(header)] = header
        self._set(COMMAND, 2, 0, wmask=COMMAND_WMASK)
        self._set(STATUS, 2, 0, w1c=STATUS_W1CMASK)
        self._set(0x0C, 1, 0, wmask=0xFF)  # cache line size: RW, no effect
        self._set(INTERRUPT_LINE, 1, 0, wmask=0xFF)

    def _build_bars(self) -> None:
        for index, bar in self.bars.items():
            if not 0 <= index < 6 or (bar.is_64bit and index == 5):
                raise ValueError(f"BAR{index} cannot be declared here")
            mask = ~(bar.size - 1) & 0xFFFFFFFF
            self._set(BAR0 + 4 * index, 4, bar.type_bits, wmask=mask & ~0xF)
            if bar.is_64bit:
                if index + 1 in self.bars:
                    raise ValueError(f"BAR{index + 1} is the upper half of 64-bit BAR{index}")
                self._set(BAR0 + 4 * index + 4, 4, 0, wmask=(~(bar.size - 1) >> 32) & 0xFFFFFFFF)

    def _add_capability(self, cap_id: CapId, body: bytes) -> int:
        offset = self._next_cap
        if offset + len(body) > CONFIG_SPACE_SIZE:
            raise ValueError("capability list does not fit the config header")
        self.data[offset:offset + len(body)] = body
        if self.capabilities:
            self.data[max(self.capabilities.values()) + 1] = offset
        else:
            self.data[CAPABILITIES_POINTER] = offset
            self.data[STATUS] |= STATUS_CAP_LIST
        self.capabilities[cap_id] = offset
        self._next_cap = (offset + len(body) + 3) & ~3
        return offset

    def _add_pm(self) -> None:
        # PMC: version 3 (PM 1.2), no PME; PMCSR: D0, No_Soft_Reset so a D3->D0
        # transition keeps our state (what QEMU's pre-reset D0 check expects).
        body = pci_pm_cap.build(dict(cap_id=CapId.PM, next=0, pmc=0x0003,
                                     pmcsr=PM_CSR_NO_SOFT_RESET, pmcsr_bse=0, data=0))
        off = self._add_capability(CapId.PM, body)
        self._set(off + 4, 2, PM_CSR_NO_SOFT_RESET, wmask=PM_CSR_POWER_STATE,
                  w1c=PM_CSR_PME_STATUS)

    def _add_msix(self, msix: MsixSpec) -> None:
        bar = self.bars.get(msix.bir)
        if bar is None:
            raise ValueError(f"MSI-X table in undeclared BAR{msix.bir}")
        for start, length in ((msix.table_offset, msix.table_size),
                              (msix.pba_offset, msix.pba_size)):
            if start + length > bar.size:
                raise ValueError("MSI-X table or PBA outside its BAR")
        if (msix.table_offset < msix.pba_offset + msix.pba_size
                and msix.pba_offset < msix.table_offset + msix.table_size):
            raise ValueError("MSI-X table and PBA overlap")
        body = pci_msix_cap.build(dict(
            cap_id=CapId.MSIX, next=0, message_control=msix.vectors - 1,
            table_offset_bir=msix.table_offset | msix.bir,
            pba_offset_bir=msix.pba_offset | msix.bir))
        off = self._add_capability(CapId.MSIX, body)
        self._set(off + 2, 2, msix.vectors - 1,
                  wmask=MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)

    def _add_pcie(self) -> None:
        # Version 2 capability of a root-complex integrated endpoint: our functions sit
        # on bus 0 of the host bridge, and an RCiEP has no link to describe.
        values = dict.fromkeys((sc.name for sc in pcie_cap.subcons), 0)
        values.update(cap_id=CapId.PCIE, next=0,
                      pcie_capabilities=2 | (PCIE_TYPE_RC_INTEGRATED << 4),
                      device_capabilities=1 << 15)  # role-based error reporting
        off = self._add_capability(CapId.PCIE, pcie_cap.build(values))
        # Device control: error reporting enables, relaxed ordering, max payload /
        # read request size fields and no-snoop are RW; device status errors RW1C.
        self._set(off + 8, 2, 0x2810, wmask=0x7CFF)
        self._set(off + 10, 2, 0, w1c=0x000F)

    def add_vendor_capability(self, body: bytes) -> int:
        """Append a vendor-specific capability (ID 0x09, PCI 3.0 appendix H); its offset.

        `body` is the whole capability; its first two bytes (ID, next) are filled in
        here. Several may be added; all are read-only, part of the power-on image, and
        must be added before the function is served.
        """
        offset = self._next_cap
        if offset + len(body) > CONFIG_SPACE_SIZE or len(body) < 2:
            raise ValueError("vendor capability does not fit the config header")
        last = self.data[CAPABILITIES_POINTER]
        while last and self.data[last + 1]:
            last = self.data[last + 1]
        self.data[offset:offset + len(body)] = bytes([VENDOR_SPECIFIC_CAP_ID, 0]) + body[2:]
        self.data[last + 1 if last else CAPABILITIES_POINTER] = offset
        self.data[STATUS] |= STATUS_CAP_LIST
        self._next_cap = (offset + len(body) + 3) & ~3
        self._reset_image = bytes(self.data)
        return offset

    # -- access ------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def read_int(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, data: bytes) -> None:
        """Apply a client's write through the masks; hooks see the new value."""
        for i, byte in enumerate(data):
            pos = offset + i
            old = self.data[pos]
            new = (old & ~self.wmask[pos]) | (byte & self.wmask[pos])
            self.data[pos] = new & ~(byte & self.w1cmask[pos]) & 0xFF
        end = offset + len(data)
        for start, stop, hook in self._hooks:
            if start < end and offset < stop:
                hook(offset, len(data))

    def on_write(self, offset: int, size: int, hook: WriteHook) -> None:
        """Call `hook(offset, size)` after any write that touches [offset, offset+size)."""
        self._hooks.append((offset, offset + size, hook))

    def reset(self) -> None:
        """Back to the power-on image (a function-level reset)."""
        self.data[:] = self._reset_image

    # -- decoded state ------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.read_int(COMMAND, 2)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & COMMAND_MASTER)

    @property
    def msix_control(self) -> int:
        off = self.capabilities.get(CapId.MSIX)
        return 0 if off is None else self.read_int(off + 2, 2)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix_control & MSIX_CONTROL_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self.msix_control & MSIX_CONTROL_FUNCTION_MASK)

    def set_interrupt_status(self, asserted: bool) -> None:
        if asserted:
            self.data[STATUS] |= STATUS_INTERRUPT
        else:
            self.data[STATUS] &= ~STATUS_INTERRUPT & 0xFF

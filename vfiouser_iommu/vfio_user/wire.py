"""vfio-user wire format: every message of the protocol, described once.

Models the vfio-user protocol (QEMU `docs/interop/vfio-user.rst`, version 0.x) as our
peer, QEMU >= 10.1's `vfio-user-pci` client, really speaks it: host byte order (we only
run on little-endian hosts), a 16-byte header on every message, payloads packed with no
padding. The `construct` definitions below are the reference; the `struct` codecs at the
end are the hot path for the header and region accesses, and
`tests/protocol/test_wire.py` proves the two agree.

DMA_READ/DMA_WRITE exist in two layouts: the protocol document's (u64 count, data at
payload + 16), which QEMU 11.1.3 was verified live to speak (docs/vfio-user.md), and the
packed one of the `VFIOUserDMARW` struct in QEMU's vfio-user patch series (u32 count,
data at payload + 12). The server speaks the first by default (`DmaLayout`).
"""

from __future__ import annotations

import enum
import struct

from construct import (
    Bytes,
    GreedyBytes,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
    this,
)


class Command(enum.IntEnum):
    """Command numbers (protocol document, "Commands")."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Header flags: bits 0-3 are the message type.
TYPE_MASK = 0xF
TYPE_COMMAND = 0
TYPE_REPLY = 1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

HEADER_SIZE = 16

# DMA_MAP flags
DMA_MAP_READ = 1 << 0
DMA_MAP_WRITE = 1 << 1
# DMA_UNMAP flags
DMA_UNMAP_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_ALL = 1 << 1

# DEVICE_GET_INFO flags
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

# Region info flags
REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1
REGION_INFO_FLAG_MMAP = 1 << 2
REGION_INFO_FLAG_CAPS = 1 << 3

# IRQ info flags
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

# SET_IRQS flags: one data type and one action.
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_TYPE_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_TYPE_MASK = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER


class PciRegion(enum.IntEnum):
    """VFIO PCI region indices (linux/vfio.h VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_PCI_REGIONS = 9


class PciIrq(enum.IntEnum):
    """VFIO PCI IRQ indices (linux/vfio.h VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_PCI_IRQS = 5

# -- construct definitions (the reference) -----------------------------------------

vfio_user_header = Struct(
    "msg_id" / Int16ul,
    "command" / Int16ul,
    "msg_size" / Int32ul,
    "flags" / Int32ul,
    "error_no" / Int32ul,
)

vfio_user_version = Struct(
    "major" / Int16ul,
    "minor" / Int16ul,
    "json" / GreedyBytes,
)

vfio_user_dma_map = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "offset" / Int64ul,
    "addr" / Int64ul,
    "size" / Int64ul,
)

vfio_user_dma_unmap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "addr" / Int64ul,
    "size" / Int64ul,
)

vfio_user_device_info = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "num_regions" / Int32ul,
    "num_irqs" / Int32ul,
)

vfio_user_region_info = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "cap_offset" / Int32ul,
    "size" / Int64ul,
    "offset" / Int64ul,
)

vfio_info_cap_header = Struct(
    "id" / Int16ul,
    "version" / Int16ul,
    "next" / Int32ul,
)

vfio_user_irq_info = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
)

vfio_user_irq_set = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "start" / Int32ul,
    "count" / Int32ul,
)

vfio_user_region_access = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
)

vfio_user_write_multi_entry = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
    "data" / Bytes(8),
)

vfio_region_info_cap_sparse_mmap = Struct(
    "header" / vfio_info_cap_header,  # id 1, version 1
    "nr_areas" / Int32ul,
    "reserved" / Int32ul,
    "areas" / Struct("offset" / Int64ul, "size" / Int64ul)[this.nr_areas],
)

vfio_region_info_cap_type = Struct(
    "header" / vfio_info_cap_header,  # id 2, version 1
    "type" / Int32ul,
    "subtype" / Int32ul,
)

vfio_user_region_io_fds_request = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
)

vfio_user_bitmap = Struct(
    "pgsize" / Int64ul,
    "size" / Int64ul,
    "data" / Bytes(this.size),
)

vfio_user_write_multi = Struct(
    "wr_cnt" / Int64ul,
    "wrs" / vfio_user_write_multi_entry[this.wr_cnt],
)

vfio_user_device_feature = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,  # bits 0-15 feature, bit 16 GET, 17 SET, 18 PROBE
    "data" / GreedyBytes,
)

vfio_user_mig_data = Struct(
    "argsz" / Int32ul,
    "size" / Int32ul,
    "data" / GreedyBytes,
)

# The protocol document's DMA_READ/DMA_WRITE: u64 count, data at payload + 16. `data`
# is empty in a DMA_READ request and in a DMA_WRITE reply.
vfio_user_dma_rw_spec = Struct(
    "addr" / Int64ul,
    "count" / Int64ul,
    "data" / GreedyBytes,
)

# The packed VFIOUserDMARW of QEMU's patch series: u32 count, data at payload + 12;
# sizeof is 32 with the header and that code checks "count <= size - 32", so a message
# carries 4 tail bytes after data. QEMU 11.1.3 does NOT speak it (it answers E2BIG).
# Used for DMA_WRITE requests and DMA_READ replies (data present) ...
vfio_user_dma_rw_packed = Struct(
    "addr" / Int64ul,
    "count" / Int32ul,
    "data" / Bytes(this.count),
    Padding(4),
)
# ... and for DMA_READ requests (no data yet).
vfio_user_dma_read_packed = Struct(
    "addr" / Int64ul,
    "count" / Int32ul,
    Padding(4),
)

# -- hot-path codecs (checked against the definitions above) -------------------------

HEADER = struct.Struct("<HHIII")
REGION_ACCESS = struct.Struct("<QII")
DMA_MAP = struct.Struct("<IIQQQ")
DMA_UNMAP = struct.Struct("<IIQQ")
DEVICE_INFO = struct.Struct("<IIII")
REGION_INFO = struct.Struct("<IIIIQQ")
IRQ_INFO = struct.Struct("<IIII")
IRQ_SET = struct.Struct("<IIIII")
VERSION = struct.Struct("<HH")
DMA_RW_SPEC = struct.Struct("<QQ")
DMA_RW_PACKED = struct.Struct("<QI")


class DmaLayout(enum.Enum):
    """Which DMA_READ/DMA_WRITE layout the peer speaks (QEMU 11.1.3: SPEC)."""

    PACKED = "packed"
    SPEC = "spec"


def encode_dma_request(layout: DmaLayout, addr: int, count: int, data: bytes = b"") -> bytes:
    """Payload of a DMA_READ (`data` empty) or DMA_WRITE request in `layout`."""
    if layout is DmaLayout.PACKED:
        return DMA_RW_PACKED.pack(addr, count) + data + bytes(4)
    return DMA_RW_SPEC.pack(addr, count) + data


def decode_dma_payload(layout: DmaLayout, payload: bytes | memoryview) -> tuple[int, int, bytes]:
    """(addr, count, data) of a DMA_READ/DMA_WRITE request or DMA_READ reply payload.

    Raises ValueError when the payload is too short for its header or its count.
    """
    codec = DMA_RW_PACKED if layout is DmaLayout.PACKED else DMA_RW_SPEC
    if len(payload) < codec.size:
        raise ValueError("DMA payload shorter than its header")
    addr, count = codec.unpack_from(payload)
    data = bytes(payload[codec.size:codec.size + count])
    if len(data) != count:
        raise ValueError("DMA payload shorter than its count")
    return addr, count, data


def pack_header(msg_id: int, command: int, size: int, flags: int, error_no: int = 0) -> bytes:
    return HEADER.pack(msg_id & 0xFFFF, command, size, flags, error_no)

"""Write the seed corpus of the wire fuzzer: valid messages, as QEMU sends them.

    python tests/fuzz/make_corpus.py [tests/fuzz/corpus]

One folder per target of fuzz_wire.py. Seeds are valid messages (and the sequences
QEMU's vfio-user-pci sends when it realizes a device, maps RAM, enables MSI-X and
drives the device), so that the fuzzer starts from messages that reach deep into each
handler and mutates from there. The files are committed; rerun this after changing the
input format (wire_harness.encode).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from wire_harness import (  # noqa: E402
    CONTROL_NO_REPLY,
    CONTROL_RAW,
    CONTROL_SPLIT,
    FD_KINDS,
    RAM_BASE,
    VERSION_BODY,
    Message,
    encode,
)

from vfiouser_iommu.vfio_user import wire  # noqa: E402
from vfiouser_iommu.vfio_user.wire import Command, PciIrq  # noqa: E402

C = Command
RW = wire.DMA_MAP_READ | wire.DMA_MAP_WRITE
MEMFD, EVENTFD = FD_KINDS.index("memfd"), FD_KINDS.index("eventfd")
IOMMU, TESTDEV, BLK, RNG, TESTDEV_ALONE = range(5)


def msg(cmd: int, payload: bytes = b"", *, fds=(), control: int = 0, msg_id: int = 1) -> Message:
    return Message(control, cmd, msg_id, payload, list(fds))


def dma_map(addr=RAM_BASE, size=1 << 20, flags=RW, offset=0, fd=True) -> Message:
    return msg(C.DMA_MAP, wire.DMA_MAP.pack(32, flags, offset, addr, size),
               fds=[MEMFD] if fd else [])


def region_read(index: int, offset: int, count: int) -> Message:
    return msg(C.REGION_READ, wire.REGION_ACCESS.pack(offset, index, count))


def region_write(index: int, offset: int, data: bytes, posted: bool = False) -> Message:
    return msg(C.REGION_WRITE, wire.REGION_ACCESS.pack(offset, index, len(data)) + data,
               control=CONTROL_NO_REPLY if posted else 0)


def set_irqs(index, start, count, flags, fds=(), data=b"") -> Message:
    return msg(C.DEVICE_SET_IRQS, wire.IRQ_SET.pack(20 + len(data), flags, index, start,
                                                    count) + data, fds=fds)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


MSIX_ENABLE = wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER


def realize(function: int, msix_cap: int) -> list[Message]:
    """What QEMU sends from connect to a running device (docs/vfio-user.md section 6)."""
    out = [dma_map(0x1000, 0xF000, wire.DMA_MAP_READ, fd=False), dma_map(),
           msg(C.DEVICE_GET_INFO, wire.DEVICE_INFO.pack(16, 0, 0, 0))]
    out += [msg(C.DEVICE_GET_REGION_INFO, wire.REGION_INFO.pack(32, 0, i, 0, 0, 0))
            for i in (0, 1, 2, 3, 4, 5, 7)]
    out += [msg(C.DEVICE_GET_IRQ_INFO, wire.IRQ_INFO.pack(16, 0, PciIrq.ERR, 0)),
            region_read(7, 0, 256), msg(C.DEVICE_RESET),
            msg(C.DEVICE_GET_IRQ_INFO, wire.IRQ_INFO.pack(16, 0, PciIrq.MSIX, 0)),
            region_write(7, 0x04, b"\x06\x00"),
            region_write(7, msix_cap + 2, b"\x03\x80"),
            set_irqs(PciIrq.MSIX, 0, 1, MSIX_ENABLE),
            set_irqs(PciIrq.MSIX, 0, 1, MSIX_ENABLE, fds=[EVENTFD])]
    return out


def iommu_program() -> list[Message]:
    """Bare mode, then a command queue with an IOFENCE.C, rung."""
    return [region_write(0, 0x10, u64(1)),                           # ddtp Bare
            region_write(0, 0x18, u64(((RAM_BASE >> 12) << 10) | 3)),  # cqb: 16 entries
            region_write(0, 0x48, u32(1)),                            # cqcsr cqen
            region_write(0, 0x24, u32(1), posted=True),               # cqt
            region_read(0, 0x48, 4), region_read(0, 0x20, 4)]


def testdev_dma() -> list[Message]:
    return [region_write(0, 0x04, u32(RAM_BASE)), region_write(0, 0x0C, u32(64)),
            region_write(0, 0x1C, u32(RAM_BASE)), region_write(0, 0x2C, u32(1 << 31)),
            region_write(0, 0x14, u32(1)), region_read(0, 0x00, 4), region_read(0, 0x10, 4)]


def virtio_init() -> list[Message]:
    """Status ACK|DRIVER, features, queue 0 at RAM, DRIVER_OK, a notify."""
    w8 = lambda off, v: region_write(0, off, bytes([v]))          # noqa: E731
    w16 = lambda off, v: region_write(0, off, struct.pack("<H", v))  # noqa: E731
    w32 = lambda off, v: region_write(0, off, u32(v))               # noqa: E731
    return [w8(0x14, 1), w8(0x14, 3), w32(0x08, 1), w32(0x0C, 0x3), w8(0x14, 11),
            w16(0x16, 0), w16(0x18, 16), w32(0x20, RAM_BASE), w32(0x28, RAM_BASE + 0x1000),
            w32(0x30, RAM_BASE + 0x2000), w16(0x1C, 1), w8(0x14, 15),
            region_write(0, 0x3000, b"\0\0", posted=True), region_read(0, 0x1000, 1)]


def seeds() -> dict[str, dict[str, bytes]]:
    per: dict[str, dict[str, bytes]] = {}
    qemu_caps = wire.VERSION.pack(0, 0) + VERSION_BODY[4:]
    per["version"] = {
        "qemu": encode(0, [msg(C.VERSION, qemu_caps)], negotiate=False),
        "empty-json": encode(0, [msg(C.VERSION, wire.VERSION.pack(0, 0) + b"{}\0")],
                             negotiate=False),
        "no-json": encode(0, [msg(C.VERSION, wire.VERSION.pack(0, 0))], negotiate=False),
    }
    per["dma_map"] = {
        "ram": encode(TESTDEV, [dma_map()]),
        "rom-without-fd": encode(IOMMU, [dma_map(0x1000, 0xF000, wire.DMA_MAP_READ, fd=False)]),
        "offset": encode(BLK, [dma_map(0x1_0000_0000, 0x2000, offset=0x4000)]),
        "overlap": encode(TESTDEV, [dma_map(), dma_map(RAM_BASE + 0x1000, 0x1000)]),
    }
    per["dma_unmap"] = {
        "exact": encode(TESTDEV, [dma_map(), msg(C.DMA_UNMAP, wire.DMA_UNMAP.pack(
            24, 0, RAM_BASE, 1 << 20))]),
        "all": encode(IOMMU, [dma_map(), dma_map(0x1000, 0x1000, fd=False), msg(
            C.DMA_UNMAP, wire.DMA_UNMAP.pack(24, wire.DMA_UNMAP_ALL, 0, 0))]),
    }
    per["device_get_info"] = {"qemu": encode(RNG, [msg(C.DEVICE_GET_INFO,
                                                         wire.DEVICE_INFO.pack(16, 0, 0, 0))])}
    per["get_region_info"] = {
        f"index-{i}": encode(i % 4, [msg(C.DEVICE_GET_REGION_INFO,
                                         wire.REGION_INFO.pack(32, 0, i, 0, 0, 0))])
        for i in range(9)}
    per["get_irq_info"] = {
        f"index-{i}": encode(i % 4, [msg(C.DEVICE_GET_IRQ_INFO, wire.IRQ_INFO.pack(16, 0, i, 0))])
        for i in range(5)}
    per["set_irqs"] = {
        "msix-eventfd": encode(TESTDEV, realize(TESTDEV, 0x48)[-3:]),
        "msix-two": encode(BLK, [set_irqs(PciIrq.MSIX, 0, 2, MSIX_ENABLE,
                                          fds=[EVENTFD, EVENTFD])]),
        "intx-mask-unmask": encode(TESTDEV, [
            set_irqs(PciIrq.INTX, 0, 1, MSIX_ENABLE, fds=[EVENTFD]),
            set_irqs(PciIrq.INTX, 0, 1, wire.IRQ_SET_DATA_NONE | wire.IRQ_SET_ACTION_MASK),
            set_irqs(PciIrq.INTX, 0, 1, wire.IRQ_SET_DATA_BOOL | wire.IRQ_SET_ACTION_UNMASK,
                     data=b"\x01")]),
        "disable": encode(IOMMU, [set_irqs(PciIrq.MSIX, 0, 0, wire.IRQ_SET_DATA_NONE
                                           | wire.IRQ_SET_ACTION_TRIGGER)]),
        "trigger": encode(RNG, [set_irqs(PciIrq.MSIX, 0, 1, MSIX_ENABLE, fds=[EVENTFD]),
                                set_irqs(PciIrq.MSIX, 0, 1, wire.IRQ_SET_DATA_NONE
                                         | wire.IRQ_SET_ACTION_TRIGGER)]),
    }
    per["region_read"] = {
        "config": encode(TESTDEV, [region_read(7, 0, 256)]),
        "bar0": encode(IOMMU, [region_read(0, 0, 8), region_read(0, 0x10, 8)]),
        "virtio-common": encode(BLK, [region_read(0, 0, 0x40)]),
        "pba": encode(RNG, [region_read(2, 0x800, 8)]),
    }
    per["region_write"] = {
        "config-command": encode(TESTDEV, [region_write(7, 4, b"\x06\x00")]),
        "iommu": encode(IOMMU, [dma_map()] + iommu_program()),
        "testdev-dma": encode(TESTDEV, [dma_map()] + testdev_dma()),
        "virtio": encode(BLK, [dma_map()] + virtio_init()),
        "rng": encode(RNG, [dma_map()] + virtio_init()),
    }
    per["device_reset"] = {"reset": encode(BLK, [msg(C.DEVICE_RESET)])}
    per["unknown"] = {"feature": encode(IOMMU, [msg(C.DEVICE_FEATURE, u32(8) + u32(0))])}
    per["sequence"] = {
        "iommu-realize": encode(IOMMU, realize(IOMMU, 0x48) + iommu_program()),
        "testdev-realize-dma": encode(TESTDEV, realize(TESTDEV, 0x48) + testdev_dma()),
        "blk-realize-init": encode(BLK, realize(BLK, 0x40) + virtio_init()),
        "rng-realize-init": encode(RNG, realize(RNG, 0x40) + virtio_init()),
        "dma-messages": encode(TESTDEV_ALONE, realize(TESTDEV_ALONE, 0x48) + [
            region_write(0, 0x04, u32(0x2800_0000)), region_write(0, 0x0C, u32(64)),
            region_write(0, 0x2C, u32(1 << 31)), region_write(0, 0x14, u32(1)),
            region_read(0, 0x00, 4),
            region_write(0, 0x28, u32(1 << 1)), region_write(0, 0x14, u32(1)),
            region_read(0, 0x00, 4), region_read(0, 0x10, 4)]),
        "slow-reader": encode(BLK, [Message(0x80, C.REGION_READ, i, wire.REGION_ACCESS.pack(
            0, 0, 0x4000)) for i in range(16)]),
        "split-and-garbage": encode(TESTDEV, [
            Message(CONTROL_SPLIT, C.DEVICE_GET_INFO, 7, wire.DEVICE_INFO.pack(16, 0, 0, 0)),
            Message(CONTROL_RAW, 0, 0, wire.pack_header(9, C.REGION_READ, 1 << 24, 0)),
            Message(CONTROL_RAW, 0, 0, b"\0" * 64)]),
        "unsolicited-reply": encode(RNG, [Message(0x40, C.DMA_WRITE, 3, b"")]),
    }
    return per


def main() -> None:
    from iommu_harness import seed_programs

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus"
    for target, files in {**seeds(), "iommu": seed_programs()}.items():
        folder = root / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / f"seed-{name}").write_bytes(data)
    print(f"seed corpus written to {root}")


if __name__ == "__main__":
    main()

"""Split virtqueues: chains direct and indirect, and every malformed form a driver can
build (loops, out-of-range indices, too-long chains, bad indirect tables, wrong order)
ends in DEVICE_NEEDS_RESET, never in an exception escaping the transport."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiouser_iommu.endpoints.virtio import VirtioPciFunction, VirtioRng
from vfiouser_iommu.endpoints.virtio.device import VIRTIO_F_INDIRECT_DESC
from vfiouser_iommu.endpoints.virtio.layouts import (
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vfiouser_iommu.endpoints.virtio.pci import DEVICE_NEEDS_RESET
from vfiouser_iommu.endpoints.virtio.testing import FakeHost, VirtioPciDriver
from vfiouser_iommu.endpoints.virtio.virtqueue import (
    Buffer,
    SplitVirtqueue,
    VirtqueueError,
    pieces,
)
from vfiouser_iommu.memory import DmaView, GuestMemory

RAM = 0x8000_0000
DATA = RAM + 0x10000
TABLE = RAM + 0x20000
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
QSIZE = 16


class PerFieldView(DmaView):
    """Identity DMA without zero-copy views: rings are read field by field."""

    def map_sg(self, buffers, *, write, attrs=None):
        return None


def make_rig(features: int | None = None, per_field: bool = False):
    fn = VirtioPciFunction(VirtioRng())
    fn.memory.add_region(RAM, bytearray(0x40000))
    if per_field:
        fn.set_dma_view(PerFieldView(fn.memory))
    host = FakeHost()
    fn.attach(host)
    drv = VirtioPciDriver(fn, fn.memory, RAM)
    assert drv.negotiate(features)
    drv.setup_queue(0, size=QSIZE)
    drv.driver_ok()
    return fn, host, drv


def run(host: FakeHost, drv: VirtioPciDriver) -> None:
    drv.notify(0)
    host.run()


# -- well-formed chains --------------------------------------------------------------------------
def test_direct_chain_of_several_buffers():
    fn, host, drv = make_rig()
    drv.add_chain(0, [(DATA, 8, True), (DATA + 0x100, 24, True)])
    run(host, drv)
    assert drv.used(0) == [(0, 32)]
    assert drv.mem.read(DATA, 8) != bytes(8) and drv.mem.read(DATA + 0x100, 24) != bytes(24)


def test_indirect_chain():
    fn, host, drv = make_rig()
    drv.add_chain(0, [(DATA, 8, True), (DATA + 0x100, 8, True)], indirect_at=TABLE)
    run(host, drv)
    assert drv.used(0) == [(0, 16)]
    assert drv.status & DEVICE_NEEDS_RESET == 0


def test_chains_complete_in_order_and_across_ring_wrap():
    fn, host, drv = make_rig()
    for rnd in range(3):
        for i in range(QSIZE):
            drv.add_chain(0, [(DATA + 16 * i, 4 + i, True)])
        run(host, drv)
        assert drv.used_idx(0) == QSIZE * (rnd + 1)
    assert drv.used(0) == [(i, 4 + i) for i in range(QSIZE)]


def test_pieces_cut_a_byte_range_across_buffers():
    bufs = [Buffer(0x1000, 4), Buffer(0x2000, 8), Buffer(0x3000, 4)]
    assert list(pieces(bufs, 2, 8)) == [(0x1002, 2), (0x2000, 6)]
    assert list(pieces(bufs, 12, 10)) == [(0x3000, 4)]


# -- malformed chains ------------------------------------------------------------------------------
def loop(drv):
    drv.write_desc(0, 0, DATA, 8, WRITE | NEXT, 1)
    drv.write_desc(0, 1, DATA, 8, WRITE | NEXT, 0)
    drv.make_available(0, 0)


def next_out_of_range(drv):
    drv.write_desc(0, 0, DATA, 8, WRITE | NEXT, QSIZE)
    drv.make_available(0, 0)


def head_out_of_range(drv):
    drv.make_available(0, QSIZE + 3)


def readable_after_writable(drv):
    drv.write_desc(0, 0, DATA, 8, WRITE | NEXT, 1)
    drv.write_desc(0, 1, DATA, 8, 0, 0)
    drv.make_available(0, 0)


def indirect_with_next(drv):
    drv.mem.write(TABLE, VIRTQ_DESC.pack(DATA, 8, WRITE, 0))
    drv.write_desc(0, 0, TABLE, 16, INDIRECT | NEXT, 1)
    drv.write_desc(0, 1, DATA, 8, WRITE, 0)
    drv.make_available(0, 0)


def indirect_bad_length(drv):
    drv.write_desc(0, 0, TABLE, 24, INDIRECT, 0)
    drv.make_available(0, 0)


def indirect_empty(drv):
    drv.write_desc(0, 0, TABLE, 0, INDIRECT, 0)
    drv.make_available(0, 0)


def indirect_nested(drv):
    drv.mem.write(TABLE, VIRTQ_DESC.pack(TABLE + 0x100, 16, INDIRECT, 0))
    drv.write_desc(0, 0, TABLE, 16, INDIRECT, 0)
    drv.make_available(0, 0)


def indirect_loop(drv):
    drv.mem.write(TABLE, VIRTQ_DESC.pack(DATA, 8, WRITE | NEXT, 1))
    drv.mem.write(TABLE + 16, VIRTQ_DESC.pack(DATA, 8, WRITE | NEXT, 0))
    drv.write_desc(0, 0, TABLE, 32, INDIRECT, 0)
    drv.make_available(0, 0)


def indirect_too_long(drv):
    entries = QSIZE + 1
    for i in range(entries):
        more = NEXT if i + 1 < entries else 0
        drv.mem.write(TABLE + 16 * i, VIRTQ_DESC.pack(DATA, 1, WRITE | more, i + 1))
    drv.write_desc(0, 0, TABLE, 16 * entries, INDIRECT, 0)
    drv.make_available(0, 0)


def indirect_next_out_of_table(drv):
    drv.mem.write(TABLE, VIRTQ_DESC.pack(DATA, 8, WRITE | NEXT, 5))
    drv.write_desc(0, 0, TABLE, 32, INDIRECT, 0)
    drv.make_available(0, 0)


def indirect_table_unmapped(drv):
    drv.write_desc(0, 0, 0x10, 32, INDIRECT, 0)
    drv.make_available(0, 0)


def avail_idx_too_far_ahead(drv):
    drv.mem.write_u16(drv.queues[0].avail + 2, QSIZE + 1)


MALFORMED = [loop, next_out_of_range, head_out_of_range, readable_after_writable,
             indirect_with_next, indirect_bad_length, indirect_empty, indirect_nested,
             indirect_loop, indirect_too_long, indirect_next_out_of_table,
             indirect_table_unmapped, avail_idx_too_far_ahead]


@pytest.mark.parametrize("per_field", [False, True], ids=["views", "per-field"])
@pytest.mark.parametrize("build", MALFORMED, ids=lambda f: f.__name__)
def test_malformed_chain_needs_reset(build, per_field):
    fn, host, drv = make_rig(per_field=per_field)
    build(drv)
    run(host, drv)
    assert drv.status & DEVICE_NEEDS_RESET
    assert drv.used_idx(0) == 0


def test_indirect_refused_when_not_negotiated():
    fn, host, drv = make_rig()
    features = drv.device_features() & ~(1 << VIRTIO_F_INDIRECT_DESC)
    assert drv.negotiate(features)
    drv.setup_queue(0, size=QSIZE)
    drv.driver_ok()
    drv.add_chain(0, [(DATA, 8, True)], indirect_at=TABLE)
    run(host, drv)
    assert drv.status & DEVICE_NEEDS_RESET


def test_longest_legal_direct_chain_is_served():
    fn, host, drv = make_rig()
    drv.add_chain(0, [(DATA + i, 1, True) for i in range(QSIZE)])
    run(host, drv)
    assert drv.used(0) == [(0, QSIZE)]


def test_pop_raises_virtqueue_error_on_loop():
    mem = GuestMemory.ram(RAM, 0x10000)
    vq = SplitVirtqueue(0, 4)
    vq.desc, vq.driver, vq.device = RAM, RAM + 0x100, RAM + 0x200
    mem.write(RAM, VIRTQ_DESC.pack(DATA, 1, NEXT, 0))
    mem.write_u16(RAM + 0x100 + 2, 1)
    with pytest.raises(VirtqueueError):
        vq.pop(DmaView(mem), indirect=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.binary(min_size=16 * QSIZE, max_size=16 * QSIZE),
       indirect=st.binary(min_size=64, max_size=64),
       ring=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=QSIZE),
       avail_idx=st.integers(0, 0xFFFF), per_field=st.booleans())
def test_random_rings_never_raise(table, indirect, ring, avail_idx, per_field):
    """Garbage descriptors (addresses pointed at our table or nowhere) and rings: the
    transport either serves chains or sets NEEDS_RESET, and nothing escapes; the same
    whether the rings are read through views or field by field."""
    fn, host, drv = make_rig(per_field=per_field)
    q = drv.queues[0]
    mangled = bytearray(table)
    for i in range(0, len(mangled), 32):  # some descriptors point at real memory
        mangled[i:i + 8] = (TABLE if i % 64 else DATA).to_bytes(8, "little")
    drv.mem.write(q.desc, bytes(mangled))
    drv.mem.write(TABLE, indirect)
    for i, head in enumerate(ring):
        drv.mem.write_u16(q.avail + 4 + 2 * i, head)
    drv.mem.write_u16(q.avail + 2, avail_idx)
    run(host, drv)
    assert drv.used_idx(0) <= QSIZE or drv.status & DEVICE_NEEDS_RESET


def test_pop_reads_avail_idx_only_when_the_known_chains_are_used_up():
    class Counting(DmaView):
        reads = 0

        def map_sg(self, buffers, *, write, attrs=None):
            return None  # every ring field through `read`, counted

        def read(self, addr, length):
            Counting.reads += addr <= AVAIL + 2 < addr + length
            return super().read(addr, length)

    AVAIL, DESC, USED = RAM, RAM + 0x1000, RAM + 0x2000
    mem = GuestMemory.ram(RAM, 0x4000)
    vq = SplitVirtqueue(0, QSIZE)
    vq.desc, vq.driver, vq.device = DESC, AVAIL, USED
    for i in range(5):
        mem.write(DESC + 16 * i, VIRTQ_DESC.pack(DATA, 8, WRITE, 0))
        mem.write_u16(AVAIL + 4 + 2 * i, i)
    mem.write_u16(AVAIL + 2, 5)
    dma = Counting(mem)
    assert [vq.pop(dma, indirect=False).head for _ in range(5)] == list(range(5))
    assert Counting.reads == 1
    assert vq.pop(dma, indirect=False) is None and Counting.reads == 2

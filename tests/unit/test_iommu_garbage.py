"""Garbage tables: random bytes in the DDT, PDT, page tables and MSI tables, pointers
outside RAM, self-referencing entries, huge device/process IDs. The IOMMU must never
raise, must answer with a Translation or a spec fault, and must never read outside the
mapped memory (reads outside would go to the fallback, which fails the test)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser_iommu.iommu import (
    Access,
    Cause,
    Fault,
    IommuConfig,
    Request,
    RequestKind,
    RiscvIommu,
    Translation,
)
from vfiouser_iommu.memory import GuestMemory

BASE = 0x8000_0000
SIZE = 1 << 20


class NoReads:
    """Fallback that fails the test on any read outside RAM (writes: notice MSIs)."""

    def __init__(self):
        self.writes = []

    def read(self, gpa: int, length: int) -> bytes:
        raise AssertionError(f"read outside mapped memory at {gpa:#x}")

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, data))


def _pointer_word(draw_int: int, kind: int) -> int:
    """A doubleword likely to look like a valid entry pointing inside (or just outside) RAM."""
    span = 20 if draw_int & 1 else (SIZE >> 12) + 4   # mostly the first pages, some outside
    ppn = (BASE >> 12) + (draw_int >> 1) % span
    return kind | ppn << 10


requests = st.builds(
    Request,
    device_id=st.one_of(st.integers(0, 0x3F), st.integers(0, (1 << 24) - 1),
                        st.just(1 << 30)),
    process_id=st.one_of(st.none(), st.integers(0, 0xFF), st.integers(0, (1 << 20) - 1),
                         st.just(1 << 24)),
    iova=st.one_of(st.integers(0, (1 << 64) - 1), st.integers(BASE, BASE + SIZE)),
    access=st.sampled_from(list(Access)),
    privileged=st.booleans(),
    kind=st.sampled_from([RequestKind.UNTRANSLATED, RequestKind.TRANSLATED,
                          RequestKind.ATS_TRANSLATION]),
    debug=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(seed_words=st.lists(st.tuples(st.integers(0, 20 * 512 - 1),
                                     st.integers(0, (1 << 64) - 1),
                                     st.sampled_from([0, 1, 3, 0xCF, 0x1F])),
                           min_size=1, max_size=200),
       noise=st.binary(min_size=0, max_size=4096),
       ddtp_mode=st.one_of(st.sampled_from([2, 3, 4]), st.integers(0, 15)), fctl=st.integers(0, 7),
       msi_flat=st.booleans(), reqs=st.lists(requests, min_size=1, max_size=8))
def test_garbage_tables_never_raise(seed_words, noise, ddtp_mode, fctl, msi_flat, reqs):
    mem = GuestMemory.ram(BASE, SIZE)
    mem.fallback = NoReads()
    mem.write(BASE, noise)
    for slot, value, kind in seed_words:
        word = _pointer_word(value, kind) | (value & (0xF << 60)) if kind else value
        mem.write_int(BASE + slot * 8, 8, word)
    config = IommuConfig(msi_flat=msi_flat, sv32=True, sv32x4=True, end=True, iotlb_entries=16)
    iommu = RiscvIommu(mem, config)
    iommu.set_register("fctl", fctl)
    iommu.set_register("ddtp", ((BASE >> 12) + ddtp_mode % 4) << 10 | ddtp_mode)
    for request in reqs:
        for _ in range(2):   # second time through the caches
            result = iommu.translate(request)
            assert isinstance(result, Translation | Fault)
            if isinstance(result, Fault):
                assert result.cause in Cause.__members__.values()
            else:
                assert 0 <= result.address < 1 << 64
        dma = iommu.dma_view(request.device_id & 0xFFFFFF, None)
        try:
            dma.write(request.iova & ((1 << 64) - 8), b"\x01\x00\x00\x00")
        except Exception as e:  # noqa: BLE001 - only DmaError may escape
            assert type(e).__name__ == "DmaError", e


TABLES = 0x8000_0000 + (8 << 20)     # where iommu_tables.Builder allocates
TABLE_PAGES = 24


def _ptr(value: int) -> int:
    return (TABLES >> 12) + value % (TABLE_PAGES + 2)


@settings(max_examples=150, deadline=None)
@given(dcs=st.lists(st.tuples(st.integers(0, 0xFFF), st.sampled_from([0, 8, 9, 10]),
                              st.sampled_from([0, 1, 2, 3, 8, 9, 10]), st.integers(0, 1),
                              st.integers(0, 1 << 20), st.integers(0, 0xFF)),
                    min_size=1, max_size=4),
       words=st.lists(st.tuples(st.integers(0, TABLE_PAGES * 512 - 1), st.integers(0, 1 << 16),
                                st.integers(0, 0xFF), st.integers(0, 7)), max_size=300),
       reqs=st.lists(st.tuples(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 300)),
                               st.integers(0, (1 << 40) - 1), st.sampled_from(list(Access)),
                               st.booleans(), st.sampled_from(list(RequestKind)[:3])),
                     min_size=1, max_size=10))
def test_random_contexts_and_tables_over_a_valid_directory(dcs, words, reqs):
    from iommu_tables import make_iommu

    iommu, b, root = make_iommu(IommuConfig(iotlb_entries=8, gtlb_entries=8))
    iommu.memory.fallback = NoReads()
    b.alloc(TABLE_PAGES * 4096)
    for did, (tc, gmode, fmode, msi, ptr, pat) in enumerate(dcs):
        b.set_dc(root, 3, did, 64, tc=tc & 0x1B2 | 1,
                 iohgatp=gmode << 60 | 5 << 44 | _ptr(ptr) & ~3,
                 ta=(ptr & 0xFFFFF) << 12, fsc=fmode << 60 | _ptr(ptr >> 3),
                 msiptp=msi << 60 | _ptr(ptr >> 5), msi_mask=pat & 0x3,
                 msi_pattern=pat << 2)
    for slot, ptr, flags, top in words:
        iommu.memory.write_int(TABLES + slot * 8, 8, top << 61 | _ptr(ptr) << 10 | flags)
    for did, pid, iova, access, priv, kind in reqs:
        request = Request(did, pid, iova, access, priv, kind)
        for _ in range(2):
            result = iommu.translate(request)
            assert isinstance(result, Translation | Fault)

"""The C fast path itself (vfiouser_iommu/iommu/fastpath.py, c_ext/): what it serves,
what it hands back to Python and when, and the cases the differential test
(test_fastpath_equivalence.py) reaches too rarely to be trusted with: A/D updates of one
word twice in a translation, the PAS boundary, region removal, the switches.

`served_by_c` tells whether C answered a call: C leaves changes pending for the next
flush, the Python path never does."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging
import mmap
import multiprocessing
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
from iommu_tables import LEAF_RW, RAM_BASE, A, Builder, D, R, U, V, W, atp, make_iommu

from vfiouser_iommu.iommu import (
    Access,
    Fault,
    HpmEvent,
    IommuConfig,
    Request,
    RiscvIommu,
    Translation,
    fastpath,
)
from vfiouser_iommu.iommu.caches import TranslationCaches
from vfiouser_iommu.iommu.regs_layouts import IOHPMEVT
from vfiouser_iommu.iommu.walk import SV39, SV39X4
from vfiouser_iommu.memory import DmaError, GuestMemory

DID = 0x10
DATA = RAM_BASE + (1 << 20)
MIB2 = 2 << 20
GPA_OFF = RAM_BASE          # nested: SPA = GPA + GPA_OFF

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="C fast path not built")


@pytest.fixture(autouse=True)
def c_implementation():
    with fastpath.implementation("c"):
        yield


def served_by_c(iommu, call):
    """(call's result, whether C answered it)."""
    iommu.caches   # noqa: B018 - flushes what C did before
    result = call()
    fast = iommu.__dict__.get("_fast")
    return result, fast is not None and bool(fastpath.lib.fp_pending(fast.c))


def req(iova, access=Access.READ, did=DID, pid=None, priv=False):
    return Request(did, pid, iova, access, priv)


def _sv39(config=None, flags=LEAF_RW, tc=1):
    iommu, b, root = make_iommu(config)
    pt = b.root(SV39)
    slot = b.map(SV39, pt, 0x5000, DATA, flags=flags)
    b.set_dc(root, 3, DID, 64, tc=tc, ta=1 << 12, fsc=atp(8, pt >> 12))
    return iommu, b, root, slot


# -- what C serves --------------------------------------------------------------------
def test_identity_bare_and_iotlb_hits_are_served_by_c():
    iommu, b, root, _ = _sv39()
    b.set_dc(root, 3, 0x11, 64)                           # identity
    assert not served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]   # DC miss
    t, c = served_by_c(iommu, lambda: iommu.translate(req(0x5008)))
    assert c and t.address == DATA + 8
    iommu.translate(req(0x1000, did=0x11))
    t, c = served_by_c(iommu, lambda: iommu.translate(req(0x1234, did=0x11)))
    assert c and (t.address, t.page_size) == (0x1234, 1 << 30)
    iommu.set_register("ddtp", 1)                         # Bare mode
    t, c = served_by_c(iommu, lambda: iommu.translate(req(0x9876)))
    assert c and t == Translation(0x9876, 1 << 30, x=True)


def test_hits_keep_statistics_lru_order_and_counters_exact():
    iommu, b, root, _ = _sv39()
    pt2 = b.root(SV39)
    b.map(SV39, pt2, 0x5000, DATA + 0x1000)
    b.set_dc(root, 3, 0x11, 64, ta=2 << 12, fsc=atp(8, pt2 >> 12))
    for did in (DID, 0x11, DID, DID):
        iommu.translate(req(0x5000, did=did))
    caches = iommu.caches
    assert list(caches.ddt) == [0x11, DID]                # LRU: most recent last
    assert [k[0][1] for k in caches.iotlb.entries] == [2, 1]
    assert caches.stats.hits == {"ddt": 2, "iotlb": 2}
    assert iommu.counters[HpmEvent.UNTRANSLATED_REQ] == 4


def test_hardware_ad_update_by_compare_and_swap():
    iommu, b, _, slot = _sv39(flags=V | R | W | U, tc=1 | 1 << 8)     # SADE
    iommu.translate(req(0x6000))                          # caches the DC (fault)
    t, c = served_by_c(iommu, lambda: iommu.translate(req(0x5000, Access.WRITE)))
    assert c and t.address == DATA
    assert b.read64(slot) & (A | D) == A | D


@pytest.mark.parametrize("impl", ["python", "c"])
def test_one_word_updated_twice_in_a_translation(impl):
    """The G-stage leaf of the first-stage tables gets A on the implicit read, then D on
    the implicit write of the first-stage A update: C's recorded updates must be seen by
    its own later reads, or it would fall back (or worse, with aliased tables)."""
    with fastpath.implementation(impl):
        iommu, b, root = make_iommu()
    groot = b.root(SV39X4)
    for gpa in range(0, 16 << 20, MIB2):      # G-stage superpages with no A/D yet
        b.map(SV39X4, groot, gpa, gpa + GPA_OFF, MIB2, flags=V | R | W | U)
    gb = replace(b, offset=GPA_OFF)
    fs_root = gb.root(SV39)
    leaf = gb.map(SV39, fs_root, 0x7000_0000, 0x10_0000, flags=V | R | W | U | A | D)
    gb.write_pte(leaf, gb.read64(leaf) & ~A, 8)
    b.set_dc(root, 3, DID, 64, tc=1 | 1 << 7 | 1 << 8, ta=3 << 12,
             fsc=atp(8, fs_root >> 12), iohgatp=atp(8, groot >> 12, 1))
    iommu.translate(req(0x9000_0000))             # DC cached (a fault)
    t, c = served_by_c(iommu, lambda: iommu.translate(req(0x7000_0000)))
    assert t.address == RAM_BASE + 0x10_0000 and c == (impl == "c")
    table_leaf = b.map(SV39X4, groot, fs_root & ~(MIB2 - 1), 0, MIB2)   # its slot
    assert b.read64(table_leaf) & (A | D) == A | D
    assert gb.read64(leaf) & A


@pytest.mark.parametrize("impl", ["python", "c"])
def test_page_table_entry_at_the_pas_boundary_is_an_access_fault(impl):
    """PAS = 32 with RAM on both sides of 4 GiB: a valid PTE at exactly 2^32 is outside
    the IOMMU's address space and must not be read."""
    base = (1 << 32) - MIB2
    mem = GuestMemory.ram(base, 2 * MIB2)
    with fastpath.implementation(impl):
        iommu = RiscvIommu(mem, IommuConfig(pas=32))
    b = Builder(mem, heap=[base])
    ddt = b.alloc()
    pt = b.alloc()
    b.write64(pt, (1 << 32) >> 12 << 10 | V)              # level 1 table at 2^32
    b.write64(1 << 32, base >> 12 << 10 | LEAF_RW)        # 2 MiB leaf, beyond PAS
    b.set_dc(ddt, 3, DID, 64, ta=1 << 12, fsc=atp(8, pt >> 12))
    iommu.set_register("ddtp", (ddt >> 12) << 10 | 4)
    for _ in range(2):
        assert iommu.translate(req(0x1000)) == Fault(5, 2, 0x1000, 0, DID, None, False)


# -- what goes back to Python -------------------------------------------------------------
def _hpm_watch(iommu, event):
    iommu.regs.hpm.write_evt(0, IOHPMEVT.encode(eventID=int(event)), (1 << 64) - 1)


@pytest.mark.parametrize("why", ["fault", "msi page", "big-endian G-stage", "poison",
                                 "hpm watching", "reference path", "pdt miss"])
def test_python_answers(why):
    config = IommuConfig(end=True) if why == "big-endian G-stage" else None
    iommu, b, root = make_iommu(config)
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA)
    request = req(0x5000)
    if why == "msi page":
        msi_pt = b.alloc()
        b.write64(msi_pt, (DATA >> 12) << 10 | 3 << 1 | 1)
        b.set_dc(root, 3, DID, 64, msiptp=1 << 60 | msi_pt >> 12, msi_pattern=DATA >> 12)
        request = req(DATA + 4, Access.WRITE)
    elif why == "big-endian G-stage":
        iommu.set_register("fctl", 1)
        b = replace(b, big_endian=True)
        groot = b.root(SV39X4)
        b.map(SV39X4, groot, 0x5000, DATA)
        b.set_dc(root, 3, DID, 64, tc=1 | 1 << 10, iohgatp=atp(8, groot >> 12, 1))
    elif why == "pdt miss":
        pdt = b.alloc()
        b.set_pc(pdt, 1, 3, 1 | 4 << 12, atp(8, pt >> 12))
        b.set_dc(root, 3, DID, 64, tc=1 | 1 << 5, fsc=atp(1, pdt >> 12))
        iommu.translate(req(0x5000, pid=3))
        iommu.invalidate_pdt(DID, 3)
        request = req(0x5000, pid=3)
    else:
        b.set_dc(root, 3, DID, 64, ta=1 << 12, fsc=atp(8, pt >> 12))
    iommu.translate(req(0x6000))                          # DC cached
    if why == "fault":
        request = req(0x6000)
    elif why == "poison":
        iommu.memory.poison(RAM_BASE + (32 << 20), 8)
    elif why == "hpm watching":
        _hpm_watch(iommu, HpmEvent.UNTRANSLATED_REQ)
    elif why == "reference path":
        iommu.needs_reference_path = True
    result, c = served_by_c(iommu, lambda: iommu.translate(request))
    assert not c, why
    assert isinstance(result, Translation | Fault)
    if why == "hpm watching":
        assert iommu.regs.hpm.ctr[0] == 1


def test_hpm_counter_on_an_event_c_never_counts_keeps_c():
    iommu, _, _, _ = _sv39()
    iommu.translate(req(0x5000))
    _hpm_watch(iommu, HpmEvent.DDT_WALK)
    assert served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]
    _hpm_watch(iommu, HpmEvent.IOTLB_MISS)
    assert not served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]
    _hpm_watch(iommu, 0)
    assert served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]


def test_replaced_caches_are_mirrored_again():
    iommu, _, _, _ = _sv39()
    iommu.translate(req(0x5000))
    c = iommu.config
    iommu.caches = TranslationCaches(c.ddt_cache_entries, c.pdt_cache_entries, 1, 1, 1)
    assert not served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]   # DC miss
    assert served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]
    assert len(iommu.caches.iotlb) == 1


def test_a_copy_is_a_plain_reference_iommu():
    """The walk explainer probes a copy; it must neither share C state nor disturb it."""
    from vfiouser_iommu.iommu.probe import probe_walk

    iommu, _, _, _ = _sv39()
    iommu.translate(req(0x5000))
    iommu.translate(req(0x5000))
    assert type(copy.copy(iommu)) is RiscvIommu
    report = probe_walk(iommu, req(0x6000))
    assert report.cause == 13
    assert not iommu.__dict__["_fast"].stale
    assert served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]


# -- DMA ------------------------------------------------------------------------------------
def test_dma_through_an_identity_view_is_one_c_call():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64)
    dma = iommu.dma_view(DID)
    data = bytes(range(256)) * 256
    dma.write(DATA + 0x800, data)                 # DC miss: Python translates
    assert served_by_c(iommu, lambda: dma.read(DATA + 0x800, len(data)))[0] == data
    assert served_by_c(iommu, lambda: dma.read_int(DATA + 0x801, 2))[0] == 0x0201
    assert served_by_c(iommu, lambda: dma.write_int(DATA, 8, -1))[1]
    assert iommu.memory.read_u64(DATA) == (1 << 64) - 1


def test_dma_continues_in_python_where_c_stops():
    """The second page faults: C translated the first (its IOTLB fill stays), Python
    raises the same DmaError as pure Python would, for the whole access."""
    iommu, b, root, _ = _sv39()
    iommu.translate(req(0x5000))
    iommu.invalidate_vma(False, 0, False, 0, False, 0)
    dma = iommu.dma_view(DID)
    with pytest.raises(DmaError) as e:
        dma.read(0x5800, 0x1000)
    assert (e.value.addr, e.value.length, e.value.fault.cause) == (0x6000, 0x1000, 13)
    assert len(iommu.caches.iotlb) == 1


def test_dma_outside_ram_goes_through_the_fallback():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64)
    writes = []
    iommu.memory.fallback = type("F", (), {"write": lambda s, gpa, d: writes.append((gpa, d)),
                                           "read": lambda s, gpa, n: bytes(n)})()
    dma = iommu.dma_view(DID)
    dma.write(0x1000, b"x")
    dma.write_int(0x2000, 4, 7)                           # C translates, Python copies
    assert writes == [(0x1000, b"x"), (0x2000, b"\x07\0\0\0")]


def test_region_removed_is_never_touched_again():
    mem = GuestMemory()
    mem.add_region(RAM_BASE, bytearray(64 << 20))
    extra = bytearray(4096)
    mem.add_region(0x1000_0000, extra)
    iommu = RiscvIommu(mem)
    b = Builder(mem)
    root = b.alloc()
    iommu.set_register("ddtp", (root >> 12) << 10 | 4)
    b.set_dc(root, 3, DID, 64)
    dma = iommu.dma_view(DID)
    dma.write(0x1000_0000, b"before")
    mem.remove_region(0x1000_0000, 4096)
    with pytest.raises(DmaError):
        dma.read(0x1000_0000, 6)
    assert bytes(extra[:6]) == b"before"


def test_concurrent_dma_from_two_threads_is_safe():
    """Threads get their own buffers even on a shared view, and C's state stays whole."""
    iommu, b, root, _ = _sv39()
    shared = iommu.dma_view(DID)
    errors = []

    def hammer(n: int):
        own = iommu.dma_view(DID)
        base = 0x5000 + n * 2048
        try:
            for i in range(1500):
                for view in (own, shared):
                    view.write_int(base + (i % 128) * 8, 8, i * 4 + n)
                    assert view.read_int(base + (i % 128) * 8, 8) == i * 4 + n
                    assert len(view.read(base, 2048)) == 2048
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert list(iommu.caches.iotlb.entries) == [((None, 1), 12, 5)]
    assert served_by_c(iommu, lambda: iommu.translate(req(0x5000)))[1]


def _vcpu(mm: mmap.mmap, offset: int, go, adds: int) -> None:
    """Another process: a vCPU that changes the PTE's PPN, atomically, `adds` times."""
    fetch_add = ctypes.CDLL(ctypes.util.find_library("atomic")).__atomic_fetch_add_8
    fetch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    address = ctypes.addressof(ctypes.c_char.from_buffer(mm, offset))
    go.wait(10)
    for _ in range(adds):
        fetch_add(address, 1 << 10, 5)


@pytest.mark.skipif(ctypes.util.find_library("atomic") is None, reason="no libatomic")
def test_a_d_updates_never_lose_a_concurrent_pte_change():
    """A leaf with A=0 under SADE, no IOTLB: every translation sets A by compare-and-swap
    while another process keeps adding to the same PTE's PPN and we clear A again. The
    PPN must end exactly where the other process left it: no update of ours overwrote
    one of its changes. Most translations must be C's own."""
    adds = 1_000_000
    mm = mmap.mmap(-1, 4 << 20)                                  # shared with the child
    mem = GuestMemory()
    mem.add_region(RAM_BASE, memoryview(mm))
    iommu = RiscvIommu(mem, IommuConfig(iotlb_entries=0, gtlb_entries=0))
    b = Builder(mem, heap=[RAM_BASE])
    root = b.alloc()
    iommu.set_register("ddtp", (root >> 12) << 10 | 4)
    pt = b.root(SV39)
    slot = b.map(SV39, pt, 0x5000, DATA, flags=V | R | W | U)
    b.set_dc(root, 3, DID, 64, tc=1 | 1 << 8, ta=1 << 12, fsc=atp(8, pt >> 12))
    fetch_and = ctypes.CDLL(ctypes.util.find_library("atomic")).__atomic_fetch_and_8
    fetch_and.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    pte = ctypes.addressof(ctypes.c_char.from_buffer(mm, slot - RAM_BASE))
    fork = multiprocessing.get_context("fork")
    go = fork.Event()
    child = fork.Process(target=_vcpu, args=(mm, slot - RAM_BASE, go, adds))
    child.start()
    by_c = rounds = 0
    try:
        go.set()
        while rounds < 500_000 and (rounds < 2000 or child.exitcode is None):
            result, c = served_by_c(iommu, lambda: iommu.translate(req(0x5000)))
            assert isinstance(result, Translation) and mem.read_u64(slot) & A
            by_c += c
            rounds += 1
            fetch_and(pte, ~A & ((1 << 64) - 1), 5)               # the guest clears A
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert mem.read_u64(slot) >> 10 & ((1 << 44) - 1) == (DATA >> 12) + adds
    assert by_c > rounds / 2, (by_c, rounds)
    mem.clear()
    mm.close()


# -- switches ---------------------------------------------------------------------------------
def test_programmatic_switch():
    with fastpath.implementation("python"):
        assert type(make_iommu()[0]) is RiscvIommu
    assert type(make_iommu()[0]) is not RiscvIommu


def test_environment_switch():
    code = ("from vfiouser_iommu.iommu import RiscvIommu; from vfiouser_iommu.memory import "
            "GuestMemory; print(type(RiscvIommu(GuestMemory())).__name__)")
    out = {env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={"VFIOUSER_IOMMU_PURE": env}, check=True).stdout.strip()
           for env in ("1", "0")}
    assert out == {"1": "RiscvIommu", "0": "FastRiscvIommu"}


def test_the_fast_path_says_once_that_it_is_on(monkeypatch, caplog):
    monkeypatch.setattr(fastpath, "_warned", False)
    with caplog.at_level(logging.INFO, logger="vfiouser_iommu.iommu.fastpath"):
        RiscvIommu(GuestMemory())
        RiscvIommu(GuestMemory())
    assert [r.message for r in caplog.records] == \
        ["translation fast path: C (VFIOUSER_IOMMU_PURE=1 for pure Python)"]


def test_missing_extension_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(fastpath, "lib", None)
    monkeypatch.setattr(fastpath, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="vfiouser_iommu.iommu.fastpath"):
        assert type(RiscvIommu(GuestMemory())) is RiscvIommu
        assert type(RiscvIommu(GuestMemory())) is RiscvIommu
    assert len(caplog.records) == 1 and "pure Python" in caplog.records[0].message

"""GuestMemory.compare_exchange: a real compare-and-swap on the mapped buffer.

Hardware A/D updates (RISC-V IOMMU spec 1.0.1, section 2.2 "atomically") race with
guest vCPUs running in other threads of QEMU; the test's second process plays them.
"""

import ctypes
import ctypes.util
import mmap
import multiprocessing

import pytest

from vfiouser_iommu import memory as memory_module
from vfiouser_iommu.memory import GuestMemory, MemoryAccessError

BASE = 0x8000_0000
WORD = 0x40
LIBATOMIC = ctypes.util.find_library("atomic")
SEQ_CST = 5
CHILD_ADDS = 200_000


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_returns_the_old_value_and_writes_only_on_a_match(size, big_endian):
    mem = GuestMemory.ram(BASE, 0x1000)
    order = "big" if big_endian else "little"
    start = int.from_bytes(bytes(range(0x11, 0x11 + size)), "big")
    new = (1 << 8 * size) - 2
    mem.write(BASE + WORD, start.to_bytes(size, order))
    assert mem.compare_exchange(BASE + WORD, size, start ^ 1, new, big_endian=big_endian) == start
    assert mem.read(BASE + WORD, size) == start.to_bytes(size, order)
    assert mem.compare_exchange(BASE + WORD, size, start, new, big_endian=big_endian) == start
    assert mem.read(BASE + WORD, size) == new.to_bytes(size, order)
    assert mem.read(BASE + WORD + size, 8) == bytes(8)            # neighbours untouched


def test_misaligned_word_is_an_access_error():
    mem = GuestMemory.ram(BASE, 0x1000)
    with pytest.raises(MemoryAccessError):
        mem.compare_exchange(BASE + 4, 8, 0, 1)
    assert mem.read(BASE, 16) == bytes(16)


def test_read_only_region_is_compared_but_never_written():
    mem = GuestMemory()
    mem.add_region(BASE, memoryview(bytes(16)))
    assert mem.compare_exchange(BASE, 8, 1, 2) == 0
    with pytest.raises(MemoryAccessError):
        mem.compare_exchange(BASE, 8, 0, 2)


def _hammer(mm: mmap.mmap, go, adds: int) -> None:
    lib = ctypes.CDLL(LIBATOMIC)
    fetch_add = lib.__atomic_fetch_add_8
    fetch_add.restype = ctypes.c_uint64
    fetch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    address = ctypes.addressof(ctypes.c_char.from_buffer(mm, WORD))
    go.wait(10)
    for _ in range(adds):
        fetch_add(address, 1, SEQ_CST)


@pytest.mark.skipif(LIBATOMIC is None, reason="no libatomic on this host")
def test_no_update_is_lost_to_a_concurrent_process():
    """Another process atomically adds 1 to the word CHILD_ADDS times while we increment
    it with compare_exchange: the total is exact only if our read-compare-write cannot
    be split by the other process's updates."""
    assert memory_module.atomic_compare_exchange_available()
    mm = mmap.mmap(-1, 0x1000)                                  # MAP_SHARED, kept by fork
    mem = GuestMemory()
    mem.add_region(BASE, memoryview(mm))
    go = multiprocessing.get_context("fork").Event()
    child = multiprocessing.get_context("fork").Process(target=_hammer,
                                                        args=(mm, go, CHILD_ADDS))
    child.start()
    ours = 0
    try:
        go.set()
        for _ in range(20 * CHILD_ADDS):                        # bounded if the child hangs
            old = mem.read_u64(BASE + WORD)
            if mem.compare_exchange(BASE + WORD, 8, old, old + 1) == old:
                ours += 1
            if ours >= 1000 and child.exitcode is not None:
                break
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert mem.read_u64(BASE + WORD) == CHILD_ADDS + ours
    mem.clear()[0].buffer.release()
    mm.close()

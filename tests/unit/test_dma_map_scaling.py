"""DMA map lookups do not scan every map (issue 14 item 4).

The overlap check of DMA_MAP and `GuestMemory.overlapping` were linear scans: ~7 ms
per DMA_MAP at 65 535 maps, during which no function is served. Time is measured by
tests/bench; here the Python work is counted instead (line events under
`sys.settrace`), which is deterministic: it must not grow with the number of maps.
"""

import sys

from vfiouser_iommu.memory import GuestMemory
from vfiouser_iommu.vfio_user.dma import DmaMapTable
from vfiouser_iommu.vfio_user.wire import DMA_MAP_READ, DMA_MAP_WRITE

PAGE = 0x1000
RW = DMA_MAP_READ | DMA_MAP_WRITE


def _lines_run(fn) -> int:
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()   # coverage.py's tracer, when it runs: keep it working
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def _table(n: int) -> DmaMapTable:
    table = DmaMapTable(GuestMemory(), max_maps=1 << 20)
    for i in range(n):
        table.map(0x1_0000_0000 + 2 * i * PAGE, PAGE, RW, None, 0)
    return table


def _memory(n: int) -> GuestMemory:
    memory = GuestMemory()
    for i in range(n):
        memory.add_region(0x1_0000_0000 + 2 * i * PAGE, bytearray(PAGE))
    return memory


def test_dma_map_work_does_not_grow_with_the_maps():
    def cost(n):
        table = _table(n)
        middle = 0x1_0000_0000 + n * PAGE + PAGE  # a hole in the middle
        return _lines_run(lambda: table.map(middle, PAGE, RW, None, 0))

    small, large = cost(16), cost(4096)
    assert large <= small + 40, (small, large)


def test_overlapping_work_does_not_grow_with_the_regions():
    def cost(n):
        memory = _memory(n)
        middle = 0x1_0000_0000 + n * PAGE + PAGE
        return _lines_run(lambda: memory.overlapping(middle, PAGE))

    small, large = cost(16), cost(4096)
    assert large <= small + 40, (small, large)


def test_overlapping_finds_exactly_the_overlapped_regions():
    memory = _memory(64)
    base = 0x1_0000_0000
    assert memory.overlapping(base - PAGE, PAGE) == []
    assert [r.gpa for r in memory.overlapping(base - 1, 2)] == [base]
    assert memory.overlapping(base + PAGE, PAGE) == []
    got = memory.overlapping(base + PAGE - 1, 4 * PAGE + 2)
    assert [r.gpa for r in got] == [base, base + 2 * PAGE, base + 4 * PAGE]
    assert [r.gpa for r in memory.overlapping(base, 1 << 40)] == \
        [base + 2 * i * PAGE for i in range(64)]


def test_overlaps_are_found_after_unmaps_and_remaps():
    import errno

    import pytest

    from vfiouser_iommu.vfio_user.dma import DmaMapError

    table = _table(8)
    base = 0x1_0000_0000
    table.unmap(base + 4 * PAGE, PAGE)
    table.map(base + 4 * PAGE, 2 * PAGE, RW, None, 0)   # fills the hole and the gap
    for addr, size in ((base + 5 * PAGE, PAGE), (base + 3 * PAGE, 2 * PAGE),
                       (base - PAGE, 2 * PAGE), (base + 15 * PAGE - PAGE, 3 * PAGE),
                       (0, 1 << 40)):
        with pytest.raises(DmaMapError) as e:
            table.map(addr, size, RW, None, 0)
        assert e.value.errno == errno.EEXIST, hex(addr)
    table.map(base - PAGE, PAGE, RW, None, 0)
    table.map(base + 16 * PAGE, PAGE, RW, None, 0)
    assert len(table) == 10

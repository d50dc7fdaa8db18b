"""DMA_MAP: fd passing, mmap of shared memory, and every bad map's errno."""

import errno
import os

import pytest
from served import RAM_BASE, RAM_SIZE, open_fds

from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.client import ClientError
from vfiouser_iommu.vfio_user.wire import DMA_MAP_READ, DMA_MAP_WRITE, Command

RW = DMA_MAP_READ | DMA_MAP_WRITE


def _map(client, addr, size, fds=(), flags=RW, offset=0, argsz=32, extra=b""):
    payload = wire.DMA_MAP.pack(argsz, flags, offset, addr, size) + extra
    return client.errno_of(Command.DMA_MAP, payload, fds=fds)


def test_map_makes_shared_memory_addressable(dev, ram):
    s, function, client = dev
    fd, memory = ram
    client.dma_map(RAM_BASE, RAM_SIZE, fd)
    memory.write(RAM_BASE + 0x100, b"from the guest")
    assert function.memory.read(RAM_BASE + 0x100, 14) == b"from the guest"
    function.memory.write(RAM_BASE + 0x200, b"from the device")
    assert memory.read(RAM_BASE + 0x200, 15) == b"from the device"


def test_map_at_an_offset_into_the_fd(dev, ram):
    s, function, client = dev
    fd, memory = ram
    client.dma_map(0x1_0000_0000, 0x2000, fd, offset=0x4000)
    memory.write(RAM_BASE + 0x4010, b"abc")
    assert function.memory.read(0x1_0000_0010, 3) == b"abc"


def test_read_only_map_refuses_device_writes(dev, ram):
    from vfiouser_iommu.memory import MemoryAccessError

    s, function, client = dev
    fd, _ = ram
    client.dma_map(RAM_BASE, 0x1000, fd, flags=DMA_MAP_READ)
    function.memory.read(RAM_BASE, 4)
    try:
        function.memory.write(RAM_BASE, b"x")
    except MemoryAccessError:
        pass
    else:
        raise AssertionError("write to a read-only map succeeded")


def test_map_without_fd_is_remembered_but_not_addressable(dev):
    """Like QEMU's mask ROM: recorded (overlaps are EEXIST) but only reachable through
    DMA messages, which a synchronous read cannot use."""
    from vfiouser_iommu.memory import MemoryAccessError

    s, function, client = dev
    client.dma_map(0x1000, 0xF000)
    s.sync()
    mapping = function.host.session.dma_maps.mappings[0x1000]
    assert (mapping.addr, mapping.size, mapping.flags, mapping.region) == (0x1000, 0xF000, RW,
                                                                           None)
    assert not function.memory.contains(0x1000)
    with pytest.raises(MemoryAccessError):
        function.memory.read(0x1000, 4)
    assert _map(client, 0x2000, 0x1000) == errno.EEXIST


def _vmas() -> int:
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for _ in maps)


def test_a_map_keeps_no_fd_and_its_vma_goes_at_unmap(dev, ram):
    # The server closes the fd it received once mmapped (issue 14: Python's mmap kept a
    # dup per map, so a client's maps could exhaust the fd table).
    s, function, client = dev
    fd, _ = ram
    before, vmas = open_fds(), _vmas()
    dup = os.dup(fd)
    client.dma_map(RAM_BASE, RAM_SIZE, dup)
    os.close(dup)
    s.sync()
    assert open_fds() <= before
    assert _vmas() > vmas
    client.dma_unmap(RAM_BASE, RAM_SIZE)
    s.sync()
    assert _vmas() <= vmas


def test_a_slice_held_at_unmap_keeps_its_mapping_alive(dev, ram):
    import gc

    s, function, client = dev
    fd, memory = ram
    client.dma_map(RAM_BASE, 0x2000, fd)
    s.sync()
    held = function.memory.slice(RAM_BASE + 0x10, 4, writable=True)
    client.dma_unmap(RAM_BASE, 0x2000)
    gc.collect()
    held[:] = b"live"          # still mapped: no crash, and it is the guest's memory
    assert memory.read(RAM_BASE + 0x10, 4) == b"live"
    del held


def test_map_past_the_end_of_the_file_is_einval(dev):
    # Touching such a page would raise SIGBUS in the server.
    s, function, client = dev
    small = os.memfd_create("small")
    os.ftruncate(small, 0x1000)
    try:
        assert _map(client, RAM_BASE, 0x2000, fds=[small]) == errno.EINVAL
        assert _map(client, RAM_BASE, 0x1000, fds=[small], offset=0x1000) == errno.EINVAL
    finally:
        os.close(small)
    assert not function.memory.regions


def test_bad_maps(dev, ram):
    s, function, client = dev
    fd, _ = ram
    client.dma_map(RAM_BASE, 0x2000, fd)
    cases = [
        (dict(addr=0x1_0000_0000, size=0x1000, argsz=31), errno.EINVAL),      # argsz short
        (dict(addr=0x1_0000_0000, size=0x1000, flags=RW | 4), errno.EINVAL),  # unknown flag
        (dict(addr=0x1_0000_0800, size=0x1000), errno.EINVAL),               # unaligned addr
        (dict(addr=0x1_0000_0000, size=0x800), errno.EINVAL),                # unaligned size
        (dict(addr=0x1_0000_0000, size=0), errno.EINVAL),                    # empty
        (dict(addr=2**64 - 0x1000, size=0x2000), errno.EINVAL),              # wraps
        (dict(addr=RAM_BASE + 0x1000, size=0x2000), errno.EEXIST),           # overlaps
        (dict(addr=RAM_BASE, size=0x2000), errno.EEXIST),                    # same again
    ]
    for kwargs, expected in cases:
        dup = os.dup(fd)
        assert _map(client, fds=[dup], **kwargs) == expected, kwargs
        os.close(dup)
    assert len(function.memory.regions) == 1


def test_unaligned_fd_offset_is_einval(dev, ram):
    s, function, client = dev
    fd, _ = ram
    dup = os.dup(fd)
    assert _map(client, 0x1_0000_0000, 0x1000, fds=[dup], offset=0x800) == errno.EINVAL
    os.close(dup)


def test_two_fds_is_einval_and_both_are_closed(dev, ram):
    s, function, client = dev
    fd, _ = ram
    before = open_fds()
    a, b = os.dup(fd), os.dup(fd)
    assert _map(client, RAM_BASE, 0x1000, fds=[a, b]) == errno.EINVAL
    os.close(a)
    os.close(b)
    s.sync()
    assert open_fds() <= before


def test_fd_that_cannot_be_mapped(dev):
    s, function, client = dev
    r, w = os.pipe()
    try:
        assert _map(client, RAM_BASE, 0x1000, fds=[r], flags=DMA_MAP_READ) == errno.ENODEV
    finally:
        os.close(r)
        os.close(w)
    assert not function.memory.regions


def test_short_payload_is_einval(dev):
    s, function, client = dev
    assert client.errno_of(Command.DMA_MAP, b"\0" * 31) == errno.EINVAL


def test_too_many_maps_is_enospc(served, ram):
    s = served(max_dma_maps=2)
    client = s.connect()
    client.negotiate()
    fd, _ = ram
    client.dma_map(RAM_BASE, 0x1000, fd)
    client.dma_map(RAM_BASE + 0x1000, 0x1000)
    dup = os.dup(fd)
    assert _map(client, RAM_BASE + 0x2000, 0x1000, fds=[dup]) == errno.ENOSPC
    os.close(dup)
    client.dma_unmap(RAM_BASE + 0x1000, 0x1000)
    client.dma_map(RAM_BASE + 0x2000, 0x1000)


def test_map_errors_leave_the_connection_usable(dev):
    s, function, client = dev
    try:
        client.dma_map(0x1001, 0x1000)
    except ClientError as e:
        assert e.errno == errno.EINVAL
    assert client.device_info()[1] == 9


def test_every_client_can_hold_the_maps_it_is_advertised(served):
    """max_dma_maps in the VERSION reply is a promise: both functions' clients hold that
    many fd-backed maps at once, and one more is ENOSPC (issue 14 item 1)."""
    from vfiouser_iommu.endpoints.testdev import IommuTestDev
    from vfiouser_iommu.vfio_user.limits import MAX_DMA_MAPS_PER_CLIENT

    s = served({"a": IommuTestDev(), "b": IommuTestDev()})
    clients = [s.connect("a"), s.connect("b")]
    advertised = [c.negotiate()["capabilities"]["max_dma_maps"] for c in clients]
    assert advertised[0] == advertised[1] <= MAX_DMA_MAPS_PER_CLIENT
    n = advertised[0]
    backing = os.memfd_create("maps")
    os.ftruncate(backing, n * 0x1000)
    try:
        for client in clients:
            for i in range(n):
                payload = wire.DMA_MAP.pack(32, RW, i * 0x1000, 0x1_0000_0000 + i * 0x2000,
                                            0x1000)
                client.send(Command.DMA_MAP, payload, fds=[backing], msg_id=i & 0xFFFF)
            # pipelined: read the replies after sending them all
            assert all(not client.wait_reply(i & 0xFFFF).is_error for i in range(n))
            assert _map(client, 0x4_0000_0000, 0x1000, fds=[backing]) == errno.ENOSPC
    finally:
        os.close(backing)
    assert s.server.dma_budget.used == 2 * n
    for client in clients:
        client.close()
    s.sync()
    s.sync()
    assert s.server.dma_budget.used == 0


def test_server_wide_map_bound_is_enospc(served):
    from vfiouser_iommu.endpoints.testdev import IommuTestDev

    s = served({"a": IommuTestDev(), "b": IommuTestDev()}, max_dma_maps=5)
    s.server.dma_budget.limit = 7
    a, b = s.connect("a"), s.connect("b")
    assert a.negotiate()["capabilities"]["max_dma_maps"] == 5
    b.negotiate()
    for i in range(5):
        a.dma_map(0x1000 * (i + 1), 0x1000)
    b.dma_map(0x1000, 0x1000)
    b.dma_map(0x2000, 0x1000)
    assert _map(b, 0x3000, 0x1000) == errno.ENOSPC
    a.dma_unmap(0x1000, 0x1000)
    b.dma_map(0x3000, 0x1000)

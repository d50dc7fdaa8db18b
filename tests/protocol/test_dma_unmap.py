"""DMA_UNMAP: exact matches only, UNMAP_ALL, and the reply echo."""

import errno

from served import RAM_BASE

from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import DMA_UNMAP_ALL, Command


def _unmap(client, addr, size, flags=0, argsz=24):
    return client.errno_of(Command.DMA_UNMAP, wire.DMA_UNMAP.pack(argsz, flags, addr, size))


def test_unmap_removes_the_region_and_echoes_the_request(dev, ram):
    s, function, client = dev
    fd, _ = ram
    client.dma_map(RAM_BASE, 0x4000, fd)
    reply = client.dma_unmap(RAM_BASE, 0x4000)
    assert reply == wire.DMA_UNMAP.pack(24, 0, RAM_BASE, 0x4000)
    assert len(reply) + wire.HEADER_SIZE <= 40  # what QEMU reserved
    assert not function.memory.regions


def test_unmap_tells_the_function_before_replying(dev, ram):
    s, function, client = dev
    fd, _ = ram
    seen = []
    function.on_dma_unmap = lambda gpa, size: seen.append(
        (gpa, size, function.memory.contains(gpa)))
    client.dma_map(RAM_BASE, 0x1000, fd)
    client.dma_unmap(RAM_BASE, 0x1000)
    assert seen == [(RAM_BASE, 0x1000, True)]


def test_unmap_must_match_a_map_exactly(dev, ram):
    s, function, client = dev
    fd, _ = ram
    client.dma_map(RAM_BASE, 0x4000, fd)
    assert _unmap(client, RAM_BASE, 0x1000) == errno.ENOENT
    assert _unmap(client, RAM_BASE + 0x1000, 0x3000) == errno.ENOENT
    assert _unmap(client, 0x1000, 0x1000) == errno.ENOENT
    assert len(function.memory.regions) == 1


def test_unmap_all(dev, ram):
    s, function, client = dev
    fd, _ = ram
    client.dma_map(RAM_BASE, 0x1000, fd)
    client.dma_map(RAM_BASE + 0x1000, 0x1000, fd)
    client.dma_map(0x1000, 0x1000)
    client.dma_unmap(0, 0, flags=DMA_UNMAP_ALL)
    assert not function.memory.regions
    client.dma_map(RAM_BASE, 0x1000, fd)


def test_bad_unmaps(dev):
    s, function, client = dev
    assert _unmap(client, RAM_BASE, 0x1000, flags=DMA_UNMAP_ALL) == errno.EINVAL
    assert _unmap(client, 0, 0, flags=1) == errno.EINVAL          # dirty bitmap: not offered
    assert _unmap(client, 0, 0, flags=8) == errno.EINVAL
    assert _unmap(client, 0, 0, argsz=23) == errno.EINVAL
    assert client.errno_of(Command.DMA_UNMAP, b"\0" * 20) == errno.EINVAL

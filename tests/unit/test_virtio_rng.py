"""virtio-rng: writable buffers filled with random bytes, capped per request, faults
ending a request with what was written."""

from __future__ import annotations

import pytest

from vfiouser_iommu.endpoints import build_endpoint
from vfiouser_iommu.endpoints.virtio import VirtioRng
from vfiouser_iommu.endpoints.virtio.rng import MAX_BYTES_PER_REQUEST
from vfiouser_iommu.endpoints.virtio.virtqueue import Buffer, DescriptorChain
from vfiouser_iommu.memory import DmaError, DmaView, GuestMemory

RAM = 0x8000_0000


class FaultAbove(DmaView):
    def __init__(self, memory, limit):
        super().__init__(memory)
        self.limit = limit

    def pieces(self, addr, length, write, attrs):
        if addr + length > self.limit:
            raise DmaError(addr, length, write, "fault")
        return [(addr, length, None)]


def chain(*bufs: tuple[int, int]) -> DescriptorChain:
    return DescriptorChain(0, writable=[Buffer(a, n) for a, n in bufs])


def test_fills_every_writable_buffer():
    mem = GuestMemory.ram(RAM, 0x1000)
    written = VirtioRng().handle(0, chain((RAM, 64), (RAM + 0x100, 64)), DmaView(mem))
    assert written == 128
    assert mem.read(RAM, 64) != bytes(64) and mem.read(RAM + 0x100, 64) != bytes(64)
    assert mem.read(RAM + 64, 0xC0) == bytes(0xC0)


def test_large_buffers_are_capped():
    mem = GuestMemory.ram(RAM, 2 * MAX_BYTES_PER_REQUEST)
    written = VirtioRng().handle(0, chain((RAM, 2 * MAX_BYTES_PER_REQUEST)), DmaView(mem))
    assert written == MAX_BYTES_PER_REQUEST
    assert mem.read(RAM + MAX_BYTES_PER_REQUEST, 16) == bytes(16)


def test_fault_ends_the_request_with_what_was_written():
    mem = GuestMemory.ram(RAM, 0x1000)
    view = FaultAbove(mem, RAM + 0x200)
    assert VirtioRng().handle(0, chain((RAM, 32), (RAM + 0x300, 32)), view) == 32


def test_build_from_options():
    fn = build_endpoint("virtio-rng", {})
    assert fn.config.read_int(2, 2) == 0x1044
    with pytest.raises(ValueError):
        build_endpoint("virtio-rng", {"disk": "x"})

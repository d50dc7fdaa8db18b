"""Benchmarks of the vfio-user server (numbers printed, never asserted on time).

* Round trip of a guest-visible register read: 10 000 qtest `readl` of BAR0's
  DMA_RESULT, our iommu-testdev over vfio-user vs QEMU's own iommu-testdev, in one run.
* Messages per second the server handles from the test client: request/reply
  REGION_READs, and pipelined posted REGION_WRITEs.

Run: .venv/bin/python -m pytest tests/bench/test_bench_vfio_user.py -s -m bench
"""

from __future__ import annotations

import signal
import time

import pytest

from vfiouser_iommu import topology
from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.lab.pci import PciBus
from vfiouser_iommu.lab.qtest import QTest
from vfiouser_iommu.lab.stack import start_server_process
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.client import Client

pytestmark = pytest.mark.bench

READS = 10_000
SPEC = "iommu-testdev@03.0"


def _readl_rate(qt: QTest) -> float:
    """Seconds per qtest readl of the testdev's DMA_RESULT."""
    device = PciBus(qt).find(testdev.VENDOR_ID, testdev.DEVICE_ID)
    device.assign_bars()
    device.enable()
    addr = device.bars[0].addr + testdev.DMA_RESULT
    assert qt.readl(addr) == testdev.RESULT_IDLE
    start = time.perf_counter()
    for _ in range(READS):
        qt.readl(addr)
    return (time.perf_counter() - start) / READS


@pytest.fixture
def server(tmp_path):
    proc = start_server_process(tmp_path, [SPEC])
    yield tmp_path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.qtest
def test_bench_register_read_round_trip(lab, server):
    args = topology.vfio_user_device_args(server, [topology.parse_function(SPEC)])
    with QTest(args, memory="256M", memory_backend="memory-backend-memfd,share=on",
               lab=lab) as qt:
        ours = _readl_rate(qt)
    with QTest(["-device", "iommu-testdev,addr=03.0"], memory="256M", lab=lab) as qt:
        theirs = _readl_rate(qt)
    print(f"\nregister read round trip ({READS} qtest readl): "
          f"ours over vfio-user {ours * 1e6:.1f} us, QEMU's iommu-testdev "
          f"{theirs * 1e6:.1f} us, ratio {ours / theirs:.2f}")


def test_bench_messages_per_second(server):
    with Client(server / "03.0.sock") as client:
        client.negotiate()
        n = 20_000
        start = time.perf_counter()
        for _ in range(n):
            client.readl(0, testdev.DMA_RESULT)
        rt = n / (time.perf_counter() - start)

        payload = wire.REGION_ACCESS.pack(testdev.DMA_LEN, 0, 4) + (64).to_bytes(4, "little")
        msg = wire.pack_header(0, wire.Command.REGION_WRITE, 16 + len(payload),
                               wire.FLAG_NO_REPLY) + payload
        n_posted = 100_000
        batch = msg * 1000
        start = time.perf_counter()
        for _ in range(n_posted // 1000):
            client.send_raw(batch)
        assert client.readl(0, testdev.DMA_LEN) == 64   # all applied before this read
        posted = (n_posted + 1) / (time.perf_counter() - start)
    print(f"\nserver messages/s from the test client: {rt:,.0f} request/reply REGION_READ, "
          f"{posted:,.0f} posted REGION_WRITE")


def test_bench_dma_map_cost_with_many_maps(server):
    """DMA_MAP round trip (no fd) with few and with many maps already held: the overlap
    check bisects, so the cost should not grow (issue 14: 23 us at first, 7 ms at
    65 535 maps when it scanned)."""
    rw = wire.DMA_MAP_READ | wire.DMA_MAP_WRITE
    with Client(server / "03.0.sock") as client:
        limit = client.negotiate()["capabilities"]["max_dma_maps"]
        held, costs = 0, {}
        for target in (0, 3000, limit - 200):
            while held < target:
                client.dma_map(0x1_0000_0000 + held * 0x2000, 0x1000)
                held += 1
            start = time.perf_counter()
            for i in range(100):
                client.dma_map(0x8_0000_0000 + i * 0x2000, 0x1000, flags=rw)
            costs[target] = (time.perf_counter() - start) / 100
            for i in range(100):
                client.dma_unmap(0x8_0000_0000 + i * 0x2000, 0x1000)
    print("\nDMA_MAP round trip (no fd): " + ", ".join(
        f"{cost * 1e6:.0f} us with {n} maps held" for n, cost in costs.items())
        + f"; ratio most/fewest {costs[limit - 200] / costs[0]:.2f}")

"""Limits (vfio_user/limits.py): what the server advertises is what it enforces, and
work one client causes is done in bounded steps, so no client stalls another function.

The per-message bounds have their own tests: MAX_MSG_SIZE (E2BIG, test_framing.py),
RECV_MAX_FDS (connection closed, test_framing.py), MAX_DATA_XFER_SIZE (E2BIG,
test_region_rw.py), DMA maps per client and server-wide (ENOSPC, test_dma_map.py),
OUT_BACKLOG (test_connection.py).
"""

from __future__ import annotations

import os
import threading

from served import RAM_BASE

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.endpoints.testdev import IommuTestDev
from vfiouser_iommu.iommu_pci import COMMAND_BUDGET, IommuFunction
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.limits import (
    BATCH,
    MAX_DATA_XFER_SIZE,
    MAX_DMA_MAPS_PER_CLIENT,
    MAX_MSG_FDS,
)

COMMANDS = 1 << 16


def test_version_reply_advertises_the_limits(served):
    s = served({"a": IommuTestDev(), "b": IommuTestDev()})
    caps = s.connect("a").negotiate()["capabilities"]
    assert caps["max_msg_fds"] == MAX_MSG_FDS
    assert caps["max_data_xfer_size"] == MAX_DATA_XFER_SIZE
    assert caps["max_dma_maps"] == s.server.max_dma_maps <= MAX_DMA_MAPS_PER_CLIENT
    assert s.server.dma_budget.limit >= 2 * caps["max_dma_maps"]


def test_a_long_command_queue_does_not_stall_another_function(served):
    """65 536 commands rung at once run COMMAND_BUDGET per loop turn: another
    function's request is answered long before the queue drains."""
    iommu, other_dev = IommuFunction(), IommuTestDev()
    s = served({"iommu": iommu, "dev": other_dev})
    ram = os.memfd_create("ram")
    queue_bytes = 16 * COMMANDS
    os.ftruncate(ram, queue_bytes)
    os.pwrite(ram, (1).to_bytes(16, "little") * COMMANDS, 0)        # IOTINVAL.VMA
    client, other = s.connect("iommu"), s.connect("dev")
    client.negotiate()
    other.negotiate()
    client.dma_map(RAM_BASE, queue_bytes, ram)
    os.close(ram)
    log2sz = COMMANDS.bit_length() - 1
    client.region_write(0, 0x18, ((RAM_BASE >> 12) << 10 | (log2sz - 1)).to_bytes(8, "little"))
    client.writel(0, 0x48, 1)                                        # cqcsr.cqen
    # What the queue had executed when the server served the other function's read.
    seen = []
    read = other_dev.mmio_read
    other_dev.mmio_read = lambda *a: seen.append(iommu.iommu.regs.cq.head) or read(*a)
    client.writel(0, 0x24, COMMANDS - 1, posted=True)                # cqt
    assert other.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert seen[0] < COMMANDS - 1, "the whole queue ran before the other function's turn"
    for _ in range(COMMANDS // COMMAND_BUDGET + 10):
        s.sync()
    assert iommu.iommu.regs.cq.head == COMMANDS - 1                  # it does drain


def test_a_flood_of_posted_writes_does_not_stall_another_function(served):
    """A client's messages are handled BATCH per readable event, so another function's
    request is answered while the flood is still being read."""
    s = served({"flood": IommuTestDev(), "other": IommuTestDev()})
    flood, other = s.connect("flood", timeout=60), s.connect("other")
    flood.negotiate()
    other.negotiate()
    payload = wire.REGION_ACCESS.pack(testdev.DMA_LEN, 0, 4) + (64).to_bytes(4, "little")
    message = wire.pack_header(0, wire.Command.REGION_WRITE, 16 + len(payload),
                               wire.FLAG_NO_REPLY) + payload
    total = 20_000
    session = s.server.ports[s.paths["flood"]].session
    sender = threading.Thread(target=lambda: flood.send_raw(message * total), daemon=True)
    sender.start()
    while session.messages_handled < BATCH:
        pass
    assert other.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert session.messages_handled < total, "the whole flood ran before the other's turn"
    sender.join(60)
    assert flood.readl(0, testdev.DMA_LEN) == 64

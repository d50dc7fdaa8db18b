"""`serve --trace`: a trace-event file with the commands, faults, invalidations,
interrupts and stale uses, and per-endpoint counters; valid when the server stops and
readable when it was killed."""

from __future__ import annotations

import json

from control_stack import DATA, DID, IOVA, Stack
from iommu_tables import LEAF_RW

from vfiouser_iommu.control.trace import read_trace
from vfiouser_iommu.iommu.regs_layouts import CMD_IODIR, CMD_IOFENCE, CMD_IOTINVAL


def test_trace_holds_commands_faults_invalidations_and_stale_uses(tmp_path):
    trace = tmp_path / "trace.json"
    stack = Stack(tmp_path, modes={"check": True, "cache": "max"}, trace=trace)
    view = stack.function.iommu.dma_view(DID)
    stack.on_loop(lambda: view.write(IOVA, bytes(0x800)))
    stack.translate(IOVA + 0x1000 * 7)                                   # a fault
    stack.builder.write_pte(stack.leaf, ((DATA + 0x1000) >> 12) << 10 | LEAF_RW, 8)
    stack.translate(IOVA)                                                # stale use
    stack.submit(CMD_IOTINVAL.encode(opcode=1, func3=0, AV=1, ADDR=IOVA >> 12),
                 CMD_IODIR.encode(opcode=3, func3=0, DV=1, DID=DID),
                 CMD_IOFENCE.encode(opcode=2, func3=0, PR=1, PW=1))
    # Read while the server runs: what a killed server would leave behind.
    stack.on_loop(stack.trace.tick)
    text = trace.read_text()
    assert not text.rstrip().endswith("]")
    assert read_trace(trace)
    stack.stop()
    events = json.loads(trace.read_text())               # strict JSON after a clean stop
    commands = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in commands] == ["IOTINVAL.VMA", "IODIR.INVAL_DDT", "IOFENCE.C"]
    assert commands[0]["args"]["removed"] == 1 and commands[0]["dur"] >= 0
    instants = [e["name"] for e in events if e["ph"] == "i"]
    assert "fault 13 Read page fault" in instants
    assert "IOTINVAL.VMA removed 1" in instants and "IODIR.INVAL_DDT removed 1" in instants
    assert "stale use: first-stage PTE" in instants
    assert any(name.startswith("interrupt vector") for name in instants)  # fault queue
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"iommu-testdev@02.0 DMA MB/s", "iommu-testdev@02.0 translations/s",
            "iommu-testdev@02.0 cache hit %"} <= counters
    for e in events:
        assert {"name", "ph", "pid"} <= set(e) and (e["ph"] == "M" or "ts" in e)

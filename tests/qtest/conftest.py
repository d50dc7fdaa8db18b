"""qtest fixtures: one RISC-V IOMMU + one iommu-testdev, on our stack or on QEMU's own.

`iommu_machine` is parametrized over the two stacks a side-by-side test compares:

- "ours": `vfiouser-iommu serve --iommu 01.0 --endpoint iommu-testdev@02.0` (a child
  process, `lab.stack.OurStack`, logging at debug level to a file), and QEMU attaching
  both functions with `vfio-user-pci` over shared memfd RAM;
- "qemu": QEMU's built-in `riscv-iommu-pci` at 01.0 and `iommu-testdev` at 02.0.

Both functions get their BARs and bus mastering as firmware would. When a test using
the fixture fails, the server's log and QEMU's stderr are attached to its report.
`side_by_side` records one outcome line per (scenario, stack); the terminal summary
prints them as a table so both results are visible without `-s`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfiouser_iommu import topology
from vfiouser_iommu.lab.paths import Lab
from vfiouser_iommu.lab.pci import PciBus
from vfiouser_iommu.lab.qtest import QTest
from vfiouser_iommu.lab.stack import OurStack, Topology

IOMMU_ADDR, TESTDEV_ADDR = "01.0", "02.0"
RAM_SIZE = "256M"
SHARED_RAM = "memory-backend-memfd,share=on"
STACKS = ("ours", "qemu")

# scenario -> stack -> one-line outcome, filled by `side_by_side`, printed at the end.
_OUTCOMES: dict[str, dict[str, str]] = {}


@dataclass
class IommuMachine:
    """A qtest session with an IOMMU and a testdev behind it, BARs assigned."""

    kind: str
    qt: QTest
    iommu_base: int
    testdev_bar: int
    requester_id: int
    server_log: Path | None = None

    def diagnostics(self) -> str:
        parts = []
        if self.server_log is not None and self.server_log.exists():
            parts.append("--- vfiouser-iommu serve log ---\n"
                         + self.server_log.read_text(errors="replace")[-8000:])
        # QEMU echoes the qtest conversation ("[R +t] ...", "[S +t] ...") on stderr;
        # only its other lines are diagnostics.
        stderr = "\n".join(line for line in self.qt.stderr().splitlines()
                           if not line.startswith(("[R +", "[S +", "[I +")))
        if stderr.strip():
            parts.append("--- QEMU stderr ---\n" + stderr[-4000:])
        return "\n".join(parts)


def _attach(qt: QTest, kind: str, server_log: Path | None) -> IommuMachine:
    bus = PciBus(qt)
    found = {}
    for addr in (IOMMU_ADDR, TESTDEV_ADDR):
        device = bus.at(*topology.parse_address(addr))
        device.assign_bars()
        device.enable()
        found[addr] = device
    return IommuMachine(kind, qt, found[IOMMU_ADDR].bars[0].addr,
                        found[TESTDEV_ADDR].bars[0].addr, found[TESTDEV_ADDR].rid, server_log)


@pytest.fixture(params=STACKS)
def iommu_machine(request, lab: Lab, tmp_path: Path) -> Iterator[IommuMachine]:
    if request.param == "qemu":
        with QTest(["-device", f"riscv-iommu-pci,addr={IOMMU_ADDR}",
                    "-device", f"iommu-testdev,addr={TESTDEV_ADDR}"],
                   memory=RAM_SIZE, lab=lab) as qt:
            machine = _attach(qt, "qemu", None)
            request.node.iommu_machine = machine
            yield machine
        return
    layout = Topology(iommu=IOMMU_ADDR, endpoints=[f"iommu-testdev@{TESTDEV_ADDR}"])
    with OurStack(lab, tmp_path, layout, memory=RAM_SIZE, verbose=2) as stack:
        args = topology.vfio_user_device_args(stack.socket_dir, stack.functions)
        with QTest(args, memory=RAM_SIZE, memory_backend=SHARED_RAM, lab=lab) as qt:
            machine = _attach(qt, "ours", stack.log_path)
            request.node.iommu_machine = machine
            yield machine


@pytest.fixture
def side_by_side(iommu_machine: IommuMachine) -> Callable[[str, str], None]:
    """`record(scenario, outcome)`: print it (visible with -s) and keep it for the table."""
    def record(scenario: str, outcome: str) -> None:
        _OUTCOMES.setdefault(scenario, {})[iommu_machine.kind] = outcome
        print(f"[side-by-side] {scenario} | {iommu_machine.kind}: {outcome}")
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    machine = getattr(item, "iommu_machine", None)
    if report.failed and report.when == "call" and machine is not None:
        report.sections.append((f"{machine.kind} stack diagnostics", machine.diagnostics()))


def pytest_terminal_summary(terminalreporter) -> None:
    if not _OUTCOMES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("RISC-V IOMMU side by side (spec outcome asserted on ours)")
    width = max(len(name) for name in _OUTCOMES)
    for scenario, by_stack in _OUTCOMES.items():
        write(f"{scenario:<{width}}  ours: {by_stack.get('ours', '-')}")
        write(f"{'':<{width}}  qemu: {by_stack.get('qemu', '-')}")

"""Our iommu-testdev attached to the lab's real QEMU over vfio-user, side by side with
QEMU's own `iommu-testdev`: the same scenario must give the same results on both.

QEMU runs in qtest mode (no guest CPU); the harness enumerates bus 0, assigns BAR0,
writes and reads the device's registers, runs DMAs and checks guest RAM. MSI-X delivery
(ours only: QEMU's device has no MSI-X) points a table entry at guest RAM and reads the
message data there.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vfiouser_iommu import topology
from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.lab.pci import PciBus, PciDevice
from vfiouser_iommu.lab.qtest import QTest
from vfiouser_iommu.lab.stack import start_server_process

pytestmark = pytest.mark.qtest

ADDR = "03.0"
RAM = 0x8000_0000
DMA_BUF = RAM + 0x10_0000
MSI_TARGET = RAM + 0x20_0000
SHARED_RAM = "memory-backend-memfd,share=on"


@dataclass
class Machine:
    kind: str
    qt: QTest
    device: PciDevice
    bar0: int

    def readl(self, reg: int) -> int:
        return self.qt.readl(self.bar0 + reg)

    def writel(self, reg: int, value: int) -> None:
        self.qt.writel(self.bar0 + reg, value)

    def arm_dma(self, gva: int, gpa: int, length: int) -> None:
        self.writel(testdev.DMA_GVA_LO, gva & 0xFFFFFFFF)
        self.writel(testdev.DMA_GVA_HI, gva >> 32)
        self.writel(testdev.DMA_GPA_LO, gpa & 0xFFFFFFFF)
        self.writel(testdev.DMA_GPA_HI, gpa >> 32)
        self.writel(testdev.DMA_LEN, length)
        self.writel(testdev.DMA_DBELL, testdev.DBELL_ARM)

    def run_dma(self) -> int:
        assert self.readl(testdev.DMA_TRIGGER) == 0
        return self.readl(testdev.DMA_RESULT)


def serve_testdev(tmp_path) -> tuple[object, list[str]]:
    spec = f"iommu-testdev@{ADDR}"
    proc = start_server_process(tmp_path, [spec])
    args = topology.vfio_user_device_args(tmp_path, [topology.parse_function(spec)])
    return proc, args


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, "serve did not shut down cleanly on SIGTERM"


def boot(qt: QTest, kind: str) -> Machine:
    bus = PciBus(qt)
    device = bus.find(testdev.VENDOR_ID, testdev.DEVICE_ID)
    assert device.slot_function == ADDR
    device.assign_bars()
    device.enable()
    return Machine(kind, qt, device, device.bars[0].addr)


@pytest.fixture(params=["ours", "qemu"])
def machine(request, lab, tmp_path) -> Iterator[Machine]:
    if request.param == "qemu":
        with QTest(["-device", f"iommu-testdev,addr={ADDR}"], memory="256M", lab=lab) as qt:
            yield boot(qt, "qemu")
        return
    proc, args = serve_testdev(tmp_path)
    try:
        with QTest(args, memory="256M", memory_backend=SHARED_RAM, lab=lab) as qt:
            yield boot(qt, "ours")
    finally:
        stop_server(proc)


def test_identity_and_bar(machine):
    dev = machine.device
    assert (dev.vendor_id, dev.device_id) == (0x1B36, 0x0005)
    # QEMU sets class_id = PCI_CLASS_OTHERS (0xff): base class 0x00, subclass 0xff.
    assert dev.config_readl(0x08) >> 8 == 0x00FF00
    assert dev.config_readl(0x08) & 0xFF == 0
    bar = dev.bars[0]
    assert (bar.size, bar.is_io, bar.is_64) == (0x1000, False, False)


def test_registers_read_back(machine):
    assert machine.readl(testdev.DMA_RESULT) == testdev.RESULT_IDLE
    machine.writel(testdev.DMA_GVA_LO, 0x1234_5000)
    machine.writel(testdev.DMA_GVA_HI, 0x9)
    machine.writel(testdev.DMA_LEN, 0x40)
    machine.writel(testdev.DMA_GPA_LO, 0x8765_4000)
    assert machine.readl(testdev.DMA_GVA_LO) == 0x1234_5000
    assert machine.readl(testdev.DMA_GVA_HI) == 0x9
    assert machine.readl(testdev.DMA_LEN) == 0x40
    assert machine.readl(testdev.DMA_GPA_LO) == 0x8765_4000
    assert machine.readl(testdev.DMA_ATTRS) == testdev.ATTRS_RESET
    machine.writel(testdev.DMA_DBELL, 1)
    assert machine.readl(testdev.DMA_RESULT) == testdev.RESULT_BUSY
    machine.writel(testdev.DMA_DBELL, 0)
    assert machine.readl(testdev.DMA_RESULT) == testdev.RESULT_IDLE


def test_dma_writes_the_pattern_at_the_guest_address(machine):
    qt = machine.qt
    qt.memwrite(DMA_BUF - 4, b"\xee" * 72)
    machine.arm_dma(DMA_BUF, DMA_BUF, 64)
    assert machine.readl(testdev.DMA_RESULT) == testdev.RESULT_BUSY
    assert machine.run_dma() == testdev.RESULT_OK
    assert qt.memread(DMA_BUF, 64) == testdev.pattern(64)
    assert qt.memread(DMA_BUF - 4, 4) == b"\xee" * 4       # nothing outside the range
    assert qt.memread(DMA_BUF + 64, 4) == b"\xee" * 4


def test_dma_odd_length(machine):
    machine.arm_dma(DMA_BUF + 0x1000, DMA_BUF + 0x1000, 7)
    assert machine.run_dma() == testdev.RESULT_OK
    assert machine.qt.memread(DMA_BUF + 0x1000, 7) == testdev.pattern(7)


def test_dma_error_codes(machine):
    assert machine.run_dma() == testdev.ERR_NOT_ARMED
    machine.arm_dma(DMA_BUF, DMA_BUF, 0)
    assert machine.run_dma() == testdev.ERR_BAD_LEN
    machine.arm_dma(DMA_BUF, DMA_BUF + 0x2000, 16)               # read back elsewhere
    assert machine.run_dma() == testdev.ERR_MISMATCH
    machine.writel(testdev.DMA_ATTRS, testdev.ATTRS_SPACE_VALID | testdev.ATTRS_SECURE
                   | testdev.ATTRS_SPACE_NONSECURE << testdev.ATTRS_SPACE_SHIFT)
    machine.arm_dma(DMA_BUF, DMA_BUF, 16)
    assert machine.run_dma() == testdev.ERR_BAD_ATTRS


def test_msix_vector_raised_on_completion_is_delivered(lab, tmp_path):
    proc, args = serve_testdev(tmp_path)
    try:
        with QTest(args, memory="256M", memory_backend=SHARED_RAM, lab=lab) as qt:
            machine = boot(qt, "ours")
            dev = machine.device
            table, vectors = dev.msix_table()
            assert vectors == testdev.MSIX_VECTORS
            assert table == machine.bar0 + 0x800
            dev.msix_enable()
            dev.msix_set_vector(2, MSI_TARGET, 0xC0DE_0002)
            qt.memwrite(MSI_TARGET, bytes(4))
            machine.writel(testdev.DMA_MSIX, testdev.MSIX_ENABLE | 2)
            machine.arm_dma(DMA_BUF, DMA_BUF, 16)
            assert machine.run_dma() == testdev.RESULT_OK
            assert _wait_for_word(qt, MSI_TARGET) == 0xC0DE_0002
    finally:
        stop_server(proc)


def _wait_for_word(qt: QTest, addr: int, timeout: float = 5.0) -> int:
    """The eventfd is serviced by QEMU's main loop between qtest commands."""
    deadline = time.monotonic() + timeout
    while True:
        value = int.from_bytes(qt.memread(addr, 4), "little")
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def test_dma_without_shared_ram_goes_through_dma_write_messages(lab, tmp_path):
    """Anonymous guest RAM gives DMA_MAPs without fds: the device's write must reach
    guest memory as DMA_WRITE messages that QEMU 11.1 accepts (protocol layout). The
    physical read-back cannot be synchronous, so the result is 0xdead0003 by design."""
    proc, args = serve_testdev(tmp_path)
    try:
        with QTest(args, memory="256M", lab=lab) as qt:
            machine = boot(qt, "ours")
            qt.memwrite(DMA_BUF, b"\xee" * 24)
            machine.arm_dma(DMA_BUF, DMA_BUF, 16)
            assert machine.run_dma() == testdev.ERR_RD_FAIL
            deadline = time.monotonic() + 5
            while qt.memread(DMA_BUF, 4) == b"\xee" * 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert qt.memread(DMA_BUF, 24) == testdev.pattern(16) + b"\xee" * 8
    finally:
        stop_server(proc)


def test_dma_read_message_is_answered_by_qemu(lab, tmp_path):
    """A DMA_READ request of ours, answered by QEMU in the protocol layout."""
    import threading

    from vfiouser_iommu.endpoints.testdev import IommuTestDev
    from vfiouser_iommu.vfio_user import Server

    server = Server()
    port = server.add_function(IommuTestDev(), tmp_path / f"{ADDR}.sock")
    thread = threading.Thread(target=server.serve_forever, kwargs={"handle_signals": False},
                              daemon=True)
    thread.start()
    got: list[tuple[int, bytes]] = []
    try:
        args = topology.vfio_user_device_args(tmp_path, [topology.parse_function(
            f"iommu-testdev@{ADDR}")])
        with QTest(args, memory="256M", lab=lab) as qt:
            machine = boot(qt, "ours")
            qt.memwrite(DMA_BUF, b"0123456789abcdef")
            server.call_soon(lambda: port.session.dma_read(
                DMA_BUF + 4, 8, lambda error, data: got.append((error, data))))
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                machine.readl(testdev.DMA_RESULT)   # lets QEMU's main loop run
                time.sleep(0.01)
    finally:
        server.stop()
        thread.join(5)
    assert got == [(0, b"456789ab")]

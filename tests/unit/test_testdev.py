"""iommu-testdev endpoint, driven directly over an in-memory GuestMemory."""

import pytest

from vfiouser_iommu.endpoints import build_endpoint, testdev
from vfiouser_iommu.endpoints.testdev import IommuTestDev
from vfiouser_iommu.memory import DmaAttrs, DmaError, DmaView

RAM = 0x8000_0000


class RecordingView(DmaView):
    """A DMA view that records the attributes of every request."""

    def __init__(self, memory, fail=False):
        super().__init__(memory)
        self.requests = []
        self.fail = fail

    def read_as(self, addr, length, attrs):
        self.requests.append(("read", addr, length, attrs))
        if self.fail:
            raise DmaError(addr, length, False, "fault")
        return super().read_as(addr, length, attrs)

    def write_as(self, addr, data, attrs):
        self.requests.append(("write", addr, len(data), attrs))
        if self.fail:
            raise DmaError(addr, len(data), True, "fault")
        super().write_as(addr, data, attrs)


class Host:
    def __init__(self):
        self.sent = []

    def trigger(self, irq_index, vector):
        self.sent.append((irq_index, vector))
        return True

    def call_soon(self, callback):
        callback()


@pytest.fixture
def dev():
    d = IommuTestDev()
    d.memory.add_region(RAM, bytearray(0x10000))
    return d


def w(d, reg, value):
    d.region_write(0, reg, value.to_bytes(4, "little"))


def r(d, reg):
    return int.from_bytes(d.region_read(0, reg, 4), "little")


def arm(d, gva, length, gpa=None):
    gpa = gva if gpa is None else gpa
    w(d, testdev.DMA_GVA_LO, gva & 0xFFFFFFFF)
    w(d, testdev.DMA_GVA_HI, gva >> 32)
    w(d, testdev.DMA_GPA_LO, gpa & 0xFFFFFFFF)
    w(d, testdev.DMA_GPA_HI, gpa >> 32)
    w(d, testdev.DMA_LEN, length)
    w(d, testdev.DMA_DBELL, 1)


def run(d):
    assert r(d, testdev.DMA_TRIGGER) == 0
    return r(d, testdev.DMA_RESULT)


def test_pattern():
    assert testdev.pattern(6) == bytes.fromhex("785634127856")


def test_write_verify(dev):
    arm(dev, RAM + 0x100, 10)
    assert r(dev, testdev.DMA_RESULT) == testdev.RESULT_BUSY
    assert run(dev) == testdev.RESULT_OK
    assert dev.memory.read(RAM + 0x100, 10) == testdev.pattern(10)
    assert run(dev) == testdev.ERR_NOT_ARMED                 # one DMA per arm


def test_error_codes(dev):
    arm(dev, RAM, 0)
    assert run(dev) == testdev.ERR_BAD_LEN
    arm(dev, RAM, testdev.MAX_DMA_LEN + 1)
    assert run(dev) == testdev.ERR_BAD_LEN
    arm(dev, 0x1000, 4)
    assert run(dev) == testdev.ERR_TX_FAIL                   # unmapped, no fallback
    arm(dev, RAM, 4, gpa=0x1000)
    assert run(dev) == testdev.ERR_RD_FAIL
    arm(dev, RAM, 4, gpa=RAM + 0x800)
    assert run(dev) == testdev.ERR_MISMATCH
    w(dev, testdev.DMA_ATTRS, testdev.ATTRS_SPACE_VALID)     # secure space, non-secure bit
    arm(dev, RAM, 4)
    assert run(dev) == testdev.ERR_BAD_ATTRS


def test_disarm(dev):
    arm(dev, RAM, 4)
    w(dev, testdev.DMA_DBELL, 0)
    assert r(dev, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert run(dev) == testdev.ERR_NOT_ARMED


def test_pasid_privilege_and_directions_reach_the_view(dev):
    view = RecordingView(dev.memory)
    dev.set_dma_view(view)
    dev.memory.write(RAM + 0x40, b"\xaa\xbb\xcc\xdd")
    w(dev, testdev.DMA_PASID, testdev.PASID_VALID | 0x12345)
    for direction in range(4):
        w(dev, testdev.DMA_CTRL, testdev.CTRL_PRIV | direction << 1)
        arm(dev, RAM + 0x40, 4)
        run(dev)
    attrs = DmaAttrs(pasid=0x12345, privileged=True)
    exec_attrs = DmaAttrs(pasid=0x12345, privileged=True, execute=True)
    assert view.requests == [("write", RAM + 0x40, 4, attrs), ("read", RAM + 0x40, 4, attrs),
                             ("write", RAM + 0x40, 4, attrs), ("read", RAM + 0x40, 4, exec_attrs)]
    assert r(dev, testdev.DMA_DATA) == 0x12345678


def test_read_direction_stores_the_data(dev):
    dev.memory.write(RAM + 0x40, b"\xaa\xbb\xcc\xdd\xee")
    w(dev, testdev.DMA_CTRL, testdev.DIR_READ << 1)
    arm(dev, RAM + 0x40, 5)
    assert run(dev) == testdev.RESULT_OK
    assert r(dev, testdev.DMA_DATA) == 0xDDCCBBAA
    assert dev.memory.read(RAM + 0x40, 5) == b"\xaa\xbb\xcc\xdd\xee"


def test_faulting_view_gives_tx_fail_in_every_direction(dev):
    dev.set_dma_view(RecordingView(dev.memory, fail=True))
    for direction in range(4):
        w(dev, testdev.DMA_CTRL, direction << 1)
        arm(dev, RAM, 4)
        assert run(dev) == testdev.ERR_TX_FAIL


def test_no_pasid_unless_valid(dev):
    w(dev, testdev.DMA_PASID, 0x777)
    assert dev.request_attrs == DmaAttrs()


def test_completion_vector(dev):
    host = Host()
    dev.attach(host)
    dev.region_write(7, 0x4A, (0x8000).to_bytes(2, "little"))  # MSI-X enable
    w(dev, testdev.DMA_MSIX, testdev.MSIX_ENABLE | 3)
    arm(dev, RAM, 4)
    run(dev)
    assert host.sent == [(2, 3)]
    w(dev, testdev.DMA_MSIX, testdev.MSIX_ENABLE | 9)            # no such vector: logged
    arm(dev, RAM, 4)
    run(dev)
    assert host.sent == [(2, 3)]


def test_qemu_unused_offsets_and_sizes(dev):
    assert r(dev, 0x48) == 0 and r(dev, 0x7FC) == 0
    w(dev, testdev.DMA_LEN, 5)
    assert dev.region_read(0, testdev.DMA_LEN, 2) == bytes(2)   # 4-byte registers only


def test_reset(dev):
    arm(dev, RAM, 4)
    w(dev, testdev.DMA_PASID, testdev.PASID_VALID | 1)
    dev.reset()
    assert r(dev, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert r(dev, testdev.DMA_PASID) == 0
    assert r(dev, testdev.DMA_ATTRS) == testdev.ATTRS_RESET


def test_build_options():
    d = build_endpoint("iommu-testdev", {"vectors": "8", "pcie": "on"})
    assert d.config.msix.vectors == 8 and 0x10 in [d.config.data[o] for o in
                                                   d.config.capabilities.values()]
    for bad in ({"vectors": "x"}, {"pcie": "maybe"}, {"colour": "red"}):
        with pytest.raises(ValueError):
            build_endpoint("iommu-testdev", bad)
    with pytest.raises(ValueError):
        build_endpoint("no-such-device", {})


def test_default_view_is_identity_over_the_function_memory(dev):
    assert type(dev.dma) is DmaView and dev.dma.memory is dev.memory


class Doorbells:
    """A GuestMemory fallback standing for QEMU: non-RAM writes as DMA_WRITE messages."""

    def __init__(self):
        self.writes = []

    def read(self, gpa, length):
        raise AssertionError("no reads expected")

    def write(self, gpa, data):
        self.writes.append((gpa, bytes(data)))


def msi(d, addr, data, enable=True):
    w(d, testdev.MSI_ADDR_LO, addr & 0xFFFFFFFF)
    w(d, testdev.MSI_ADDR_HI, addr >> 32)
    w(d, testdev.MSI_DATA, data)
    w(d, testdev.MSI_CTRL, int(enable))


def test_completion_msi_is_a_32bit_write_after_the_dma(dev):
    bells = Doorbells()
    dev.memory.fallback = bells
    view = RecordingView(dev.memory)
    dev.set_dma_view(view)
    assert r(dev, testdev.MSI_RESULT) == testdev.RESULT_IDLE
    msi(dev, 0x2800_1000, 0x2A)
    assert (r(dev, testdev.MSI_ADDR_LO), r(dev, testdev.MSI_DATA)) == (0x2800_1000, 0x2A)
    arm(dev, RAM, 8)
    assert run(dev) == 0
    assert [q[:3] for q in view.requests] == [("write", RAM, 8), ("write", 0x2800_1000, 4)]
    assert bells.writes == [(0x2800_1000, (0x2A).to_bytes(4, "little"))]
    assert r(dev, testdev.MSI_RESULT) == testdev.RESULT_OK


def test_completion_msi_fault_is_reported_and_disabled_msi_sends_nothing(dev):
    view = RecordingView(dev.memory)
    dev.set_dma_view(view)
    msi(dev, 0x2800_1000, 1, enable=False)
    arm(dev, RAM, 4)
    run(dev)
    assert len(view.requests) == 1
    view.fail = True
    msi(dev, 0x2800_1000, 1)
    arm(dev, RAM, 4)
    assert run(dev) == testdev.ERR_TX_FAIL
    assert r(dev, testdev.MSI_RESULT) == testdev.ERR_TX_FAIL
    dev.reset()
    assert r(dev, testdev.MSI_CTRL) == 0 and r(dev, testdev.MSI_RESULT) == testdev.RESULT_IDLE


def test_completion_msi_goes_through_the_iommus_msi_page_table():
    """Flat MSI PT, basic translate: the interrupt-file GPA the device writes becomes
    the real file's address, outside RAM, so it leaves as a doorbell write; with V=0
    the write faults 262 and nothing leaves."""
    from iommu_tables import atp, make_iommu

    did, file_gpa, real = 0x10, 0x2800_0000, 0x2900_0000
    iommu, b, root = make_iommu(None)
    msipt = b.alloc()
    b.write64(msipt + 16, 1 | 3 << 1 | (real >> 12) << 10)     # file 1: basic, valid
    b.set_dc(root, 3, did, 64, tc=1, msiptp=atp(1, msipt >> 12), msi_mask=0x1,
             msi_pattern=file_gpa >> 12)
    bells = Doorbells()
    iommu.memory.fallback = bells
    d = IommuTestDev()
    d.set_dma_view(iommu.dma_view(did))
    data_page = b.alloc()
    w(d, testdev.DMA_CTRL, testdev.DIR_WRITE << testdev.CTRL_DIR_SHIFT)  # no read-back
    msi(d, file_gpa + 0x1000, 0x21)
    arm(d, data_page, 4)
    assert run(d) == 0
    assert bells.writes == [(real, (0x21).to_bytes(4, "little"))]
    msi(d, file_gpa, 0x21)                                      # file 0: V=0
    arm(d, data_page, 4)
    run(d)
    assert r(d, testdev.MSI_RESULT) == testdev.ERR_TX_FAIL
    assert iommu.recent_faults[-1].cause == 262
    assert len(bells.writes) == 1

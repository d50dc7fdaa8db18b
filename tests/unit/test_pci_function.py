"""The function API: region dispatch, MSI-X table/PBA, pending vectors, hooks."""

from vfiouser_iommu.pci.config import BarSpec, MsixSpec, PciIdentity
from vfiouser_iommu.pci.function import IRQ_INTX, IRQ_MSIX, PciFunction, _split


class Host:
    def __init__(self, deliver=True):
        self.deliver = deliver
        self.sent = []

    def trigger(self, irq_index, vector):
        if self.deliver:
            self.sent.append((irq_index, vector))
        return self.deliver

    def call_soon(self, callback):
        callback()


class Recorder(PciFunction):
    def __init__(self):
        super().__init__(PciIdentity(0x1234, 0x5678, 0x020000), {0: BarSpec(0x1000)},
                         msix=MsixSpec(2, table_offset=0x800, pba_offset=0xC00),
                         interrupt_pin=1)
        self.accesses = []

    def mmio_read(self, bar, offset, size):
        self.accesses.append(("r", offset, size))
        return 0x1122334455667788

    def mmio_write(self, bar, offset, size, value):
        self.accesses.append(("w", offset, size, value))


def _msix_enable(f):
    f.region_write(7, 0x4A, (0x8000).to_bytes(2, "little"))


def test_split_is_naturally_aligned():
    assert _split(0, 8) == [(0, 8)]
    assert _split(1, 7) == [(1, 1), (2, 2), (4, 4)]
    assert _split(6, 4) == [(6, 2), (8, 2)]


def test_bar_accesses_reach_the_device_sized_and_masked():
    f = Recorder()
    assert f.region_read(0, 0x10, 4) == bytes.fromhex("88776655")
    f.region_write(0, 0x13, b"\x01\x02\x03")
    assert f.accesses[1:] == [("w", 0x13, 1, 1), ("w", 0x14, 2, 0x0302)]


def test_msix_table_and_pba_are_served_by_the_function():
    f = Recorder()
    f.region_write(0, 0x800, (0xFEE0_0000).to_bytes(4, "little"))
    assert f.region_read(0, 0x800, 4) == (0xFEE0_0000).to_bytes(4, "little")
    assert f.region_read(0, 0x80C, 4) == (1).to_bytes(4, "little")   # masked at reset
    assert f.accesses == []


def test_vector_raised_while_undeliverable_stays_pending():
    f = Recorder()
    host = Host(deliver=False)
    f.attach(host)
    _msix_enable(f)
    f.raise_msix(1)
    assert f.region_read(0, 0xC00, 8) == (2).to_bytes(8, "little")
    host.deliver = True
    f.msix_vector_ready(1)
    assert host.sent == [(IRQ_MSIX, 1)]
    assert f.region_read(0, 0xC00, 8) == bytes(8)


def test_msix_disabled_drops_the_vector():
    f = Recorder()
    host = Host()
    f.attach(host)
    f.raise_msix(0)
    assert host.sent == []


def test_intx_respects_interrupt_disable():
    f = Recorder()
    host = Host()
    f.attach(host)
    f.set_intx(True)
    assert host.sent == [(IRQ_INTX, 0)] and f.config.data[0x06] & 0x08
    f.region_write(7, 0x04, (0x400).to_bytes(2, "little"))
    f.set_intx(True)
    assert host.sent == [(IRQ_INTX, 0)]


def test_counts_and_sizes():
    f = Recorder()
    assert f.irq_count(IRQ_MSIX) == 2 and f.irq_count(IRQ_INTX) == 1
    assert f.region_size(0) == 0x1000 and f.region_size(7) == 256 and f.region_size(1) == 0


def test_reset_calls_the_device_hook_and_resets_msix():
    f = Recorder()
    called = []
    f.on_reset = lambda: called.append(True)
    f.attach(Host(deliver=False))
    _msix_enable(f)
    f.raise_msix(0)
    f.reset()
    assert called == [True]
    assert f.region_read(0, 0xC00, 8) == bytes(8)
    assert not f.config.msix_enabled

"""The modern virtio-pci transport, driven through BAR0 and config space as Linux does:
capabilities, feature negotiation, queue setup, status and reset, interrupts (MSI-X and
INTx), bounded queue processing, and DEVICE_NEEDS_RESET for broken rings."""

from __future__ import annotations

import pytest

from vfiouser_iommu.endpoints import ENDPOINTS
from vfiouser_iommu.endpoints.virtio import VirtioPciFunction, VirtioRng
from vfiouser_iommu.endpoints.virtio.device import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from vfiouser_iommu.endpoints.virtio.layouts import VIRTQ_AVAIL_F_NO_INTERRUPT, virtio_pci_cap
from vfiouser_iommu.endpoints.virtio.pci import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    FEATURES_OK,
    ISR_CFG,
    STEP_BUDGET,
)
from vfiouser_iommu.endpoints.virtio.testing import FakeHost, VirtioPciDriver
from vfiouser_iommu.endpoints.virtio.virtqueue import VIRTIO_MSI_NO_VECTOR
from vfiouser_iommu.memory import DmaView
from vfiouser_iommu.pci.function import IRQ_INTX, IRQ_MSIX

RAM = 0x8000_0000
DATA = RAM + 0x10000


@pytest.fixture
def rig():
    fn = VirtioPciFunction(VirtioRng())
    fn.memory.add_region(RAM, bytearray(0x40000))
    host = FakeHost()
    fn.attach(host)
    return fn, host, VirtioPciDriver(fn, fn.memory, RAM)


def ready(drv: VirtioPciDriver, *, msix: bool = True, features: int | None = None) -> None:
    assert drv.negotiate(features)
    if msix:
        drv.enable_msix()
        drv.write("config_msix_vector", 2, 0)
    drv.setup_queue(0, vector=1 if msix else None)
    drv.driver_ok()


def vendor_caps(fn: VirtioPciFunction) -> list[dict]:
    caps, pos = [], fn.config.read_int(0x34, 1)
    while pos:
        if fn.config.read_int(pos, 1) == 0x09:
            parsed = virtio_pci_cap.parse(fn.config.read(pos, 16))
            caps.append({k: v for k, v in parsed.items() if not k.startswith("_")} | {"at": pos})
        pos = fn.config.read_int(pos + 1, 1)
    return caps


# -- identity and capabilities ---------------------------------------------------------------
def test_identity_is_modern_only(rig):
    fn, _, _ = rig
    assert fn.config.read_int(0, 2) == 0x1AF4
    assert fn.config.read_int(2, 2) == 0x1044
    assert fn.config.read_int(8, 1) == 1  # revision >= 1: non-transitional


def test_vendor_capabilities_describe_bar0(rig):
    fn, _, _ = rig
    caps = {c["cfg_type"]: c for c in vendor_caps(fn)}
    assert set(caps) == {1, 2, 3}  # rng has no device-specific configuration
    assert caps[1]["offset"] == 0 and caps[1]["length"] == 0x40
    assert caps[3]["offset"] == ISR_CFG
    assert caps[2]["cap_len"] == 20
    assert all(c["bar"] == 0 for c in caps.values())
    assert fn.config.read_int(caps[2]["at"] + 16, 4) == 4  # notify_off_multiplier
    assert fn.config.read(0, 256) == fn.config._reset_image[:256]


def test_function_level_reset_keeps_the_capabilities(rig):
    fn, _, _ = rig
    before = vendor_caps(fn)
    fn.reset()
    assert vendor_caps(fn) == before


def test_endpoint_kinds_are_registered():
    assert {"virtio-blk", "virtio-rng"} <= set(ENDPOINTS)


# -- features --------------------------------------------------------------------------------
def test_offered_features_include_version_1_and_access_platform(rig):
    _, _, drv = rig
    offered = drv.device_features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_INDIRECT_DESC,
                VIRTIO_F_EVENT_IDX):
        assert offered >> bit & 1


@pytest.mark.parametrize("drop", [VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM])
def test_features_ok_refused_without_required_bit(rig, drop):
    _, _, drv = rig
    assert not drv.negotiate(drv.device_features() & ~(1 << drop))


def test_features_ok_refused_for_bits_not_offered(rig):
    _, _, drv = rig
    assert not drv.negotiate(drv.device_features() | 1 << 40)


def test_driver_features_frozen_after_features_ok(rig):
    _, _, drv = rig
    assert drv.negotiate()
    accepted = drv.read("driver_feature", 4)
    drv.write("driver_feature", 4, 0)
    assert drv.read("driver_feature", 4) == accepted


# -- queue and vector configuration -------------------------------------------------------------
def test_queue_size_accepts_only_powers_of_two_up_to_max(rig):
    _, _, drv = rig
    drv.write("queue_select", 2, 0)
    top = drv.read("queue_size", 2)
    drv.write("queue_size", 2, 48)
    assert drv.read("queue_size", 2) == top
    drv.write("queue_size", 2, top * 2)
    assert drv.read("queue_size", 2) == top
    drv.write("queue_size", 2, 16)
    assert drv.read("queue_size", 2) == 16


def test_absent_queue_reads_size_zero(rig):
    _, _, drv = rig
    assert drv.read("num_queues", 2) == 1
    drv.write("queue_select", 2, 1)
    assert drv.read("queue_size", 2) == 0


def test_vectors_the_function_lacks_read_back_no_vector(rig):
    _, _, drv = rig
    drv.write("config_msix_vector", 2, 1)
    assert drv.read("config_msix_vector", 2) == 1
    drv.write("config_msix_vector", 2, 2)  # 2 vectors: config + one queue
    assert drv.read("config_msix_vector", 2) == VIRTIO_MSI_NO_VECTOR
    drv.write("queue_msix_vector", 2, 7)
    assert drv.read("queue_msix_vector", 2) == VIRTIO_MSI_NO_VECTOR


def test_queue_address_halves_and_whole_agree(rig):
    _, _, drv = rig
    drv.write("queue_desc", 8, 0x1234_5678_9ABC_DEF0)
    assert drv.read("queue_desc", 4) == 0x9ABC_DEF0
    assert drv.fn.region_read(0, 0x24, 4) == (0x1234_5678).to_bytes(4, "little")
    assert drv.read("queue_desc", 8) == 0x1234_5678_9ABC_DEF0


def test_queue_settings_ignored_once_enabled(rig):
    _, _, drv = rig
    drv.negotiate()
    drv.setup_queue(0, size=16)
    drv.write("queue_size", 2, 32)
    drv.write("queue_desc", 8, 0)
    assert drv.read("queue_size", 2) == 16
    assert drv.read("queue_desc", 8) == drv.queues[0].desc


# -- status and reset ------------------------------------------------------------------------
def test_status_zero_resets_everything(rig):
    fn, _, drv = rig
    ready(drv)
    drv.set_status(0)
    assert drv.status == 0
    assert drv.read("driver_feature", 4) == 0
    assert drv.read("config_msix_vector", 2) == VIRTIO_MSI_NO_VECTOR
    assert drv.read("queue_enable", 2) == 0
    assert drv.read("queue_msix_vector", 2) == VIRTIO_MSI_NO_VECTOR
    assert fn.queues[0].last_avail_idx == 0


def test_client_disconnect_resets_the_device(rig):
    fn, _, drv = rig
    ready(drv)
    fn.disconnected()
    assert drv.status == 0 and drv.read("queue_enable", 2) == 0


def test_no_buffers_consumed_before_driver_ok(rig):
    _, host, drv = rig
    drv.negotiate()
    drv.setup_queue(0)
    drv.add_chain(0, [(DATA, 64, True)])
    drv.notify(0)
    host.run()
    assert drv.used_idx(0) == 0
    drv.driver_ok()
    host.run()
    assert drv.used(0) == [(0, 64)]


# -- interrupts -------------------------------------------------------------------------------
def test_used_buffer_raises_the_queue_vector(rig):
    _, host, drv = rig
    ready(drv)
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert host.irqs == [(IRQ_MSIX, 1)]


def test_no_vector_means_no_interrupt(rig):
    _, host, drv = rig
    assert drv.negotiate()
    drv.enable_msix()
    drv.setup_queue(0)
    drv.driver_ok()
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert drv.used_idx(0) == 1 and host.irqs == []


def test_intx_and_isr_without_msix(rig):
    fn, host, drv = rig
    ready(drv, msix=False)
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert host.irqs == [(IRQ_INTX, 0)] and fn.intx_asserted
    assert fn.region_read(0, ISR_CFG, 1) == b"\x01"
    assert not fn.intx_asserted
    assert fn.region_read(0, ISR_CFG, 1) == b"\x00"


def test_no_interrupt_flag_suppresses_the_notification(rig):
    _, host, drv = rig
    features = drv.device_features() & ~(1 << VIRTIO_F_EVENT_IDX)
    ready(drv, features=features)
    drv.mem.write_u16(drv.queues[0].avail, VIRTQ_AVAIL_F_NO_INTERRUPT)
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert drv.used_idx(0) == 1 and host.irqs == []


def test_event_idx_interrupts_only_when_used_event_is_crossed(rig):
    _, host, drv = rig
    ready(drv)
    q = drv.queues[0]
    used_event = q.avail + 4 + 2 * q.size
    drv.mem.write_u16(used_event, 1)  # interrupt once the second buffer is used
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert host.irqs == []
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert host.irqs == [(IRQ_MSIX, 1)]
    avail_event = q.used + 4 + 8 * q.size
    assert drv.mem.read_u16(avail_event) == 2


# -- processing is bounded ---------------------------------------------------------------------
def test_one_step_serves_at_most_the_budget_then_reschedules(rig):
    fn, host, drv = rig
    ready(drv)
    for i in range(STEP_BUDGET + 10):
        drv.add_chain(0, [(DATA + 16 * i, 16, True)])
    drv.notify(0)
    assert len(host.soon) == 1
    host.soon.popleft()()
    assert drv.used_idx(0) == STEP_BUDGET
    assert len(host.soon) == 1
    host.run()
    assert drv.used_idx(0) == STEP_BUDGET + 10


def test_many_notifies_schedule_one_step(rig):
    _, host, drv = rig
    ready(drv)
    drv.add_chain(0, [(DATA, 16, True)])
    for _ in range(5):
        drv.notify(0)
    assert len(host.soon) == 1


# -- broken rings --------------------------------------------------------------------------------
def test_unreadable_ring_sets_needs_reset_and_raises_config_vector(rig):
    fn, host, drv = rig
    assert drv.negotiate()
    drv.enable_msix()
    drv.write("config_msix_vector", 2, 0)
    drv.write("queue_select", 2, 0)
    drv.write("queue_driver", 8, 0x10)  # nothing mapped there
    drv.write("queue_enable", 2, 1)
    drv.driver_ok()
    host.run()
    drv.notify(0)
    host.run()
    assert drv.status & DEVICE_NEEDS_RESET
    assert host.irqs == [(IRQ_MSIX, 0)]


def test_device_works_again_after_reset(rig):
    fn, host, drv = rig
    ready(drv)
    drv.write_desc(0, 0, DATA, 16, 0x1, 0)  # a descriptor that loops onto itself
    drv.make_available(0, 0)
    drv.notify(0)
    host.run()
    assert drv.status & DEVICE_NEEDS_RESET
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert drv.used_idx(0) == 0  # stopped until reset
    ready(drv)
    assert drv.status == 0x0F
    drv.add_chain(0, [(DATA, 16, True)])
    drv.notify(0)
    host.run()
    assert drv.used(0) == [(0, 16)]


def test_needs_reset_survives_driver_status_writes(rig):
    fn, host, drv = rig
    ready(drv)
    fn.needs_reset("test")
    drv.set_status(drv.status & ~DEVICE_NEEDS_RESET)
    assert drv.status & DEVICE_NEEDS_RESET
    assert drv.status & (FEATURES_OK | DRIVER_OK) == FEATURES_OK | DRIVER_OK


# -- hot path: what one batch costs --------------------------------------------------------------
class PerFieldView(DmaView):
    """Identity DMA with no zero-copy views (as for rings outside plain RAM): every ring
    field goes through `read`/`write`, which this counts for one watched address."""

    def __init__(self, memory, watched: int) -> None:
        super().__init__(memory)
        self.watched, self.reads, self.writes = watched, 0, 0

    def map_sg(self, buffers, *, write, attrs=None):
        return None

    def read(self, addr: int, length: int) -> bytes:
        self.reads += addr <= self.watched < addr + length
        return super().read(addr, length)

    def write(self, addr: int, data) -> None:
        self.writes += addr <= self.watched < addr + len(data)
        super().write(addr, data)


class CountingTranslations(DmaView):
    """Identity DMA that records the start of every range it translates."""

    def __init__(self, memory) -> None:
        super().__init__(memory)
        self.translated: list[int] = []

    def pieces(self, addr, length, write, attrs):
        self.translated.append(addr)
        return super().pieces(addr, length, write, attrs)


@pytest.mark.parametrize("event_idx,reads", [(False, 1), (True, 2)])
def test_a_batch_reads_avail_idx_once(rig, event_idx, reads):
    """Once per batch; with EVENT_IDX once more after publishing avail_event, since a
    chain made available before the driver saw it was not notified."""
    fn, host, drv = rig
    features = drv.device_features()
    features = features if event_idx else features & ~(1 << VIRTIO_F_EVENT_IDX)
    ready(drv, features=features)
    for i in range(10):
        drv.add_chain(0, [(DATA + 16 * i, 16, True)])
    view = PerFieldView(fn.memory, drv.queues[0].avail + 2)
    fn.set_dma_view(view)
    drv.notify(0)
    host.run()
    assert drv.used_idx(0) == 10 and view.reads == reads


def test_a_batch_publishes_the_used_index_once(rig):
    fn, host, drv = rig
    ready(drv)
    for i in range(10):
        drv.add_chain(0, [(DATA + 16 * i, 16, True)])
    view = PerFieldView(fn.memory, drv.queues[0].used + 2)
    fn.set_dma_view(view)
    drv.notify(0)
    host.run()
    assert drv.used_idx(0) == 10 and view.writes == 1
    assert host.irqs == [(IRQ_MSIX, 1)]


def test_a_batch_translates_each_ring_area_once(rig):
    """The descriptor table, driver area and device area are each translated once per
    step, however many chains it serves; the data buffers once each."""
    fn, host, drv = rig
    ready(drv)
    for i in range(10):
        drv.add_chain(0, [(DATA + 16 * i, 16, True)])
    view = CountingTranslations(fn.memory)
    fn.set_dma_view(view)
    drv.notify(0)
    host.run()
    q = drv.queues[0]
    assert drv.used_idx(0) == 10
    assert sorted(view.translated) == sorted([q.desc, q.avail, q.used]
                                             + [DATA + 16 * i for i in range(10)])


def test_rings_accessed_per_field_serve_the_same(rig):
    fn, host, drv = rig
    ready(drv)
    fn.set_dma_view(PerFieldView(fn.memory, 0))
    for _ in range(3):
        for i in range(5):
            drv.add_chain(0, [(DATA + 16 * i, 4 + i, True)])
        drv.notify(0)
        host.run()
    assert drv.used_idx(0) == 15
    assert drv.used(0)[-5:] == [(10 + i, 4 + i) for i in range(5)]


def test_bar0_dispatch_tables_are_built_once(rig, monkeypatch):
    fn, _, drv = rig
    monkeypatch.setattr(VirtioPciFunction, "_read_handlers", None)
    monkeypatch.setattr(VirtioPciFunction, "_write_handlers", None)
    drv.write("device_status", 1, 1)
    assert drv.status == 1

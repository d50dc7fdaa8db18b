"""virtio-net over a packet file descriptor: features and config, transmit, receive into
kept chains, no watching (no spinning) without receive buffers, bounded work per event,
oversize frames, faulting buffers, reset, offloads passed through to the backend and
mergeable receive buffers, and the `virtio-net@` option parsing.

The wire is a datagram socketpair: like a tap opened with IFF_VNET_HDR, it carries one
frame per read or write, header first.
"""

from __future__ import annotations

import os
import socket

import pytest

from vfiouser_iommu.endpoints import build_endpoint
from vfiouser_iommu.endpoints.virtio import VirtioNet, VirtioPciFunction, default_mac, parse_mac
from vfiouser_iommu.endpoints.virtio.device import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
)
from vfiouser_iommu.endpoints.virtio.layouts import VIRTIO_NET_HDR, virtio_net_config
from vfiouser_iommu.endpoints.virtio.net import (
    HDR_SIZE,
    OFFLOAD_FEATURES,
    RX_BUDGET,
    RX_QUEUE,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MTU,
)
from vfiouser_iommu.endpoints.virtio.pci import DEVICE_CFG, DEVICE_NEEDS_RESET
from vfiouser_iommu.endpoints.virtio.testing import FakeHost, VirtioPciDriver
from vfiouser_iommu.memory import DmaError, DmaView
from vfiouser_iommu.pci.function import IRQ_MSIX

RAM = 0x8000_0000
RX_BUFS = RAM + 0x20000      # receive buffers, 2 KiB apart
TX_BUFS = RAM + 0x80000
BUF = 2048
MAC = bytes.fromhex("525400abcdef")
RX_SIZE = 128


class FaultingView(DmaView):
    """Identity, except that [lo, hi) faults like an IOMMU would."""

    def __init__(self, memory, lo: int, hi: int):
        super().__init__(memory)
        self.lo, self.hi = lo, hi

    def pieces(self, addr, length, write, attrs):
        if addr < self.hi and self.lo < addr + length:
            raise DmaError(addr, length, write, "translation fault")
        return [(addr, length, None)]


class Rig:
    """A virtio-net on a datagram socketpair; with `offload`, its backend records the
    TUNSETOFFLOAD flags it is told instead of being a tap."""

    def __init__(self, mtu: int = 1500, features: int | None = None, offload: bool = False):
        self.wire, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wire.setblocking(False)
        self.wire.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.tun_flags: list[int] = []
        self.dev = VirtioNet(os.dup(theirs.fileno()), MAC, mtu,
                             set_offload=self.tun_flags.append if offload else None)
        theirs.close()
        self.fn = VirtioPciFunction(self.dev)
        self.fn.memory.add_region(RAM, bytearray(0x100000))
        self.host = FakeHost()
        self.fn.attach(self.host)
        self.drv = VirtioPciDriver(self.fn, self.fn.memory, RAM)
        assert self.drv.negotiate(features)
        self.drv.enable_msix()
        self.drv.setup_queue(RX_QUEUE, size=RX_SIZE, vector=1)
        self.drv.setup_queue(TX_QUEUE, size=64, vector=2)
        self.drv.driver_ok()
        self.host.run()
        self.rx_posted = 0

    def close(self):
        self.dev.close()
        self.wire.close()

    def post_rx(self, count: int, size: int = BUF, *, run: bool = True) -> None:
        for _ in range(count):
            addr = RX_BUFS + BUF * (self.rx_posted % RX_SIZE)
            self.drv.add_chain(RX_QUEUE, [(addr, size, True)])
            self.rx_posted += 1
        self.drv.notify(RX_QUEUE)
        if run:
            self.host.run()

    def send_from_wire(self, frame: bytes, header: bytes = bytes(HDR_SIZE)) -> None:
        self.wire.send(header + frame)

    def transmit(self, frame: bytes, split: list[int] | None = None) -> None:
        """Queue header + frame on the transmit queue, cut at the offsets in `split`."""
        data = bytes(HDR_SIZE) + frame
        cuts = [0, *(split or []), len(data)]
        bufs = []
        for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
            addr = TX_BUFS + 0x1000 * i
            self.fn.memory.write(addr, data[a:b])
            bufs.append((addr, b - a, False))
        self.drv.add_chain(TX_QUEUE, bufs)
        self.drv.notify(TX_QUEUE)
        self.host.run()

    def received(self, index: int) -> tuple[bytes, bytes]:
        """(header, frame) of the `index`-th used receive chain."""
        head, length = self.drv.used(RX_QUEUE)[index]
        data = self.fn.memory.read(RX_BUFS + BUF * head, length)
        return data[:HDR_SIZE], data[HDR_SIZE:]


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def frame(n: int, tag: int = 0) -> bytes:
    return MAC + bytes.fromhex("020000000001") + b"\x08\x00" + bytes((tag + i) & 0xFF
                                                                   for i in range(n - 14))


# -- features and configuration ------------------------------------------------------------------
def test_offers_mac_mtu_version_1_and_access_platform_and_no_offloads(rig):
    features = rig.drv.device_features()
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM):
        assert features >> bit & 1, bit
    for bit in (0, 1, 7, 8, 10, 11, 12, 14, 15, 17):  # CSUM ... MRG_RXBUF, CTRL_VQ
        assert not features >> bit & 1, bit


def test_config_space_has_the_mac_and_the_mtu(rig):
    raw = rig.fn.region_read(0, DEVICE_CFG, virtio_net_config.sizeof())
    cfg = virtio_net_config.parse(raw)
    assert cfg.mac == MAC and cfg.mtu == 1500 and cfg.max_virtqueue_pairs == 1
    assert rig.fn.identity.device_id == 0x1041 and rig.fn.identity.class_code == 0x020000


# -- transmit ----------------------------------------------------------------------------
def test_transmit_sends_the_frame_with_a_plain_header_and_interrupts(rig):
    rig.transmit(frame(100))
    got = rig.wire.recv(4096)
    assert got == bytes(HDR_SIZE) + frame(100)
    assert rig.drv.used(TX_QUEUE) == [(0, 0)]
    assert (IRQ_MSIX, 2) in rig.host.irqs
    assert rig.dev.stats["tx_packets"] == 1


def test_transmit_gathers_a_frame_cut_anywhere_even_inside_the_header(rig):
    rig.transmit(frame(1514, 7), split=[5, 12, 40, 1000])
    assert rig.wire.recv(4096) == bytes(HDR_SIZE) + frame(1514, 7)


def transmit_with_header(rig, header: bytes, payload: bytes) -> None:
    data = header + payload
    rig.fn.memory.write(TX_BUFS, data)
    rig.drv.add_chain(TX_QUEUE, [(TX_BUFS, len(data), False)])
    rig.drv.notify(TX_QUEUE)
    rig.host.run()


def test_transmit_flags_not_negotiated_are_ignored_and_gso_not_negotiated_drops(rig):
    """Section 5.1.6.2.2: the device ignores flag bits it does not recognize; they are
    cleared, so DATA_VALID never tells the tap's stack to skip checksum checks."""
    transmit_with_header(rig, VIRTIO_NET_HDR.pack(1, 0, 0, 0, 34, 16, 0), frame(200, 1))
    transmit_with_header(rig, VIRTIO_NET_HDR.pack(0, 1, 54, 1448, 0, 0, 0), frame(200, 2))
    transmit_with_header(rig, VIRTIO_NET_HDR.pack(0xFE, 0, 0, 0, 0, 0, 0), frame(200, 3))
    got = [rig.wire.recv(4096) for _ in range(2)]
    assert [g[0] for g in got] == [0, 0]
    assert [g[HDR_SIZE:] for g in got] == [frame(200, 1), frame(200, 3)]
    with pytest.raises(BlockingIOError):
        rig.wire.recv(4096)
    assert rig.dev.stats["tx_malformed"] == 1 and rig.drv.used_idx(TX_QUEUE) == 3


def test_transmit_chain_shorter_than_the_header_or_longer_than_mtu_is_dropped(rig):
    rig.fn.memory.write(TX_BUFS, bytes(8))
    rig.drv.add_chain(TX_QUEUE, [(TX_BUFS, 8, False)])
    rig.transmit(frame(1500 + 14 + 4 + 1))
    assert rig.drv.used_idx(TX_QUEUE) == 2  # both returned to the driver
    with pytest.raises(BlockingIOError):
        rig.wire.recv(4096)
    assert rig.dev.stats["tx_malformed"] == 2


def test_transmit_buffer_that_faults_drops_the_frame_and_completes_the_chain(rig):
    rig.fn.set_dma_view(FaultingView(rig.fn.memory, TX_BUFS, TX_BUFS + 0x10000))
    rig.transmit(frame(64))
    assert rig.drv.used(TX_QUEUE) == [(0, 0)]
    assert rig.dev.stats["tx_dma_errors"] == 1
    assert not rig.fn.status & DEVICE_NEEDS_RESET


# -- receive -----------------------------------------------------------------------------
def test_receive_fills_the_oldest_buffer_with_header_and_frame(rig):
    rig.post_rx(4)
    rig.send_from_wire(frame(60, 1))
    rig.send_from_wire(frame(1514, 2))
    rig.host.run()
    assert rig.drv.used_idx(RX_QUEUE) == 2
    hdr, data = rig.received(0)
    assert VIRTIO_NET_HDR.unpack(hdr) == (0, 0, 0, 0, 0, 0, 1)  # num_buffers 1
    assert data == frame(60, 1)
    assert rig.received(1)[1] == frame(1514, 2)
    assert [length for _, length in rig.drv.used(RX_QUEUE)] == [HDR_SIZE + 60, HDR_SIZE + 1514]
    assert (IRQ_MSIX, 1) in rig.host.irqs


def test_receive_header_flags_from_the_tap_are_not_passed_on(rig):
    rig.post_rx(1)
    rig.send_from_wire(frame(80), header=VIRTIO_NET_HDR.pack(2, 0, 0, 0, 0, 0, 0))  # DATA_VALID
    rig.host.run()
    assert VIRTIO_NET_HDR.unpack(rig.received(0)[0]) == (0, 0, 0, 0, 0, 0, 1)


def test_without_receive_buffers_the_wire_is_not_watched(rig):
    rig.send_from_wire(frame(60))
    assert rig.host.watched == {}
    assert rig.host.run() == 0          # nothing to do, nothing spins
    rig.post_rx(1, run=False)
    rig.host.soon.popleft()()           # the queue step only: it keeps the buffer
    assert rig.dev.fd in rig.host.watched
    rig.host.run()
    assert rig.drv.used_idx(RX_QUEUE) == 1
    assert rig.host.watched == {}       # the only buffer is used: stop watching


def test_one_readable_event_moves_at_most_the_budget(rig):
    assert RX_BUDGET + 10 < RX_SIZE
    rig.post_rx(RX_SIZE)
    for i in range(RX_BUDGET + 10):
        rig.send_from_wire(frame(60, i))
    rig.host.watched[rig.dev.fd]()
    assert rig.drv.used_idx(RX_QUEUE) == RX_BUDGET
    rig.host.run()                             # the loop comes back for the rest
    assert rig.drv.used_idx(RX_QUEUE) == RX_BUDGET + 10
    assert [rig.received(i)[1][-1] for i in range(RX_BUDGET + 10)] == [
        (i + 45) & 0xFF for i in range(RX_BUDGET + 10)]


def test_frames_wait_in_the_wire_until_the_driver_adds_buffers(rig):
    rig.post_rx(4)
    for i in range(10):
        rig.send_from_wire(frame(60, i))
    rig.host.run()
    assert rig.drv.used_idx(RX_QUEUE) == 4 and rig.host.watched == {}
    rig.post_rx(6)
    assert rig.drv.used_idx(RX_QUEUE) == 10
    assert [rig.received(i)[1][-1] for i in range(10)] == [(i + 45) & 0xFF for i in range(10)]


def test_receive_batch_raises_one_interrupt(rig):
    rig.post_rx(32)
    rig.host.irqs.clear()
    for i in range(20):
        rig.send_from_wire(frame(60, i))
    rig.host.run()
    assert rig.drv.used_idx(RX_QUEUE) == 20
    assert rig.host.irqs == [(IRQ_MSIX, 1)]


def test_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept(rig):
    rig.post_rx(1, size=HDR_SIZE + 100)
    rig.send_from_wire(frame(101))
    rig.send_from_wire(frame(100))
    rig.host.run()
    assert rig.drv.used(RX_QUEUE) == [(0, HDR_SIZE + 100)]
    assert rig.dev.stats["rx_too_big"] == 1


def test_receive_buffer_that_faults_completes_with_length_zero(rig):
    rig.fn.set_dma_view(FaultingView(rig.fn.memory, RX_BUFS, RX_BUFS + BUF))
    rig.post_rx(2)
    rig.send_from_wire(frame(60, 1))
    rig.send_from_wire(frame(60, 2))
    rig.host.run()
    assert [length for _, length in rig.drv.used(RX_QUEUE)] == [0, HDR_SIZE + 60]
    assert rig.received(1)[1] == frame(60, 2)
    assert rig.dev.stats["rx_dma_errors"] == 1


def test_reset_drops_kept_buffers_and_stops_watching(rig):
    rig.post_rx(8)
    assert len(rig.dev.rx_chains) == 8 and rig.host.watched
    rig.drv.set_status(0)
    assert not rig.dev.rx_chains and rig.host.watched == {}


def test_device_needing_reset_drops_kept_buffers(rig):
    rig.post_rx(4)
    rig.fn.needs_reset("test")
    rig.send_from_wire(frame(60))
    rig.host.run()
    assert rig.drv.used_idx(RX_QUEUE) == 0
    assert not rig.dev.rx_chains and rig.host.watched == {}


def test_event_idx_and_no_event_idx_both_work():
    r = Rig(features=(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
                      | 1 << VIRTIO_NET_F_MAC))
    try:
        assert not r.fn.driver_features >> VIRTIO_F_EVENT_IDX & 1
        r.post_rx(2)
        r.send_from_wire(frame(60))
        r.host.run()
        r.transmit(frame(60))
        assert r.drv.used_idx(RX_QUEUE) == 1 and r.drv.used_idx(TX_QUEUE) == 1
        assert r.wire.recv(4096) == bytes(HDR_SIZE) + frame(60)
    finally:
        r.close()


# -- offloads and mergeable receive buffers -----------------------------------------------
ALL_OFFLOADS = sum(1 << b for b in OFFLOAD_FEATURES)


@pytest.fixture
def orig():
    r = Rig(offload=True)
    yield r
    r.close()


def test_offloads_offered_only_when_the_backend_takes_them(rig, orig):
    assert not rig.drv.device_features() & ALL_OFFLOADS
    assert orig.drv.device_features() & ALL_OFFLOADS == ALL_OFFLOADS
    assert orig.dev.mergeable


def test_the_tap_is_told_the_drivers_receive_offloads_and_forgets_them_at_reset(orig):
    assert orig.tun_flags == [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN]
    orig.drv.set_status(0)
    assert orig.tun_flags[-1] == 0
    base = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
    assert orig.drv.negotiate(base | 1 << VIRTIO_NET_F_GUEST_CSUM)
    assert orig.tun_flags[-1] == TUN_F_CSUM


@pytest.mark.parametrize("feature, without", [
    (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_CSUM),
])
def test_features_the_spec_forbids_together_are_refused(orig, feature, without):
    base = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
    assert not orig.drv.negotiate(base | 1 << feature)
    assert orig.drv.negotiate(base | 1 << feature | 1 << without)


def test_transmit_passes_the_offload_header_to_the_tap(orig):
    header = VIRTIO_NET_HDR.pack(1 | 2, 1, 54, 1448, 34, 16, 7)  # DATA_VALID: ignored
    transmit_with_header(orig, header, frame(4000))  # a TSO frame larger than the MTU
    got = orig.wire.recv(8192)
    assert VIRTIO_NET_HDR.unpack(got[:HDR_SIZE]) == (1, 1, 54, 1448, 34, 16, 0)
    assert got[HDR_SIZE:] == frame(4000)


def test_transmit_gso_without_host_tso_is_dropped():
    base = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
    r = Rig(offload=True, features=base | 1 << VIRTIO_NET_F_CSUM)
    try:
        transmit_with_header(r, VIRTIO_NET_HDR.pack(1, 1, 54, 1448, 34, 16, 0), frame(1000))
        transmit_with_header(r, VIRTIO_NET_HDR.pack(1, 0, 0, 0, 34, 16, 0), frame(4000))
        with pytest.raises(BlockingIOError):
            r.wire.recv(8192)
        assert r.dev.stats["tx_malformed"] == 2  # GSO not negotiated; larger than the MTU
    finally:
        r.close()


def test_mergeable_frame_spans_chains_and_says_how_many(orig):
    orig.post_rx(4)
    orig.send_from_wire(frame(5000, 3), header=VIRTIO_NET_HDR.pack(1, 1, 66, 1448, 34, 16, 0))
    orig.host.run()
    used = orig.drv.used(RX_QUEUE)
    assert [length for _, length in used] == [BUF, BUF, HDR_SIZE + 5000 - 2 * BUF]
    data = b"".join(orig.fn.memory.read(RX_BUFS + BUF * head, length) for head, length in used)
    assert VIRTIO_NET_HDR.unpack(data[:HDR_SIZE]) == (1, 1, 66, 1448, 34, 16, 3)
    assert data[HDR_SIZE:] == frame(5000, 3)
    assert len(orig.dev.rx_chains) == 1


class RecordingView(DmaView):
    """Identity, recording the address of every write; no zero-copy views, so the
    rings too are written field by field through it."""

    def __init__(self, memory):
        super().__init__(memory)
        self.writes: list[int] = []

    def map_sg(self, buffers, *, write, attrs=None):
        return None

    def pieces(self, addr, length, write, attrs):
        if write:
            self.writes.append(addr)
        return [(addr, length, None)]


def test_mergeable_frame_is_published_whole_with_one_used_idx_write(orig):
    """The guest's NAPI poll runs on another vCPU: were used.idx written per chain, it
    could see the first chain of a frame without the rest ("buffers missing")."""
    view = RecordingView(orig.fn.memory)
    orig.fn.set_dma_view(view)
    orig.post_rx(4)
    view.writes.clear()
    orig.send_from_wire(frame(5000))
    orig.host.run()
    used = orig.drv.queues[RX_QUEUE].used
    idx_writes = [i for i, a in enumerate(view.writes) if a == used + 2]
    elem_writes = [i for i, a in enumerate(view.writes) if used + 4 <= a < used + 4 + 8 * 128]
    assert len(elem_writes) == 3 and len(idx_writes) == 1
    assert idx_writes[0] > max(elem_writes)


def test_mergeable_frame_waits_for_enough_buffers_then_arrives(orig):
    orig.post_rx(2)
    orig.send_from_wire(frame(5000))
    orig.host.run()
    assert orig.drv.used_idx(RX_QUEUE) == 0 and orig.host.watched == {}  # waiting, idle
    orig.post_rx(1)                        # nothing new on the wire: the frame waited
    assert orig.drv.used_idx(RX_QUEUE) == 3
    assert orig.dev.stats["rx_packets"] == 1


def test_mergeable_frame_larger_than_the_whole_queue_is_dropped(orig):
    orig.post_rx(RX_SIZE, size=32)
    orig.send_from_wire(frame(5000))
    orig.send_from_wire(frame(20))
    orig.host.run()
    assert orig.dev.stats["rx_too_big"] == 1
    assert orig.drv.used(RX_QUEUE) == [(0, 32)]


def test_mergeable_fault_returns_the_first_chain_empty_and_keeps_the_rest(orig):
    orig.fn.set_dma_view(FaultingView(orig.fn.memory, RX_BUFS + BUF, RX_BUFS + 2 * BUF))
    orig.post_rx(4)
    orig.send_from_wire(frame(3000))
    orig.host.run()
    assert orig.drv.used(RX_QUEUE) == [(0, 0)]
    assert len(orig.dev.rx_chains) == 3 and orig.dev.rx_chains[0].head == 1


def test_receive_offload_flags_pass_with_guest_csum(orig):
    orig.post_rx(2)
    orig.send_from_wire(frame(80), header=VIRTIO_NET_HDR.pack(2, 0, 0, 0, 0, 0, 0))
    orig.host.run()
    assert VIRTIO_NET_HDR.unpack(orig.received(0)[0]) == (2, 0, 0, 0, 0, 0, 1)


def test_receive_gso_frame_not_negotiated_is_dropped(rig):
    rig.post_rx(2)
    rig.send_from_wire(frame(80), header=VIRTIO_NET_HDR.pack(1, 1, 54, 1448, 34, 16, 0))
    rig.send_from_wire(frame(80), header=VIRTIO_NET_HDR.pack(1, 0, 0, 0, 34, 16, 0))
    rig.host.run()
    assert rig.drv.used_idx(RX_QUEUE) == 0 and rig.dev.stats["rx_malformed"] == 2


def test_small_mtu_limits_frames_both_ways():
    r = Rig(mtu=576)
    try:
        r.post_rx(2)
        r.send_from_wire(frame(576 + 18 + 1))
        r.send_from_wire(frame(576 + 14))
        r.host.run()
        assert [length for _, length in r.drv.used(RX_QUEUE)] == [HDR_SIZE + 590]
        assert r.dev.stats["rx_malformed"] == 1
    finally:
        r.close()


# -- options -----------------------------------------------------------------------------
def test_mac_option_parsing():
    assert parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    for bad in ("52:54:00:ab:cd", "52-54-00-ab-cd-01", "53:54:00:00:00:01", "zz:54:00:00:00:01"):
        with pytest.raises(ValueError):
            parse_mac(bad)


def test_default_mac_is_local_unicast_stable_and_differs_per_tap():
    a, b = default_mac("tap0", "ns1"), default_mac("tap1", "ns1")
    assert a == default_mac("tap0", "ns1") and a != b
    assert a[:3] == bytes.fromhex("525400") and not a[0] & 1 and a[0] & 2


@pytest.mark.parametrize("options, message", [
    ({}, "tap=NAME is required"),
    ({"tap": "tap0", "speed": "10"}, "unknown options"),
    ({"tap": "tap0", "mac": "01:00:00:00:00:00"}, "multicast"),
    ({"tap": "tap0", "netns": "vfu-no-such-namespace"}, "no network namespace"),
    ({"tap": "vfu-no-such-tap"}, "no interface 'vfu-no-such-tap'"),
    ({"tap": "a" * 16}, "bad interface name"),
    ({"tap": "tap0", "offload": "maybe"}, "offload=on|off"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        build_endpoint("virtio-net", options)

"""The virtio layouts: construct definitions at the spec's offsets, hot-path codecs agreeing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser_iommu.endpoints.virtio.layouts import (
    VIRTIO_BLK_REQ,
    VIRTIO_NET_HDR,
    VIRTQ_DESC,
    VIRTQ_USED_ELEM,
    field_offsets,
    virtio_blk_config,
    virtio_blk_req,
    virtio_net_config,
    virtio_net_hdr,
    virtio_pci_cap,
    virtio_pci_common_cfg,
    virtio_pci_notify_cap,
    virtq_desc,
    virtq_used_elem,
)
from vfiouser_iommu.endpoints.virtio.virtqueue import vring_need_event

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def test_common_cfg_offsets_are_the_specs():
    cc = field_offsets(virtio_pci_common_cfg)
    assert (cc["config_msix_vector"], cc["device_status"], cc["queue_select"],
            cc["queue_enable"], cc["queue_desc"], cc["queue_driver"], cc["queue_device"],
            cc["queue_notify_data"], cc["queue_reset"]) == (
        0x10, 0x14, 0x16, 0x1C, 0x20, 0x28, 0x30, 0x38, 0x3A)
    assert virtio_pci_common_cfg.sizeof() == 0x40


def test_capability_sizes_are_the_specs():
    assert virtio_pci_cap.sizeof() == 16
    assert virtio_pci_notify_cap.sizeof() == 20


def test_blk_config_offsets_are_the_specs():
    off = field_offsets(virtio_blk_config)
    assert (off["capacity"], off["seg_max"], off["blk_size"], off["writeback"],
            off["num_queues"], off["max_discard_sectors"], off["write_zeroes_may_unmap"],
            off["max_secure_erase_sectors"]) == (0, 12, 20, 32, 34, 36, 56, 60)


@settings(max_examples=50, deadline=None)
@given(u64, u32, u16, u16)
def test_desc_codec_agrees_with_construct(addr, length, flags, nxt):
    built = virtq_desc.build(dict(addr=addr, len=length, flags=flags, next=nxt))
    assert VIRTQ_DESC.pack(addr, length, flags, nxt) == built
    assert VIRTQ_DESC.unpack(built) == (addr, length, flags, nxt)


@settings(max_examples=50, deadline=None)
@given(u32, u32)
def test_used_elem_codec_agrees_with_construct(ident, length):
    assert VIRTQ_USED_ELEM.pack(ident, length) == virtq_used_elem.build(dict(id=ident, len=length))


@settings(max_examples=50, deadline=None)
@given(u32, u32, u64)
def test_blk_req_codec_agrees_with_construct(req_type, reserved, sector):
    built = virtio_blk_req.build(dict(type=req_type, reserved=reserved, sector=sector))
    assert VIRTIO_BLK_REQ.unpack(built) == (req_type, reserved, sector)


def test_net_config_offsets_are_the_specs():
    off = field_offsets(virtio_net_config)
    assert (off["mac"], off["status"], off["max_virtqueue_pairs"], off["mtu"]) == (0, 6, 8, 10)
    assert virtio_net_hdr.sizeof() == 12


@settings(max_examples=50, deadline=None)
@given(st.tuples(st.integers(0, 0xFF), st.integers(0, 0xFF), u16, u16, u16, u16, u16))
def test_net_hdr_codec_agrees_with_construct(fields):
    names = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
             "num_buffers")
    built = virtio_net_hdr.build(dict(zip(names, fields, strict=True)))
    assert VIRTIO_NET_HDR.pack(*fields) == built
    assert VIRTIO_NET_HDR.unpack(built) == fields


def test_need_event_follows_the_spec_formula():
    assert vring_need_event(event=4, new=5, old=4)       # crossed the event index
    assert not vring_need_event(event=9, new=5, old=4)   # not there yet
    assert vring_need_event(event=0xFFFF, new=1, old=0xFFFE)  # across the wrap
    assert not vring_need_event(event=3, new=5, old=4)   # already past before

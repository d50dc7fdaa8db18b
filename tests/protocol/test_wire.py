"""The struct hot-path codecs agree with the construct definitions of each message."""

from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser_iommu.vfio_user import wire

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)

PAIRS = [
    (wire.HEADER, wire.vfio_user_header, ("msg_id", "command", "msg_size", "flags", "error_no"),
     (u16, u16, u32, u32, u32)),
    (wire.REGION_ACCESS, wire.vfio_user_region_access, ("offset", "region", "count"),
     (u64, u32, u32)),
    (wire.DMA_MAP, wire.vfio_user_dma_map, ("argsz", "flags", "offset", "addr", "size"),
     (u32, u32, u64, u64, u64)),
    (wire.DMA_UNMAP, wire.vfio_user_dma_unmap, ("argsz", "flags", "addr", "size"),
     (u32, u32, u64, u64)),
    (wire.DEVICE_INFO, wire.vfio_user_device_info, ("argsz", "flags", "num_regions", "num_irqs"),
     (u32, u32, u32, u32)),
    (wire.REGION_INFO, wire.vfio_user_region_info,
     ("argsz", "flags", "index", "cap_offset", "size", "offset"), (u32, u32, u32, u32, u64, u64)),
    (wire.IRQ_INFO, wire.vfio_user_irq_info, ("argsz", "flags", "index", "count"),
     (u32, u32, u32, u32)),
    (wire.IRQ_SET, wire.vfio_user_irq_set, ("argsz", "flags", "index", "start", "count"),
     (u32, u32, u32, u32, u32)),
]


def _check(codec, definition, names, values):
    packed = codec.pack(*values)
    assert packed == definition.build(dict(zip(names, values, strict=True)))
    parsed = definition.parse(packed)
    assert tuple(parsed[n] for n in names) == codec.unpack(packed)


def test_every_codec_has_the_size_of_its_definition():
    for codec, definition, _, _ in PAIRS:
        assert codec.size == definition.sizeof(), definition


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_struct_codecs_agree_with_construct(data):
    for codec, definition, names, strategies in PAIRS:
        _check(codec, definition, names, tuple(data.draw(s) for s in strategies))


@settings(max_examples=50, deadline=None)
@given(u64, st.binary(max_size=64))
def test_packed_dma_layout_agrees_with_construct(addr, payload):
    encoded = wire.encode_dma_request(wire.DmaLayout.PACKED, addr, len(payload), payload)
    assert encoded == wire.vfio_user_dma_rw_packed.build(dict(addr=addr, count=len(payload),
                                                            data=payload))
    # sizeof(VFIOUserDMARW) is 32 with the header; data starts at message byte 28.
    assert len(encoded) + wire.HEADER_SIZE == 32 + len(payload)
    assert encoded[12:12 + len(payload)] == payload
    assert wire.decode_dma_payload(wire.DmaLayout.PACKED, encoded) == (addr, len(payload), payload)


@settings(max_examples=50, deadline=None)
@given(u64, st.binary(max_size=64))
def test_spec_dma_layout_agrees_with_construct(addr, payload):
    encoded = wire.encode_dma_request(wire.DmaLayout.SPEC, addr, len(payload), payload)
    assert encoded == wire.vfio_user_dma_rw_spec.build(dict(addr=addr, count=len(payload),
                                                            data=payload))
    assert wire.decode_dma_payload(wire.DmaLayout.SPEC, encoded) == (addr, len(payload), payload)


def test_packed_dma_read_request_is_32_bytes_with_header():
    encoded = wire.encode_dma_request(wire.DmaLayout.PACKED, 0x1000, 8)
    assert encoded == wire.vfio_user_dma_read_packed.build(dict(addr=0x1000, count=8))
    assert wire.HEADER_SIZE + len(encoded) == 32


def test_short_dma_payloads_are_rejected():
    import pytest

    for layout in wire.DmaLayout:
        with pytest.raises(ValueError):
            wire.decode_dma_payload(layout, b"\0" * 8)
        whole = wire.encode_dma_request(layout, 0, 8, b"x" * 8)
        with pytest.raises(ValueError):
            wire.decode_dma_payload(layout, whole[:14])


def test_unserved_messages_round_trip():
    """Messages QEMU 11 never sends us are still described; their layouts round-trip."""
    cases = [
        (wire.vfio_region_info_cap_sparse_mmap,
         dict(header=dict(id=1, version=1, next=0), nr_areas=2, reserved=0,
              areas=[dict(offset=0, size=0x1000), dict(offset=0x2000, size=0x1000)]), 48),
        (wire.vfio_region_info_cap_type,
         dict(header=dict(id=2, version=1, next=0), type=3, subtype=1), 16),
        (wire.vfio_user_region_io_fds_request, dict(argsz=16, flags=0, index=0, count=0), 16),
        (wire.vfio_user_bitmap, dict(pgsize=4096, size=8, data=b"\xff" * 8), 24),
        (wire.vfio_user_write_multi,
         dict(wr_cnt=1, wrs=[dict(offset=4, region=0, count=4, data=b"abcd\0\0\0\0")]), 32),
        (wire.vfio_user_device_feature, dict(argsz=8, flags=1 << 16 | 1, data=b""), 8),
        (wire.vfio_user_mig_data, dict(argsz=12, size=4, data=b"wxyz"), 12),
    ]
    for definition, value, size in cases:
        raw = definition.build(value)
        assert len(raw) == size, definition
        assert definition.build(definition.parse(raw)) == raw

"""Layouts of virtio 1.2 (OASIS virtio-v1.2-cs01) that our PCI endpoints use.

Written once as `construct` definitions named as in the spec: the PCI capabilities and
common configuration (section 4.1.4), split virtqueue structures (section 2.7),
virtio-blk configuration and request header (section 5.2), and virtio-net
configuration and packet header (section 5.1). The hot path uses the
precompiled `struct` codecs at the bottom; tests prove they agree with the definitions.
"""

from __future__ import annotations

import struct

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

# -- PCI capabilities (section 4.1.4) --------------------------------------------------------
virtio_pci_cap = Struct(
    "cap_vndr" / Int8ul,
    "cap_next" / Int8ul,
    "cap_len" / Int8ul,
    "cfg_type" / Int8ul,
    "bar" / Int8ul,
    "id" / Int8ul,
    Padding(2),
    "offset" / Int32ul,
    "length" / Int32ul,
)

virtio_pci_notify_cap = Struct(
    "cap" / virtio_pci_cap,
    "notify_off_multiplier" / Int32ul,
)

VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4

# Section 4.1.4.3, with the queue_notify_data and queue_reset fields of 1.2 and the
# admin queue fields Linux's `virtio_pci_modern_common_cfg` maps when present.
virtio_pci_common_cfg = Struct(
    "device_feature_select" / Int32ul,
    "device_feature" / Int32ul,
    "driver_feature_select" / Int32ul,
    "driver_feature" / Int32ul,
    "config_msix_vector" / Int16ul,
    "num_queues" / Int16ul,
    "device_status" / Int8ul,
    "config_generation" / Int8ul,
    "queue_select" / Int16ul,
    "queue_size" / Int16ul,
    "queue_msix_vector" / Int16ul,
    "queue_enable" / Int16ul,
    "queue_notify_off" / Int16ul,
    "queue_desc" / Int64ul,
    "queue_driver" / Int64ul,
    "queue_device" / Int64ul,
    "queue_notify_data" / Int16ul,
    "queue_reset" / Int16ul,
    "admin_queue_index" / Int16ul,
    "admin_queue_num" / Int16ul,
)

# -- split virtqueues (section 2.7) ----------------------------------------------------------
virtq_desc = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "flags" / Int16ul,
    "next" / Int16ul,
)

# The fixed head of `struct virtq_avail`; ring[queue size] and used_event follow.
virtq_avail = Struct(
    "flags" / Int16ul,
    "idx" / Int16ul,
)

virtq_used_elem = Struct(
    "id" / Int32ul,
    "len" / Int32ul,
)

# The fixed head of `struct virtq_used`; ring[queue size] and avail_event follow.
virtq_used = Struct(
    "flags" / Int16ul,
    "idx" / Int16ul,
)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

# -- virtio-blk (section 5.2) ------------------------------------------------------------------
virtio_blk_geometry = Struct("cylinders" / Int16ul, "heads" / Int8ul, "sectors" / Int8ul)
virtio_blk_topology = Struct(
    "physical_block_exp" / Int8ul,
    "alignment_offset" / Int8ul,
    "min_io_size" / Int16ul,
    "opt_io_size" / Int32ul,
)

virtio_blk_config = Struct(
    "capacity" / Int64ul,
    "size_max" / Int32ul,
    "seg_max" / Int32ul,
    "geometry" / virtio_blk_geometry,
    "blk_size" / Int32ul,
    "topology" / virtio_blk_topology,
    "writeback" / Int8ul,
    "unused0" / Int8ul,
    "num_queues" / Int16ul,
    "max_discard_sectors" / Int32ul,
    "max_discard_seg" / Int32ul,
    "discard_sector_alignment" / Int32ul,
    "max_write_zeroes_sectors" / Int32ul,
    "max_write_zeroes_seg" / Int32ul,
    "write_zeroes_may_unmap" / Int8ul,
    Padding(3),
    "max_secure_erase_sectors" / Int32ul,
    "max_secure_erase_seg" / Int32ul,
    "secure_erase_sector_alignment" / Int32ul,
)

# The device-readable head of `struct virtio_blk_req`; data[] and status follow.
virtio_blk_req = Struct(
    "type" / Int32ul,
    "reserved" / Int32ul,
    "sector" / Int64ul,
)

# -- virtio-net (section 5.1) ------------------------------------------------------------------
# The fields up to `mtu`; the RSS/hash fields after it belong to features we do not offer.
virtio_net_config = Struct(
    "mac" / Bytes(6),
    "status" / Int16ul,
    "max_virtqueue_pairs" / Int16ul,
    "mtu" / Int16ul,
)

# `struct virtio_net_hdr` as VIRTIO_F_VERSION_1 lays it out: always 12 bytes, num_buffers
# included whether or not VIRTIO_NET_F_MRG_RXBUF is negotiated (section 5.1.6).
virtio_net_hdr = Struct(
    "flags" / Int8ul,
    "gso_type" / Int8ul,
    "hdr_len" / Int16ul,
    "gso_size" / Int16ul,
    "csum_start" / Int16ul,
    "csum_offset" / Int16ul,
    "num_buffers" / Int16ul,
)


def field_offsets(layout: Struct) -> dict[str, int]:
    """The byte offset of each named field of a fixed-size `Struct`."""
    offsets, pos = {}, 0
    for sc in layout.subcons:
        if sc.name:
            offsets[sc.name] = pos
        pos += sc.sizeof()
    return offsets


# -- hot-path codecs ------------------------------------------------------------------------------
VIRTQ_DESC = struct.Struct("<QIHH")
VIRTQ_USED_ELEM = struct.Struct("<II")
VIRTIO_BLK_REQ = struct.Struct("<IIQ")
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")

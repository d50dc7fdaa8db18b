"""virtio-rng, the entropy device (virtio 1.2 section 5.4).

One request queue; every device-writable buffer is filled with bytes from
`os.urandom`. Choice where the spec leaves one: at most `MAX_BYTES_PER_REQUEST` bytes
per chain (the used length says how many), so a driver's huge buffer cannot stall the
event loop; a buffer that faults ends the chain with what was written before it.
"""

from __future__ import annotations

import logging
import os

from ...memory import DmaError, DmaView
from .device import VirtioDevice
from .virtqueue import DescriptorChain, pieces

log = logging.getLogger(__name__)

VIRTIO_ID_ENTROPY = 4
CLASS_OTHERS = 0xFF0000  # what QEMU's virtio-rng-pci reports
MAX_BYTES_PER_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_ENTROPY
    class_code = CLASS_OTHERS
    queue_max_size = 64
    name = "virtio-rng"

    def handle(self, queue: int, chain: DescriptorChain, dma: DmaView) -> int:
        length = min(chain.writable_length, MAX_BYTES_PER_REQUEST)
        done = 0
        for addr, n in pieces(chain.writable, 0, length):
            try:
                dma.write(addr, os.urandom(n))
            except DmaError as e:
                log.info("%s: buffer of request %d faulted: %s", self.name, chain.head, e)
                break
            done += n
        return done

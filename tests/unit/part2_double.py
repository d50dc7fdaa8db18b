"""A test double of part 1's RiscvIommu surface, for part 2's unit tests.

It has exactly what the contract says part 2 may use: `memory`, `config`, the `ddtp`
and `fctl` ints, `raise_irq`, the `report_fault` / `count_event` hooks, the
invalidation primitives (recorded in `calls`), `device_context` and `translate`.
"""

from __future__ import annotations

from collections import Counter, deque
from types import SimpleNamespace

from vfiouser_iommu.iommu.config import IommuConfig
from vfiouser_iommu.iommu.faults import Fault
from vfiouser_iommu.iommu.registers import RegisterFile
from vfiouser_iommu.iommu.regs_layouts import CAPABILITIES
from vfiouser_iommu.memory import GuestMemory

RAM_BASE = 0x8000_0000
RAM_SIZE = 16 << 20

DEFAULT_CAPS = dict(version=0x10, Sv39=1, Sv48=1, Sv57=1, Sv39x4=1, Sv48x4=1, Sv57x4=1,
                    MSI_FLAT=1, MSI_MRIF=1, ATS=1, IGS=0, HPM=1, DBG=1, PAS=56, PD8=1,
                    PD17=1, PD20=1)


# Part 1's own fault: its record layout is not what these tests are about.
FakeFault = Fault


class FakeIommu:
    def __init__(self, caps: dict | None = None, **regs_options):
        self.memory = GuestMemory.ram(RAM_BASE, RAM_SIZE)
        self.config = IommuConfig.from_capabilities(
            CAPABILITIES.encode(**{**DEFAULT_CAPS, **(caps or {})}))
        self.ddtp = 0
        self.fctl = 0
        self.irqs: list[int] = []
        self.raise_irq = self.irqs.append
        self.recent_faults: deque = deque(maxlen=64)
        self.counters: Counter = Counter()
        self.calls: list[tuple] = []
        self.translation_resets = 0
        self.contexts: dict[int, object] = {}
        self.translate_result: object = None
        self.report_fault = self.recent_faults.append
        self.count_event = self._count
        regs_options.setdefault("msi_table_external", True)
        self.regs = RegisterFile(self, **regs_options)

    def _count(self, event, device_id, process_id, gscid, pscid) -> None:
        self.counters[event] += 1

    def invalidate_ddt(self, dv, device_id):
        self.calls.append(("ddt", dv, device_id))

    def invalidate_pdt(self, device_id, process_id):
        self.calls.append(("pdt", device_id, process_id))

    def invalidate_vma(self, gv, gscid, pscv, pscid, av, addr, size=4096):
        self.calls.append(("vma", gv, gscid, pscv, pscid, av, addr)
                          + ((size,) if size != 4096 else ()))

    def invalidate_gvma(self, gv, gscid, av, addr, size=4096):
        self.calls.append(("gvma", gv, gscid, av, addr) + ((size,) if size != 4096 else ()))

    def reset_translation_state(self):
        self.translation_resets += 1

    def device_context(self, device_id):
        return self.contexts.get(device_id, FakeFault(258, 9, 4, 0, device_id, None, False))

    def message_context(self, request):
        """Part 1's §3.8 message check, reduced to what the page-request tests need."""
        mode = self.ddtp & 0xF
        dc = self.device_context(request.device_id) if mode > 1 else None
        if mode == 0 or mode == 1 or isinstance(dc, Fault) or not dc.en_pri:
            cause = 256 if mode == 0 else dc.cause if isinstance(dc, Fault) else 260
            fault = FakeFault(cause, 9, request.message_code, 0, request.device_id,
                              request.process_id, False)
            self.report_fault(fault)
            return fault
        return dc

    def translate(self, request):
        return self.translate_result

    # -- helpers for tests --------------------------------------------------------------
    def read(self, offset: int, size: int = 4) -> int:
        return self.regs.mmio_read(offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.regs.mmio_write(offset, size, value)


def device_context(en_ats=True, en_pri=True, prpr=False):
    return SimpleNamespace(en_ats=en_ats, en_pri=en_pri, prpr=prpr)


class RecordingFallback:
    """A `GuestMemory.fallback` that records what reaches it (vfio-user's DMA messages
    in a served function) and answers reads with zeros."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, gpa: int, length: int) -> bytes:
        self.reads.append((gpa, length))
        return bytes(length)

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, data))

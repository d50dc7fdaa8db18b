"""The IOMMU register file at offsets 0x000–0xFFF (spec v1.0.1 §5).

`RegisterFile(iommu)` owns the programming interface of one `RiscvIommu`: it decodes
MMIO accesses, keeps every register's state (or, for `ddtp` and `fctl`, the plain int
attributes of `iommu` that part 1 reads), and owns the queues, interrupts, HPM and
debug interface. It installs itself into part 1's hooks: `iommu.report_fault` becomes
the fault-queue writer and `iommu.count_event` the HPM (each chaining to the hook it
replaces, so `recent_faults` and `counters` keep working).

Access rules (§5.1): naturally aligned 4- and 8-byte accesses; a 64-bit register may
be accessed as two 4-byte halves. Accesses of another size, misaligned ones, 8-byte
accesses spanning two 32-bit registers, and offsets with no register read 0 and
ignore writes (the spec leaves them UNSPECIFIED; this is what the reference model
does). Absent optional registers read 0.

Embedding (the vfio-user layer): MMIO is handled in order, synchronously. A `cqt` write
executes at most `inline_budget` commands before returning; if `work_pending()` is
then still true the caller should call `run_pending(budget)` from its event loop until
it is false. Reads of `cqh` and `cqcsr` also advance the queue by `inline_budget`, so a
driver polling for completion always makes progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vfiouser_iommu.iommu.commands import AtsEndpoint, CommandQueue
from vfiouser_iommu.iommu.config import Igs
from vfiouser_iommu.iommu.debug import DebugInterface
from vfiouser_iommu.iommu.directory import MODE_1LVL, MODE_3LVL, MODE_BARE, MODE_OFF
from vfiouser_iommu.iommu.faults import Fault
from vfiouser_iommu.iommu.hpm import Hpm
from vfiouser_iommu.iommu.interrupts import MSI_CFG_TBL_ENTRIES, Interrupts
from vfiouser_iommu.iommu.queues import FaultQueue, PageRequestQueue
from vfiouser_iommu.iommu.regs_layouts import DDTP, FCTL, IOMMU_QOSID

log = logging.getLogger(__name__)

REGISTER_FILE_SIZE = 0x1000
MSI_CFG_TBL = 0x300
_M32 = 0xFFFF_FFFF
_TTYP_NONE = 0


@dataclass(frozen=True)
class Register:
    """One register: where it is, how wide, and its read/write behaviour.

    `write(value, mask)` receives the value already shifted into place and the mask of
    the bytes being written (so a 4-byte half write touches only its half).
    """

    name: str
    offset: int
    size: int
    read: Callable[[], int]
    write: Callable[[int, int], None]


def _ignore(value: int, mask: int) -> None:
    """Writes to read-only registers are ignored."""


class RegisterFile:
    """The programming interface of one IOMMU; `iommu.regs`."""

    def __init__(self, iommu, *, msi_table_external: bool | None = None,
                 vectors: int | None = None, hpm_counters: int | None = None,
                 inline_budget: int = 64):
        config = iommu.config
        self.iommu = iommu
        self.config = config
        self.caps_value = config.capabilities
        self.pas = config.pas or 56
        self.inline_budget = inline_budget
        self.msi_table_external = (config.msi_table_external if msi_table_external is None
                                   else msi_table_external)
        self.ats_endpoints: dict[int, AtsEndpoint] = {}
        self._build_units(config, vectors, hpm_counters)
        self._hook_part1()
        self._registers: dict[int, Register] = {}
        self._map_registers()
        self.reset()

    # -- construction -----------------------------------------------------------------
    def _build_units(self, config, vectors: int | None, hpm_counters: int | None) -> None:
        self.irq = Interrupts(self, vectors or config.interrupt_vectors,
                              self.msi_table_external)
        self.cq = CommandQueue(self)
        self.fq = FaultQueue(self)
        self.pq = PageRequestQueue(self) if config.ats else None
        self.hpm = Hpm(self, hpm_counters or config.hpm_counters) if config.hpm else None
        self.debug = DebugInterface(self) if config.dbg else None
        self._qosid_mask = 0
        if config.qosid:
            self._qosid_mask = (IOMMU_QOSID.mask("RCID") & ((1 << config.rcid_bits) - 1)) | (
                IOMMU_QOSID.mask("MCID") & (((1 << config.mcid_bits) - 1) << 16))

    def _hook_part1(self) -> None:
        iommu = self.iommu
        previous_report = iommu.report_fault
        previous_count = iommu.count_event

        def report_fault(fault) -> None:
            previous_report(fault)
            self.fq.report(fault)

        iommu.report_fault = report_fault
        if self.hpm is not None:
            hpm = self.hpm

            def count_event(event, device_id, process_id, gscid, pscid) -> None:
                previous_count(event, device_id, process_id, gscid, pscid)
                if event in hpm.counters_by_event:
                    hpm.count(event, device_id, process_id, gscid, pscid)

            # What this hook chains to: the C fast path counts events itself while no
            # HPM counter watches them (iommu/fastpath.py).
            count_event.hpm_chain = (previous_count, hpm)
            iommu.count_event = count_event

    def _add(self, name: str, offset: int, size: int, read: Callable[[], int],
             write: Callable[[int, int], None] = _ignore) -> None:
        self._registers[offset] = Register(name, offset, size, read, write)
        if size == 8:
            self._registers[offset + 4] = self._registers[offset]

    def _map_registers(self) -> None:
        cq, fq, irq = self.cq, self.fq, self.irq
        self._add("capabilities", 0x000, 8, lambda: self.caps_value)
        self._add("fctl", 0x008, 4, lambda: self.iommu.fctl, self._write_fctl)
        self._add("ddtp", 0x010, 8, lambda: self.iommu.ddtp, self._write_ddtp)
        self._add("cqb", 0x018, 8, lambda: cq.base, cq.write_base)
        self._add("cqh", 0x020, 4, cq.read_head)
        self._add("cqt", 0x024, 4, lambda: cq.tail, cq.write_tail)
        self._add("fqb", 0x028, 8, lambda: fq.base, fq.write_base)
        self._add("fqh", 0x030, 4, lambda: fq.head, fq.write_head)
        self._add("fqt", 0x034, 4, lambda: fq.tail)
        self._add("cqcsr", 0x048, 4, self._read_cqcsr, cq.write_csr)
        self._add("fqcsr", 0x04C, 4, lambda: fq.csr, fq.write_csr)
        self._add("ipsr", 0x054, 4, lambda: irq.ipsr, irq.write_ipsr)
        self._add("icvec", 0x2F8, 8, lambda: irq.icvec, irq.write_icvec)
        if self.pq is not None:
            self._map_pq(self.pq)
        if self.hpm is not None:
            self._map_hpm(self.hpm)
        if self.debug is not None:
            self._map_debug(self.debug)
        if self.config.qosid:
            self._add("iommu_qosid", 0x270, 4, lambda: self.iommu_qosid, self._write_qosid)
        if self.config.igs != Igs.WSI and not self.msi_table_external:
            for i in range(MSI_CFG_TBL_ENTRIES):
                self._map_msi_entry(i)

    def _map_pq(self, pq: PageRequestQueue) -> None:
        self._add("pqb", 0x038, 8, lambda: pq.base, pq.write_base)
        self._add("pqh", 0x040, 4, lambda: pq.head, pq.write_head)
        self._add("pqt", 0x044, 4, lambda: pq.tail)
        self._add("pqcsr", 0x050, 4, lambda: pq.csr, pq.write_csr)

    def _map_hpm(self, hpm: Hpm) -> None:
        self._add("iocountovf", 0x058, 4, hpm.read_ovf)
        self._add("iocountinh", 0x05C, 4, lambda: hpm.iocountinh, hpm.write_inh)
        self._add("iohpmcycles", 0x060, 8, hpm.read_cycles, hpm.write_cycles)
        for i in range(hpm.n):
            self._add(f"iohpmctr{i + 1}", 0x068 + 8 * i, 8, lambda i=i: hpm.ctr[i],
                      lambda v, m, i=i: hpm.write_ctr(i, v, m))
            self._add(f"iohpmevt{i + 1}", 0x160 + 8 * i, 8, lambda i=i: hpm.evt[i],
                      lambda v, m, i=i: hpm.write_evt(i, v, m))

    def _map_debug(self, debug: DebugInterface) -> None:
        self._add("tr_req_iova", 0x258, 8, lambda: debug.tr_req_iova, debug.write_iova)
        self._add("tr_req_ctl", 0x260, 8, lambda: debug.tr_req_ctl, debug.write_ctl)
        self._add("tr_response", 0x268, 8, lambda: debug.tr_response)

    def _map_msi_entry(self, i: int) -> None:
        irq, base = self.irq, MSI_CFG_TBL + 16 * i
        self._add(f"msi_addr_{i}", base, 8, lambda: irq.msi_cfg_tbl[i].addr,
                  lambda v, m: irq.write_msi_addr(i, v, m))
        self._add(f"msi_data_{i}", base + 8, 4, lambda: irq.msi_cfg_tbl[i].data,
                  lambda v, m: irq.write_msi_data(i, v, m))
        self._add(f"msi_vec_ctl_{i}", base + 12, 4, lambda: irq.read_msi_vec_ctl(i),
                  lambda v, m: irq.write_msi_vec_ctl(i, v, m))

    # -- MMIO -------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        reg = self._decode(offset, size)
        if reg is None:
            return 0
        shift = (offset - reg.offset) * 8
        return (reg.read() >> shift) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        reg = self._decode(offset, size)
        if reg is None:
            return
        shift = (offset - reg.offset) * 8
        mask = ((1 << (8 * size)) - 1) << shift
        reg.write((value << shift) & mask, mask)

    def _decode(self, offset: int, size: int) -> Register | None:
        if size not in (4, 8) or offset % size or not 0 <= offset < REGISTER_FILE_SIZE:
            log.debug("unsupported register access %#x/%d", offset, size)
            return None
        reg = self._registers.get(offset)
        if reg is None or size > reg.size:
            return None
        return reg

    # -- fctl, ddtp, cqcsr, qosid -----------------------------------------------------
    def _fctl_writable_mask(self) -> int:
        mask = 0
        if self.config.end:
            mask |= FCTL.mask("BE")
        if self.config.igs == Igs.BOTH:
            mask |= FCTL.mask("WSI")
        if self.config.gxl_writable:
            mask |= FCTL.mask("GXL")
        return mask

    def _fctl_reset(self) -> int:
        return FCTL.encode(WSI=1) if self.config.igs == Igs.WSI else 0

    def _write_fctl(self, value: int, mask: int) -> None:
        # The spec leaves fctl changes UNSPECIFIED while translating or with a queue on;
        # they are ignored then, so the byte order never changes under a running queue.
        if DDTP.get(self.iommu.ddtp, "iommu_mode") >= MODE_1LVL or self._any_queue_on():
            return
        writable = self._fctl_writable_mask() & mask
        self.iommu.fctl = (self.iommu.fctl & ~writable) | (value & writable)
        self.irq.fctl_changed()

    def _any_queue_on(self) -> bool:
        queues = (self.cq, self.fq, self.pq)
        return any(q is not None and q.csr & (q.EN | q.ON) for q in queues)

    def _write_ddtp(self, value: int, mask: int) -> None:
        old = self.iommu.ddtp
        merged = (old & ~mask) | (value & mask)
        mode = DDTP.get(merged, "iommu_mode")
        old_mode = DDTP.get(old, "iommu_mode")
        if not self._ddtp_transition_ok(old_mode, mode):
            return
        ppn = DDTP.get(merged, "PPN") & ((1 << (self.pas - 12)) - 1)
        self.iommu.ddtp = DDTP.encode(iommu_mode=mode, PPN=ppn)

    @staticmethod
    def _ddtp_transition_ok(old_mode: int, mode: int) -> bool:
        """Which iommu_mode writes take effect (WARL; others keep the old value).

        Off and Bare may go to any mode; an xLVL mode may go to Off or Bare (Linux's
        shutdown writes Bare) or stay (a PPN update, also what a split 8-byte write
        produces). Reserved modes and xLVL→other xLVL are ignored, so an unsupported
        request never reads back as a different level.
        """
        if mode > MODE_3LVL:
            return False
        return old_mode <= MODE_BARE or mode <= MODE_BARE or mode == old_mode

    def _read_cqcsr(self) -> int:
        self.cq.process(self.inline_budget)
        return self.cq.csr

    def _write_qosid(self, value: int, mask: int) -> None:
        self.iommu_qosid = ((self.iommu_qosid & ~mask) | (value & mask)) & self._qosid_mask

    # -- reset and the caller's work loop ---------------------------------------------
    def reset(self) -> None:
        """Spec reset: queues, ipsr, debug off; ddtp Off with PPN 0; caches empty."""
        self.iommu.ddtp = DDTP.encode(iommu_mode=MODE_OFF)
        self.iommu.fctl = self._fctl_reset()
        self.iommu_qosid = 0
        for unit in (self.irq, self.cq, self.fq, self.pq, self.hpm, self.debug):
            if unit is not None:
                unit.reset()
        self.iommu.reset_translation_state()

    def work_pending(self) -> bool:
        """Whether `run_pending` has commands to execute."""
        return self.cq.work_pending()

    def run_pending(self, budget: int = 256) -> int:
        """Execute up to `budget` queued commands; return how many completed."""
        return self.cq.process(budget)

    # -- services for the units -------------------------------------------------------
    def report_internal_fault(self, cause: int, iotval: int) -> None:
        """A fault of the IOMMU itself (TTYP 0), e.g. cause 273 for a failed MSI write."""
        self.iommu.report_fault(Fault(cause=cause, ttyp=_TTYP_NONE, iotval=iotval, iotval2=0,
                                      device_id=0, process_id=None, privileged=False))

    def send_prg_response(self, device_id: int, process_id: int | None, prg_index: int,
                          response_code: int) -> None:
        endpoint = self.ats_endpoints.get(device_id)
        if endpoint is not None:
            endpoint.prg_response(process_id, prg_index, response_code)

    def page_request(self, device_id: int, process_id: int | None, **request) -> None:
        """A PCIe Page Request from an endpoint (see `PageRequestQueue.page_request`)."""
        if self.pq is not None:
            self.pq.page_request(device_id, process_id, **request)

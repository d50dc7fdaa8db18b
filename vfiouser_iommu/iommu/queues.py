"""In-memory queues: the registers they share, the fault queue and the page-request queue.

Spec v1.0.1 §3 (fault queue, page-request queue), §5.6–§5.17 (qb, qh, qt, qcsr) and
§3.2 (PRI handling). The command queue, which consumes rather than produces, is in
`commands.py` on top of the same `QueueRegs`.

All queue state changes complete synchronously, so `busy` always reads 0 and `on`
follows `en` at the end of the csr write. Writes to a queue base while the queue is on
are ignored (the spec leaves them UNSPECIFIED; the queue keeps running where it was).

Queue memory must be guest RAM, i.e. lie inside the DMA-mapped regions: an entry
anywhere else is the queue's memory fault (cqmf/fqmf/pqmf), even though a served
`GuestMemory` could post the write to the VMM as a DMA message. Records written to
MMIO or a hole would otherwise vanish while the tail advanced. Only MSI writes and
IOFENCE.C's data write, which may target MMIO such as an IMSIC, use that fallback.
"""

from __future__ import annotations

import logging
from enum import IntEnum

from vfiouser_iommu.iommu.directory import MODE_BARE
from vfiouser_iommu.iommu.faults import Fault
from vfiouser_iommu.iommu.interrupts import FIP, PIP
from vfiouser_iommu.iommu.regs_layouts import DDTP, FCTL, FQCSR, PAGE_REQUEST, PQCSR, QB
from vfiouser_iommu.iommu.request import Request, RequestKind
from vfiouser_iommu.memory import MemoryAccessError

log = logging.getLogger(__name__)

PAGE_REQUEST_MSG_CODE = 0x04
_DDT_FAILURE_CAUSES = frozenset({256, 257, 258, 259, 268, 272})


class PrgResponseCode(IntEnum):
    """PCIe PRG Response codes used by the IOMMU's auto-responses (§3.2)."""

    SUCCESS = 0x0
    INVALID_REQUEST = 0x1
    RESPONSE_FAILURE = 0xF


class QueueRegs:
    """qb / head / tail / csr of one queue; `SOFTWARE_INDEX` names the software-owned
    index ("head" or "tail")."""

    SOFTWARE_INDEX = "head"

    def __init__(self, regs, entry_size: int, csr_layout, prefix: str):
        self.regs = regs
        self.entry_size = entry_size
        self.csr_layout = csr_layout
        self.EN = csr_layout.mask(prefix + "en")
        self.IE = csr_layout.mask(prefix[0] + "ie")
        self.ON = csr_layout.mask(prefix + "on")
        self.MF = csr_layout.mask(prefix + "mf")
        self._ppn_mask = QB.mask("PPN") & ((1 << (regs.pas - 2)) - 1)  # PPN sits at bit 10
        self.reset()

    def reset(self) -> None:
        self.base = 0
        self.head = 0
        self.tail = 0
        self.csr = 0

    @property
    def entries(self) -> int:
        return 2 << QB.get(self.base, "LOG2SZ_1")

    @property
    def index_mask(self) -> int:
        return self.entries - 1

    def entry_address(self, index: int) -> int:
        return (QB.get(self.base, "PPN") << 12) + index * self.entry_size

    def write_base(self, value: int, mask: int) -> None:
        if self.csr & (self.ON | self.EN):
            return
        merged = (self.base & ~mask) | (value & mask)
        self.base = merged & (self._ppn_mask | QB.mask("LOG2SZ_1"))
        # §5.7/§5.10/§5.13: bits 31:LOG2SZ of the software-owned index read 0 after a
        # base write; the low bits keep their (valid) value.
        index = getattr(self, self.SOFTWARE_INDEX)
        setattr(self, self.SOFTWARE_INDEX, index & self.index_mask)

    def masked_index(self, value: int, mask: int, old: int) -> int:
        return ((old & ~mask) | (value & mask)) & self.index_mask

    @property
    def big_endian(self) -> bool:
        return bool(FCTL.get(self.regs.iommu.fctl, "BE"))

    @property
    def on(self) -> bool:
        return bool(self.csr & self.ON)

    def in_ram(self, addr: int, size: int) -> bool:
        """Whether a queue entry lies in mapped guest RAM (see the module docstring)."""
        return self.regs.iommu.memory.contains(addr, size)

    def full(self) -> bool:
        return (self.tail + 1) & self.index_mask == self.head & self.index_mask

    def _write_csr(self, value: int, mask: int, rw1c: int) -> bool:
        """A csr write: EN and IE are RW, the `rw1c` error bits RW1C, ON follows EN.

        Enabling the queue also clears the error bits; True when this write enabled it
        (the caller then resets the index the IOMMU owns).
        """
        value &= mask
        rw = self.EN | self.IE
        new = (self.csr & ~(rw & mask)) | (value & rw)
        new &= ~(value & rw1c)
        enabled = bool(new & self.EN and not self.csr & self.EN)
        if enabled:
            new &= ~rw1c
        self.csr = new | self.ON if new & self.EN else new & ~self.ON
        return enabled


class ProducerQueue(QueueRegs):
    """A queue the IOMMU writes records into: the fault queue or the page-request queue.

    Software owns the head; the IOMMU owns the tail. While the queue is off, or its
    memory-fault or overflow bit is set, records are discarded (§3.1, §3.2).
    """

    def __init__(self, regs, entry_size: int, csr_layout, prefix: str, cause: int):
        super().__init__(regs, entry_size, csr_layout, prefix)
        self.OF = csr_layout.mask(prefix + "of")
        self.cause = cause
        regs.irq.persistent[cause] = self._error_pending

    def _error_pending(self) -> bool:
        return bool(self.csr & self.IE and self.csr & (self.MF | self.OF))

    def write_head(self, value: int, mask: int) -> None:
        self.head = self.masked_index(value, mask, self.head)

    def write_csr(self, value: int, mask: int) -> None:
        if self._write_csr(value, mask, self.MF | self.OF):
            self.tail = 0

    def accepting(self) -> bool:
        return self.on and not self.csr & (self.MF | self.OF)

    def push(self, record: bytes) -> bool:
        """Append one record; set of/mf as the spec says. True if it was written."""
        if not self.accepting():
            return False
        if self.full():
            self._error(self.OF)
            return False
        addr = self.entry_address(self.tail)
        try:
            if not self.in_ram(addr, len(record)):
                raise MemoryAccessError(addr, len(record), "queue memory is not RAM")
            self.regs.iommu.memory.write(addr, record)
        except MemoryAccessError:
            self._error(self.MF)
            return False
        self.tail = (self.tail + 1) & self.index_mask
        self._interrupt()
        return True

    def _error(self, bit: int) -> None:
        self.csr |= bit
        self._interrupt()

    def _interrupt(self) -> None:
        if self.csr & self.IE:
            self.regs.irq.raise_cause(self.cause)


class FaultQueue(ProducerQueue):
    """The fault queue (§3.1): 32-byte fault records written by `report`."""

    def __init__(self, regs):
        super().__init__(regs, 32, FQCSR, "fq", FIP)

    def report(self, fault) -> None:
        """`iommu.report_fault`: write the record of a fault the spec says is reported."""
        log.info("fault cause=%d ttyp=%d did=%#x pid=%s iotval=%#x iotval2=%#x%s",
                 fault.cause, fault.ttyp, fault.device_id,
                 "-" if fault.process_id is None else f"{fault.process_id:#x}",
                 fault.iotval, fault.iotval2, "" if self.on else " (fault queue off: dropped)")
        self.push(fault.to_record(big_endian=self.big_endian))


class PageRequestQueue(ProducerQueue):
    """The page-request queue (§3.2) and the IOMMU's handling of PCIe Page Requests."""

    def __init__(self, regs):
        super().__init__(regs, 16, PQCSR, "pq", PIP)

    def page_request(self, device_id: int, process_id: int | None, *, page_addr: int,
                     prg_index: int, read: bool, write: bool, last: bool,
                     privileged: bool = False, execute: bool = False) -> None:
        """A Page Request (or Stop Marker: read=write=False, last=True) from an endpoint.

        Queued when the device's context has EN_ATS and EN_PRI and the queue can take it.
        Otherwise a last request of a group gets the spec's automatic PRG Response,
        sent to the endpoint registered for `device_id`; other requests and Stop
        Markers are dropped. Directory failures and EN_PRI=0 are also fault-logged
        (TTYP 9, iotval = the Page Request message code).
        """
        refused, dc = self._context_refusal(device_id, process_id, privileged)
        if refused is None:
            record = self._record(device_id, process_id, page_addr, prg_index, read, write,
                                  last, privileged, execute)
            if not self.on or self.csr & self.MF:
                refused = PrgResponseCode.RESPONSE_FAILURE, False
            elif self.push(record):
                return
            elif self.csr & self.MF:
                refused = PrgResponseCode.RESPONSE_FAILURE, False
            else:
                refused = PrgResponseCode.SUCCESS, bool(dc.prpr)
        if last and (read or write):
            self._auto_response(device_id, process_id, prg_index, *refused)

    def _context_refusal(self, device_id: int, process_id: int | None, privileged: bool):
        """(refusal, DC): the (response code, PRPR) when the directory refuses the
        request, else None; and the DC when the message check found one.

        Part 1's `message_context` locates the DC and reports the fault (TTYP 9) for
        Off/Bare, directory faults and a DC without EN_PRI; the record's PRIV is the
        request's Privilege Mode Requested, as in the page-request record.
        """
        request = Request(device_id, process_id, 0, privileged=privileged,
                          kind=RequestKind.PCIE_MESSAGE, message_code=PAGE_REQUEST_MSG_CODE)
        dc = self.regs.iommu.message_context(request)
        if isinstance(dc, Fault):
            if dc.cause in _DDT_FAILURE_CAUSES:
                return (PrgResponseCode.RESPONSE_FAILURE, False), None
            return (PrgResponseCode.INVALID_REQUEST, self._refused_prpr(device_id)), None
        if not dc.en_ats:
            return (PrgResponseCode.INVALID_REQUEST, bool(dc.prpr)), dc
        return None, dc

    def _refused_prpr(self, device_id: int) -> bool:
        """DC.PRPR after a cause-260 refusal, which returns the fault, not the DC."""
        if DDTP.get(self.regs.iommu.ddtp, "iommu_mode") <= MODE_BARE:
            return False
        dc = self.regs.iommu.device_context(device_id)
        return not isinstance(dc, Fault) and bool(dc.prpr)

    def _record(self, device_id, process_id, page_addr, prg_index, read, write, last,
                privileged, execute) -> bytes:
        pv = process_id is not None
        value = PAGE_REQUEST.encode(
            DID=device_id, PV=pv, PID=process_id if pv else 0, PRIV=pv and privileged,
            EXEC=pv and execute, R=read, W=write, L=last, prg_index=prg_index,
            page_addr=page_addr >> 12)
        order = "big" if self.big_endian else "little"
        return ((value & (1 << 64) - 1).to_bytes(8, order) + (value >> 64).to_bytes(8, order))

    def _auto_response(self, device_id: int, process_id: int | None, prg_index: int,
                       code: PrgResponseCode, prpr: bool) -> None:
        with_pasid = process_id is not None and (
            code == PrgResponseCode.RESPONSE_FAILURE or prpr)
        self.regs.send_prg_response(device_id, process_id if with_pasid else None,
                                    prg_index, int(code))


"""The command queue and its commands (spec v1.0.1 §4, registers §5.7–§5.9, §5.15).

Software writes 16-byte commands and moves `cqt`; the IOMMU fetches from `cqh`,
executes, and moves `cqh` past each completed command. A memory fault on the fetch
(including a queue outside mapped RAM, see `queues.py`) sets `cqmf`; an illegal or
unsupported command sets `cmd_ill`; an IOFENCE.C that finds an earlier ATS.INVAL timed
out sets `cmd_to`. In each case `cqh` stays on the command and the queue stops until
software clears the bit.

Processing is bounded: `process(budget)` executes at most `budget` commands and
returns, so a queue of thousands of commands never blocks the vfio-user loop for long.
Invalidation itself is part 1's (`iommu.invalidate_*`); ATS messages go to endpoints
registered in `RegisterFile.ats_endpoints`, which implement `AtsEndpoint`.

Every request a device made before a command was fetched has already completed when
it is executed (DMA is translated synchronously), so IOFENCE.C's PR/PW need no work.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from vfiouser_iommu.iommu.caches import iotinval_range, napot_range
from vfiouser_iommu.iommu.directory import DDT_LEVELS, device_id_fits
from vfiouser_iommu.iommu.interrupts import CIP
from vfiouser_iommu.iommu.queues import QueueRegs
from vfiouser_iommu.iommu.regs_layouts import (
    CMD_ATS,
    CMD_IODIR,
    CMD_IOFENCE,
    CMD_IOTINVAL,
    COMMAND,
    CQCSR,
    DDTP,
    FCTL,
    LAYOUTS,
)
from vfiouser_iommu.memory import MemoryAccessError

log = logging.getLogger(__name__)

ATS_INVAL_PAYLOAD = LAYOUTS["ats_inval_payload"]
PRGR_PAYLOAD = LAYOUTS["prgr_payload"]

OPCODE_IOTINVAL, OPCODE_IOFENCE, OPCODE_IODIR, OPCODE_ATS = 1, 2, 3, 4
CQMF, CMD_TO, CMD_ILL, FENCE_W_IP = (CQCSR.mask(n) for n in
                                     ("cqmf", "cmd_to", "cmd_ill", "fence_w_ip"))
_ERRORS = CQMF | CMD_TO | CMD_ILL
_PAGE = 4096


# (opcode, func3) -> (name, layout whose fields describe it), for the command trace.
COMMAND_NAMES = {
    (1, 0): ("IOTINVAL.VMA", CMD_IOTINVAL), (1, 1): ("IOTINVAL.GVMA", CMD_IOTINVAL),
    (2, 0): ("IOFENCE.C", CMD_IOFENCE), (3, 0): ("IODIR.INVAL_DDT", CMD_IODIR),
    (3, 1): ("IODIR.INVAL_PDT", CMD_IODIR), (4, 0): ("ATS.INVAL", CMD_ATS),
    (4, 1): ("ATS.PRGR", CMD_ATS),
}


def describe_command(command: int) -> str:
    """`IOTINVAL.VMA GV=0 AV=1 ...`: a command's name and its non-zero fields."""
    key = (COMMAND.get(command, "opcode"), COMMAND.get(command, "func3"))
    if key not in COMMAND_NAMES:
        return f"opcode={key[0]} func3={key[1]} raw={command:#034x}"
    name, layout = COMMAND_NAMES[key]
    fields = " ".join(f"{k}={v:#x}" for k, v in layout.decode(command).items()
                      if v and k not in ("opcode", "func3"))
    return f"{name} {fields}".rstrip()


class AtsEndpoint(Protocol):
    """What the command queue needs from an endpoint with an ATC and PRI."""

    def ats_invalidate(self, process_id: int | None, address: int, size: int,
                       global_mapping: bool) -> bool:
        """Invalidate [address, address+size) in the ATC; False if it timed out."""

    def prg_response(self, process_id: int | None, prg_index: int, response_code: int) -> None:
        """Deliver a PRG Response."""


class Outcome(Enum):
    DONE = "done"      # cqh moves past the command
    STALL = "stall"    # cqh stays (an error bit was set)


#: How many executed commands `CommandQueue.history` keeps.
HISTORY = 256


@dataclass(frozen=True)
class CommandRecord:
    """One command the queue executed (or stalled on), for tools and listeners."""

    time: float          # wall clock when it ran
    started: float       # time.perf_counter() when it started (trace timestamps)
    duration: float      # seconds
    index: int           # cqh when it was fetched
    command: int         # the 128-bit command
    outcome: Outcome
    removed: int | None  # cache entries an invalidation removed (None: not one)

    @property
    def name(self) -> str:
        key = (COMMAND.get(self.command, "opcode"), COMMAND.get(self.command, "func3"))
        return COMMAND_NAMES.get(key, ("unknown",))[0]

    def describe(self) -> str:
        return describe_command(self.command)


def ats_range(payload: int) -> tuple[int, int, bool]:
    """(address, size, global) of an ATS.INVAL payload; S=1 is a NAPOT-encoded range."""
    fields = ATS_INVAL_PAYLOAD.decode(payload)
    page = fields["addr"]
    if not fields["S"]:
        return page << 12, _PAGE, bool(fields["G"])
    base, size = napot_range(page)
    return base, size, bool(fields["G"])


class CommandQueue(QueueRegs):
    """cqb/cqh/cqt/cqcsr and command execution."""

    SOFTWARE_INDEX = "tail"

    def __init__(self, regs):
        super().__init__(regs, 16, CQCSR, "cq")
        self.ats_timeout_pending = False
        #: the last HISTORY commands executed, and who wants to hear of each one
        self.history: deque[CommandRecord] = deque(maxlen=HISTORY)
        self.listeners: list[Callable[[CommandRecord], None]] = []
        self.removed: int | None = None
        regs.irq.persistent[CIP] = self._error_pending
        config = regs.config
        self._handlers: dict[tuple[int, int], Callable[[int], Outcome]] = {
            (OPCODE_IOTINVAL, 0): self._iotinval_vma,
            (OPCODE_IOTINVAL, 1): self._iotinval_gvma,
            (OPCODE_IOFENCE, 0): self._iofence_c,
            (OPCODE_IODIR, 0): self._iodir_inval_ddt,
            (OPCODE_IODIR, 1): self._iodir_inval_pdt,
        }
        if config.ats:
            self._handlers[(OPCODE_ATS, 0)] = self._ats_inval
            self._handlers[(OPCODE_ATS, 1)] = self._ats_prgr
        self._supported_nl = config.nl
        self._supported_s = config.s
        self._pid_bits = 20 if config.pd20 else 17 if config.pd17 else 8
        self._dc_size = config.dc_size

    def reset(self) -> None:
        super().reset()
        self.ats_timeout_pending = False

    # -- registers ----------------------------------------------------------------------
    def write_tail(self, value: int, mask: int) -> None:
        self.tail = self.masked_index(value, mask, self.tail)
        self.process(self.regs.inline_budget)

    def read_head(self) -> int:
        self.process(self.regs.inline_budget)
        return self.head

    def write_csr(self, value: int, mask: int) -> None:
        if self._write_csr(value, mask, _ERRORS | FENCE_W_IP):
            self.head = 0
            self.ats_timeout_pending = False
        self.process(self.regs.inline_budget)

    def _error_pending(self) -> bool:
        return bool(self.csr & self.IE and self.csr & (_ERRORS | FENCE_W_IP))

    # -- processing ---------------------------------------------------------------------
    def work_pending(self) -> bool:
        """Commands are waiting and the queue is able to execute them."""
        return self.on and not self.csr & _ERRORS and self.head != self.tail

    def process(self, budget: int) -> int:
        """Execute up to `budget` commands; return how many completed."""
        done = 0
        while done < budget and self.work_pending():
            command = self._fetch()
            if command is None:
                break
            self.removed = None
            started = time.perf_counter()
            outcome = self._execute(command)
            self._record(CommandRecord(time.time(), started, time.perf_counter() - started,
                                       self.head, command, outcome, self.removed))
            if outcome is Outcome.STALL:
                log.warning("cq[%d] %s stalled the queue (cqcsr %#x)", self.head,
                            describe_command(command), self.csr)
                break
            if log.isEnabledFor(logging.INFO):
                log.info("cq[%d] %s: done%s", self.head, describe_command(command),
                         "" if self.removed is None else f" (removed {self.removed})")
            self.head = (self.head + 1) & self.index_mask
            done += 1
        return done

    def _record(self, record: CommandRecord) -> None:
        self.history.append(record)
        for listener in list(self.listeners):
            listener(record)

    def _fetch(self) -> int | None:
        addr = self.entry_address(self.head)
        memory, be = self.regs.iommu.memory, self.big_endian
        try:
            if not self.in_ram(addr, 16):
                raise MemoryAccessError(addr, 16, "queue memory is not RAM")
            dw0 = memory.read_int(addr, 8, big_endian=be)
            dw1 = memory.read_int(addr + 8, 8, big_endian=be)
        except MemoryAccessError:
            self._error(CQMF)
            return None
        return dw0 | dw1 << 64

    def _execute(self, command: int) -> Outcome:
        key = (COMMAND.get(command, "opcode"), COMMAND.get(command, "func3"))
        handler = self._handlers.get(key)
        if handler is None:
            return self._illegal()
        return handler(command)

    def _error(self, bit: int) -> Outcome:
        self.csr |= bit
        if self.csr & self.IE:
            self.regs.irq.raise_cause(CIP)
        return Outcome.STALL

    def _illegal(self) -> Outcome:
        return self._error(CMD_ILL)

    # -- IOTINVAL -------------------------------------------------------------------------
    def _iotinval_fields(self, command: int) -> dict[str, int] | None:
        if command & CMD_IOTINVAL.reserved_mask:
            return None
        f = CMD_IOTINVAL.decode(command)
        if (f["NL"] and not self._supported_nl) or (f["S"] and not self._supported_s):
            return None
        return f

    def _iotinval_vma(self, command: int) -> Outcome:
        f = self._iotinval_fields(command)
        if f is None:
            return self._illegal()
        addr, size = iotinval_range(f)
        self.removed = self.regs.iommu.invalidate_vma(bool(f["GV"]), f["GSCID"],
                                                      bool(f["PSCV"]), f["PSCID"],
                                                      bool(f["AV"]), addr, **_sized(size))
        return Outcome.DONE

    def _iotinval_gvma(self, command: int) -> Outcome:
        f = self._iotinval_fields(command)
        if f is None or f["PSCV"]:
            return self._illegal()
        addr, size = iotinval_range(f)
        self.removed = self.regs.iommu.invalidate_gvma(bool(f["GV"]), f["GSCID"],
                                                       bool(f["AV"]), addr, **_sized(size))
        return Outcome.DONE

    # -- IOFENCE.C ------------------------------------------------------------------------
    def _iofence_c(self, command: int) -> Outcome:
        if command & CMD_IOFENCE.reserved_mask:
            return self._illegal()
        f = CMD_IOFENCE.decode(command)
        if f["WSI"] and not FCTL.get(self.regs.iommu.fctl, "WSI"):
            return self._illegal()
        if self.ats_timeout_pending:
            self.ats_timeout_pending = False
            return self._error(CMD_TO)
        if f["AV"]:
            try:
                self.regs.iommu.memory.write_int(f["ADDR"] << 2, 4, f["DATA"],
                                                 big_endian=self.big_endian)
            except MemoryAccessError:
                return self._error(CQMF)
        if f["WSI"]:
            self._error(FENCE_W_IP)
        return Outcome.DONE

    # -- IODIR ----------------------------------------------------------------------------
    def _device_id_fits(self, device_id: int) -> bool:
        """Whether IODIR's DID fits the DDT's levels (any 24-bit DID with no DDT)."""
        mode = DDTP.get(self.regs.iommu.ddtp, "iommu_mode")
        return mode not in DDT_LEVELS or device_id_fits(device_id, mode, self._dc_size)

    def _iodir_fields(self, command: int) -> dict[str, int] | None:
        if command & CMD_IODIR.reserved_mask:
            return None
        f = CMD_IODIR.decode(command)
        if f["DV"] and not self._device_id_fits(f["DID"]):
            return None
        return f

    def _iodir_inval_ddt(self, command: int) -> Outcome:
        f = self._iodir_fields(command)
        if f is None or f["PID"]:
            return self._illegal()
        self.removed = self.regs.iommu.invalidate_ddt(bool(f["DV"]), f["DID"])
        return Outcome.DONE

    def _iodir_inval_pdt(self, command: int) -> Outcome:
        f = self._iodir_fields(command)
        if f is None or not f["DV"] or f["PID"] >> self._pid_bits:
            return self._illegal()
        self.removed = self.regs.iommu.invalidate_pdt(f["DID"], f["PID"])
        return Outcome.DONE

    # -- ATS ------------------------------------------------------------------------------
    def _ats_target(self, command: int) -> tuple[dict[str, int], int, int | None] | None:
        if command & CMD_ATS.reserved_mask:
            return None
        f = CMD_ATS.decode(command)
        device_id = f["DSEG"] << 16 | f["RID"] if f["DSV"] else f["RID"]
        return f, device_id, f["PID"] if f["PV"] else None

    def _ats_inval(self, command: int) -> Outcome:
        target = self._ats_target(command)
        if target is None:
            return self._illegal()
        f, device_id, process_id = target
        endpoint = self.regs.ats_endpoints.get(device_id)
        if endpoint is not None:
            address, size, global_mapping = ats_range(f["PAYLOAD"])
            if not endpoint.ats_invalidate(process_id, address, size, global_mapping):
                self.ats_timeout_pending = True
        return Outcome.DONE

    def _ats_prgr(self, command: int) -> Outcome:
        target = self._ats_target(command)
        if target is None:
            return self._illegal()
        f, device_id, process_id = target
        payload = PRGR_PAYLOAD.decode(f["PAYLOAD"])
        self.regs.send_prg_response(device_id, process_id, payload["prg_index"],
                                    payload["response_code"])
        return Outcome.DONE




def _sized(size: int) -> dict[str, int]:
    """The `size` argument of an invalidation primitive, passed only for a range (so a
    primitive replaced by a tool that predates ranges still gets single pages)."""
    return {"size": size} if size != _PAGE else {}

"""The IOMMU core under fuzzing: random programs and the invariants checked after each step.

A program drives one `RiscvIommu` (over 256 KiB of RAM at 0x8000_0000, with a fallback
standing in for MMIO outside RAM) the way a guest driver and its devices could: register
writes of every width (and 64-bit registers in two halves), reads, table and queue
memory written word by word, commands pushed on the command queue, translation
requests of every kind, endpoint DMA, page requests, resets, all interleaved.

Program format (bytes, short reads pad with zeros):

    byte      configuration (bit 0 end, 1 msi_flat, 2 ats, 3 igs BOTH, 4 sv32,
              5 hpm, 6 dbg, 7 a 40-bit pas)
    then steps: byte op (modulo len(OPS)), then STEP_ARGS bytes of arguments

After every step (`IommuHarness.check_step`), spec v1.0.1's rules must hold:

* no Python exception escapes (only `DmaError` from endpoint DMA);
* memory: nothing is read through the fallback (reads outside RAM must fault); a
  fallback write is a 4-byte MSI or IOFENCE.C data write; in RAM, a 32-byte write is a
  fault record at a fault-queue slot, a 16-byte one a page request at a page-request
  queue slot, anything else at most 8 naturally aligned bytes (A/D updates, IOFENCE.C
  data, MSIs, MRIF bits);
* every fault reported is well formed (§4.2: a defined CAUSE and TTYP, PV=0 ⇒ no PID
  or PRIV, TTYP 0 ⇒ no DID/PID, widths) and the record the fault queue stores equals
  it, field by field, decoded independently;
* queue heads and tails lie within their queue's entries;
* error bits appear only where the spec sets them: cmd_ill only on a command that an
  independent decoder of §4.1's table finds illegal (and a command the queue passes
  over is legal), cqmf/fqmf only with the queue slot outside RAM, fqof only with the
  fault queue full;
* interrupts name an existing vector.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from vfiouser_iommu.iommu import (
    Access,
    Cause,
    Fault,
    IommuConfig,
    Request,
    RequestKind,
    RiscvIommu,
    Translation,
)
from vfiouser_iommu.iommu.config import Igs
from vfiouser_iommu.memory import DmaError, GuestMemory, MemoryAccessError

BASE = 0x8000_0000
SIZE = 256 << 10
PAGES = SIZE >> 12
STEP_ARGS = 18

# Every register offset of §5's map (both halves of the 64-bit ones), so that most
# register writes hit a register; the rest of the time the offset is raw.
REGISTERS = [0x00, 0x04, 0x08, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34,
             0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C, 0x50, 0x54, 0x58, 0x5C, 0x60, 0x64, 0x68,
             0x6C, 0x160, 0x164, 0x258, 0x25C, 0x260, 0x264, 0x268, 0x26C, 0x270, 0x2F8,
             0x2FC, 0x300, 0x308, 0x30C, 0x310, 0x318, 0x31C]
CQB, CQH, CQT, FQB, FQH, FQT, PQB, PQH, PQT = 0x18, 0x20, 0x24, 0x28, 0x30, 0x34, 0x38, 0x40, 0x44
CQCSR, FQCSR, PQCSR = 0x48, 0x4C, 0x50
CQMF, CMD_TO, CMD_ILL = 1 << 8, 1 << 9, 1 << 10
FQMF, FQOF = 1 << 8, 1 << 9
TTYPS = {0, 1, 2, 3, 5, 6, 7, 8, 9}
CAUSES = set(Cause.__members__.values())


class InvariantBroken(AssertionError):
    """What the fuzzer reports as a crash."""


class _Args:
    def __init__(self, data: bytes) -> None:
        self.data = data.ljust(STEP_ARGS, b"\0")
        self.pos = 0

    def take(self, n: int) -> int:
        value = int.from_bytes(self.data[self.pos:self.pos + n], "little")
        self.pos += n
        return value

    def pointer(self) -> int:
        """A PPN mostly inside RAM (sometimes just past it)."""
        return (BASE >> 12) + self.take(1) % (PAGES + 4)

    def word(self) -> int:
        """A doubleword shaped like what tables and registers hold."""
        shape = self.take(1) % 4
        if shape == 0:
            return self.take(8)
        if shape == 1:          # PTE/DDTE/queue base: PPN << 10 | low bits
            return self.pointer() << 10 | self.take(2) & 0x3FF
        if shape == 2:          # atp: MODE << 60 | PPN
            return (self.take(1) & 0xF) << 60 | self.pointer()
        return self.take(2) & 0x3FF          # small values: modes, enables, sizes


class _Fallback:
    """MMIO outside RAM: reads cannot be served synchronously, writes are recorded."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def read(self, gpa: int, length: int) -> bytes:
        raise MemoryAccessError(gpa, length, "not RAM")

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, len(data)))


class RecordingMemory(GuestMemory):
    """GuestMemory that remembers every write made to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa, data) -> None:
        self.writes.append((gpa, len(data)))
        super().write(gpa, data)

    def compare_exchange(self, gpa, size, expected, new, *, big_endian=False):
        self.writes.append((gpa, size))
        return super().compare_exchange(gpa, size, expected, new, big_endian=big_endian)


@dataclass
class _Queue:
    base_reg: int
    head_reg: int
    tail_reg: int
    csr_reg: int
    entry: int


CQ = _Queue(CQB, CQH, CQT, CQCSR, 16)
FQ = _Queue(FQB, FQH, FQT, FQCSR, 32)
PQ = _Queue(PQB, PQH, PQT, PQCSR, 16)


class IommuHarness:
    """Runs programs; counts programs and steps. One IOMMU per configuration, reset
    (registers, queues, caches) and over zeroed RAM for every program."""

    def __init__(self) -> None:
        self.programs = 0
        self.steps = 0
        self._machines: dict[int, _Program] = {}
        # The queues log every command; a fuzzer runs millions.
        self._logger = logging.getLogger("vfiouser_iommu")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def close(self) -> None:
        self._logger.setLevel(self._level)

    def run(self, data: bytes) -> None:
        if not data:
            return
        self.programs += 1
        program = self._machines.get(data[0])
        if program is None:
            program = self._machines[data[0]] = _Program(data[0])
        program.start()
        pos = 1
        while pos < len(data):
            op = data[pos] % len(OPS)
            args = _Args(data[pos + 1:pos + 1 + STEP_ARGS])
            pos += 1 + STEP_ARGS
            self.steps += 1
            program.step(op, args)


class _Program:
    def __init__(self, config_bits: int) -> None:
        self.config = IommuConfig(
            end=bool(config_bits & 1), msi_flat=bool(config_bits & 2),
            ats=bool(config_bits & 4), igs=Igs.BOTH if config_bits & 8 else Igs.MSI,
            sv32=bool(config_bits & 0x10), sv32x4=bool(config_bits & 0x10),
            hpm=bool(config_bits & 0x20), dbg=bool(config_bits & 0x40),
            pas=40 if config_bits & 0x80 else 56,
            iotlb_entries=8, gtlb_entries=8, ddt_cache_entries=4, pdt_cache_entries=4,
            msi_cache_entries=4)
        self.ram = bytearray(SIZE)
        self.memory = RecordingMemory()
        self.memory.add_region(BASE, self.ram)
        self.fallback = _Fallback()
        self.memory.fallback = self.fallback
        self.irqs: list[int] = []
        self.iommu = RiscvIommu(self.memory, self.config, raise_irq=self.irqs.append)
        self.faults: list[Fault] = []
        report = self.iommu.report_fault

        def record(fault: Fault) -> None:
            self.faults.append(fault)
            report(fault)

        self.iommu.report_fault = record

    def start(self) -> None:
        """A fresh machine: zeroed RAM, the IOMMU reset."""
        self.ram[:] = bytes(SIZE)
        self.iommu.reset()
        self.iommu.recent_faults.clear()

    # -- steps --------------------------------------------------------------------------
    def step(self, op: int, args: _Args) -> None:
        before = self._snapshot()
        self.memory.writes.clear()
        self.fallback.writes.clear()
        self.faults.clear()
        self.irqs.clear()
        dma = OPS[op] is _Program.dma
        try:
            OPS[op](self, args)
        except InvariantBroken:
            raise
        except Exception as e:  # noqa: BLE001 - anything escaping is the bug we look for
            raise InvariantBroken(f"{OPS[op].__name__} raised {type(e).__name__}: {e}") from e
        self.check_step(before, dma)

    def mmio_write(self, args: _Args) -> None:
        offset, size = self._offset(args)
        value = args.word()
        self.iommu.mmio_write(offset, size, value & ((1 << (8 * size)) - 1))

    def mmio_read(self, args: _Args) -> None:
        offset, size = self._offset(args)
        value = self.iommu.mmio_read(offset, size)
        if not 0 <= value < 1 << (8 * size):
            raise InvariantBroken(f"read of {offset:#x}/{size} gave {value:#x}")

    def memory_word(self, args: _Args) -> None:
        slot = args.take(2) % (SIZE // 8)
        self.memory.write_int(BASE + slot * 8, 8, args.word())
        self.memory.writes.clear()

    def memory_bytes(self, args: _Args) -> None:
        slot = args.take(2) % (SIZE // 16)
        self.memory.write(BASE + slot * 16, args.data[2:18])
        self.memory.writes.clear()

    def push_command(self, args: _Args) -> None:
        """Write a command (mostly a defined opcode and func3) at cqt and ring cqt."""
        cq = self.iommu.regs.cq
        pick, dw0 = args.take(1), args.take(8)
        dw1 = args.word()
        if pick < 0xC0:
            opcode, func3 = _DEFINED[pick % len(_DEFINED)]
            dw0 = (dw0 & ~0x3FF) | func3 << 7 | opcode
        addr = cq.entry_address(cq.tail)
        if self.memory.contains(addr, 16):
            be = self.iommu.big_endian
            self.memory.write_int(addr, 8, dw0, big_endian=be)
            self.memory.write_int(addr + 8, 8, dw1, big_endian=be)
        self.memory.writes.clear()
        self.iommu.mmio_write(CQT, 4, (cq.tail + 1) & cq.index_mask)

    def translate(self, args: _Args) -> None:
        request = self._request(args)
        result = self.iommu.translate(request)
        if not isinstance(result, Translation | Fault):
            raise InvariantBroken(f"translate returned {result!r}")
        if isinstance(result, Translation) and not 0 <= result.address < 1 << 64:
            raise InvariantBroken(f"translation to {result.address:#x}")

    def dma(self, args: _Args) -> None:
        request = self._request(args)
        view = self.iommu.dma_view(request.device_id, request.process_id, request.privileged)
        length = 1 + args.take(1) % 64
        try:
            if args.take(1) & 1:
                view.write(request.iova, bytes(length))
            else:
                view.read(request.iova, length)
        except DmaError:
            pass

    def run_pending(self, args: _Args) -> None:
        self.iommu.regs.run_pending(1 + args.take(2) % 300)

    def page_request(self, args: _Args) -> None:
        flags = args.take(1)
        self.iommu.regs.page_request(
            args.take(1) % 64 if flags & 1 else args.take(3), args.take(3) & 0xFFFFF
            if flags & 2 else None, page_addr=args.take(8) & ~0xFFF,
            prg_index=args.take(2) & 0x1FF, read=bool(flags & 4), write=bool(flags & 8),
            last=bool(flags & 16), privileged=bool(flags & 32))

    def consume_faults(self, args: _Args) -> None:
        """Software reads the fault records: fqh = fqt."""
        self.iommu.mmio_write(FQH, 4, self.iommu.mmio_read(FQT, 4))

    def reset(self, args: _Args) -> None:
        if args.take(1) == 0x5A:
            self.iommu.reset()

    # -- pieces ----------------------------------------------------------------------
    @staticmethod
    def _offset(args: _Args) -> tuple[int, int]:
        pick, raw = args.take(1), args.take(2)
        size = 8 if pick & 1 else 4
        if pick & 0x80:
            return raw & 0xFFF, size      # anywhere, any alignment
        offset = REGISTERS[(pick >> 1) % len(REGISTERS)]
        return offset, 4 if offset % 8 else size

    @staticmethod
    def _request(args: _Args) -> Request:
        flags = args.take(1)
        device_id = args.take(1) % 64 if flags & 1 else args.take(3)
        process_id = (args.take(1) if flags & 2 else args.take(3) & 0xFFFFF) \
            if flags & 4 else None
        iova = BASE + args.take(3) % (SIZE + 0x2000) if flags & 8 else args.take(8)
        access = (Access.READ, Access.WRITE, Access.EXECUTE, Access.READ)[(flags >> 4) & 3]
        kind = (RequestKind.UNTRANSLATED, RequestKind.UNTRANSLATED, RequestKind.TRANSLATED,
                RequestKind.ATS_TRANSLATION)[(flags >> 6) & 3]
        return Request(device_id, process_id, iova, access, bool(args.take(1) & 1), kind)

    def _queue_state(self, q: _Queue) -> tuple[int, int, int, int]:
        regs = self.iommu.regs
        unit = {CQ.base_reg: regs.cq, FQ.base_reg: regs.fq}.get(q.base_reg, regs.pq)
        if unit is None:
            return 0, 0, 0, 0
        return unit.head, unit.tail, unit.csr, unit.entries

    def _snapshot(self) -> dict:
        regs = self.iommu.regs
        return {"cq": self._queue_state(CQ), "fq": self._queue_state(FQ),
                "pq": self._queue_state(PQ),
                "cq_slots": [regs.cq.entry_address(i) for i in range(regs.cq.entries)]
                if regs.cq.entries <= 64 else None}

    # -- invariants -------------------------------------------------------------------
    def check_step(self, before: dict, dma: bool) -> None:
        self._check_queue_bounds()
        self._check_writes(dma)
        self._check_faults()
        self._check_command_queue(before)
        self._check_fault_queue(before)
        for vector in self.irqs:
            if not 0 <= vector < self.config.interrupt_vectors:
                raise InvariantBroken(f"interrupt vector {vector}")

    def _check_queue_bounds(self) -> None:
        """Software's index (cqt, fqh, pqh) always lies within the queue (§5: bits
        31:LOG2SZ read 0); the IOMMU's (cqh, fqt, pqt) while the queue is on (it is
        reset when the queue is enabled)."""
        for name, q, software in (("cq", CQ, "tail"), ("fq", FQ, "head"), ("pq", PQ, "head")):
            head, tail, csr, entries = self._queue_state(q)
            if not entries:
                continue
            indices = {"head": head, "tail": tail}
            checked = [software] + ([k for k in indices if k != software] if csr & 1 << 16
                                    else [])
            for key in checked:
                if not 0 <= indices[key] < entries:
                    raise InvariantBroken(f"{name} {key} {indices[key]} of {entries} entries")

    def _check_writes(self, dma: bool) -> None:
        regs = self.iommu.regs
        for gpa, n in self.fallback.writes:
            if not dma and (n != 4 or gpa % 4):
                raise InvariantBroken(f"{n}-byte write at {gpa:#x} outside RAM")
        if dma:
            return
        for gpa, n in self.memory.writes:
            if n == 32 and self._is_slot(regs.fq, gpa):
                continue
            if n == 16 and regs.pq is not None and self._is_slot(regs.pq, gpa):
                continue
            if n > 8 or gpa % n:
                raise InvariantBroken(f"{n}-byte write at {gpa:#x}")

    @staticmethod
    def _is_slot(queue, gpa: int) -> bool:
        offset = gpa - queue.entry_address(0)
        return 0 <= offset < queue.entries * queue.entry_size and offset % queue.entry_size == 0

    def _check_faults(self) -> None:
        for fault in self.faults:
            _check_fault(fault)
        fq = self.iommu.regs.fq
        if not self.faults or not fq.on:
            return
        be = self.iommu.big_endian
        for gpa, n in self.memory.writes:
            if n == 32 and self._is_slot(fq, gpa):
                _check_record(self.memory.read(gpa, 32), be)

    def _check_command_queue(self, before: dict) -> None:
        cq = self.iommu.regs.cq
        old_head, _, old_csr, entries = before["cq"]
        if not entries or before["cq_slots"] is None:
            return
        be = self.iommu.big_endian
        index = old_head
        while index != cq.head:
            command = self._command_at(before["cq_slots"][index], be)
            if command is not None and _illegal(command, self.config, self.iommu):
                raise InvariantBroken(f"cq passed over illegal command {command:#034x}")
            index = (index + 1) % entries
        new_errors = cq.csr & ~old_csr
        if new_errors & CMD_ILL:
            command = self._command_at(cq.entry_address(cq.head), be)
            if command is None or not _illegal(command, self.config, self.iommu):
                raise InvariantBroken(f"cmd_ill on legal command {command:#034x}")
        if new_errors & CQMF and self.memory.contains(cq.entry_address(cq.head), 16):
            command = self._command_at(cq.entry_address(cq.head), be)
            if not (command is not None and command & 0x3FF == 2 and command >> 10 & 1):
                raise InvariantBroken("cqmf with the command queue slot in RAM")

    def _command_at(self, addr: int, be: bool) -> int | None:
        if not self.memory.contains(addr, 16):
            return None
        return (self.memory.read_int(addr, 8, big_endian=be)
                | self.memory.read_int(addr + 8, 8, big_endian=be) << 64)

    def _check_fault_queue(self, before: dict) -> None:
        fq = self.iommu.regs.fq
        new_errors = fq.csr & ~before["fq"][2]
        if new_errors & FQOF and (fq.tail + 1) % fq.entries != fq.head:
            raise InvariantBroken("fqof with the fault queue not full")
        if new_errors & FQMF and self.memory.contains(fq.entry_address(fq.tail), 32):
            raise InvariantBroken("fqmf with the fault queue slot in RAM")


OPS = [
    _Program.mmio_write, _Program.mmio_write, _Program.mmio_read, _Program.memory_word,
    _Program.memory_word, _Program.memory_bytes, _Program.push_command, _Program.translate,
    _Program.translate, _Program.dma, _Program.run_pending, _Program.page_request,
    _Program.consume_faults, _Program.reset,
]

_DEFINED = [(1, 0), (1, 1), (2, 0), (3, 0), (3, 1), (4, 0), (4, 1)]


def _check_fault(f: Fault) -> None:
    if f.cause not in CAUSES:
        raise InvariantBroken(f"fault cause {f.cause}")
    if f.ttyp not in TTYPS:
        raise InvariantBroken(f"fault ttyp {f.ttyp}")
    if not 0 <= f.device_id < 1 << 24:
        raise InvariantBroken(f"fault device_id {f.device_id:#x}")
    if f.process_id is not None and not 0 <= f.process_id < 1 << 20:
        raise InvariantBroken(f"fault process_id {f.process_id:#x}")
    if f.process_id is None and f.privileged and f.ttyp:
        raise InvariantBroken("PRIV without PV")
    if f.ttyp == 0 and (f.device_id or f.process_id is not None or f.privileged):
        raise InvariantBroken("TTYP 0 with a device or process")
    if not (0 <= f.iotval < 1 << 64 and 0 <= f.iotval2 < 1 << 64):
        raise InvariantBroken("iotval out of range")


def _check_record(raw: bytes, big_endian: bool) -> None:
    """§4.2's layout, decoded here without the project's construct definitions."""
    dw0, dw1, iotval, iotval2 = struct.unpack((">" if big_endian else "<") + "QQQQ", raw)
    cause, pid, pv = dw0 & 0xFFF, dw0 >> 12 & 0xFFFFF, dw0 >> 32 & 1
    priv, ttyp, did = dw0 >> 33 & 1, dw0 >> 34 & 0x3F, dw0 >> 40
    if cause not in CAUSES or ttyp not in TTYPS:
        raise InvariantBroken(f"record cause {cause} ttyp {ttyp}")
    if not pv and (pid or priv):
        raise InvariantBroken("record PID/PRIV without PV")
    if ttyp == 0 and (did or pv):
        raise InvariantBroken("record TTYP 0 with DID/PV")
    if dw1 >> 32:
        raise InvariantBroken("record reserved bits of DW1 set")


def _bits(value: int, hi: int, lo: int) -> int:
    return value >> lo & ((1 << (hi - lo + 1)) - 1)


def _illegal(command: int, config: IommuConfig, iommu: RiscvIommu) -> bool:
    """§4.1: reserved opcode/func3, a reserved bit set, or a defined but unsupported
    encoding. Written from the spec's command table, independently of commands.py."""
    dw0, dw1 = command & (1 << 64) - 1, command >> 64
    opcode, func3 = dw0 & 0x7F, dw0 >> 7 & 7
    if (opcode, func3) not in _DEFINED or (opcode == 4 and not config.ats):
        return True
    if opcode == 1:                                       # IOTINVAL.VMA / .GVMA
        nl, s = dw0 >> 34 & 1, dw1 >> 9 & 1
        return bool(_bits(dw0, 11, 11) or _bits(dw0, 43, 35) or _bits(dw0, 63, 60)
                    or _bits(dw1, 8, 0) or _bits(dw1, 63, 62)
                    or (nl and not config.nl) or (s and not config.s)
                    or (func3 == 1 and dw0 >> 32 & 1))
    if opcode == 2:                                       # IOFENCE.C
        wsi_enabled = iommu.fctl >> 1 & 1
        return bool(_bits(dw0, 31, 14) or _bits(dw1, 63, 62)
                    or (dw0 >> 11 & 1 and not wsi_enabled))
    if opcode == 3:                                       # IODIR.INVAL_DDT / _PDT
        pid, dv, did = _bits(dw0, 31, 12), dw0 >> 33 & 1, dw0 >> 40
        if _bits(dw0, 11, 10) or _bits(dw0, 32, 32) or _bits(dw0, 39, 34) or dw1:
            return True
        if dv and not _did_fits(did, iommu, config):
            return True
        pid_bits = 20 if config.pd20 else 17 if config.pd17 else 8
        return bool(pid) if func3 == 0 else (not dv or pid >> pid_bits != 0)
    return bool(_bits(dw0, 11, 10) or _bits(dw0, 39, 34))   # ATS.INVAL / ATS.PRGR


def _did_fits(did: int, iommu: RiscvIommu, config: IommuConfig) -> bool:
    """The DID fits ddtp's levels (§3.1.1: DDI widths 6/7 + 9 + 8/9 bits)."""
    mode = iommu.ddtp & 0xF
    if mode not in (2, 3, 4):
        return True
    base = 6 if config.dc_size == 64 else 7   # dc_size: 64 (extended) or 32 bytes
    width = {2: base, 3: base + 9, 4: 24}[mode]
    return did < 1 << width


class Asm:
    """Writes programs in the fuzzer's format: seeds and regression tests read like a
    driver's steps."""

    def __init__(self, config_bits: int = 0x27) -> None:
        self.out = bytearray([config_bits])

    def _step(self, op, args: bytes) -> Asm:
        self.out += bytes([OPS.index(op)]) + args.ljust(STEP_ARGS, b"\0")
        return self

    def write(self, offset: int, value: int, size: int = 8) -> Asm:
        pick = 0x80 | (1 if size == 8 else 0)
        return self._step(_Program.mmio_write, bytes([pick]) + offset.to_bytes(2, "little")
                          + b"\0" + value.to_bytes(8, "little"))

    def read(self, offset: int, size: int = 4) -> Asm:
        pick = 0x80 | (1 if size == 8 else 0)
        return self._step(_Program.mmio_read, bytes([pick]) + offset.to_bytes(2, "little"))

    def word(self, gpa: int, value: int) -> Asm:
        slot = (gpa - BASE) // 8
        return self._step(_Program.memory_word, slot.to_bytes(2, "little") + b"\0"
                          + value.to_bytes(8, "little"))

    def command(self, dw0: int, dw1: int = 0) -> Asm:
        return self._step(_Program.push_command, b"\xff" + dw0.to_bytes(8, "little") + b"\0"
                          + dw1.to_bytes(8, "little"))

    def request(self, device_id: int, iova: int, *, process_id: int | None = None,
                access: int = 0, kind: int = 0, op=None) -> Asm:
        """access 0 read, 1 write, 2 execute; kind 0 untranslated, 2 translated, 3 ATS."""
        flags = (4 if process_id is not None else 0) | access << 4 | kind << 6
        args = bytes([flags]) + device_id.to_bytes(3, "little")
        if process_id is not None:
            args += process_id.to_bytes(3, "little")
        args += iova.to_bytes(8, "little") + b"\0"
        return self._step(op or _Program.translate, args)

    def dma(self, device_id: int, iova: int, write: bool = True) -> Asm:
        flags = 1 << 4 if write else 0
        args = bytes([flags]) + device_id.to_bytes(3, "little") + iova.to_bytes(8, "little")
        args += b"\0" + bytes([8, int(write)])
        return self._step(_Program.dma, args)

    def run(self, budget: int = 256) -> Asm:
        return self._step(_Program.run_pending, budget.to_bytes(2, "little"))

    def consume_faults(self) -> Asm:
        return self._step(_Program.consume_faults, b"")

    def page_request(self, device_id: int, page: int, last: bool = True) -> Asm:
        flags = 4 | (16 if last else 0)
        return self._step(_Program.page_request, bytes([flags]) + device_id.to_bytes(3, "little")
                          + page.to_bytes(8, "little") + b"\1\0")

    def bytes(self) -> bytes:
        return bytes(self.out)


def seed_programs() -> dict[str, bytes]:
    """Programs a driver would run: queues, a device directory, page tables, requests."""
    cq, fq, pq, ddt, pt = BASE + 0x10000, BASE + 0x11000, BASE + 0x12000, BASE, BASE + 0x1000
    queues = (Asm().write(CQB, (cq >> 12) << 10 | 3).write(CQCSR, 3, 4)
              .write(FQB, (fq >> 12) << 10 | 3).write(FQCSR, 3, 4)
              .write(PQB, (pq >> 12) << 10 | 3).write(PQCSR, 3, 4))
    seeds = {}
    bare = Asm().write(0x10, 1)
    bare.out += queues.out[1:]
    bare.command(2 | 1 << 10 | 0x1234 << 32, (BASE + 0x13000) >> 2).command(1).command(3)
    bare.run().request(0x10, BASE + 0x100).dma(0x10, BASE + 0x200).read(CQH).read(CQCSR)
    seeds["bare-queues-fence"] = bare.bytes()
    # 1LVL DDT (extended DCs: msi_flat in config 0x27): device 0x10 with an Sv39 first
    # stage whose root maps 1 GiB at 0x8000_0000 to itself.
    dc = ddt + 0x10 * 64
    sv39 = (Asm().word(dc, 7)                          # tc: V, EN_ATS, EN_PRI
            .word(dc + 8, 0).word(dc + 16, 0)          # iohgatp Bare, ta PSCID 0
            .word(dc + 24, 8 << 60 | pt >> 12)         # fsc: Sv39, root page table
            .word(pt + 2 * 8, (BASE >> 12) << 10 | 0xDF))
    sv39.out += queues.out[1:]
    sv39.write(0x10, (ddt >> 12) << 10 | 2)            # ddtp: 1LVL
    sv39.request(0x10, BASE + 0x1234).request(0x10, BASE + 0x2000, access=1)
    sv39.request(0x11, BASE).request(0x10, 0x4000_0000).dma(0x10, BASE + 0x3000)
    sv39.request(0x10, BASE + 0x5000, kind=3).page_request(0x10, BASE + 0x6000)
    sv39.command(1 | 1 << 10, (BASE + 0x1000) >> 12 << 10).command(3 | 1 << 33 | 0x10 << 40)
    sv39.run().request(0x10, BASE + 0x1234).consume_faults()
    seeds["1lvl-sv39-requests"] = sv39.bytes()
    illegal = Asm().write(CQB, (cq >> 12) << 10 | 3).write(CQCSR, 1, 4)
    illegal.command(7).run().read(CQCSR).write(CQCSR, 1 << 10 | 1, 4).command(2).run()
    seeds["illegal-command"] = illegal.bytes()
    full = Asm().write(0x10, (ddt >> 12) << 10 | 2).write(FQB, (fq >> 12) << 10).write(FQCSR, 3, 4)
    for i in range(4):
        full.request(0x20 + i, 0x1000 * i)
    full.read(FQCSR).write(FQCSR, 1 << 9 | 3, 4).consume_faults()
    seeds["fault-queue-overflow"] = full.bytes()
    outside = Asm().write(CQB, 0xFFFF << 10).write(CQCSR, 1, 4).command(1).run()
    outside.write(FQB, 0xFFFF << 10).write(FQCSR, 1, 4).write(0x10, 0xFFFF << 10 | 2)
    outside.request(1, 0)
    seeds["queues-outside-ram"] = outside.bytes()
    return seeds

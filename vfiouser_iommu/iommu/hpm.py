"""Hardware performance monitor (spec v1.0.1 §5.19–§5.23): iocountovf, iocountinh,
iohpmcycles, iohpmctr1..N and iohpmevt1..N.

Part 1 calls `iommu.count_event(event, device_id, process_id, gscid, pscid)` once per
occurrence of a standard event; `Hpm.count` replaces that hook, counts every
programmed counter whose event and filter match, and chains to the previous hook.
Counting is on every translation's path, so an index from eventID to the counters
programmed for it (and not inhibited) is rebuilt whenever iohpmevt or iocountinh is
written: an event no counter watches costs one dict lookup.

iohpmcycles counts nanoseconds of the host's monotonic clock (a 1 GHz "cycle"), read
lazily: nothing runs between accesses. Counters are 64-bit (iohpmcycles 63-bit);
eventIDs other than the eight standard ones are WARL and read back as 0 (no event).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vfiouser_iommu.iommu.interrupts import PMIP
from vfiouser_iommu.iommu.regs_layouts import IOHPMCYCLES, IOHPMEVT

MAX_COUNTERS = 31
_CTR_MASK = (1 << 64) - 1
_CYCLES_MASK = IOHPMCYCLES.mask("counter")
_CYCLES_OF = IOHPMCYCLES.mask("OF")
_EVT_OF = IOHPMEVT.mask("OF")
_EVT_WRITABLE = IOHPMEVT.defined_mask
#: events that may be filtered by GSCID/PSCID (IDT=1); the rest count with IDT=0 only
_IDT1_EVENTS = frozenset({4, 7, 8})
_STANDARD_EVENTS = frozenset(range(1, 9))


def dmask_compare_mask(did_gscid: int) -> int:
    """The DID_GSCID bits compared when DMASK=1: all above the lowest 0 bit."""
    lowest_zero = (~did_gscid & (did_gscid + 1)).bit_length() - 1
    return ~((1 << (lowest_zero + 1)) - 1) & ((1 << 24) - 1)


class Hpm:
    """Counter state; `count` is installed as `iommu.count_event`."""

    def __init__(self, regs, counters: int, clock: Callable[[], int] = time.monotonic_ns):
        if not 1 <= counters <= MAX_COUNTERS:
            raise ValueError(f"HPM counters must be 1..{MAX_COUNTERS}, not {counters}")
        self.regs = regs
        self.n = counters
        self.clock = clock
        self._inh_mask = (1 << (counters + 1)) - 1
        self.reset()

    def reset(self) -> None:
        self.iocountinh = 0
        self.ctr = [0] * self.n
        self.evt = [0] * self.n
        #: eventID -> indexes of the counters programmed for it and not inhibited
        self.counters_by_event: dict[int, tuple[int, ...]] = {}
        self._cycles_of = 0
        self._cycles_base = 0
        self._cycles_at = self.clock()

    # -- iohpmcycles --------------------------------------------------------------------
    def read_cycles(self) -> int:
        value = self._cycles_base
        if not self.iocountinh & 1:
            value += self.clock() - self._cycles_at
        if value > _CYCLES_MASK:
            self._overflow_cycles(value)
            value &= _CYCLES_MASK
        return value | self._cycles_of

    def _overflow_cycles(self, value: int) -> None:
        self._cycles_base = value & _CYCLES_MASK
        self._cycles_at = self.clock()
        if not self._cycles_of:
            self._cycles_of = _CYCLES_OF
            self.regs.irq.raise_cause(PMIP)

    def write_cycles(self, value: int, mask: int) -> None:
        merged = (self.read_cycles() & ~mask) | (value & mask)
        self._cycles_of = merged & _CYCLES_OF
        self._cycles_base = merged & _CYCLES_MASK
        self._cycles_at = self.clock()

    # -- iocountinh / iocountovf --------------------------------------------------------
    def read_ovf(self) -> int:
        ovf = 1 if self.read_cycles() & _CYCLES_OF else 0
        for i, evt in enumerate(self.evt):
            if evt & _EVT_OF:
                ovf |= 2 << i
        return ovf

    def write_inh(self, value: int, mask: int) -> None:
        cycles = self.read_cycles()
        self.iocountinh = ((self.iocountinh & ~mask) | (value & mask)) & self._inh_mask
        self._cycles_base, self._cycles_at = cycles & _CYCLES_MASK, self.clock()
        self._reindex()

    # -- iohpmctrN / iohpmevtN ----------------------------------------------------------
    def write_ctr(self, index: int, value: int, mask: int) -> None:
        self.ctr[index] = ((self.ctr[index] & ~mask) | (value & mask)) & _CTR_MASK

    def write_evt(self, index: int, value: int, mask: int) -> None:
        merged = ((self.evt[index] & ~mask) | (value & mask)) & _EVT_WRITABLE
        if IOHPMEVT.get(merged, "eventID") not in _STANDARD_EVENTS:
            merged = IOHPMEVT.put(merged, "eventID", 0)
        self.evt[index] = merged
        self._reindex()

    def _reindex(self) -> None:
        by_event: dict[int, list[int]] = {}
        for i, evt in enumerate(self.evt):
            event = evt & 0x7FFF
            if event and not self.iocountinh >> (i + 1) & 1:
                by_event.setdefault(event, []).append(i)
        self.counters_by_event = {event: tuple(counters) for event, counters in by_event.items()}

    def programmed(self, event: int) -> tuple[int, ...]:
        """Indexes (0-based) of the counters that count `event` and are not inhibited."""
        return self.counters_by_event.get(event, ())

    # -- counting -----------------------------------------------------------------------
    def count(self, event: int, device_id: int, process_id: int | None, gscid: int | None,
              pscid: int | None) -> None:
        """One occurrence of `event` for a transaction with these IDs."""
        counters = self.counters_by_event.get(event)
        if counters is None:
            return
        event = int(event)
        for i in counters:
            if self._matches(self.evt[i], event, device_id, process_id, gscid, pscid):
                self._increment(i)

    @staticmethod
    def _matches(evt: int, event: int, device_id: int, process_id: int | None,
                 gscid: int | None, pscid: int | None) -> bool:
        f = IOHPMEVT.decode(evt)
        if f["IDT"]:
            if event not in _IDT1_EVENTS:
                return False
            did, pid = gscid, pscid
        else:
            did, pid = device_id, process_id
        if f["DV_GSCV"]:
            mask = dmask_compare_mask(f["DID_GSCID"]) if f["DMASK"] else (1 << 24) - 1
            if did is None or (did ^ f["DID_GSCID"]) & mask:
                return False
        if f["PV_PSCV"] and (pid is None or pid != f["PID_PSCID"]):
            return False
        return True

    def _increment(self, i: int) -> None:
        self.ctr[i] = (self.ctr[i] + 1) & _CTR_MASK
        if self.ctr[i] == 0 and not self.evt[i] & _EVT_OF:
            self.evt[i] |= _EVT_OF
            self.regs.irq.raise_cause(PMIP)

"""The RISC-V IOMMU translation core (spec v1.0.1 §3.3 "Process to translate an IOVA").

`RiscvIommu.translate(request)` follows the spec's numbered process: ddtp mode
(Off/Bare), device context, transaction checks, process context, first stage (with
every first-stage table access itself G-stage translated), MSI address translation,
G-stage. Results are `Translation`s; failures are `Fault`s built in one place
(`faults.build_fault`) and reported through `report_fault` unless DTF suppresses them.

Programming interface (registers, queues, interrupts) is part 2 of the core: it reads
and writes `ddtp`/`fctl`, replaces the `report_fault`/`count_event` hooks and calls the
invalidation primitives below. See docs/translation.md for the choices made where the
spec leaves one.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace

from vfiouser_iommu.iommu import ats, fastpath, msi
from vfiouser_iommu.iommu.caches import TlbEntry, TranslationCaches
from vfiouser_iommu.iommu.config import IommuConfig
from vfiouser_iommu.iommu.directory import (
    BARE,
    DDT_LEVELS,
    MODE_BARE,
    DeviceContext,
    ProcessContext,
    device_id_fits,
    locate_device_context,
    locate_process_context,
    process_id_fits,
    read_table_word,
)
from vfiouser_iommu.iommu.faults import (
    ACCESS_FAULT,
    GUEST_PAGE_FAULT,
    PAGE_FAULT,
    Cause,
    Fault,
    Stop,
    build_fault,
    reportable,
)
from vfiouser_iommu.iommu.negative import negative_fill, negative_hit
from vfiouser_iommu.iommu.registers import RegisterFile
from vfiouser_iommu.iommu.request import (
    Access,
    HpmEvent,
    Request,
    RequestKind,
    Translation,
)
from vfiouser_iommu.iommu.walk import (
    FIRST_STAGE_MODES,
    G_STAGE_MODES,
    INVALID,
    Leaf,
    PagingMode,
    first_stage_permits,
    g_stage_permits,
    input_in_range,
    needs_ad_update,
    walk,
)
from vfiouser_iommu.memory import GuestMemory, MemoryAccessError, MemoryPoisonError

#: Size reported for an identity (Bare) stage: the spec leaves it to the
#: implementation; 1 GiB matches the reference model.
BARE_PAGE_SIZE = 1 << 30
_FIRST_WALK_EVENT = int(HpmEvent.IOTLB_MISS)  # events from here on are misses and walks
_REQUEST_EVENT = {RequestKind.UNTRANSLATED: HpmEvent.UNTRANSLATED_REQ,
                  RequestKind.TRANSLATED: HpmEvent.TRANSLATED_REQ,
                  RequestKind.ATS_TRANSLATION: HpmEvent.ATS_TRANSLATION_REQ}


@dataclass(slots=True)
class StageContext:
    """Everything one translation needs once the contexts are known (§3.3 step 17)."""

    request: Request
    dc: DeviceContext
    access: Access
    privileged: bool = False
    sum: bool = False
    process_id: int | None = None
    fs_mode: PagingMode | None = None
    fs_root: int = 0
    pscid: int | None = None
    gs_mode: PagingMode | None = None
    gs_root: int = 0
    gscid: int | None = None
    g_leaves: list = field(default_factory=list)


class RiscvIommu:
    """One RISC-V IOMMU over the guest memory it translates into."""

    def __init__(self, memory: GuestMemory, config: IommuConfig | None = None,
                 raise_irq=None):
        self.memory = memory
        self.config = config or IommuConfig()
        self.raise_irq = raise_irq
        self.ddtp = 0
        self.fctl = 0
        self.recent_faults: deque[Fault] = deque(maxlen=256)
        self.counters: Counter = Counter()
        # Per requester: the walks and misses (device_id, HpmEvent) the default
        # `count_event` sees, and the DMA statistics of each `IommuDmaView`.
        self.device_walks: Counter = Counter()
        self.requester_stats: dict = {}
        c = self.config
        self.caches = TranslationCaches(c.ddt_cache_entries, c.pdt_cache_entries,
                                        c.iotlb_entries, c.gtlb_entries, c.msi_cache_entries)
        # True while an introspection mode is on that only this (reference) Python path
        # implements: the invalidation checker, negative caching, a cache mode other than
        # `spec`, per-translation tracing (docs/introspection.md). A fast path must step
        # aside while it is set. A plain attribute, kept current by whatever switches a
        # mode, so reading it costs one attribute load.
        self.needs_reference_path = False
        # The invalidation checker (checker.InvalidationChecker) and the recorder it reads
        # the walks with; None unless check=on. `recorder` is also set on probes.
        self.checker = None
        self.recorder = None
        # ---- part 2 (programming interface) hooks in below this line ----
        self.regs = RegisterFile(self)
        # The C fast path (iommu/fastpath.py) takes over the hot paths when it is built
        # and enabled; this object then stays the reference for everything else.
        fastpath.attach(self)

    # -- programming interface (part 2: registers.py) -------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        return self.regs.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.regs.mmio_write(offset, size, value)

    def reset(self) -> None:
        self.regs.reset()

    # -- hooks part 2 replaces -----------------------------------------------------------
    def report_fault(self, fault: Fault) -> None:
        """Default fault sink: keep the most recent faults for tests and tools."""
        self.recent_faults.append(fault)

    def count_event(self, event: HpmEvent, device_id: int, process_id: int | None,
                    gscid: int | None, pscid: int | None) -> None:
        """Default HPM sink: count events by type, and walks/misses by device too."""
        self.counters[event] += 1
        if event >= _FIRST_WALK_EVENT:
            self.device_walks[device_id, event] += 1

    def set_register(self, name: str, value: int) -> None:
        """Set `ddtp` or `fctl` directly (tests and tools without the register file)."""
        if name not in ("ddtp", "fctl"):
            raise ValueError(f"no translation register {name!r}")
        setattr(self, name, value)

    # -- invalidation primitives (command queue) -------------------------------------------
    # Each returns how many cache entries it removed (the checker counts the ones that
    # removed nothing; query-commands shows the number).
    def invalidate_ddt(self, dv: bool, device_id: int) -> int:
        return self.caches.invalidate_ddt(dv, device_id)

    def invalidate_pdt(self, device_id: int, process_id: int) -> int:
        return self.caches.invalidate_pdt(device_id, process_id)

    def invalidate_vma(self, gv: bool, gscid: int, pscv: bool, pscid: int, av: bool,
                       addr: int, size: int = 4096) -> int:
        """IOTINVAL.VMA; with AV=1, [addr, addr+size) (a NAPOT range when S=1)."""
        return self.caches.invalidate_vma(gv, gscid, pscv, pscid, av, addr, size)

    def invalidate_gvma(self, gv: bool, gscid: int, av: bool, addr: int,
                        size: int = 4096) -> int:
        """IOTINVAL.GVMA; with GV=AV=1, the GPAs [addr, addr+size)."""
        return self.caches.invalidate_gvma(gv, gscid, av, addr, size)

    def reset_translation_state(self) -> None:
        """Empty every cache (reset, or a ddtp mode change if part 2 chooses)."""
        self.caches.clear()

    @property
    def big_endian(self) -> bool:
        return bool(self.fctl & 1)

    # -- contexts ---------------------------------------------------------------------------
    def device_context(self, device_id: int) -> DeviceContext | Fault:
        """The (cached or walked) DC of `device_id`, or the fault locating it."""
        probe = Request(device_id, None, 0)
        try:
            return self._device_context(probe)
        except Stop as stop:
            return build_fault(probe, stop.cause, stop.iotval2)

    def _device_context(self, request: Request) -> DeviceContext:
        mode = self.ddtp & 0xF
        if mode not in DDT_LEVELS:
            raise Stop(Cause.TRANSACTION_TYPE_DISALLOWED if mode == MODE_BARE
                       else Cause.ALL_INBOUND_DISALLOWED)
        device_id = request.device_id
        if not device_id_fits(device_id, mode, self.config.dc_size):
            raise Stop(Cause.TRANSACTION_TYPE_DISALLOWED)
        caches = self.caches
        dc = caches.ddt.lookup(device_id)
        if dc is not None:
            caches.stats.hits["ddt"] += 1
            return dc
        caches.stats.misses["ddt"] += 1
        if caches.negative is not None:
            negative_hit(self, "ddt", device_id)
        caches.stats.walks["ddt"] += 1
        self.count_event(HpmEvent.DDT_WALK, device_id, request.process_id, None, None)
        rec = self.recorder
        mark = rec.restart() if rec is not None else 0
        try:
            dc = locate_device_context(self.memory, self.config, self.ddtp, self.fctl,
                                       device_id, rec)
        except Stop as stop:
            if caches.negative is not None and stop.cause == Cause.DDT_ENTRY_NOT_VALID:
                negative_fill(self, "ddt", device_id, None,
                              rec.source(mark) if rec is not None else None)
            raise
        if rec is not None:
            dc = replace(dc, source=rec.source(mark))
        caches.ddt.insert(device_id, dc)
        return dc

    def _process_context(self, ctx: StageContext, process_id: int) -> ProcessContext:
        caches = self.caches
        key = (ctx.request.device_id, process_id)
        pc = caches.pdt.lookup(key)
        if pc is not None:
            caches.stats.hits["pdt"] += 1
            return pc
        caches.stats.misses["pdt"] += 1
        if caches.negative is not None:
            negative_hit(self, "pdt", key)
        caches.stats.walks["pdt"] += 1
        self.count_event(HpmEvent.PDT_WALK, ctx.request.device_id, ctx.request.process_id,
                         ctx.gscid, None)
        rec = self.recorder
        mark = rec.restart() if rec is not None else 0

        def gpa_to_spa(gpa: int) -> int:
            if ctx.gs_mode is None:
                return gpa
            return self._g_translate(ctx, gpa, Access.READ, implicit=True,
                                     pdt=True).output(gpa)

        try:
            pc = locate_process_context(self.memory, self.config, ctx.dc, process_id,
                                        gpa_to_spa, rec)
        except Stop as stop:
            if caches.negative is not None and stop.cause == Cause.PDT_ENTRY_NOT_VALID:
                negative_fill(self, "pdt", key, ctx,
                              rec.source(mark) if rec is not None else None)
            raise
        if rec is not None:
            pc = replace(pc, source=rec.source(mark, ctx))
        caches.pdt.insert(key, pc)
        return pc

    # -- translation ----------------------------------------------------------------------
    def translate(self, request: Request) -> Translation | Fault:
        """Translate one inbound request (§3.3); never raises for bad guest tables."""
        event = _REQUEST_EVENT.get(request.kind)
        if event is None:
            raise ValueError("PCIe messages go through message_context()")
        self.count_event(event, request.device_id, request.process_id, None, None)
        if request.kind is RequestKind.ATS_TRANSLATION:
            return ats.translate_ats(self, request)
        try:
            return self.translate_or_stop(request)
        except Stop as stop:
            return self.fault(request, stop)

    def fault(self, request: Request, stop: Stop) -> Fault:
        """Build the fault record for a stopped request and report it unless DTF."""
        record = build_fault(request, stop.cause, stop.iotval2)
        if reportable(stop.cause, stop.dtf):
            self.report_fault(record)
        return record

    def translate_or_stop(self, request: Request) -> Translation:
        """§3.3 steps 1-20; raises `Stop` (with `dtf` filled in) on a fault."""
        if self.ddtp & 0xF == MODE_BARE and request.kind is RequestKind.UNTRANSLATED:
            return Translation(request.iova, BARE_PAGE_SIZE, x=True)
        return self.translate_in_context(request, self._device_context(request))

    def translate_in_context(self, request: Request, dc: DeviceContext) -> Translation:
        """§3.3 steps 7-20 for a request whose device context `dc` is already known."""
        try:
            return self._translate_with_dc(request, dc)
        except Stop as stop:
            stop.dtf = dc.dtf
            raise

    def _translate_with_dc(self, request: Request, dc: DeviceContext) -> Translation:
        self._check_transaction(request, dc)
        ctx = self._stage_context(request, dc)
        if request.kind is RequestKind.TRANSLATED and not dc.t2gpa:
            return Translation(request.iova, 1 << 12, x=True)
        return self._two_stage(ctx)

    def _check_transaction(self, request: Request, dc: DeviceContext) -> None:
        """§3.3 step 7: transactions the device context does not allow (cause 260)."""
        pid = request.process_id
        disallowed = (
            (request.kind is not RequestKind.UNTRANSLATED and not dc.en_ats)
            or (pid is not None and not dc.pdtv)
            or (pid is not None and dc.fsc_mode != BARE
                and not process_id_fits(pid, dc.fsc_mode))
            or (request.kind is RequestKind.TRANSLATED and request.access is Access.EXECUTE
                and pid is None)
        )
        if disallowed:
            raise Stop(Cause.TRANSACTION_TYPE_DISALLOWED)

    def _stage_context(self, request: Request, dc: DeviceContext) -> StageContext:
        """§3.3 steps 8-16: pick the first-stage root, PSCID and G-stage of the request."""
        ctx = StageContext(request, dc, request.access,
                           privileged=request.privileged and request.process_id is not None)
        if dc.iohgatp_mode != BARE:
            ctx.gs_mode = G_STAGE_MODES[(bool(self.fctl & 4), dc.iohgatp_mode)]
            ctx.gs_root = dc.iohgatp_ppn << 12
            ctx.gscid = dc.gscid
        if request.kind is RequestKind.TRANSLATED:
            return ctx
        if not dc.pdtv:
            self._set_first_stage(ctx, dc.fsc, dc.pscid, dc.sxl)
            return ctx
        pid = request.process_id if request.process_id is not None else (0 if dc.dpe else None)
        if pid is None or dc.fsc_mode == BARE:
            return ctx
        ctx.process_id = pid
        pc = self._process_context(ctx, pid)
        if ctx.privileged and not pc.ens:
            raise Stop(Cause.TRANSACTION_TYPE_DISALLOWED)
        ctx.sum = pc.sum
        self._set_first_stage(ctx, pc.fsc, pc.pscid, dc.sxl)
        return ctx

    @staticmethod
    def _set_first_stage(ctx: StageContext, atp: int, pscid: int, sxl: bool) -> None:
        mode = atp >> 60
        if mode == BARE:
            return
        ctx.fs_mode = FIRST_STAGE_MODES[(sxl, mode)]
        ctx.fs_root = (atp & ((1 << 44) - 1)) << 12
        ctx.pscid = pscid

    def _two_stage(self, ctx: StageContext) -> Translation:
        """§3.3 steps 17-20 with the leaf-translation cache in front."""
        iova = ctx.request.iova
        if ctx.fs_mode is None and ctx.gs_mode is None:
            hit = msi.translate_msi(self, ctx, iova)
            if hit is not None:
                return hit
            size = BARE_PAGE_SIZE
            if msi.flat(self, ctx.dc):
                size = msi.unshadowed_size(ctx.dc, iova, size)
            return Translation(iova, size, x=True)
        space = (ctx.gscid, ctx.pscid)
        caches = self.caches
        entry = caches.iotlb.lookup(space, iova)
        if entry is not None and self.checker is not None:
            self.checker.iotlb_hit(ctx, entry, iova)
        if entry is not None and self._entry_permits(ctx, entry):
            if not msi.flat(self, ctx.dc):
                caches.stats.hits["iotlb"] += 1
                return _translation(entry, iova)
            hit = self._msi_flat_hit(ctx, entry, iova)
            if hit is not None:
                caches.stats.hits["iotlb"] += 1
                return hit
        caches.stats.misses["iotlb"] += 1
        if caches.negative is not None and ctx.fs_mode is not None:
            negative_hit(self, "iotlb", (space, iova), ctx)
        self.count_event(HpmEvent.IOTLB_MISS, ctx.request.device_id, ctx.request.process_id,
                         ctx.gscid, ctx.pscid)
        return self._walk_and_fill(ctx, space)

    @staticmethod
    def _msi_flat_hit(ctx: StageContext, entry: TlbEntry, iova: int) -> Translation | None:
        """An IOTLB hit for a DC whose msiptp is Flat; None if it must be re-walked.

        The IOTLB is tagged by GSCID/PSCID, not by the DC's MSI address pattern, so an
        entry may have been filled by a device with other (or no) interrupt files: the
        hit's GPA is checked here, and an interrupt-file GPA goes to the MSI path (as a
        miss, since MSI translations are never put in the IOTLB). The reported page size
        is cut so that the region does not hold an interrupt file of this DC either.
        """
        offset = iova & (entry.size - 1)
        gpa = (entry.gpa_base if entry.gpa_base is not None else entry.out_base) | offset
        dc = ctx.dc
        if msi.is_interrupt_file(gpa, dc.msi_mask, dc.msi_pattern):
            return None
        t = _translation(entry, iova)
        size = msi.unshadowed_size(dc, gpa, entry.size)
        return t if size == entry.size else replace(t, page_size=size)

    def _entry_permits(self, ctx: StageContext, entry: TlbEntry) -> bool:
        write = ctx.access is Access.WRITE
        fs, gs = entry.fs_flags, entry.gs_flags
        if fs is not None and (not first_stage_permits(fs, ctx.access, ctx.privileged, ctx.sum)
                               or needs_ad_update(fs, write)):
            return False
        return gs is None or (g_stage_permits(gs, ctx.access) and not needs_ad_update(gs, write))

    def _walk_and_fill(self, ctx: StageContext, space: tuple) -> Translation:
        iova = ctx.request.iova
        rec = self.recorder
        mark = rec.restart() if rec is not None else 0
        fs_leaf = self._first_stage(ctx, iova) if ctx.fs_mode is not None else None
        gpa = fs_leaf.output(iova) if fs_leaf is not None else iova
        hit = msi.translate_msi(self, ctx, gpa)
        if hit is not None:
            return hit
        gs_leaf = None
        if ctx.gs_mode is not None:
            gs_leaf = self._g_translate(ctx, gpa, ctx.access, implicit=False)
        spa = gs_leaf.output(gpa) if gs_leaf is not None else gpa
        size = min(leaf.size for leaf in (fs_leaf, gs_leaf) if leaf is not None)
        if msi.flat(self, ctx.dc):
            # Cache only the part without interrupt files (see msi.unshadowed_size).
            size = msi.unshadowed_size(ctx.dc, gpa, size)
        offset = iova & (size - 1)
        entry = TlbEntry(
            ctx.gscid, ctx.pscid, iova - offset, size, spa - offset,
            fs_leaf.flags if fs_leaf is not None else None,
            gs_leaf.flags if gs_leaf is not None else None,
            fs_leaf.pbmt if fs_leaf is not None and fs_leaf.pbmt else
            (gs_leaf.pbmt if gs_leaf is not None else 0),
            gpa - offset if gs_leaf is not None else None, tuple(ctx.g_leaves),
            rec.source(mark, ctx) if rec is not None else None)
        self.caches.iotlb.insert(space, entry)
        return _translation(entry, iova)

    # -- stages -----------------------------------------------------------------------------
    def _first_stage(self, ctx: StageContext, iova: int) -> Leaf:
        """First-stage walk (§3.3.4); table accesses go through the G-stage if active."""
        mode, access = ctx.fs_mode, ctx.access
        if not input_in_range(mode, iova, sign_extended=not mode.sv32):
            raise Stop(PAGE_FAULT[access])
        self.caches.stats.walks["first_stage"] += 1
        self.count_event(HpmEvent.S_STAGE_WALK, ctx.request.device_id, ctx.request.process_id,
                         ctx.gscid, ctx.pscid)
        pte_size = mode.pte_size
        be = ctx.dc.sbe
        fault_cause = ACCESS_FAULT[access]

        def spa_of(gpa: int, write: bool) -> int:
            if ctx.gs_mode is None:
                return gpa
            leaf = self._g_translate(ctx, gpa, Access.WRITE if write else Access.READ,
                                     implicit=True)
            return leaf.output(gpa)

        def load(addr: int) -> int:
            return read_table_word(self.memory, self.config.pas, spa_of(addr, False), pte_size,
                                   be, fault_cause)

        def store(addr: int, old: int, new: int) -> int:
            return self._compare_exchange(spa_of(addr, True), pte_size, old, new, be,
                                          fault_cause)

        rec = self.recorder

        def fail(why: str, level: int) -> None:
            if why is INVALID and self.caches.negative is not None:
                negative_fill(self, "iotlb", (iova, mode, level), ctx,
                              rec.source(0, ctx) if rec is not None else None)
            raise Stop(PAGE_FAULT[access])

        return walk(mode, ctx.fs_root, iova, load=load, store=store, fail=fail,
                    permitted=lambda f: first_stage_permits(f, access, ctx.privileged, ctx.sum),
                    ade=ctx.dc.sade, write=access is Access.WRITE,
                    svpbmt=self.config.svpbmt,
                    record=None if rec is None else rec.first_stage(ctx, iova, pte_size, be))

    def _g_translate(self, ctx: StageContext, gpa: int, access: Access, *, implicit: bool,
                     pdt: bool = False) -> Leaf:
        """G-stage translation of `gpa` (§3.3.5), through the G-stage leaf cache.

        Implicit accesses (first-stage tables, PDT) report guest page faults with the
        original request's access type and iotval2 bit 0 set (bit 1 for an implicit
        write: a first-stage A/D update).
        """
        orig = ctx.access
        iotval2 = (gpa & ~3) | (1 if implicit else 0) | \
            (2 if implicit and access is Access.WRITE else 0)
        mode = ctx.gs_mode
        if not input_in_range(mode, gpa, sign_extended=False):
            raise Stop(GUEST_PAGE_FAULT[orig], iotval2)
        space = (ctx.gscid,)
        write = access is Access.WRITE
        entry = self.caches.gtlb.lookup(space, gpa)
        rec = self.recorder
        if entry is not None and g_stage_permits(entry.gs_flags, access) and \
                not needs_ad_update(entry.gs_flags, write):
            self.caches.stats.hits["gtlb"] += 1
            leaf = Leaf(entry.out_base, entry.size, entry.gs_flags, entry.pbmt)
            if rec is not None:
                rec.g_leaf(gpa, leaf, entry.source)
        else:
            if self.caches.negative is not None:
                negative_hit(self, "gtlb", (space, gpa), ctx, (orig, iotval2))
            mark = rec.mark() if rec is not None else 0
            leaf = self._g_walk(ctx, gpa, access, iotval2, pdt)
            self.caches.gtlb.insert(space, TlbEntry(
                ctx.gscid, None, gpa & ~(leaf.size - 1), leaf.size, leaf.out_base, None,
                leaf.flags, leaf.pbmt, gpa & ~(leaf.size - 1), (),
                rec.source(mark) if rec is not None else None))
            if rec is not None:
                rec.g_leaf(gpa, leaf, None)
        ctx.g_leaves.append((gpa & ~(leaf.size - 1), leaf.size))
        return leaf

    def _g_walk(self, ctx: StageContext, gpa: int, access: Access, iotval2: int,
                pdt: bool) -> Leaf:
        self.caches.stats.misses["gtlb"] += 1
        self.caches.stats.walks["g_stage"] += 1
        self.count_event(HpmEvent.G_STAGE_WALK, ctx.request.device_id, ctx.request.process_id,
                         ctx.gscid, ctx.pscid)
        mode = ctx.gs_mode
        be = self.big_endian
        # §3.3.2: the G-stage accesses of a PDT walk report an access fault as 265 and
        # poisoned data as 269 (the PDT causes), not as 5 / 274.
        if pdt:
            fault_cause, corruption = Cause.PDT_LOAD_ACCESS_FAULT, Cause.PDT_DATA_CORRUPTION
        else:
            fault_cause, corruption = ACCESS_FAULT[ctx.access], Cause.PT_DATA_CORRUPTION

        def load(addr: int) -> int:
            return read_table_word(self.memory, self.config.pas, addr, mode.pte_size, be,
                                   fault_cause, corruption)

        def store(addr: int, old: int, new: int) -> int:
            return self._compare_exchange(addr, mode.pte_size, old, new, be, fault_cause,
                                          corruption)

        rec = self.recorder
        mark = rec.mark() if rec is not None else 0

        def fail(why: str, level: int) -> None:
            if why is INVALID and self.caches.negative is not None:
                negative_fill(self, "gtlb", (gpa, mode, level), ctx,
                              rec.source(mark) if rec is not None else None)
            raise Stop(GUEST_PAGE_FAULT[ctx.access], iotval2)

        return walk(mode, ctx.gs_root, gpa, load=load, store=store, fail=fail,
                    permitted=lambda f: g_stage_permits(f, access), ade=ctx.dc.gade,
                    write=access is Access.WRITE, svpbmt=self.config.svpbmt,
                    record=None if rec is None else rec.g_stage(ctx, gpa, mode.pte_size, be))

    def _compare_exchange(self, addr: int, size: int, old: int, new: int, be: bool,
                          cause: int, corruption: int = Cause.PT_DATA_CORRUPTION) -> int:
        """The A/D update's atomic compare-and-swap on guest memory.

        Its read half returning poisoned data is `corruption`: a page-table data
        corruption (274), or 269 for the G-stage tables of a PDT access.
        """
        if addr + size > 1 << self.config.pas or not self.memory.contains(addr, size):
            raise Stop(cause)
        try:
            return self.memory.compare_exchange(addr, size, old, new, big_endian=be)
        except MemoryPoisonError:
            raise Stop(corruption) from None
        except MemoryAccessError:
            raise Stop(cause) from None

    # -- MRIF writes and endpoint DMA -------------------------------------------------------
    def mrif_write(self, request: Request, translation: Translation,
                   data: bytes) -> Fault | None:
        """Deliver an MSI write to an MRIF-mode interrupt file page (§3.3.6 / AIA)."""
        try:
            msi.deliver_mrif(self, request, translation, data)
        except Stop as stop:
            return self.fault(request, stop)
        return None

    def dma_view(self, device_id: int, process_id: int | None = None,
                 privileged: bool = False):
        """A `DmaView` whose every access is translated for this requester."""
        from vfiouser_iommu.iommu.dma import IommuDmaView
        return IommuDmaView(self, device_id, process_id, privileged)

    def message_context(self, request: Request) -> DeviceContext | Fault:
        """Check a PCIe message (§3.8) against ddtp and the DC; see `ats.check_message`."""
        return ats.check_message(self, request)


def _translation(entry: TlbEntry, iova: int) -> Translation:
    fs = entry.fs_flags if entry.fs_flags is not None else 0xFF
    gs = entry.gs_flags if entry.gs_flags is not None else 0xFF
    flags = fs & gs
    return Translation(
        entry.out_base | (iova & (entry.size - 1)), entry.size,
        r=bool(flags & 2), w=bool(flags & 4), x=bool(flags & 8), u=False,
        g=bool(entry.fs_flags is not None and entry.fs_flags & 0x20),
        pbmt=entry.pbmt,
        gpa=None if entry.gpa_base is None else entry.gpa_base | (iova & (entry.size - 1)))

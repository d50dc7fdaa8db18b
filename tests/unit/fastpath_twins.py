"""Test helper: the same random world (configuration, device directory, process
directories, page tables for every stage, garbage words) built twice, once on the pure
Python reference and once on the C fast path, driven in lock step, and compared after
every step: results, exceptions, fault records, guest memory (A/D bits), every cache's
entries in LRU order, the IOTLB page-size order, statistics, event counts and HPM
counters.

A world is a function of its seed (`random.Random`), so a failing example is replayed
by its seed alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from iommu_tables import A, Builder, D, G, R, U, V, W, X, atp

from vfiouser_iommu.iommu import (
    Access,
    HpmEvent,
    IommuConfig,
    Request,
    RequestKind,
    RiscvIommu,
    fastpath,
)
from vfiouser_iommu.iommu.regs_layouts import IOHPMEVT
from vfiouser_iommu.iommu.walk import (
    SV32,
    SV32X4,
    SV39,
    SV39X4,
    SV48,
    SV48X4,
    SV57,
    SV57X4,
    PagingMode,
)
from vfiouser_iommu.memory import DmaError, GuestMemory

RAM = 0x8000_0000
SIZE = 2 << 20
TABLES = RAM + (1 << 20)          # table pages; [RAM, TABLES) is data
GPA_BASE = 0x4000_0000            # nested worlds: GPA = GPA_BASE + (SPA - RAM)
VA_WINDOWS = (0x0000_1000_0000, 0x7F_FFE0_0000, 0xFFFF_FFC0_0000_0000, 0x4000_0000)
MAX_DEVICES = 6
EXTRA, EXTRA_SIZE = 0x1_0000_0000, 0x2_0000   # a second region, mapped and unmapped
FS_MODES = {8: SV39, 9: SV48, 10: SV57}
GS_MODES = {8: SV39X4, 9: SV48X4, 10: SV57X4}
KINDS = ("identity", "identity", "fs", "fs", "gs", "nested", "nested", "pdt", "pdt_nested",
         "garbage", "invalid")


class NoReads:
    """Fallback that makes reads outside RAM fail loudly; writes are recorded."""

    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []

    def read(self, gpa: int, length: int) -> bytes:
        raise AssertionError(f"read outside mapped memory at {gpa:#x}")

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, bytes(data)))


@dataclass
class Device:
    did: int
    kind: str
    pids: list = field(default_factory=list)
    iovas: list = field(default_factory=list)
    gscid: int = 0
    pscid: int = 0


@dataclass
class World:
    """The recipe of one world: what both twins are built from."""

    config: IommuConfig
    fctl: int
    ddtp: int
    image: bytes
    devices: list[Device]


def _leaf_flags(rng: random.Random, stage_g: bool) -> int:
    flags = V | R | W | X | U | A | D
    for bit, p in ((A, 0.15), (D, 0.2), (U, 0.08), (W, 0.15), (X, 0.3)):
        if rng.random() < p:
            flags &= ~bit
    if not stage_g and rng.random() < 0.2:
        flags |= G
    if rng.random() < 0.03:
        flags = (flags | W) & ~R        # W without R: reserved
    return flags


def _map(rng, b: Builder, mode: PagingMode, root: int, va: int, pa: int, stage_g: bool,
         size: int = 4096, napot: bool = False) -> None:
    flags = _leaf_flags(rng, stage_g)
    if mode.pte_size == 8 and rng.random() < 0.05:
        flags |= rng.choice((1, 2, 3)) << 61   # PBMT (3 is reserved)
    b.map(mode, root, va, pa, size, flags=flags, napot=napot)


def _fs_mappings(rng, b: Builder, mode: PagingMode, root: int, out_base: int) -> list[int]:
    """Map a few pages (4K, 64K NAPOT, a superpage) of one VA window; return IOVAs."""
    windows = [0x1000_0000, 0x4000_0000]
    if not mode.sv32:   # the upper half of a sign-extended address space
        windows.append((1 << 64) - (1 << (mode.va_bits - 1)) + 0x2000_0000)
    window = rng.choice(windows)
    iovas = []
    for k in range(rng.randint(1, 6)):
        va = window + k * 4096
        _map(rng, b, mode, root, va, out_base + rng.randrange(0, 256) * 4096, False)
        iovas.append(va)
    if rng.random() < 0.4 and not mode.sv32:
        va = window + 0x10_0000
        _map(rng, b, mode, root, va, out_base + 0x1_0000 * rng.randrange(0, 8), False,
             size=1 << 16, napot=True)
        iovas += [va, va + 0x8123]
    if rng.random() < 0.4:
        va = window + (4 << 20 if not mode.sv32 else 8 << 20)
        size = 4 << 20 if mode.sv32 else 2 << 20
        _map(rng, b, mode, root, va, out_base & ~(size - 1), False, size=size)
        iovas += [va + 0x1234, va + size - 8]
    return iovas


def _g_stage(rng, b: Builder, mode: PagingMode) -> int:
    """A G-stage mapping GPA_BASE + x -> RAM + x over all of RAM (2M or 4K pages)."""
    root = b.root(mode)
    for chunk in range(0, SIZE, 2 << 20):
        if rng.random() < 0.5 and not mode.sv32:
            b.map(mode, root, GPA_BASE + chunk, RAM + chunk, 2 << 20, flags=_g_flags(rng))
        else:
            for page in range(chunk, chunk + (2 << 20), 4096):
                b.map(mode, root, GPA_BASE + page, RAM + page, flags=_g_flags(rng, 0.01))
    return root


def _g_flags(rng, damage: float = 0.2) -> int:
    flags = V | R | W | X | U | A | D
    if rng.random() < damage:
        flags &= ~rng.choice((A, D, U, W, X))
    return flags


def _garbage(rng, mem: GuestMemory, n: int) -> None:
    for _ in range(n):
        slot = TABLES + rng.randrange(0, (SIZE - (1 << 20)) // 8) * 8
        if rng.random() < 0.5:
            word = rng.getrandbits(64)
        else:   # something that looks like a valid entry
            word = ((TABLES >> 12) + rng.randrange(0, 64)) << 10 | rng.choice((1, 0xCF, 0xDF))
        mem.write_int(slot, 8, word)


def _device(rng, b: Builder, gb: Builder, root: int, config: IommuConfig, did: int,
            kind: str, fctl: int) -> Device:
    dev = Device(did, kind, gscid=rng.randrange(0, 2), pscid=rng.randrange(0, 2))
    dc_size = config.dc_size
    tc = V
    if config.amo_hwad:
        tc |= (1 << 7 if rng.random() < 0.5 else 0) | (1 << 8 if rng.random() < 0.5 else 0)
    tc |= (1 << 10) if fctl & 1 else 0        # SBE follows fctl.BE
    gxl = bool(fctl & 4)
    tc |= gxl << 11                           # fctl.GXL needs tc.SXL
    if rng.random() < 0.1:
        tc |= 1 << 4                          # DTF
    msi = {}
    if config.msi_flat and rng.random() < 0.4:
        msiptp_page = b.alloc()
        msi = dict(msiptp=atp(0, 0) | 1 << 60 | msiptp_page >> 12,
                   msi_mask=rng.choice((0, 1, 3)),
                   msi_pattern=((RAM >> 12) + rng.randrange(0, 256)))
        b.write64(msiptp_page, (RAM + 0x4_0000) >> 12 << 10 | 3 << 1 | 1)
    if kind == "identity":
        b.set_dc(root, 3, did, dc_size, tc=tc, **msi)
        dev.iovas = [RAM + rng.randrange(0, SIZE), RAM + 0x1000, rng.getrandbits(40)]
    elif kind in ("fs", "nested"):
        nested = kind == "nested"
        builder = gb if nested else b
        out = GPA_BASE if nested else RAM
        sv32 = gxl
        fmode = 8 if sv32 else rng.choice((8, 9, 10))
        mode = SV32 if sv32 else FS_MODES[fmode]
        pt = builder.root(mode)
        dev.iovas = _fs_mappings(rng, builder, mode, pt, out)
        iohgatp = 0
        if nested:
            gmode = 8 if gxl else rng.choice((8, 9, 10))
            groot = _g_stage(rng, b, SV32X4 if gxl else GS_MODES[gmode])
            iohgatp = atp(gmode, groot >> 12, dev.gscid)
        b.set_dc(root, 3, did, dc_size, tc=tc, ta=dev.pscid << 12,
                 fsc=atp(fmode, pt >> 12), iohgatp=iohgatp, **msi)
    elif kind == "gs":
        gmode = 8 if gxl else rng.choice((8, 9, 10))
        groot = _g_stage(rng, b, SV32X4 if gxl else GS_MODES[gmode])
        b.set_dc(root, 3, did, dc_size, tc=tc,
                 iohgatp=atp(gmode, groot >> 12, dev.gscid), **msi)
        dev.iovas = [GPA_BASE + rng.randrange(0, SIZE), GPA_BASE + 0x1008, GPA_BASE + SIZE]
    elif kind in ("pdt", "pdt_nested"):
        nested = kind == "pdt_nested" and not gxl
        builder = gb if nested else b
        iohgatp = 0
        if nested:
            groot = _g_stage(rng, b, SV39X4)
            iohgatp = atp(8, groot >> 12, dev.gscid)
        pdt = builder.alloc()
        for pid in range(rng.randint(1, 3)):
            fmode = rng.choice((8, 9, 10))
            pt = builder.root(FS_MODES[fmode])
            dev.iovas += _fs_mappings(rng, builder, FS_MODES[fmode], pt,
                                      GPA_BASE if nested else RAM)
            ens_sum = rng.choice((0, 2, 4, 6))
            builder.set_pc(pdt, 1, pid, ta=(dev.pscid + pid) << 12 | ens_sum | 1,
                           fsc=atp(fmode, pt >> 12))
            dev.pids.append(pid)
        dpe = 1 << 9 if rng.random() < 0.5 else 0
        b.set_dc(root, 3, did, dc_size, tc=tc | 1 << 5 | dpe, fsc=atp(1, pdt >> 12),
                 iohgatp=iohgatp, **msi)
    elif kind == "garbage":
        words = [rng.getrandbits(64) for _ in range(dc_size // 8)]
        words[0] = words[0] & ~0xFFFF_F000 | 1 if rng.random() < 0.5 else words[0]
        slot = b.ddt_slot(root, 3, did, dc_size)
        for k, w in enumerate(words):
            b.write64(slot + 8 * k, w)
        dev.iovas = [rng.getrandbits(64), RAM + 0x2000]
    return dev


def make_world(seed: int) -> World:
    rng = random.Random(seed)
    small = rng.random() < 0.5
    config = IommuConfig(
        iotlb_entries=rng.choice((0, 1, 3, 16)) if small else 4096,
        gtlb_entries=rng.choice((0, 1, 2, 8)) if small else 1024,
        ddt_cache_entries=rng.choice((1, 4, 256, 256)),
        pdt_cache_entries=rng.choice((1, 256)),
        msi_flat=rng.random() < 0.7, svpbmt=rng.random() < 0.8,
        amo_hwad=rng.random() < 0.8, end=rng.random() < 0.2,
        sv32x4=rng.random() < 0.15)
    config = replace(config, sv32=config.sv32x4 or rng.random() < 0.1)
    fctl = 0
    if config.end and rng.random() < 0.5:
        fctl |= 1
    if config.sv32x4 and rng.random() < 0.5:
        fctl |= 4
    mem = GuestMemory.ram(RAM, SIZE)
    for page in range(0, 1 << 20, 4096):    # recognisable data
        mem.write(RAM + page, bytes([page >> 12 & 0xFF]) * 4096)
    mem.write(TABLES, bytes(SIZE - (1 << 20)))
    b = Builder(mem, big_endian=bool(fctl & 1), heap=[TABLES])
    gb = Builder(mem, big_endian=bool(fctl & 1), offset=RAM - GPA_BASE, heap=b.heap)
    root = b.alloc()
    devices = [_device(rng, b, gb, root, config, did, rng.choice(KINDS), fctl)
               for did in range(rng.randint(1, MAX_DEVICES))]
    _garbage(rng, mem, rng.choice((0, 0, 3, 30)))
    ddtp = (root >> 12) << 10 | 4
    return World(config, fctl, ddtp, bytes(mem.slice(RAM, SIZE)), devices)


class Twins:
    """Two IOMMUs built from one World: `py` (reference) and `c` (fast path)."""

    def __init__(self, world: World):
        self.world = world
        self.py = self._build(world, "python")
        self.c = self._build(world, "c")
        assert type(self.c) is not RiscvIommu, "the C twin has no fast path"
        self.views: dict = {}
        self.recent: list[Request] = []

    @staticmethod
    def _build(world: World, impl: str) -> RiscvIommu:
        mem = GuestMemory.ram(RAM, SIZE)
        mem.write(RAM, world.image)
        mem.fallback = NoReads()
        with fastpath.implementation(impl):
            iommu = RiscvIommu(mem, world.config)
        iommu.set_register("fctl", world.fctl)
        iommu.set_register("ddtp", world.ddtp)
        return iommu

    # -- operations: each returns (python outcome, C outcome) -------------------------
    def both(self, fn) -> tuple:
        return _outcome(fn, self.py), _outcome(fn, self.c)

    def translate(self, request: Request) -> tuple:
        return self.both(lambda iommu: iommu.translate(request))

    def view(self, iommu, did: int, pid, priv: bool):
        key = (id(iommu), did, pid, priv)
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = iommu.dma_view(did, pid, priv)
        return view


def _outcome(fn, iommu):
    try:
        return ("ok", fn(iommu))
    except DmaError as e:
        return ("DmaError", str(e), e.fault)
    except Exception as e:  # noqa: BLE001 - the reference's own failures must match too
        return ("raised", type(e).__name__, str(e))


def snapshot(iommu: RiscvIommu) -> dict:
    """Everything observable about the translation state of `iommu`."""
    caches = iommu.caches
    hpm = iommu.regs.hpm
    memory = iommu.memory
    return {
        "ddt": list(caches.ddt.items()),
        "pdt": list(caches.pdt.items()),
        "msi": list(caches.msi.items()),
        "iotlb": list(caches.iotlb.entries.items()),
        "iotlb_shifts": list(caches.iotlb.shifts.items()),
        "gtlb": list(caches.gtlb.entries.items()),
        "gtlb_shifts": list(caches.gtlb.shifts.items()),
        "stats": {name: {k: v for k, v in getattr(caches.stats, name).items() if v}
                  for name in ("hits", "misses", "walks")},
        "counters": {int(k): v for k, v in iommu.counters.items() if v},
        "device_walks": {(d, int(e)): v for (d, e), v in iommu.device_walks.items() if v},
        "requester_stats": {d: s.as_dict() for d, s in iommu.requester_stats.items()},
        "faults": list(iommu.recent_faults),
        "hpm": (list(hpm.ctr), list(hpm.evt)) if hpm is not None else None,
        "memory": bytes(memory.slice(RAM, SIZE, writable=True)),
        "extra": bytes(memory.slice(EXTRA, EXTRA_SIZE, writable=True))
        if memory.contains(EXTRA) and memory.regions[-1].writable else None,
        "fallback_writes": list(memory.fallback.writes),
    }


def random_request(rng: random.Random, world: World) -> Request:
    dev = rng.choice(world.devices) if rng.random() < 0.95 else Device(99, "absent")
    pid = None
    if dev.pids and rng.random() < 0.8:
        pid = rng.choice(dev.pids + [7])
    elif rng.random() < 0.05:
        pid = rng.randrange(0, 1 << 20)
    if rng.random() < 0.25:   # another device's address: shared PSCID/GSCID spaces
        dev_iovas = rng.choice(world.devices).iovas
    else:
        dev_iovas = dev.iovas
    iova = rng.choice(dev_iovas) if dev_iovas and rng.random() < 0.85 else \
        rng.choice((rng.getrandbits(64), RAM + rng.randrange(0, SIZE),
                    EXTRA + rng.randrange(0, EXTRA_SIZE)))
    iova += rng.choice((0, 0, 8, 0x7F8, 0xFFC))
    access = rng.choice(list(Access))
    kind = RequestKind.UNTRANSLATED if rng.random() < 0.9 else \
        rng.choice((RequestKind.TRANSLATED, RequestKind.ATS_TRANSLATION))
    return Request(dev.did, pid, iova & ((1 << 64) - 1), access, rng.random() < 0.3, kind)


def _request(rng: random.Random, twins: Twins) -> Request:
    """Mostly a recent request again (cache hits), else a new one."""
    recent = twins.recent
    if recent and rng.random() < 0.7:
        return rng.choice(recent)
    request = random_request(rng, twins.world)
    recent.append(request)
    del recent[:-8]
    return request


def random_step(rng: random.Random, twins: Twins) -> tuple[str, tuple]:
    """One random operation applied to both twins: (description, outcomes)."""
    world = twins.world
    if twins.py.memory.poisoned_ranges and rng.random() < 0.3:
        return "unpoison", twins.both(lambda iommu: iommu.memory.unpoison(RAM, SIZE))
    if any(twins.py.regs.hpm.evt) and rng.random() < 0.2:
        return "hpm off", twins.both(lambda iommu: [iommu.regs.hpm.write_evt(i, 0, (1 << 64) - 1)
                                                    for i in range(2)])
    if getattr(twins.c, "needs_reference_path", False) and rng.random() < 0.3:
        return "reference path off", twins.both(_set_reference_path(False))
    if twins.py.ddtp != world.ddtp and rng.random() < 0.3:
        return "ddtp back", twins.both(lambda iommu: iommu.set_register("ddtp", world.ddtp))
    roll = rng.random()
    if roll < 0.5:
        request = _request(rng, twins)
        return f"translate {request}", twins.translate(request)
    if roll < 0.75:
        return _dma(rng, twins, _request(rng, twins))
    if roll < 0.83:
        return _invalidate(rng, twins)
    if roll < 0.88:
        slot = TABLES + rng.randrange(0, (SIZE - (1 << 20)) // 8) * 8
        word = rng.getrandbits(64)
        clear_ad = rng.random() < 0.5

        def poke(iommu):
            old = iommu.memory.read_int(slot, 8)
            iommu.memory.write_int(slot, 8, old & ~(A | D) if clear_ad else word)
        return f"poke {slot:#x}", twins.both(poke)
    if roll < 0.91:
        return _hpm(rng, twins)
    if roll < 0.94:
        start = RAM + rng.randrange(0, SIZE // 4096) * 4096
        return f"poison {start:#x}", twins.both(lambda iommu: iommu.memory.poison(start, 4096))
    if roll < 0.955:
        return "reference path on", twins.both(_set_reference_path(True))
    if roll < 0.97:
        return _extra_region(rng, twins)
    mode = rng.choice((0, 1, 4, 4))

    def ddtp(iommu):
        iommu.set_register("ddtp", world.ddtp & ~0xF | mode)
    return f"ddtp mode {mode}", twins.both(ddtp)


def _extra_region(rng: random.Random, twins: Twins) -> tuple[str, tuple]:
    """Map or unmap a second region (sometimes read-only): C's region table follows."""
    writable = rng.random() < 0.6
    fill = rng.getrandbits(8)

    def toggle(iommu):
        memory = iommu.memory
        if memory.contains(EXTRA):
            memory.remove_region(EXTRA, EXTRA_SIZE)
        else:
            memory.add_region(EXTRA, bytearray([fill]) * EXTRA_SIZE, writable=writable)
    return f"extra region toggle writable={writable}", twins.both(toggle)


def _set_reference_path(flag: bool):
    def switch(iommu):   # what introspection's modes will switch
        iommu.needs_reference_path = flag
    return switch


def _dma(rng: random.Random, twins: Twins, request: Request) -> tuple[str, tuple]:
    length = rng.choice((1, 2, 4, 8, 16, 100, 4096, 5000, 0x1_0000))
    write = rng.random() < 0.4
    as_int = length <= 8 and rng.random() < 0.5
    pieces = rng.random() < 0.15       # translate only (scatter-gather callers)
    data = (bytes(rng.getrandbits(8) for _ in range(min(length, 64))) * (length // 64 + 1))
    data = data[:length]
    addr = request.iova

    def dma(iommu):
        view = twins.view(iommu, request.device_id, request.process_id, request.privileged)
        if pieces:
            return [(gpa, n, type(special).__name__)
                    for gpa, n, special in view.pieces(addr, length, write, view.attrs)]
        if as_int:
            if write:
                return view.write_int(addr, length, int.from_bytes(data, "little"))
            return view.read_int(addr, length)
        return view.write(addr, data) if write else view.read(addr, length)
    return f"dma {'write' if write else 'read'} {addr:#x}+{length}", twins.both(dma)


def _invalidate(rng: random.Random, twins: Twins) -> tuple[str, tuple]:
    world = twins.world
    dev = rng.choice(world.devices)
    addr = rng.choice(dev.iovas) if dev.iovas else 0
    gscid, pscid = dev.gscid, dev.pscid + rng.choice((0, 0, 1))
    kind = rng.randrange(5)
    flags = [rng.random() < 0.5 for _ in range(3)]
    if kind == 0:
        op = ("invalidate_ddt", flags[0], dev.did)
    elif kind == 1:
        op = ("invalidate_pdt", dev.did, rng.choice(dev.pids or [0]))
    elif kind == 2:
        op = ("invalidate_vma", flags[0], gscid, flags[1], pscid, flags[2], addr)
    elif kind == 3:
        op = ("invalidate_gvma", flags[0], gscid, flags[1],
              addr if rng.random() < 0.5 else GPA_BASE + rng.randrange(0, SIZE))
    else:
        op = ("reset_translation_state",)
    return f"{op}", twins.both(lambda iommu: getattr(iommu, op[0])(*op[1:]))


def _hpm(rng: random.Random, twins: Twins) -> tuple[str, tuple]:
    index = rng.randrange(0, 2)
    event = rng.choice((0, 0, 0, HpmEvent.UNTRANSLATED_REQ, HpmEvent.IOTLB_MISS,
                        HpmEvent.DDT_WALK, HpmEvent.S_STAGE_WALK, HpmEvent.G_STAGE_WALK))
    dev = rng.choice(twins.world.devices)
    filtered = rng.random() < 0.3
    value = IOHPMEVT.encode(eventID=int(event), DV_GSCV=int(filtered),
                            DID_GSCID=dev.did if filtered else 0)

    def program(iommu):
        iommu.regs.hpm.write_evt(index, value, (1 << 64) - 1)
    return f"hpm[{index}] = event {int(event)} filtered={filtered}", twins.both(program)

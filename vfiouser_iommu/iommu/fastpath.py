"""The C translation fast path (c_ext/, built by cffi) and how it stays an exact twin of
the Python reference (spec v1.0.1 §3.3; design and rules in docs/fastpath.md).

`attach(iommu)` runs at the end of `RiscvIommu.__init__`. When the extension is built
and enabled it turns the instance into a subclass (`FastIommu`) whose `translate` (for
Untranslated requests) and `dma_view` (every endpoint DMA) run in C, and falls back to
the inherited Python code for everything C does not decide: C answers "fall back"
before any side effect, so Python then runs the request from the very same state.

Where the cache state lives: **Python's caches stay authoritative and complete**; C
holds a mirror of `caches.ddt`, `caches.pdt`, `caches.iotlb` and `caches.gtlb` (keys,
values, LRU order, the IOTLB page-size order). Two directions keep them equal:

* Python → C, eagerly: the mirrored dictionaries (`_MirrorOps`) repeat every
  `__setitem__`, `__delitem__`, `pop`, `popitem`, `move_to_end` and `clear` in C, after
  flushing what C did before. Anything else (an unknown method, a replaced object, a
  value of an unknown type) marks the mirror stale; the next fast call rebuilds it.
* C → Python, lazily: a C hit only touches the C LRU list and bumps counters. Those
  changes (statistics, HPM event counts, touched entries in LRU order, C's inserts and
  evictions) are replayed into the Python objects by `FastPath.flush`, which runs
  whenever anyone reads `iommu.caches` or `iommu.counters` and before any Python-side
  cache change. Readers therefore always see exactly what pure Python would show.

The fast path steps aside (plain Python for every request) while
`iommu.needs_reference_path` is True, while an HPM counter watches an event C would
count, while any guest memory is poisoned, and while the mirror cannot be built.

`VFIOUSER_IOMMU_PURE=1` in the environment, or `set_enabled(False)` (tests:
`implementation("python")`), makes IOMMUs created afterwards pure Python.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from vfiouser_iommu.iommu.caches import TlbEntry, TranslationCaches
from vfiouser_iommu.iommu.directory import DeviceContext, ProcessContext
from vfiouser_iommu.iommu.dma import IommuDmaView, RequesterStats
from vfiouser_iommu.iommu.request import Access, HpmEvent, RequestKind, Translation
from vfiouser_iommu.memory import DmaAttrs

log = logging.getLogger(__name__)

#: must equal FP_ABI of c_ext/fastpath.h: an extension built from older sources is unused
ABI = 5

try:
    from vfiouser_iommu._fastpath import ffi, lib
except ImportError as e:  # not built (no compiler) or not installed through setup.py
    ffi = lib = None
    _why_missing = f"the extension is not built ({e})"
else:
    if lib.fp_abi() != ABI:
        _why_missing = f"the extension is stale (ABI {lib.fp_abi()}, need {ABI}): reinstall"
        ffi = lib = None
    else:
        _why_missing = ""

_enabled = os.environ.get("VFIOUSER_IOMMU_PURE", "") in ("", "0")
_warned = False

NONE = (1 << 64) - 1
#: HPM events C counts (the others are only ever counted by the Python path)
FAST_EVENTS = frozenset({HpmEvent.UNTRANSLATED_REQ, HpmEvent.IOTLB_MISS,
                         HpmEvent.S_STAGE_WALK, HpmEvent.G_STAGE_WALK})
_READ, _WRITE = Access.READ, Access.WRITE
_UNTRANSLATED = RequestKind.UNTRANSLATED
#: (stats counter, kind) of each pending statistic, in fastpath.h order
_STATS = (("hits", "ddt"), ("hits", "pdt"), ("hits", "iotlb"), ("hits", "gtlb"),
          ("misses", "iotlb"), ("misses", "gtlb"), ("walks", "first_stage"),
          ("walks", "g_stage"))
_NSTAT, _NEVENT, _NDEV, _RECORD = 8, 9, 8, 32
#: RequesterStats fields, then the device_walks events, in fastpath.h order
_DEV_STATS = ("reads", "writes", "bytes_read", "bytes_written", "translations")
_DEV_EVENTS = (HpmEvent.IOTLB_MISS, HpmEvent.S_STAGE_WALK, HpmEvent.G_STAGE_WALK)
_DDT, _PDT, _IOTLB, _GTLB = range(4)
_CACHE_NAMES = ((_DDT, "ddt"), (_PDT, "pdt"), (_IOTLB, "iotlb"), (_GTLB, "gtlb"))
_DMA_DONE, _DMA_TRANSLATE_PY, _DMA_COPY_PY, _DMA_REFUSED = range(4)
_TRANSLATE_ONLY = 8
get_ident = threading.get_ident
fp_translate = lib.fp_translate if lib is not None else None
fp_dma = lib.fp_dma if lib is not None else None
view_dma = lib.fp_view_dma if lib is not None else None
view_read_int = lib.fp_view_read_int if lib is not None else None
view_write_int = lib.fp_view_write_int if lib is not None else None
_AGAIN = (1 << 64) - 9   # FP_AGAIN


def available() -> bool:
    """Whether the C extension is built and current."""
    return lib is not None


def enabled() -> bool:
    """Whether IOMMUs created now get the fast path."""
    return _enabled and lib is not None


def set_enabled(on: bool) -> None:
    """Programmatic `VFIOUSER_IOMMU_PURE`: affects IOMMUs created afterwards."""
    global _enabled
    _enabled = on


@contextmanager
def implementation(name: str) -> Iterator[None]:
    """Create IOMMUs with the "c" fast path or in pure "python" inside the block."""
    if name not in ("c", "python"):
        raise ValueError(f"no translation implementation {name!r}")
    if name == "c" and lib is None:
        raise RuntimeError(f"the C fast path is unavailable: {_why_missing}")
    global _enabled
    old, _enabled = _enabled, name == "c"
    try:
        yield
    finally:
        _enabled = old


def attach(iommu) -> None:
    """Give `iommu` (a plain RiscvIommu) the fast path, if it is built and enabled."""
    global _warned
    if not _enabled:
        return
    if lib is None:
        if not _warned:
            _warned = True
            log.warning("C translation fast path unavailable, translating in pure Python: %s",
                        _why_missing)
        return
    if not _warned:
        _warned = True
        log.info("translation fast path: C (VFIOUSER_IOMMU_PURE=1 for pure Python)")
    FastPath(iommu)


def _fast_class(base: type) -> type:
    cls = _FAST_CLASSES.get(base)
    if cls is None:
        attrs = {"_reference": base}
        if not hasattr(base, "needs_reference_path"):
            # Until the core defines it: a class attribute, because getattr() with a
            # default costs an exception (~1 us) on every call when it is missing.
            attrs["needs_reference_path"] = False
        cls = type("Fast" + base.__name__, (FastIommu, base), attrs)
        _FAST_CLASSES[base] = cls
    return cls


_FAST_CLASSES: dict[type, type] = {}


# -- conversions between Python cache entries and C words --------------------------------
def _opt(value: int | None) -> int:
    return NONE if value is None else value


def _unopt(word: int) -> int | None:
    return None if word == NONE else word


def _ddt_key(key) -> tuple:
    return (key, 0, 0, 0)


def _pdt_key(key) -> tuple:
    return (key[0], key[1], 0, 0)


def _iotlb_key(key) -> tuple:
    (gscid, pscid), shift, vpn = key
    return (_opt(gscid), _opt(pscid), shift, vpn)


def _gtlb_key(key) -> tuple:
    (gscid,), shift, vpn = key
    return (gscid, 0, shift, vpn)


def _dc_words(dc) -> tuple:
    if type(dc) is not DeviceContext:
        raise TypeError("not a DeviceContext")
    return (dc.tc, dc.iohgatp, dc.ta, dc.fsc, dc.msiptp, dc.msi_addr_mask,
            dc.msi_addr_pattern, dc.reserved, 0, 0)


def _pc_words(pc) -> tuple:
    if type(pc) is not ProcessContext:
        raise TypeError("not a ProcessContext")
    return (pc.ta, pc.fsc, 0, 0, 0, 0, 0, 0, 0, 0)


def _tlb_words(e) -> tuple:
    if type(e) is not TlbEntry:
        raise TypeError("not a TlbEntry")
    return (_opt(e.gscid), _opt(e.pscid), e.va_base, e.size, e.out_base, _opt(e.fs_flags),
            _opt(e.gs_flags), e.pbmt, 0 if e.gpa_base is None else e.gpa_base,
            int(e.gpa_base is not None))


_TO_C = {_DDT: (_ddt_key, _dc_words), _PDT: (_pdt_key, _pc_words),
         _IOTLB: (_iotlb_key, _tlb_words), _GTLB: (_gtlb_key, _tlb_words)}


def _py_key(k: int, w: list[int]):
    if k == _DDT:
        return w[0]
    if k == _PDT:
        return (w[0], w[1])
    if k == _IOTLB:
        return ((_unopt(w[0]), _unopt(w[1])), w[2], w[3])
    return ((w[0],), w[2], w[3])


def _tlb_entry(rec: list[int]) -> TlbEntry:
    v = rec[5:15]
    ngl = rec[15]
    leaves = tuple((rec[16 + 2 * j], rec[17 + 2 * j]) for j in range(ngl))
    return TlbEntry(_unopt(v[0]), _unopt(v[1]), v[2], v[3], v[4], _unopt(v[5]), _unopt(v[6]),
                    v[7], v[8] if v[9] else None, leaves)


_new = object.__new__
#: the fields of a C translation's Translation that depend only on its permissions
_TEMPLATES = tuple({"r": bool(perms & 1), "w": bool(perms & 2), "x": bool(perms & 4),
                    "u": False, "g": bool(perms & 16), "msi": False, "mrif": None}
                   for perms in range(32))


def _translation(address: int, size: int, perms: int, pbmt: int, gpa: int | None):
    """Translation(...) without the frozen dataclass's per-field __setattr__ (3x faster):
    the same object, built in the instance dict from a per-permission template."""
    t = _new(Translation)
    d = t.__dict__
    d.update(_TEMPLATES[perms])
    d["address"] = address
    d["page_size"] = size
    d["pbmt"] = pbmt
    d["gpa"] = gpa
    return t


# -- the mirrored Python caches ---------------------------------------------------------
class _MirrorOps:
    """OrderedDict mutations repeated in the C mirror (`_fp`, cache `_k`).

    Each first lets C's own pending changes reach Python (so both sides apply the
    operation to the same state), then changes the Python dict, then C. `pop` and
    `popitem` are written in terms of `__delitem__` because OrderedDict's own versions
    call `__delitem__` on subclasses anyway.
    """

    def __setitem__(self, key, value):
        fp = self._fp
        fp.before_change()
        OrderedDict.__setitem__(self, key, value)
        fp.mirror(self._k, lib.fp_cache_set, key, value)

    def __delitem__(self, key):
        fp = self._fp
        fp.before_change()
        OrderedDict.__delitem__(self, key)
        fp.mirror(self._k, lib.fp_cache_del, key)

    def pop(self, key, *default):
        self._fp.before_change()
        if OrderedDict.__contains__(self, key):
            value = OrderedDict.__getitem__(self, key)
            self.__delitem__(key)
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self, last: bool = True):
        self._fp.before_change()
        if not len(self):
            raise KeyError("dictionary is empty")
        key = next(reversed(self)) if last else next(iter(self))
        value = OrderedDict.__getitem__(self, key)
        self.__delitem__(key)
        return key, value

    def move_to_end(self, key, last: bool = True):
        fp = self._fp
        fp.before_change()
        OrderedDict.move_to_end(self, key, last)
        fp.mirror(self._k, lib.fp_cache_move, key, int(last))

    def clear(self):
        fp = self._fp
        fp.before_change()
        OrderedDict.clear(self)
        if not fp.stale and lib.fp_cache_clear(fp.c, self._k) != 0:
            fp.mark_stale()

    def setdefault(self, key, default=None):
        self._fp.before_change()
        self._fp.mark_stale()
        return OrderedDict.setdefault(self, key, default)

    def update(self, *args, **kwargs):
        self._fp.before_change()
        self._fp.mark_stale()
        OrderedDict.update(self, *args, **kwargs)

    def __ior__(self, other):
        self.update(other)
        return self


class _MirroredDict(_MirrorOps, OrderedDict):
    """`Tlb.entries` once the fast path mirrors it."""


class _AttributeHook:
    """Reassigning a cache's parts (or its `limit`) re-synchronises the mirror."""

    def __setattr__(self, name, value):
        fp = self.__dict__.get("_fp")
        if fp is not None:
            fp.before_change()
        super().__setattr__(name, value)
        if fp is not None and name in self._watched:
            fp.mark_stale()


def _hooked(obj, mixin: type, **attrs) -> None:
    """Make `obj` an instance of a subclass of its class with `mixin` first."""
    base = type(obj)
    if not issubclass(base, mixin):
        key = (base, mixin)
        cls = _HOOKED.get(key)
        if cls is None:
            cls = type(base.__name__, (mixin, base), {})
            _HOOKED[key] = cls
        obj.__class__ = cls
    obj.__dict__.update(attrs)


_HOOKED: dict[tuple[type, type], type] = {}


class _LruHook(_AttributeHook, _MirrorOps):
    _watched = frozenset({"limit"})


class _TlbHook(_AttributeHook):
    _watched = frozenset({"limit", "entries", "shifts"})


class _CachesHook(_AttributeHook):
    _watched = frozenset({"ddt", "pdt", "iotlb", "gtlb", "stats"})


# -- the fast path of one IOMMU ---------------------------------------------------------
class FastPath:
    """The C state of one RiscvIommu and the bookkeeping that keeps it exact."""

    def __init__(self, iommu):
        self.iommu = iommu
        self.c = ffi.gc(lib.fp_new(), lib.fp_free)
        self.out = ffi.new("uint64_t[6]")
        self.out_words = memoryview(ffi.buffer(self.out)).cast("Q")
        self._owner = threading.get_ident()
        self._flush_buf = ffi.new("uint64_t[]", 4096)
        self._flush_lock = threading.Lock()
        self._key = ffi.new("uint64_t[4]")
        self._value = ffi.new("uint64_t[10]")
        self.ok = False             # C may run now
        self.stale = True           # the mirror must be rebuilt from Python
        self.resync_wanted = True   # something changed since the last failed rebuild
        self.poisoned = False
        cfg = iommu.config
        lib.fp_configure(self.c, cfg.pas, int(cfg.svpbmt), int(cfg.msi_flat))
        d = iommu.__dict__
        d["count_event"] = iommu.count_event
        d["_fast"] = self
        self._reference = type(iommu)
        iommu.__class__ = _fast_class(type(iommu))
        self.push_regs()
        iommu.memory.add_listener(self.memory_changed)
        self.memory_changed()
        hpm = getattr(getattr(iommu, "regs", None), "hpm", None)
        if hpm is not None:
            self._watch_hpm(hpm)
        self.refresh()

    # -- state the C side copies ---------------------------------------------------------
    def push_regs(self) -> None:
        d = self.iommu.__dict__
        lib.fp_set_regs(self.c, d["ddtp"] & NONE, d["fctl"] & NONE)

    def memory_changed(self) -> None:
        """Rebuild C's region table (before a removed region's mmap can be closed).

        C keeps raw addresses, not buffer exports: each `Region.buffer` pins its memory
        for as long as the region is mapped, and GuestMemory calls this before it hands
        a removed region back to be released.
        """
        memory = self.iommu.memory
        regions = memory.regions
        n = len(regions)
        gpa = ffi.new("uint64_t[]", [r.gpa for r in regions] or [0])
        size = ffi.new("uint64_t[]", [r.size for r in regions] or [0])
        host = ffi.new("char *[]", n or 1)
        for j, region in enumerate(regions):
            exported = ffi.from_buffer(region.buffer)
            host[j] = ffi.cast("char *", ffi.cast("uintptr_t", exported))
            ffi.release(exported)
        writable = ffi.new("int[]", [int(r.writable) for r in regions] or [0])
        lib.fp_set_regions(self.c, n, gpa, size, host, writable)
        poisoned = bool(memory.poisoned_ranges)
        if poisoned != self.poisoned:
            self.poisoned = poisoned
            self.refresh()

    def _watch_hpm(self, hpm) -> None:
        for name in ("_reindex", "reset"):
            method = getattr(hpm, name)

            def wrapped(*args, _method=method, **kwargs):
                result = _method(*args, **kwargs)
                self.refresh()
                return result

            setattr(hpm, name, wrapped)

    def _plain_counting(self) -> bool:
        """Whether C may count events by adding to `iommu.counters` (no HPM counter
        watches them, and no other hook listens)."""
        fn = self.iommu.__dict__["count_event"]
        chain = getattr(fn, "hpm_chain", None)
        if chain is not None:
            fn, hpm = chain
            if FAST_EVENTS & hpm.counters_by_event.keys():
                return False
        return getattr(fn, "__func__", None) is self._reference.count_event and \
            getattr(fn, "__self__", None) is self.iommu

    def refresh(self) -> None:
        """Recompute whether C may run."""
        self.ok = not self.stale and not self.poisoned and self._plain_counting()

    def revive(self) -> bool:
        """Called when `ok` is False: rebuild a stale mirror if anything changed."""
        if self.stale and self.resync_wanted:
            self.resync()
        return self.ok

    # -- the mirror ------------------------------------------------------------------------
    def mark_stale(self) -> None:
        self.stale = True
        self.resync_wanted = True
        self.ok = False

    def before_change(self) -> None:
        if lib.fp_pending(self.c):
            self.flush()

    def mirror(self, k: int, op, key, *args) -> None:
        """Repeat one Python-side dict operation in C (or give up on the mirror)."""
        if self.stale:
            self.resync_wanted = True
            return
        to_key, to_value = _TO_C[k]
        try:
            self._key[0:4] = to_key(key)
            if op is lib.fp_cache_set:
                self._value[0:10] = to_value(args[0])
                rc = op(self.c, k, self._key, self._value)
            else:
                rc = op(self.c, k, self._key, *args)
        except (TypeError, ValueError, OverflowError):
            rc = -3
        if rc != 0:
            self.mark_stale()

    def _caches(self) -> TranslationCaches:
        return self.iommu.__dict__["caches"]

    def adopt(self, caches: TranslationCaches) -> None:
        """Hook `caches` and its four mirrored parts."""
        _hooked(caches, _CachesHook, _fp=self)
        for k, name in _CACHE_NAMES:
            part = getattr(caches, name)
            if k in (_DDT, _PDT):
                _hooked(part, _LruHook, _fp=self, _k=k)
            else:
                _hooked(part, _TlbHook, _fp=self)
                if type(part.entries) is not _MirroredDict or part.entries._fp is not self:
                    entries = _MirroredDict()
                    entries.__dict__.update(_fp=self, _k=k)
                    for key, value in part.entries.items():
                        OrderedDict.__setitem__(entries, key, value)
                    object.__setattr__(part, "entries", entries)

    def resync(self) -> None:
        """Rebuild the whole C mirror from the Python caches."""
        self.resync_wanted = False
        if lib.fp_pending(self.c):
            self.flush()
        caches = self._caches()
        self.adopt(caches)
        try:
            for k, name in _CACHE_NAMES:
                part = getattr(caches, name)
                lib.fp_cache_reset(self.c, k, part.limit)
                items = part.items() if k in (_DDT, _PDT) else part.entries.items()
                to_key, to_value = _TO_C[k]
                for key, value in items:
                    self._key[0:4] = to_key(key)
                    self._value[0:10] = to_value(value)
                    if lib.fp_cache_set(self.c, k, self._key, self._value) != 0:
                        raise ValueError("C mirror refused an entry")
                if k in (_IOTLB, _GTLB):
                    shifts = list(part.shifts)
                    if lib.fp_cache_set_shifts(self.c, k, len(shifts),
                                               ffi.new("int[]", shifts or [0])) != 0:
                        raise ValueError("Tlb.shifts does not match its entries")
        except (TypeError, ValueError, OverflowError, AttributeError) as e:
            log.debug("fast path off until the caches change: %s", e)
            self.stale = True
            self.ok = False
            return
        self.stale = False
        self.refresh()

    def flush(self) -> None:
        """Replay into the Python objects what C did since the last flush.

        One C call exports it and marks it flushed atomically (another thread's C calls
        cannot slip in between); the lock keeps two flushes from interleaving.
        """
        if not lib.fp_pending(self.c):
            return
        with self._flush_lock:
            words = self._export()
            if words:
                self._apply(words)

    def _export(self) -> list[int]:
        buf = self._flush_buf
        n = lib.fp_flush(self.c, buf, len(buf))
        while n < 0:
            buf = self._flush_buf = ffi.new("uint64_t[]", -n + 1024)
            n = lib.fp_flush(self.c, buf, len(buf))
        return ffi.unpack(buf, n)

    def _apply(self, words: list[int]) -> None:
        iommu_dict = self.iommu.__dict__
        caches = iommu_dict["caches"]
        stats = caches.stats
        for (counter, kind), n in zip(_STATS, words, strict=False):
            if n:
                getattr(stats, counter)[kind] += n
        counters = iommu_dict["counters"]
        for event in FAST_EVENTS:
            n = words[_NSTAT + event]
            if n:
                counters[event] += n
        at = self._apply_devices(words, _NSTAT + _NEVENT)
        for k, name in _CACHE_NAMES:
            part = getattr(caches, name)
            tlb = k in (_IOTLB, _GTLB)
            at = self._replay(k, part.entries if tlb else part, words, at)
            n = words[at]
            at += 1
            if tlb:
                shifts = part.shifts
                shifts.clear()
                for j in range(n):
                    shifts[words[at + 2 * j]] = words[at + 2 * j + 1]
            at += 2 * n

    def _apply_devices(self, words: list[int], at: int) -> int:
        """Per-requester DMA statistics and walk counts (what RiscvIommu.count_event and
        IommuDmaView.pieces count per device)."""
        iommu_dict = self.iommu.__dict__
        requester_stats = iommu_dict["requester_stats"]
        device_walks = iommu_dict["device_walks"]
        n = words[at]
        at += 1
        for _ in range(n):
            did, counts = words[at], words[at + 1:at + 1 + _NDEV]
            at += 1 + _NDEV
            if any(counts[:len(_DEV_STATS)]):
                stats = requester_stats.get(did)
                if stats is None:
                    stats = requester_stats[did] = RequesterStats()
                for name, count in zip(_DEV_STATS, counts, strict=False):
                    if count:
                        setattr(stats, name, getattr(stats, name) + count)
            for event, count in zip(_DEV_EVENTS, counts[len(_DEV_STATS):], strict=True):
                if count:
                    device_walks[did, event] += count
        return at

    @staticmethod
    def _replay(k: int, d: OrderedDict, words: list[int], at: int) -> int:
        """Apply one cache's removed keys and touched suffix; return where the next
        part of `words` starts. The base-class methods keep this from being mirrored."""
        n = words[at]
        at += 1
        for j in range(n):
            key = _py_key(k, words[at + 4 * j:at + 4 * j + 4])
            if OrderedDict.__contains__(d, key):
                OrderedDict.__delitem__(d, key)
        at += 4 * n
        n = words[at]
        at += 1
        for j in range(n):
            rec = words[at + _RECORD * j:at + _RECORD * (j + 1)]
            key = _py_key(k, rec)
            if rec[4]:
                OrderedDict.__setitem__(d, key, _tlb_entry(rec))
            if OrderedDict.__contains__(d, key):
                OrderedDict.move_to_end(d, key)
        return at + _RECORD * n


class FastIommu:
    """Mixed in before RiscvIommu by `attach`: the C fast path in front of the reference.

    `ddtp`/`fctl` writes reach C at once; reading `caches` or `counters` first replays
    what C did (so callers always see pure Python's state); replacing `count_event`
    (an HPM or tracing hook) is noticed.
    """

    _reference: type

    def translate(self, request):
        fp = self.__dict__["_fast"]
        if request.kind is _UNTRANSLATED and (fp.ok or fp.revive()) and \
                not self.needs_reference_path:
            pid = request.process_id
            access = request.access
            mine = get_ident() == fp._owner
            out = fp.out if mine else ffi.new("uint64_t[6]")
            try:
                rc = fp_translate(fp.c, request.device_id, -1 if pid is None else pid,
                                  request.iova, 0 if access is _READ else
                                  1 if access is _WRITE else 2, request.privileged, out)
            except (OverflowError, TypeError):
                rc = 1
            if not rc:
                address, size, perms, pbmt, gpa, has_gpa = \
                    fp.out_words.tolist() if mine else ffi.unpack(out, 6)
                return _translation(address, size, perms, pbmt, gpa if has_gpa else None)
        return self._reference.translate(self, request)

    def dma_view(self, device_id: int, process_id: int | None = None,
                 privileged: bool = False):
        return FastDmaView(self, device_id, process_id, privileged)

    def __copy__(self):
        """A copy (the walk explainer's side-effect-free probe) is a plain reference
        IOMMU: the C state, and the hooks on the caches, belong to this object alone."""
        fp = self.__dict__["_fast"]
        fp.before_change()
        other = _new(self._reference)
        state = dict(self.__dict__)
        del state["_fast"]
        other.__dict__.update(state)
        return other

    @property
    def caches(self):
        d = self.__dict__
        fp = d["_fast"]
        if lib.fp_pending(fp.c):
            fp.flush()
        return d["caches"]

    @caches.setter
    def caches(self, value):
        d = self.__dict__
        d["_fast"].before_change()
        d["caches"] = value
        d["_fast"].mark_stale()

    @property
    def counters(self):
        d = self.__dict__
        fp = d["_fast"]
        if lib.fp_pending(fp.c):
            fp.flush()
        return d["counters"]

    @counters.setter
    def counters(self, value):
        d = self.__dict__
        d["_fast"].before_change()
        d["counters"] = value

    @property
    def requester_stats(self):
        d = self.__dict__
        fp = d["_fast"]
        if lib.fp_pending(fp.c):
            fp.flush()
        return d["requester_stats"]

    @property
    def device_walks(self):
        d = self.__dict__
        fp = d["_fast"]
        if lib.fp_pending(fp.c):
            fp.flush()
        return d["device_walks"]

    @property
    def count_event(self):
        return self.__dict__["count_event"]

    @count_event.setter
    def count_event(self, value):
        d = self.__dict__
        d["_fast"].before_change()
        d["count_event"] = value
        d["_fast"].refresh()

    @property
    def ddtp(self):
        return self.__dict__["ddtp"]

    @ddtp.setter
    def ddtp(self, value):
        self.__dict__["ddtp"] = value
        self.__dict__["_fast"].push_regs()

    @property
    def fctl(self):
        return self.__dict__["fctl"]

    @fctl.setter
    def fctl(self, value):
        self.__dict__["fctl"] = value
        self.__dict__["_fast"].push_regs()


# -- endpoint DMA -------------------------------------------------------------------------
class _Scratch:
    """The buffers one thread hands to C: results, the pieces C translated, data."""

    def __init__(self, capacity: int):
        self.stop = ffi.new("uint64_t[2]")
        self.capacity = 0
        self.grow(capacity)

    def grow(self, length: int) -> None:
        self.capacity = max(length, 2 * self.capacity)
        self.buf = ffi.new("unsigned char[]", self.capacity)
        self.bytes = ffi.buffer(self.buf)
        self.max_pieces = (self.capacity >> 12) + 2
        self.pieces = ffi.new("uint64_t[]", 2 * self.max_pieces)


class FastDmaView(IommuDmaView):
    """`IommuDmaView` whose translate-and-copy loop runs in C.

    What C leaves undone is finished by the inherited Python code from where C stopped:
    the pieces C translated are kept (their side effects happened, as they would have in
    Python), the rest is translated by `more_pieces`, and the copy is the shared
    `read_pieces`/`write_pieces` loop.

    Calls with the view's own `attrs`, from the thread that made the view, go through a
    C view (`fp_view`: the requester's attributes and a pieces buffer, so a call passes
    3 or 4 arguments); other calls pass everything (`fp_dma`) with buffers of their own.
    """

    def __init__(self, iommu, device_id: int, process_id: int | None = None,
                 privileged: bool = False):
        self._view = None
        super().__init__(iommu, device_id, process_id, privileged)
        self._fp = iommu.__dict__["_fast"]
        self._owner = get_ident()
        self._own = _Scratch(4096)
        self._make_view()

    @property
    def attrs(self) -> DmaAttrs:
        return self.__dict__["attrs"]

    @attrs.setter
    def attrs(self, value: DmaAttrs) -> None:
        self.__dict__["attrs"] = value
        if self.__dict__.get("_fp") is not None:
            self._make_view()

    def _make_view(self) -> None:
        attrs = self.attrs
        pid = attrs.pasid
        try:
            view = lib.fp_view_new(self._fp.c, self.device_id, -1 if pid is None else pid,
                                   attrs.privileged, attrs.execute)
        except (OverflowError, TypeError):
            self._view = None
            return
        self._view = ffi.gc(view, lib.fp_view_free)

    def _scratch(self, length: int) -> _Scratch:
        s = self._own if get_ident() == self._owner else _Scratch(4096)
        if length > s.capacity:
            s.grow(length)
        return s

    def _mine(self):
        """The C view when this call may use it: fast path on, owner thread."""
        fp = self._fp
        if (fp.ok or fp.revive()) and not self.iommu.needs_reference_path and \
                get_ident() == self._owner:
            return self._view
        return None

    def _continue(self, rc: int, start: int, pairs: list[int], addr: int, length: int,
                  write: bool, attrs: DmaAttrs) -> list:
        """C's pieces, then Python's translations from where C stopped (C counted the
        request, and its translations only if it translated every piece)."""
        pieces = [(pairs[2 * j], pairs[2 * j + 1], None) for j in range(len(pairs) // 2)]
        if rc == _DMA_COPY_PY:
            return pieces
        pieces = self.more_pieces(addr, length, write, attrs, start, pieces)
        self.stats.translations += len(pieces)
        return pieces

    def _view_rest(self, view, rc: int, addr: int, length: int, write: bool) -> list:
        pairs = ffi.unpack(view.pieces, 2 * view.npieces) if view.npieces else []
        return self._continue(rc, view.stop, pairs, addr, length, write, self.attrs)

    def _args_dma(self, addr: int, length: int, access: int, attrs: DmaAttrs, data,
                  write: bool):
        """fp_dma with every argument: (rc, pieces or None); rc None: not C's."""
        fp = self._fp
        if not (fp.ok or fp.revive()) or self.iommu.needs_reference_path:
            return None, None
        s = self._scratch(length)
        pid = attrs.pasid
        try:
            rc = fp_dma(fp.c, self.device_id, -1 if pid is None else pid, attrs.privileged,
                        access, addr, length, s.buf if data is None else data, s.pieces,
                        s.max_pieces, s.stop)
        except (OverflowError, TypeError):
            return None, None
        if rc == _DMA_REFUSED:
            return None, None
        if rc == _DMA_DONE:
            return rc, s
        pairs = ffi.unpack(s.pieces, 2 * s.stop[1])
        return rc, self._continue(rc, s.stop[0], pairs, addr, length, write, attrs)

    def pieces(self, addr: int, length: int, write: bool, attrs: DmaAttrs) -> list:
        """`IommuDmaView.pieces` translated in C (for callers that move the data
        themselves, e.g. scatter-gather I/O straight into guest RAM)."""
        if length > 0:
            access = (1 if write else 2 if attrs.execute else 0) | _TRANSLATE_ONLY
            rc, result = self._args_dma(addr, length, access, attrs, ffi.NULL, write)
            if rc == _DMA_DONE:     # every piece translated (and counted) by C
                s = result
                pairs = ffi.unpack(s.pieces, 2 * s.stop[1])
                return self._continue(_DMA_COPY_PY, s.stop[0], pairs, addr, length, write,
                                      attrs)
            if rc is not None:
                return result
        return super().pieces(addr, length, write, attrs)

    # The methods below are the hot path of every endpoint: kept flat on purpose.
    def read_as(self, addr: int, length: int, attrs: DmaAttrs) -> bytes:
        if length <= 0:
            return b""
        view = self._mine() if attrs is self.__dict__["attrs"] else None
        if view is not None:
            s = self._own
            if length > s.capacity:
                s.grow(length)
            try:
                rc = view_dma(view, addr, length, 2 if attrs.execute else 0, s.buf)
            except (OverflowError, TypeError):
                rc = _DMA_REFUSED
            if rc == _DMA_DONE:
                return s.bytes[:length]
            if rc != _DMA_REFUSED:
                return self.read_pieces(addr, length,
                                        self._view_rest(view, rc, addr, length, False))
        else:
            rc, result = self._args_dma(addr, length, 2 if attrs.execute else 0, attrs, None,
                                        False)
            if rc == _DMA_DONE:
                return result.bytes[:length]
            if rc is not None:
                return self.read_pieces(addr, length, result)
        return super().read_as(addr, length, attrs)

    def write_as(self, addr: int, data, attrs: DmaAttrs) -> None:
        length = len(data)
        if not length:
            return None
        if type(data) is memoryview and (data.itemsize != 1 or not data.c_contiguous):
            return super().write_as(addr, data, attrs)
        view = self._mine() if attrs is self.__dict__["attrs"] else None
        if view is not None:
            try:
                rc = view_dma(view, addr, length, 1, ffi.from_buffer(data))
            except (OverflowError, TypeError):
                rc = _DMA_REFUSED
            if rc == _DMA_DONE:
                return None
            if rc != _DMA_REFUSED:
                return self.write_pieces(addr, data,
                                         self._view_rest(view, rc, addr, length, True))
        else:
            rc, result = self._args_dma(addr, length, 1, attrs, ffi.from_buffer(data), True)
            if rc == _DMA_DONE:
                return None
            if rc is not None:
                return self.write_pieces(addr, data, result)
        return super().write_as(addr, data, attrs)

    def read(self, addr: int, length: int) -> bytes:
        return self.read_as(addr, length, self.__dict__["attrs"])

    def write(self, addr: int, data) -> None:
        self.write_as(addr, data, self.__dict__["attrs"])

    def read_int(self, addr: int, size: int) -> int:
        view = self._mine()
        if view is not None and 0 < size <= 8:
            try:
                value = view_read_int(view, addr, size)
            except (OverflowError, TypeError):
                return super().read_int(addr, size)
            if value != _AGAIN:
                return value
            rc = view.status
            if rc == _DMA_DONE:
                return value
            if rc != _DMA_REFUSED:
                data = self.read_pieces(addr, size, self._view_rest(view, rc, addr, size, False))
                return int.from_bytes(data, "little")
        return super().read_int(addr, size)

    def write_int(self, addr: int, size: int, value: int) -> None:
        view = self._mine()
        if view is not None and 0 < size <= 8:
            value &= (1 << (8 * size)) - 1
            try:
                rc = view_write_int(view, addr, size, value)
            except (OverflowError, TypeError):
                return super().write_int(addr, size, value)
            if rc == _DMA_DONE:
                return None
            if rc != _DMA_REFUSED:
                return self.write_pieces(addr, value.to_bytes(size, "little"),
                                         self._view_rest(view, rc, addr, size, True))
        return super().write_int(addr, size, value)

"""Introspection modes of one IOMMU: the invalidation checker, the cache mode and
negative caching (docs/introspection.md).

`set_modes(iommu, check=..., cache=..., negative=...)` switches them at any time (from
`--iommu` options or the control socket's `set-mode`); what is not given keeps its
value. Every switch empties the caches, which correct software cannot tell from
evictions. It also keeps `iommu.needs_reference_path` current: the fast path steps
aside while any of these is on, or while translations are traced.

| mode | spec v1.0.1 |
|---|---|
| cache=spec | what the model always did: bounded LRU caches of what §10 allows |
| cache=max  | allowed: caches everything §10 allows, never evicts, keeps superpages per 4 KiB |
| cache=none | allowed: caches nothing |
| negative=on | deviation: caches V=0 entries (§10 forbids it) |
| check=on | no effect on translation: warnings only |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vfiouser_iommu.iommu.caches import CACHE_MODES
from vfiouser_iommu.iommu.checker import InvalidationChecker


@dataclass(frozen=True)
class Modes:
    check: bool = False
    cache: str = "spec"
    negative: bool = False
    trace_translations: bool = False

    def as_dict(self) -> dict:
        return {"check": self.check, "cache": self.cache, "negative": self.negative,
                "trace_translations": self.trace_translations}


def modes_of(iommu) -> Modes:
    return getattr(iommu, "modes", Modes())


def set_modes(iommu, *, check: bool | None = None, cache: str | None = None,
              negative: bool | None = None,
              trace_translations: bool | None = None) -> Modes:
    """Switch modes (None: unchanged); return the modes now in force.

    Turning the checker off drops it with its findings; turning it on while on keeps
    them. ValueError for an unknown cache mode.
    """
    old = modes_of(iommu)
    new = replace(old, **{k: v for k, v in (("check", check), ("cache", cache),
                                            ("negative", negative),
                                            ("trace_translations", trace_translations))
                          if v is not None})
    if new.cache not in CACHE_MODES:
        raise ValueError(f"cache={new.cache!r}: want one of {', '.join(CACHE_MODES)}")
    checker = iommu.checker if new.check else None
    if new.check and checker is None:
        checker = InvalidationChecker(iommu)
        checker.listeners.extend(getattr(iommu, "stale_listeners", ()))
        _listen_to_commands(iommu, checker)
    if iommu.checker is not None and checker is None:
        _stop_listening(iommu, iommu.checker)
    iommu.checker = checker
    iommu.recorder = checker.recorder if checker is not None else None
    if checker is not None:
        iommu.caches.configure(new.cache, new.negative, checker.lru, checker.tlb)
    else:
        iommu.caches.configure(new.cache, new.negative)
    iommu.modes = new
    iommu.needs_reference_path = (new.check or new.negative or new.cache != "spec"
                                  or new.trace_translations)
    return new


def _listen_to_commands(iommu, checker: InvalidationChecker) -> None:
    regs = getattr(iommu, "regs", None)
    if regs is not None and hasattr(regs, "cq"):
        regs.cq.listeners.append(checker.command)


def _stop_listening(iommu, checker: InvalidationChecker) -> None:
    regs = getattr(iommu, "regs", None)
    if regs is not None and checker.command in regs.cq.listeners:
        regs.cq.listeners.remove(checker.command)


def parse_modes(options: dict[str, str]) -> dict:
    """`set_modes` keywords from `--iommu` options (check=on|off, cache=spec|max|none,
    negative=on|off); ValueError for a bad value."""
    switches = {"on": True, "off": False}
    modes: dict = {}
    for name in ("check", "negative"):
        if name in options:
            if options[name] not in switches:
                raise ValueError(f"riscv-iommu: {name}={options[name]!r}: want on or off")
            modes[name] = switches[options[name]]
    if "cache" in options:
        if options["cache"] not in CACHE_MODES:
            raise ValueError(f"riscv-iommu: cache={options['cache']!r}: want one of "
                             f"{', '.join(CACHE_MODES)}")
        modes["cache"] = options["cache"]
    return modes


MODE_OPTIONS = ("check", "cache", "negative")

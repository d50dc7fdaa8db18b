"""Translation and DMA: the C fast path vs the pure-Python reference, side by side.

Both implementations get the same tables; each round times Python, then C, for every
case, and the table reports the median over rounds of each time and of the per-round
ratio (robust on a machine other jobs share). Never fails on time.

Rows:
* `translate()`: `iommu.translate(Request)` returning a `Translation`, the full API;
  its floor in C mode is building the Translation object (~0.4 us of Python).
* `raw C call`: `lib.fp_translate` called from a Python loop: one cffi call and the C
  translation, no Python object; the ratio is against Python's `translate()`.
* `inside C`: the same translation repeated by C itself (`fp_translate_repeat`), the C
  cost without any call.
* `cffi call`: an empty C call (`fp_pending`), what any call from Python costs.
* DMA rows: `DmaView` methods an endpoint calls, through an identity DC (stock Linux
  uses identity domains) and through an Sv39 IOTLB hit.

Run: .venv/bin/python -m pytest tests/bench/test_bench_translate.py -s -m bench
(BENCH_ROUNDS, BENCH_SECONDS change the rounds and the time per measurement.)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from iommu_tables import LEAF_RWX, RAM_BASE, atp, make_iommu  # noqa: E402

from vfiouser_iommu.iommu import (  # noqa: E402
    Access,
    IommuConfig,
    Request,
    Translation,
    fastpath,
)
from vfiouser_iommu.iommu.walk import SV39, SV39X4  # noqa: E402

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "0.15"))
NO_TLB = IommuConfig(iotlb_entries=0, gtlb_entries=0)
MIB2 = 2 << 20
DID, IDENTITY_DID = 0x10, 0x11
IOVA = 0x4000_0000
DATA = RAM_BASE + (1 << 20)


def _sv39(config=None):
    iommu, b, root = make_iommu(config)
    pt = b.root(SV39)
    for page in range(16):      # 64 KiB of IOVA, mapped page by page
        b.map(SV39, pt, IOVA + page * 4096, DATA + page * 4096)
    b.set_dc(root, 3, DID, 64, ta=1 << 12, fsc=atp(8, pt >> 12))
    b.set_dc(root, 3, IDENTITY_DID, 64)
    return iommu


def _nested(config=None):
    iommu, b, root = make_iommu(config)
    groot = b.root(SV39X4)
    for gpa in range(0, 16 << 20, MIB2):
        b.map(SV39X4, groot, gpa, gpa + RAM_BASE, MIB2, flags=LEAF_RWX)
    gb = replace(b, offset=RAM_BASE)
    fs = gb.root(SV39)
    gb.map(SV39, fs, IOVA, 0x10_0000)
    b.set_dc(root, 3, DID, 64, ta=1 << 12, fsc=atp(8, fs >> 12),
             iohgatp=atp(8, groot >> 12, 3))
    return iommu


def _build(impl: str, world):
    with fastpath.implementation(impl):
        return world()


# Each case: (name, world builder, config, did, run factory, bytes per op or 0).
# A run factory gets the IOMMU and returns run(n), which does n operations.
def _translate(did, iova=IOVA + 0x10):
    def factory(iommu):
        request = Request(did, None, iova, Access.READ)
        translate = iommu.translate
        assert isinstance(translate(request), Translation)

        def run(n):
            for _ in range(n):
                translate(request)
        return run
    return factory


def _raw(did, iova=IOVA + 0x10):
    def factory(iommu):
        fast = iommu.__dict__.get("_fast")
        if fast is None:        # Python's only way to translate
            return _translate(did, iova)(iommu)
        call, c, out = fastpath.lib.fp_translate, fast.c, fast.out
        iommu.translate(Request(did, None, iova, Access.READ))     # DC cached
        assert call(c, did, -1, iova, 0, 0, out) == 0, "C did not serve the request"

        def run(n):
            for _ in range(n):
                call(c, did, -1, iova, 0, 0, out)
        return run
    return factory


def _inside_c(did, iova=IOVA + 0x10):
    def factory(iommu):
        fast = iommu.__dict__.get("_fast")
        if fast is None:
            return _translate(did, iova)(iommu)
        iommu.translate(Request(did, None, iova, Access.READ))
        repeat, c, out = fastpath.lib.fp_translate_repeat, fast.c, fast.out

        def run(n):
            assert repeat(c, did, -1, iova, 0, 0, n, out) == 0
        return run
    return factory


def _empty_call(iommu):
    fast = iommu.__dict__.get("_fast")
    if fast is None:
        def nothing(n):
            for _ in range(n):
                len(())
        return nothing
    call, c = fastpath.lib.fp_pending, fast.c

    def run(n):
        for _ in range(n):
            call(c)
    return run


def _dma(did, method: str, length: int, iova: int):
    def factory(iommu):
        view = iommu.dma_view(did)
        data = bytes(range(256)) * (length // 256 + 1)
        data = data[:length]
        ops = {"read_int": lambda: view.read_int(iova, length),
               "write_int": lambda: view.write_int(iova, length, 0x1234),
               "read": lambda: view.read(iova, length),
               "write": lambda: view.write(iova, data)}
        op = ops[method]
        op()

        def run(n):
            for _ in range(n):
                op()
        return run
    return factory


CASES = [
    ("IOTLB hit (Sv39), translate()", _sv39, _translate(DID), 0),
    ("IOTLB hit (Sv39), raw C call", _sv39, _raw(DID), 0),
    ("IOTLB hit (Sv39), inside C", _sv39, _inside_c(DID), 0),
    ("identity DC, translate()", _sv39, _translate(IDENTITY_DID, DATA), 0),
    ("identity DC, raw C call", _sv39, _raw(IDENTITY_DID, DATA), 0),
    ("Sv39 walk (no IOTLB), translate()", lambda: _sv39(NO_TLB), _translate(DID), 0),
    ("Sv39 walk (no IOTLB), raw C call", lambda: _sv39(NO_TLB), _raw(DID), 0),
    ("nested walk (Sv39 over Sv39x4, no IOTLB/G-TLB), translate()", lambda: _nested(NO_TLB),
     _translate(DID), 0),
    ("nested walk (Sv39 over Sv39x4, no IOTLB/G-TLB), raw C call", lambda: _nested(NO_TLB),
     _raw(DID), 0),
    ("nested IOTLB hit, translate()", _nested, _translate(DID), 0),
    ("cffi call (empty) vs len(())", _sv39, _empty_call, 0),
    ("DMA read_int 2 B, identity", _sv39, _dma(IDENTITY_DID, "read_int", 2, DATA), 0),
    ("DMA write_int 2 B, identity", _sv39, _dma(IDENTITY_DID, "write_int", 2, DATA), 0),
    ("DMA read_int 2 B, Sv39", _sv39, _dma(DID, "read_int", 2, IOVA), 0),
    ("DMA read 4 KiB, identity", _sv39, _dma(IDENTITY_DID, "read", 4096, DATA), 4096),
    ("DMA write 4 KiB, identity", _sv39, _dma(IDENTITY_DID, "write", 4096, DATA), 4096),
    ("DMA read 64 KiB, identity", _sv39, _dma(IDENTITY_DID, "read", 65536, DATA), 65536),
    ("DMA write 64 KiB, identity", _sv39, _dma(IDENTITY_DID, "write", 65536, DATA), 65536),
    ("DMA read 4 KiB, Sv39", _sv39, _dma(DID, "read", 4096, IOVA), 4096),
    ("DMA write 4 KiB, Sv39", _sv39, _dma(DID, "write", 4096, IOVA), 4096),
    ("DMA read 64 KiB, Sv39 (16 pages)", _sv39, _dma(DID, "read", 65536, IOVA), 65536),
    ("DMA write 64 KiB, Sv39 (16 pages)", _sv39, _dma(DID, "write", 65536, IOVA), 65536),
]


def _seconds_per_op(run, seconds: float) -> float:
    n = 1
    while True:             # calibrate: one batch takes about a tenth of the time
        start = time.perf_counter()
        run(n)
        took = time.perf_counter() - start
        if took > seconds / 10:
            break
        n *= 4
    best = took / n
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        run(n)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def _fmt_time(s: float) -> str:
    return f"{s * 1e9:,.0f} ns" if s < 1e-5 else f"{s * 1e6:,.1f} us"


def measure(cases=CASES, rounds=ROUNDS, seconds=SECONDS) -> list[tuple]:
    """(name, python s/op, C s/op, median ratio, bytes) per case."""
    rows = []
    for name, world, factory, size in cases:
        runs = {impl: factory(_build(impl, world)) for impl in ("python", "c")}
        times = {"python": [], "c": []}
        ratios = []
        for _ in range(rounds):
            for impl in ("python", "c"):
                times[impl].append(_seconds_per_op(runs[impl], seconds))
            ratios.append(times["python"][-1] / times["c"][-1])
        rows.append((name, statistics.median(times["python"]), statistics.median(times["c"]),
                     statistics.median(ratios), size))
    return rows


def test_bench_translate():
    if not fastpath.available():
        pytest.fail("the C fast path is not built: reinstall (make venv)")
    rows = measure()
    print(f"\nC fast path vs pure Python, {ROUNDS} rounds, median (best of "
          f"{SECONDS:.2f} s per measurement); ratio = Python time / C time per round")
    print(f"{'case':<62} {'Python':>11} {'C':>11} {'C/Py':>8}")
    for name, py, c, ratio, size in rows:
        extra = f"   {size / c / 1e6:,.0f} vs {size / py / 1e6:,.0f} MB/s" if size else ""
        print(f"{name:<62} {_fmt_time(py):>11} {_fmt_time(c):>11} {ratio:>7.1f}x{extra}")

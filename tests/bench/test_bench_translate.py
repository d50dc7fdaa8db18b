"""Pure-Python translation throughput: a cached hit, an uncached 3-level (Sv39) walk, and
an uncached nested walk (Sv39 over Sv39x4). Prints translations per second; never fails
on time."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from iommu_tables import LEAF_RWX, RAM_BASE, atp, make_iommu  # noqa: E402

from vfiouser_iommu.iommu import Access, IommuConfig, Request, Translation  # noqa: E402
from vfiouser_iommu.iommu.walk import SV39, SV39X4  # noqa: E402

NO_TLB = IommuConfig(iotlb_entries=0, gtlb_entries=0)
MIB2 = 2 << 20


def _rate(iommu, request, seconds=1.0) -> float:
    assert isinstance(iommu.translate(request), Translation)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            iommu.translate(request)
        n += 200
    return n / (time.perf_counter() - start)


def _single_stage(config=None):
    iommu, b, root = make_iommu(config)
    pt = b.root(SV39)
    b.map(SV39, pt, 0x4000_5000, RAM_BASE + (1 << 20))
    b.set_dc(root, 3, 0x10, 64, ta=1 << 12, fsc=atp(8, pt >> 12))
    return iommu


def _nested(config):
    iommu, b, root = make_iommu(config)
    groot = b.root(SV39X4)
    for gpa in range(0, 16 << 20, MIB2):
        b.map(SV39X4, groot, gpa, gpa + RAM_BASE, MIB2, flags=LEAF_RWX)
    gb = replace(b, offset=RAM_BASE)
    fs = gb.root(SV39)
    gb.map(SV39, fs, 0x4000_5000, 0x10_0000)
    b.set_dc(root, 3, 0x10, 64, ta=1 << 12, fsc=atp(8, fs >> 12),
             iohgatp=atp(8, groot >> 12, 3))
    return iommu


@pytest.mark.bench
def test_bench_translate():
    r = Request(0x10, None, 0x4000_5010, Access.READ)
    results = {
        "cached hit (Sv39, IOTLB)": _rate(_single_stage(), r),
        "3-level walk (Sv39, no IOTLB)": _rate(_single_stage(NO_TLB), r),
        "nested walk (Sv39 over Sv39x4, no IOTLB/G-TLB)": _rate(_nested(NO_TLB), r),
        "nested, cached hit": _rate(_nested(None), r),
    }
    for name, rate in results.items():
        print(f"{name}: {rate:,.0f} translations/s")

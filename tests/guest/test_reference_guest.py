"""Guest: a Linux guest on QEMU's built-in riscv-iommu-pci (the reference stack).

Proves the lab works end to end: the riscv-iommu driver probes, the endpoints sit in
IOMMU groups, and a virtio-blk write/read of a few MiB bypassing the page cache
round-trips with matching checksums.
"""

import pytest

from vfiouser_iommu.lab.boot import boot_reference, default_script

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def reference_run(lab):
    return boot_reference(lab, default_script(), timeout=180, echo=None)


def results(run):
    return {r.name: r for r in run.verdict.results}


def test_guest_finishes_with_a_passing_verdict(reference_run):
    assert not reference_run.timed_out
    assert reference_run.verdict.passed, reference_run.verdict.summary() + "\n" + "\n".join(
        reference_run.console[-40:])


def test_riscv_iommu_driver_probed(reference_run):
    r = results(reference_run)["iommu-probed"]
    assert r.passed and "riscv-iommu@0000:00:01.0" in r.detail


def test_endpoints_are_in_iommu_groups(reference_run):
    r = results(reference_run)
    for bdf in ("0000:00:02.0", "0000:00:03.0"):
        assert r[f"iommu-group-{bdf}"].passed, r[f"iommu-group-{bdf}"].detail


def test_virtio_blk_round_trip_checksums_match(reference_run):
    r = results(reference_run)["virtio-blk-roundtrip"]
    assert r.passed, r.detail


def test_driver_logged_no_error(reference_run):
    bad = [line for line in reference_run.console
           if "iommu" in line.lower() and ("error" in line.lower() or "fail" in line.lower())]
    assert not bad

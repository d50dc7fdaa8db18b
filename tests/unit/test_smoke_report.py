"""Unit: the smoke run's KTAP and JUnit renderings, and the KTAP grammar check."""

import xml.etree.ElementTree as ET

import pytest
from junitparser import JUnitXml

from vfiouser_iommu.smoke.battery import SUITES, select
from vfiouser_iommu.smoke.report import Check, KtapError, Suite, ktap, parse_ktap, write_junit


def sample() -> list[Suite]:
    return [
        Suite("probe", [Check("boot", True, 1.5, "init after 1.5s"),
                        Check("iommu-probed", True, 0.2, "riscv-iommu@0000:00:01.0"),
                        Check("virtio-rng", False, 0.1, "read ''",
                              ["--- guest console", "dd: /dev/hwrng: # No such device"])],
              seconds=4.0),
        Suite("reboot", [Check("boot", True, 2.0), Check("second-boot-probe", True, 0.3),
                         Check("later", False, skipped="not selected")], seconds=6.0),
    ]


def test_ktap_of_a_run_parses_back_with_the_same_verdicts():
    text = ktap(sample(), ["kernel 7.2.13"])
    tests = parse_ktap(text)
    assert [(t.name, t.ok) for t in tests] == [("probe", False), ("reboot", True)]
    assert [(t.name, t.ok) for t in tests[0].subtests] == [
        ("boot", True), ("iommu-probed", True), ("virtio-rng", False)]
    assert tests[1].subtests[2].directive == "SKIP not selected"


def test_ktap_carries_times_and_the_failure_evidence_as_diagnostics():
    text = ktap(sample())
    assert "    # iommu-probed: pass in 0.200s: riscv-iommu@0000:00:01.0" in text
    assert "    # dd: /dev/hwrng: # No such device" in text
    # '#' would start a directive on a result line: it never reaches a test name.
    assert "    not ok 3 virtio-rng\n" in text


@pytest.mark.parametrize("broken, why", [
    ("KTAP version 1\n1..2\nok 1 a\n", "plan 1..2 but 1 results"),
    ("KTAP version 1\n1..2\nok 1 a\nok 3 b\n", "test 3, want 2"),
    ("1..1\nok 1 a\n", "want a KTAP version line"),
    ("KTAP version 1\nok 1 a\n", "want a plan line"),
    ("KTAP version 1\n1..1\nfine 1 a\n", "not a KTAP line"),
    ("KTAP version 1\n1..1\n    KTAP version 1\n    1..1\n    not ok 1 x\nok 1 s\n",
     "ok but a subtest failed"),
])
def test_the_ktap_check_rejects_broken_files(broken, why):
    with pytest.raises(KtapError, match=why):
        parse_ktap(broken)


def test_junit_counts_and_failure_text(tmp_path):
    path = tmp_path / "smoke.xml"
    write_junit(sample(), path)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("6", "1", "1")
    xml = JUnitXml.fromfile(str(path))
    suites = {s.name: s for s in xml}
    assert (suites["probe"].tests, suites["probe"].failures) == (3, 1)
    failed = next(c for c in suites["probe"] if c.name == "virtio-rng")
    assert "No such device" in failed.result[0].text
    assert float(failed.time) == pytest.approx(0.1)


def test_only_selects_suites_and_checks_by_name_or_pattern():
    assert [s.name for s, w in select(SUITES, [])] == [s.name for s in SUITES]
    chosen = select(SUITES, ["probe"])
    assert [(s.name, w) for s, w in chosen] == [("probe", set())]
    chosen = select(SUITES, ["iommu-group-*", "second-boot-probe"])
    assert {s.name: w for s, w in chosen} == {
        "probe": {"iommu-group-0000:00:02.0", "iommu-group-0000:00:03.0",
                  "iommu-group-0000:00:04.0"},
        "reboot": {"second-boot-probe"}}
    with pytest.raises(ValueError, match="names no suite or check"):
        select(SUITES, ["no-such-check"])


def test_smoke_runs_the_checker_unless_told_not_to():
    from vfiouser_iommu.smoke.battery import iommu_options

    assert iommu_options("") == "check=on"
    assert iommu_options("svpbmt=off") == "svpbmt=off,check=on"
    assert iommu_options("check=off") == "check=off"
    assert iommu_options("", strict=True) == "check=on,cache=max,negative=on"
    assert iommu_options("cache=spec", strict=True) == "cache=spec,check=on,negative=on"


def test_the_checker_host_check_reads_the_servers_summary(tmp_path):
    from vfiouser_iommu.lab.boot import GuestRun
    from vfiouser_iommu.lab.initramfs import Verdict
    from vfiouser_iommu.smoke.battery import HOST_CHECKS, Boot

    def check(log):
        run = GuestRun(Verdict([], 0), server_log=log)
        return HOST_CHECKS["invalidation-checker"](Boot(run, tmp_path, {}))

    clean = check("x INFO: invalidation checker: 0 distinct stale use(s), 0 use(s) in all\n")
    assert clean.passed
    stale = check("x WARNING: stale use of the IOTLB: leaf PTE at 0x1000 ...\n"
                  "x WARNING: invalidation checker: 1 distinct stale use(s), 3 use(s) in all\n")
    assert not stale.passed and "stale use of the IOTLB" in stale.evidence[0]
    assert not check("no summary at all").passed

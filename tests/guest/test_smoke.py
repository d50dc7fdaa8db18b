"""Guest: `vfiouser-iommu smoke`, the command a kernel CI job runs, on the lab kernel.

It runs as a user runs it (a child process), and its two report files are checked:
KTAP against the format's grammar (`parse_ktap`), JUnit with junitparser and plain XML
parsing, both with the counts the terminal summary gave. A kernel command line that
panics the kernel must fail the boot check fast (well before the boot deadline), with
the panic in both reports.
"""

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from junitparser import JUnitXml

from vfiouser_iommu.smoke.report import parse_ktap

pytestmark = pytest.mark.guest


def smoke(tmp_path, *args, timeout=400):
    ktap, junit = tmp_path / "smoke.ktap", tmp_path / "smoke.xml"
    proc = subprocess.run([sys.executable, "-m", "vfiouser_iommu", "smoke", "--ktap", str(ktap),
                           "--junit", str(junit), *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc, ktap.read_text(), junit


def counts(junit):
    root = ET.parse(junit).getroot()
    return int(root.get("tests")), int(root.get("failures"))


def test_smoke_on_the_lab_kernel_passes_with_valid_ktap_and_junit(tmp_path):
    proc, ktap, junit = smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + ktap[-6000:]
    m = re.search(r"== smoke: (\d+)/(\d+) checks passed", proc.stdout)
    assert m and m.group(1) == m.group(2), proc.stdout[-2000:]
    total = int(m.group(2))
    suites = parse_ktap(ktap)
    assert [s.name for s in suites] == ["probe", "reboot", "kmod"]
    assert all(s.ok for s in suites)
    assert sum(len(s.subtests) for s in suites) == total
    assert counts(junit) == (total, 0)
    xml = JUnitXml.fromfile(str(junit))
    cases = [c for suite in xml for c in suite]
    assert len(cases) == total and all(c.is_passed for c in cases)
    assert all(float(c.time) >= 0 for c in cases)


def test_smoke_fails_the_boot_check_fast_when_the_kernel_panics(tmp_path):
    proc, ktap, junit = smoke(tmp_path, "--only", "probe", "--append", "rdinit=/nonexistent",
                              "--timeout", "200")
    assert proc.returncode == 1, proc.stdout[-3000:]
    suites = parse_ktap(ktap)
    boot = suites[0].subtests[0]
    assert (boot.name, boot.ok) == ("boot", False)
    assert "Kernel panic" in ktap and "deadline" not in ktap
    tests, failures = counts(junit)
    assert failures >= tests - 3       # only host-side facts can still hold
    xml = JUnitXml.fromfile(str(junit))
    failed_boot = next(c for suite in xml for c in suite if c.name == "boot")
    assert "Kernel panic" in failed_boot.result[0].text


def test_smoke_on_your_own_kernel_builds_the_module_with_your_kbuild(lab, tmp_path):
    """The path a kernel CI job takes: --kernel, --modules and --kbuild name a kernel
    outside the lab (here the lab's own files, passed as a user would pass theirs); the
    test module is built against that tree, in the run's own cache."""
    from pathlib import Path

    modules = Path(lab.modules[lab.module_order[0]]).parent
    proc, ktap, junit = smoke(tmp_path, "--kernel", lab.kernel, "--modules", str(modules),
                              "--kbuild", lab.kbuild, "--workdir", str(tmp_path / "w"),
                              "--only", "virtio-blk-roundtrip", "kmod-map-4k")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"kernel {lab.kernel_version} (user {lab.kernel})" in ktap
    assert "building the test module against" in proc.stdout
    assert list((tmp_path / "w" / "kmod").glob("vfiouser_iommu_test-*.ko"))
    assert counts(junit) == (4, 0)      # two boots, each: boot + the chosen check

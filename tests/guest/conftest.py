"""Guest-layer fixtures: the project's test kernel module, built once per session, and
the side-by-side table of its checks on our IOMMU and on QEMU's riscv-iommu-pci (printed
at the end of the run, like the qtest layer's)."""

from __future__ import annotations

import time

import pytest

from vfiouser_iommu.lab import kmod

# check -> stack -> one-line outcome; boot -> seconds.
KMOD_OUTCOMES: dict[str, dict[str, str]] = {}
BOOT_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def test_module(lab):
    """The test module's .ko, built from the project's sources for the lab's kernel."""
    started = time.monotonic()
    ko = kmod.build(lab.kbuild_for_modules())
    BOOT_SECONDS["module build (0 s when cached)"] = time.monotonic() - started
    return ko


def pytest_terminal_summary(terminalreporter) -> None:
    if not KMOD_OUTCOMES and not BOOT_SECONDS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("test kernel module: our IOMMU and QEMU's riscv-iommu-pci")
    width = max((len(name) for name in KMOD_OUTCOMES), default=10)
    for check, by_stack in KMOD_OUTCOMES.items():
        write(f"{check:<{width}}  ours: {by_stack.get('ours', '-')}")
        write(f"{'':<{width}}  qemu: {by_stack.get('qemu', '-')}")
    for what, seconds in BOOT_SECONDS.items():
        write(f"{what}: {seconds:.1f}s")

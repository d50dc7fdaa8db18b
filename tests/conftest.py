"""Shared fixtures. Tests that need the lab fail (not skip) when it is missing:
`make test` provisions it first, so a missing lab is a broken setup, not a reason to
pass quietly."""

from __future__ import annotations

import pytest

from vfiouser_iommu.lab.paths import Lab, NoLab, load_lab


@pytest.fixture(scope="session")
def lab() -> Lab:
    try:
        return load_lab()
    except NoLab as e:
        pytest.fail(f"{e}")


@pytest.fixture(scope="module")
def tap_network():
    """A network namespace of the test's own with a tap in it (address 10.0.2.2/24, link
    up), removed afterwards; namespaces a crashed earlier run left are removed first."""
    from vfiouser_iommu.lab.netns import TapNetwork, remove_leftovers

    for name in remove_leftovers():
        print(f"removed the network namespace {name} a previous run left behind")
    net = TapNetwork().create()
    try:
        yield net
    finally:
        net.remove()

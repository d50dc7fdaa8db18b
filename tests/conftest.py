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

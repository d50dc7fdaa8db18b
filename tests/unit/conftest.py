"""Unit-test fixtures: every test of the translation modules runs twice, on the pure-Python
reference and on the C fast path (vfiouser_iommu/iommu/fastpath.py), so both
implementations meet the same expectations (docs/fastpath.md, "Equivalence testing")."""

from __future__ import annotations

import pytest

from vfiouser_iommu.iommu import fastpath

#: modules whose IOMMUs translate: each of their tests runs on both implementations
TRANSLATION_MODULES = frozenset({
    "test_cache_modes", "test_checker_catalogue", "test_probe_walk",
    "test_debug", "test_hpm", "test_iommu_caches", "test_iommu_function", "test_iommu_garbage",
    "test_iommu_msi_ats_dma", "test_iommu_msi_superpages", "test_iommu_poison",
    "test_iommu_translate", "test_linux_probe", "test_pq_core", "test_scenarios_commands",
    "test_scenarios_tables",
})
IMPLEMENTATIONS = ("python", "c")


@pytest.fixture(autouse=True)
def translation_impl(request):
    """The implementation IOMMUs created by this test use ("python" or "c")."""
    name = getattr(request, "param", None)
    if name is None:
        yield None
        return
    with fastpath.implementation(name):
        yield name


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in TRANSLATION_MODULES and \
            "translation_impl" in metafunc.fixturenames:
        metafunc.parametrize("translation_impl", IMPLEMENTATIONS, indirect=True)

"""Guest-kernel bugs our IOMMU's capabilities expose, and the one-line hints about them.

Our IOMMU advertises what it implements; a driver bug that only a fuller set of
capabilities reaches is the driver's, not ours, but a user who meets it deserves a
pointer. See docs/svpbmt.md for the one we know.

- **Svpbmt** (Linux 7.2): with `capabilities.Svpbmt` set the driver asks generic_pt for
  `PT_FEAT_RISCV_SVPBMT`, which the riscv64 page-table format does not list among its
  supported features, so every paging-domain allocation fails with -EOPNOTSUPP (-95).
  Identity domains (what a stock guest uses) are unaffected, so the boot looks fine.

`lab boot` knows the guest kernel's version and prints the hint when it is affected.
`serve` cannot know which kernel its guest runs (nothing the driver sends carries a
version, and a failed allocation sends nothing), so it prints the hint once at start
whenever it advertises Svpbmt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EOPNOTSUPP = 95


@dataclass(frozen=True)
class KnownBug:
    name: str
    kernels: re.Pattern      # `uname -r` values known to have it
    hint: str


SVPBMT = KnownBug(
    "svpbmt-paging-domains",
    re.compile(r"^7\.2\.\d+"),
    "hint: Linux 7.2's riscv-iommu cannot allocate paging domains (-EOPNOTSUPP) while the "
    "IOMMU advertises Svpbmt; add svpbmt=off to --iommu for paging-domain tests "
    "(docs/svpbmt.md)")

SERVE_SVPBMT_HINT = (
    "hint: Svpbmt is advertised; Linux 7.2's riscv-iommu then fails every paging-domain "
    "allocation with -EOPNOTSUPP (identity domains work): use --iommu ...,svpbmt=off for "
    "such guests (docs/svpbmt.md)")


def advertises_svpbmt(iommu_options: str) -> bool:
    """Whether our IOMMU with `serve --iommu SS.F,OPTIONS` options sets Svpbmt."""
    from vfiouser_iommu.iommu_pci import build_iommu_function
    from vfiouser_iommu.topology import parse_function

    try:
        spec = parse_function(f"riscv-iommu@01.0{',' if iommu_options else ''}{iommu_options}")
        return build_iommu_function(spec.options).iommu.config.svpbmt
    except ValueError:
        return False


def kernel_has(bug: KnownBug, kernel_version: str) -> bool:
    return bool(bug.kernels.search(kernel_version))


def hints_for_guest(kernel_version: str, console: list[str],
                    iommu_options: str | None) -> list[str]:
    """Hints for a guest run on our IOMMU (`iommu_options`; None: QEMU's, which does not
    advertise Svpbmt)."""
    if iommu_options is None or not kernel_has(SVPBMT, kernel_version):
        return []
    return [SVPBMT.hint] if advertises_svpbmt(iommu_options) else []

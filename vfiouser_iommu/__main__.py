"""`python -m vfiouser_iommu` is the `vfiouser-iommu` command."""

import sys

from vfiouser_iommu.cli import main

sys.exit(main())

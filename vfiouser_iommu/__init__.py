"""vfiouser-iommu: an emulated RISC-V IOMMU (spec v1.0.1) served to QEMU over vfio-user."""

__version__ = "0.1.0"

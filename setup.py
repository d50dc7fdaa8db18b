"""Build and install vfiouser-iommu.

The C translation fast path (c_ext/) will be built from here through cffi once it
exists; until then this is a pure-Python package.
"""

from setuptools import find_packages, setup

setup(
    name="vfiouser-iommu",
    version="0.1.0",
    description="An emulated RISC-V IOMMU served to QEMU over vfio-user",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vfiouser_iommu", "vfiouser_iommu.*"]),
    package_data={"vfiouser_iommu.lab": ["guest/*.sh", "guest/*.c"]},
    install_requires=[
        "construct>=2.10",
        "cffi>=1.15",
        "pylibfdt>=1.7",
        "pyroute2>=0.7",
        "junitparser>=3",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "ruff"],
    },
    entry_points={"console_scripts": ["vfiouser-iommu=vfiouser_iommu.cli:main"]},
)

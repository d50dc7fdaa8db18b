"""Function specs and the QEMU arguments built from them."""

import json

import pytest

from vfiouser_iommu import topology
from vfiouser_iommu.topology import FunctionSpec, parse_function, parse_functions


def test_parse_function():
    spec = parse_function("iommu-testdev@1f.7,vectors=8,pcie=on")
    assert (spec.kind, spec.slot, spec.function) == ("iommu-testdev", 0x1F, 7)
    assert spec.options == {"vectors": "8", "pcie": "on"}
    assert spec.addr == "1f.7" and spec.requester_id == 0xFF


@pytest.mark.parametrize("text", [
    "iommu-testdev", "iommu-testdev@3", "iommu-testdev@20.0", "iommu-testdev@03.8",
    "iommu-testdev@03.0,novalue", "iommu-testdev@03.0,a=1,a=2", "@03.0", "Bad@03.0"])
def test_bad_specs(text):
    with pytest.raises(ValueError):
        parse_function(text)


def test_parse_functions_with_iommu_and_duplicates():
    functions = parse_functions("01.0", ["iommu-testdev@03.0"])
    assert [(f.kind, f.addr) for f in functions] == [("riscv-iommu", "01.0"),
                                                       ("iommu-testdev", "03.0")]
    with pytest.raises(ValueError):
        parse_functions("03.0", ["iommu-testdev@03.0"])


def test_qemu_args(tmp_path):
    functions = [FunctionSpec("iommu-testdev", 3, 0), FunctionSpec("iommu-testdev", 4, 1)]
    args = topology.qemu_vfio_user_args(tmp_path, functions, "512M")
    assert args[:6] == ["-object", "memory-backend-memfd,id=ram0,size=512M,share=on",
                        "-machine", "memory-backend=ram0", "-m", "512M"]
    devices = [json.loads(a) for a in args[7::2]]
    assert args[6::2] == ["-device"] * 2
    assert devices[0] == {"driver": "vfio-user-pci", "id": "vfu03_0", "addr": "03.0",
                          "socket": {"type": "unix", "path": str(tmp_path / "03.0.sock")}}
    assert devices[1]["addr"] == "04.1"

"""The RISC-V IOMMU as a PCI function (spec v1.0.1 chapter 7.2, "PCIe IOMMU device").

What the Linux `riscv-iommu` PCI driver binds to: 1b36:0014, class 08/06/00, one 64-bit
memory BAR0 of 4 KiB holding the register file, and MSI-X whose table sits at BAR0+0x300
and PBA at BAR0+0x400, so that the MSI-X table *is* `msi_cfg_tbl` (as on QEMU's own
riscv-iommu-pci). Over vfio-user QEMU emulates that table itself; the core only says
"vector N" (`raise_irq`) and the function signals the vector's eventfd.

The core reads the guest's tables and queues through this function's DMA maps. Command
processing, triggered by a (posted) `cqt` write, runs later from the event loop in
bounded steps, so one doorbell never stalls the other functions.
"""

from __future__ import annotations

import dataclasses
import logging

from vfiouser_iommu.iommu import IommuConfig, RiscvIommu
from vfiouser_iommu.iommu.config import CAPABILITY_FIELDS
from vfiouser_iommu.iommu.modes import MODE_OPTIONS, parse_modes, set_modes
from vfiouser_iommu.iommu.observe import Observer
from vfiouser_iommu.iommu.request import HpmEvent
from vfiouser_iommu.pci.config import BarSpec, MsixSpec, PciIdentity
from vfiouser_iommu.pci.function import PciFunction

log = logging.getLogger(__name__)

RISCV_IOMMU_PCI = PciIdentity(vendor_id=0x1B36, device_id=0x0014, class_code=0x080600,
                              revision_id=0x01, subsystem_vendor_id=0x1B36,
                              subsystem_id=0x0014)
REGISTER_FILE_SIZE = 0x1000
MSI_CFG_TBL = 0x300
MSI_PBA = 0x400
# msi_cfg_tbl has 16 entries (0x300-0x3FF), so icvec fields can name any of them.
MSIX_VECTORS = 16
# Commands executed per step of the event loop.
COMMAND_BUDGET = 256


def default_config() -> IommuConfig:
    """What the function advertises unless told otherwise: everything QEMU's built-in
    riscv-iommu-pci advertises that v1.0.1 defines (it also sets Svrsw60t59b, a later
    extension we do not implement) plus everything else we implement."""
    return IommuConfig(sv32=True, sv32x4=True)


class IommuFunction(PciFunction):
    """A `RiscvIommu` behind a PCI BAR0, with MSI-X for its interrupts."""

    def __init__(self, config: IommuConfig | None = None, modes: dict | None = None) -> None:
        super().__init__(RISCV_IOMMU_PCI, {0: BarSpec(REGISTER_FILE_SIZE, is_64bit=True)},
                         msix=MsixSpec(MSIX_VECTORS, bir=0, table_offset=MSI_CFG_TBL,
                                       pba_offset=MSI_PBA),
                         pcie=True)
        config = config or default_config()
        config = dataclasses.replace(config, msi_table_external=True,
                                     interrupt_vectors=MSIX_VECTORS)
        self.iommu = RiscvIommu(self.memory, config, raise_irq=self.raise_msix)
        self.observer = Observer(self.iommu)
        if modes:
            set_modes(self.iommu, **modes)
        self._scheduled = False
        self.name = "riscv-iommu"

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0 or size not in (4, 8):
            return 0
        return self.iommu.mmio_read(offset, size)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or size not in (4, 8):
            return
        self.iommu.mmio_write(offset, size, value)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self.iommu.regs.work_pending():
            self._scheduled = True
            self.host.call_soon(self._run_commands)

    def _run_commands(self) -> None:
        self._scheduled = False
        self.iommu.regs.run_pending(COMMAND_BUDGET)
        self._schedule()

    def on_reset(self) -> None:
        self._log_events("reset")
        self.iommu.reset()

    def on_disconnect(self) -> None:
        self._log_events("client left")

    def _log_events(self, why: str) -> None:
        """The IOMMU's event totals so far (what the HPM events count, for every device):
        a cheap record of how much DMA it translated, read only here."""
        counts = self.iommu.counters
        if counts:
            log.info("riscv-iommu: %s; events so far: %s", why, " ".join(
                f"{HpmEvent(e).name.lower()}={n}" for e, n in sorted(counts.items())))


_SWITCH = {"on": True, "off": False}


def build_iommu_function(options: dict[str, str]) -> IommuFunction:
    """The IOMMU function of `--iommu SS.F[,caps=0xVALUE][,FLAG=on|off...]`.

    `caps` sets the whole capabilities register; a FLAG is any capability field of
    `IommuConfig` (sv39, ats, msi_flat, ...; `pas` and `version` take numbers) and
    overrides it. `check=on`, `cache=spec|max|none` and `negative=on` are the
    introspection modes (`iommu.modes`). ValueError for anything else.
    """
    config = default_config()
    if "caps" in options:
        try:
            config = IommuConfig.from_capabilities(int(options["caps"], 0))
        except ValueError:
            raise ValueError(f"riscv-iommu: caps={options['caps']!r} is not a number") \
                from None
    changes: dict[str, object] = {}
    modes = parse_modes(options)
    for name, value in options.items():
        if name == "caps" or name in MODE_OPTIONS:
            continue
        if name not in CAPABILITY_FIELDS or name == "igs":
            raise ValueError(f"riscv-iommu: unknown option {name!r} (caps=0x..., "
                             f"check=on, cache=spec|max|none, negative=on, or one of "
                             f"{', '.join(f for f in CAPABILITY_FIELDS if f != 'igs')})")
        if name in ("pas", "version"):
            try:
                changes[name] = int(value, 0)
            except ValueError:
                raise ValueError(f"riscv-iommu: {name}={value!r} is not a number") from None
        elif value in _SWITCH:
            changes[name] = _SWITCH[value]
        else:
            raise ValueError(f"riscv-iommu: {name}={value!r}: want on or off")
    return IommuFunction(dataclasses.replace(config, **changes), modes)

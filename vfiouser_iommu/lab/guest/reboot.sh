# Boot twice: the first boot leaves a mark on the disk and reboots (QEMU resets the
# machine, and with it our IOMMU and endpoints); the second checks the driver probed
# again and that DMA still works, then powers off.
mark=$(dd if=/dev/vda bs=8 count=1 2>/dev/null)
if [ "$mark" != "REBOOTED" ]; then
    printf 'REBOOTED' | dd of=/dev/vda conv=fsync 2>/dev/null
    if [ -e /sys/class/iommu/riscv-iommu@0000:00:01.0 ]; then pass first-boot-probe; else fail first-boot-probe; fi
    reboot -f
    sleep 30
fi
if [ -e /sys/class/iommu/riscv-iommu@0000:00:01.0 ]; then pass second-boot-probe; else fail second-boot-probe; fi
for bdf in 0000:00:02.0 0000:00:03.0 0000:00:04.0; do
    if [ -e /sys/bus/pci/devices/$bdf/iommu_group ]; then pass "second-boot-group-$bdf"; else fail "second-boot-group-$bdf"; fi
done
errors=$(dmesg | grep -E 'iommu_pci|riscv-iommu' | grep -i -E 'error|fail|timeout|unexpected|already attached')
if [ -z "$errors" ]; then pass second-boot-no-driver-errors; else fail second-boot-no-driver-errors "$errors"; fi
dd if=/dev/urandom of=/tmp/out bs=1M count=2 2>/dev/null
dd if=/tmp/out of=/dev/vda bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null
a=$(md5sum < /tmp/out | cut -d' ' -f1); b=$(dd if=/dev/vda bs=1M skip=1 count=2 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$a" = "$b" ]; then pass second-boot-virtio-blk "$b"; else fail second-boot-virtio-blk "$a != $b"; fi

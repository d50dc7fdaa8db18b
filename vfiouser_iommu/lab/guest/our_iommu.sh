# Guest checks for our IOMMU (tests/guest/test_our_iommu.py reads the results).
# Topology: IOMMU 01.0, iommu-testdev 02.0, virtio-blk 03.0, virtio-rng 04.0.

iommu=/sys/class/iommu/riscv-iommu@0000:00:01.0
if [ -e "$iommu" ]; then pass iommu-probed "$iommu"; else fail iommu-probed "no $iommu"; fi

errors=$(dmesg | grep -E 'iommu_pci|riscv-iommu' | grep -i -E 'error|fail|timeout|unexpected')
if [ -z "$errors" ]; then pass driver-no-errors; else fail driver-no-errors "$errors"; fi

# The driver's interrupts: MSI-X vectors of 00:01.0 in /proc/interrupts.
irqs=$(grep -c -i '0000:00:01.0' /proc/interrupts)
if [ "$irqs" -ge 1 ]; then pass iommu-msix "$irqs lines: $(grep -i '0000:00:01.0' /proc/interrupts | tr -s ' ' | tr '\n' '|')"
else fail iommu-msix "$(cat /proc/interrupts | tr -s ' ' | tr '\n' '|')"; fi

for bdf in 0000:00:02.0 0000:00:03.0 0000:00:04.0; do
    dev=/sys/bus/pci/devices/$bdf
    if [ -e "$dev/iommu_group" ]; then
        pass "iommu-group-$bdf" "group $(basename "$(readlink "$dev/iommu_group")") $(cat "$dev/iommu_group/type")"
    else fail "iommu-group-$bdf" "no iommu_group"; fi
done

# virtio-blk: tens of MiB out and back, bypassing the page cache.
MIB=32
dd if=/dev/urandom of=/tmp/out bs=1M count=$MIB 2>/dev/null
want=$(md5sum < /tmp/out | cut -d' ' -f1)
dd if=/tmp/out of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
rm /tmp/out
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M count=$MIB iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$want" = "$got" ]; then pass virtio-blk-roundtrip "$MIB MiB md5 $got"
else fail virtio-blk-roundtrip "wrote $want read $got"; fi

bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ ${#bytes} -eq 64 ]; then pass virtio-rng "$bytes"; else fail virtio-rng "read '$bytes'"; fi

# A DMA fault from inside the guest: take the testdev out of the PCI tree (its device
# context goes invalid), then make it DMA anyway through its BAR.
dev=/sys/bus/pci/devices/0000:00:02.0
bar=$(printf '%d' "$(head -n1 $dev/resource | cut -d' ' -f1)")
echo 1 > $dev/enable
echo 1 > $dev/remove
before=$(grep -i '0000:00:01.0' /proc/interrupts | awk '{s=0; for (i=2; i<=NF; i++) if ($i ~ /^[0-9]+$/) s+=$i; t+=s} END {print t+0}')
devmem $((bar + 0x04)) 32 0x80001000
devmem $((bar + 0x08)) 32 0
devmem $((bar + 0x0c)) 32 4
devmem $((bar + 0x14)) 32 1
devmem $((bar + 0x00)) 32 >/dev/null
result=$(devmem $((bar + 0x10)) 32)
sleep 1
after=$(grep -i '0000:00:01.0' /proc/interrupts | awk '{s=0; for (i=2; i<=NF; i++) if ($i ~ /^[0-9]+$/) s+=$i; t+=s} END {print t+0}')
line=$(dmesg | grep 'Fault 258 devid: 0x10' | tail -n 1)
if [ -n "$line" ]; then pass dma-fault-reported "testdev result $result; irqs $before->$after; $line"
else fail dma-fault-reported "testdev result $result; irqs $before->$after; $(dmesg | tail -n 3 | tr '\n' '|')"; fi
if [ "$after" -gt "$before" ]; then pass fault-interrupt "$before->$after"; else fail fault-interrupt "$before->$after"; fi

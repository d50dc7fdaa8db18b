# The demo guest script: evidence that the riscv-iommu driver runs and that the
# devices behind the IOMMU do DMA through it. Runs under busybox sh with the helpers
# of guest-lib.sh (pass, fail, check).

iommu=$(ls -d /sys/class/iommu/riscv-iommu@* 2>/dev/null | head -n 1)
if [ -n "$iommu" ]; then pass iommu-probed "$iommu"; else fail iommu-probed "no /sys/class/iommu/riscv-iommu@*"; fi

# Every PCI function except the host bridge and the IOMMU itself sits in an IOMMU group.
for dev in /sys/bus/pci/devices/*; do
    class=$(cat "$dev/class")
    case "$class" in 0x060000|0x080600) continue ;; esac
    name=$(basename "$dev")
    if [ -e "$dev/iommu_group" ]; then
        group=$(basename "$(readlink "$dev/iommu_group")")
        pass "iommu-group-$name" "group $group type $(cat "$dev/iommu_group/type" 2>/dev/null)"
    else
        fail "iommu-group-$name" "vendor $(cat "$dev/vendor") device $(cat "$dev/device") has no iommu_group"
    fi
done

# A virtio-blk round trip that bypasses the page cache.
MIB=${DEMO_MIB:-4}
if [ -b /dev/vda ]; then
    dd if=/dev/urandom of=/tmp/out bs=1M count="$MIB" 2>/dev/null
    want=$(md5sum < /tmp/out | cut -d' ' -f1)
    dd if=/tmp/out of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1M count="$MIB" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$want" = "$got" ]; then pass virtio-blk-roundtrip "${MIB} MiB md5 $got"
    else fail virtio-blk-roundtrip "wrote $want read $got"; fi
else
    fail virtio-blk-roundtrip "no /dev/vda"
fi

if [ -c /dev/hwrng ]; then
    bytes=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
    if [ ${#bytes} -eq 32 ]; then pass virtio-rng "$bytes"; else fail virtio-rng "read '${bytes}'"; fi
fi

dmesg | grep -i -E 'riscv-iommu|iommu_pci|iommu' | head -n 20

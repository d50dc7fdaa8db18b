# virtio-net behind our IOMMU (tests/guest/test_virtio_net.py reads the results).
# Topology: IOMMU 01.0, virtio-net 02.0 on a tap in the test's network
# namespace, virtio-blk 03.0. The namespace's side: $HOST, a TCP sink on port 5001 that
# answers the MD5 of the $MIB MiB it read, and a TCP source on 5002 that sends $MIB MiB.
HOST=${HOST:-10.0.2.2}
GUEST=${GUEST:-10.0.2.15}
PINGS=${PINGS:-1000}
MIB=${MIB:-4}
dev=/sys/bus/pci/devices/0000:00:02.0
eth=$(ls $dev/virtio*/net 2>/dev/null | head -n 1)
if [ -n "$eth" ]; then pass net-probed "$eth $(readlink $dev/virtio*/driver | sed 's|.*/||')"
else fail net-probed "no network interface under $dev: $(ls $dev)"; fi
if [ -e $dev/iommu_group ]; then pass net-iommu-group "$(cat $dev/iommu_group/type)"
else fail net-iommu-group "no iommu_group"; fi
pass net-features "$(cat $dev/virtio*/features)"

ip link set "$eth" up
ip addr add "$GUEST/24" dev "$eth"

# Pings of three sizes, the last one filling the 1500-byte MTU (1472 + 8 + 20).
for size in 56 1000 1472; do
    out=$(ping -A -q -c "$PINGS" -s $size -W 5 "$HOST" 2>&1 | grep 'packets transmitted')
    case "$out" in
        "$PINGS packets transmitted, $PINGS packets received, 0% packet loss")
            pass "ping-$size" "$out" ;;
        *) fail "ping-$size" "$out" ;;
    esac
done

# TCP, guest to namespace: the sink answers the MD5 of what it read.
dd if=/dev/urandom of=/tmp/out bs=1M count="$MIB" 2>/dev/null
want=$(md5sum < /tmp/out | cut -d' ' -f1)
# virtio-blk works meanwhile: the same bytes go to the disk and back.
(dd if=/tmp/out of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
 dd if=/dev/vda bs=1M count="$MIB" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1 \
    > /tmp/blk.md5) &
blk=$!
got=$(nc "$HOST" 5001 < /tmp/out)
if [ "$want" = "$got" ]; then pass tcp-to-host "$MIB MiB md5 $got"
else fail tcp-to-host "sent $want, the namespace read $got"; fi
wait $blk
if [ "$want" = "$(cat /tmp/blk.md5)" ]; then pass blk-meanwhile "$(cat /tmp/blk.md5)"
else fail blk-meanwhile "wrote $want read $(cat /tmp/blk.md5)"; fi
rm -f /tmp/out

# TCP, namespace to guest: the test compares this MD5 with what the source sent.
nc "$HOST" 5002 > /tmp/in
pass tcp-from-host "$(wc -c < /tmp/in) bytes md5 $(md5sum < /tmp/in | cut -d' ' -f1)"

s=/sys/class/net/$eth/statistics
pass net-stats "rx_packets=$(cat $s/rx_packets) tx_packets=$(cat $s/tx_packets) rx_errors=$(cat $s/rx_errors) tx_errors=$(cat $s/tx_errors) rx_length_errors=$(cat $s/rx_length_errors) rx_dropped=$(cat $s/rx_dropped)"

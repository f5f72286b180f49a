#!/bin/busybox sh
# /init of the emulated arm64 KVM host (tests/arm64-qemu/run): live-migrates
# a 2-vCPU guest whose every vCPU keeps dirtying memory between two QEMUs in
# this host, for each scenario named by kds_scenarios= on the kernel command
# line, then powers off. One line per scenario, then "N passed, M failed"
# (only the patched scenarios count; stock and the hook-less build are
# reported beside them).
#
# Scenario names: <binary>-<gic>, binary patched|nohook|stock (/qemu/*),
# gic its (GICv3 + in-kernel ITS) or noits (GICv3, its=off).
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=2g tmp /tmp
exec > /dev/console 2>&1
export PATH=/bin:/usr/bin

arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
scenarios=$(arg kds_scenarios | tr , ' ')
mem=$(arg kds_guest_mib)
mem=${mem:-256}
ring=$(arg kds_ring)
ring=${ring:-4096}
# kds_thp=never|madvise|always: the host's transparent huge pages (QEMU
# asks for them for guest RAM); the kernel's default otherwise.
thp=$(arg kds_thp)
[ -z "$thp" ] || echo "$thp" > /sys/kernel/mm/transparent_hugepage/enabled
echo "arm64 host: Linux $(uname -r), $(nproc) CPUs, /dev/kvm $( [ -c /dev/kvm ] && echo present || echo MISSING), THP $(cat /sys/kernel/mm/transparent_hugepage/enabled)"

cat > /tmp/events <<EOF
kvm_dirty_shim_log
kvm_dirty_shim_stats
kvm_dirty_ring_full
EOF

# qemu_start BINARY NAME ITS [extra options]: starts a guest in the
# background; its serial console, trace and QMP socket are /tmp/NAME-*.
qemu_start() {
    bin=$1 name=$2 its=$3
    shift 3
    rm -f /tmp/$name-*
    "$bin" -accel kvm,dirty-ring-size=$ring -M virt,gic-version=3,its=$its -cpu host \
        -smp 2 -m $mem -nodefaults -display none -no-reboot \
        -kernel /guest/Image -initrd /guest/initrd.cpio \
        -append "console=ttyAMA0 rdinit=/init quiet panic=-1 kds_region_mib=64" \
        -device virtio-serial-pci,id=vs0 -device virtserialport,bus=vs0.0,chardev=vp,name=p \
        -chardev socket,id=vp,path=/tmp/$name-vp.sock,server=on,wait=off \
        -serial file:/tmp/$name-serial.log -qmp unix:/tmp/$name-qmp.sock,server=on,wait=off \
        -trace events=/tmp/events -D /tmp/$name-trace.log "$@" > /tmp/$name-stderr.log 2>&1 &
    echo $! > /tmp/$name.pid
}
qmp() { name=$1; shift; host-tool qmp /tmp/$name-qmp.sock "$@"; }
# wait_for FILE PATTERN SECONDS
wait_for() {
    i=0
    while [ $i -lt $(($3 * 5)) ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}
field() { echo "$2" | sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" | head -n 1; }
hb_count() { grep '^hb ' "$1" 2>/dev/null | wc -l; }
stop_all() {
    for n in src dst; do
        [ -f /tmp/$n.pid ] || continue
        qmp $n '{"execute":"quit"}' > /dev/null 2>&1 || true
        p=$(cat /tmp/$n.pid)
        i=0
        while kill -0 "$p" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
        kill -9 "$p" 2>/dev/null || true
        rm -f /tmp/$n.pid
    done
}

passed=0 failed=0
for sc in $scenarios; do
    t0=$(date +%s)
    bin=/qemu/${sc%%-*}
    gic=${sc#*-}
    its=off
    [ "$gic" = its ] && its=on
    why=""
    qemu_start "$bin" src $its
    if ! wait_for /tmp/src-serial.log '^hb 4 ' 120; then
        why="$why source guest did not start;"
    fi
    boot=$(( $(date +%s) - t0 ))
    host-tool ping /tmp/src-vp.sock before 30 || why="$why no echo before migration;"
    qemu_start "$bin" dst $its -incoming unix:/tmp/mig.sock -S
    qmp dst '{"execute":"query-status"}' > /dev/null || why="$why destination QMP;"
    t1=$(date +%s)
    qmp src '{"execute":"migrate-set-parameters","arguments":{"downtime-limit":2000}}' \
        '{"execute":"migrate","arguments":{"uri":"unix:/tmp/mig.sock"}}' > /tmp/mig-start.log
    status=""
    i=0
    while [ $i -lt 600 ]; do
        info=$(qmp src '{"execute":"query-migrate"}')
        status=$(echo "$info" | sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p' | head -n 1)
        case $status in completed|failed|cancelled) break ;; esac
        sleep 0.3
        i=$((i + 1))
    done
    mig_wall=$(( $(date +%s) - t1 ))
    [ "$status" = completed ] || why="$why migration $status after ${mig_wall}s;"
    total=$(field total-time "$info")
    downtime=$(field downtime "$info")
    syncs=$(field dirty-sync-count "$info")
    sent=$(field transferred "$info")
    # RAM of both sides, page by page (the guest's RAM starts at 1 GiB).
    t2=$(date +%s)
    qmp src "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":1073741824,\"size\":$((mem << 20)),\"filename\":\"/tmp/src.ram\"}}" > /dev/null
    qmp dst "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":1073741824,\"size\":$((mem << 20)),\"filename\":\"/tmp/dst.ram\"}}" > /dev/null
    cmp=$(host-tool cmp /tmp/src.ram /tmp/dst.ram 0x40000000 8)
    rm -f /tmp/src.ram /tmp/dst.ram
    differ=$(echo "$cmp" | awk '{print $2}')
    [ "$differ" = 0 ] || why="$why $differ pages differ;"
    cmp_s=$(( $(date +%s) - t2 ))
    # The destination runs on: heartbeats with advancing stores, and a
    # virtio-serial round trip (its receive interrupt is an MSI).
    qmp dst '{"execute":"cont"}' > /dev/null
    alive=no
    i=0
    while [ $i -lt 150 ]; do
        [ "$(hb_count /tmp/dst-serial.log)" -ge 3 ] && { alive=yes; break; }
        sleep 0.2
        i=$((i + 1))
    done
    first=$(grep '^hb ' /tmp/dst-serial.log | head -n 1 | awk '{print $3 + $4}')
    last=$(grep '^hb ' /tmp/dst-serial.log | tail -n 1 | awk '{print $3 + $4}')
    [ "$alive" = yes ] && [ "${last:-0}" -gt "${first:-0}" ] || { alive=no; why="$why guest not alive after cont;"; }
    echo_after=ok
    host-tool ping /tmp/dst-vp.sock after 20 || { echo_after=LOST; why="$why virtio-serial echo lost after migration;"; }
    # What dirty tracking did on the source.
    trace=/tmp/src-trace.log
    mode=$(sed -n 's/.*the mode is now fixed at \(KDS_MODE_[A-Z_]*\).*/\1/p' $trace | head -n 1)
    [ -n "$mode" ] || mode="n/a"
    backup=$(sed -n 's/.*the backup bitmap held \([0-9]*\) pages.*/\1/p' $trace | awk '{s += $1} END {print s + 0}')
    backup_gpas=$(sed -n 's/.*the backup bitmap held [0-9]* pages: //p' $trace | tr '\n' ' ')
    stats=$(grep 'kvm-dirty-shim stats' $trace | tail -n 1 | sed 's/.*stats: //')
    full=$(grep -c 'kvm_dirty_ring_full' $trace)
    coll=$(sed -n 's/.*Interrupt Collections @\([0-9a-f]*\).*/\1/p' /tmp/src-serial.log | head -n 1)
    its_seen=""
    if [ -n "$coll" ]; then
        page=$(printf '%#x' $(( 0x$coll & ~4095 )))
        if echo " $backup_gpas " | grep -q " $page "; then its_seen=yes; else its_seen=no; fi
        if echo " $cmp " | grep -q " $page"; then its_differ=yes; else its_differ=no; fi
    fi
    # On arm64 the shim uses the ring only with the backup bitmap, ITS or
    # not (a ring-only memslot loses writes in huge pages; README). Linux
    # before 6.2 has no dirty ring on arm64: bitmap mode there.
    want=KDS_MODE_RING_WITH_BITMAP
    case $(uname -r) in 6.1.*|6.0.*|5.*) want=KDS_MODE_BITMAP ;; esac
    case $sc in
        patched-*)
            [ "$mode" = "$want" ] || why="$why mode $mode, expected $want;"
            # With an ITS, the tables it saved at VM stop must be in the
            # backup bitmap's final drain; without one, nothing writes
            # guest memory with no vCPU running.
            if [ "$want" = KDS_MODE_RING_WITH_BITMAP ] && [ "$its" = on ] && [ "$its_seen" != yes ]; then
                why="$why the ITS collection table page ${page:-?} was not in the backup bitmap;"
            fi
            [ "$its" = on ] || [ "$backup" = 0 ] || why="$why backup bitmap pages without an ITS;"
            # The echo tests the ITS only if the port's interrupts are MSIs
            # through it (the guest prints its /proc/interrupts lines).
            if [ "$its" = on ] && ! grep -q 'ITS-PCI-MSIX.*virtio' /tmp/src-serial.log; then
                why="$why the guest's virtio interrupts do not go through the ITS;"
            fi ;;
    esac
    line="$sc: kernel $(uname -r | cut -d- -f1) mode=$mode migration=${status:-none} total_ms=$total downtime_ms=$downtime syncs=$syncs sent_bytes=$sent pages_differ=$differ backup_drain_pages=$backup its_collection_table=${coll:-none}${its_seen:+ in_backup=$its_seen its_page_differs=$its_differ} ring_full_exits=$full alive=$alive echo_after=$echo_after stats=[${stats:-n/a}] boot_s=$boot migrate_s=$mig_wall dump_cmp_s=$cmp_s scenario_s=$(( $(date +%s) - t0 ))"
    case $sc in
        patched-*)
            if [ -z "$why" ]; then
                echo "PASS $line"; passed=$((passed + 1))
            else
                echo "FAIL $line ($why )"; failed=$((failed + 1))
            fi ;;
        *) echo "INFO $line${why:+ (}$why${why:+ )}" ;;
    esac
    [ -n "$backup_gpas" ] && echo "  $sc backup bitmap pages: $backup_gpas"
    echo "  $sc differing pages: $cmp"
    grep '^guest: .*\(ITS\|virtio\)' /tmp/src-serial.log | head -n 6 | sed "s/^/  $sc /"
    for n in src dst; do
        grep -v '^$' /tmp/$n-stderr.log 2>/dev/null | sort | uniq -c | sort -rn | head -n 4 |
            sed "s/^/  $sc $n qemu: /"
    done
    if [ -n "$why" ]; then
        echo "  $sc destination: $(qmp dst '{"execute":"query-status"}' 2>&1 | tail -n 1)"
        echo "  $sc destination: $(qmp dst '{"execute":"query-migrate"}' 2>&1 | tail -n 1 | cut -c1-300)"
        tail -n 3 /tmp/dst-serial.log | sed "s/^/  $sc destination serial: /"
    fi
    stop_all
done
echo "$passed passed, $failed failed"
sync
poweroff -f

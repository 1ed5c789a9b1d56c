#!/bin/sh
# /init of the test guest (scripts/build-test-guest.sh puts it into the initramfs; tests/harness/guest.py
# boots it). Everything it says goes to the serial console, one line per event, which the harness reads:
#   EKKO-READY agent=<port|none> mounts=<mount points>     booted, file systems mounted, qemu-ga started
#   EKKO-W <mount> <seq> <guest seconds>                  one workload step done (file + journal fsync'ed)
#   EKKO-PAUSED <mount> / EKKO-RESUMED <mount>           the workload saw /run/ekko-pause appear / go
#   EKKO-HOOK freeze|thaw                                 the guest agent's fsfreeze hook ran
#   EKKO-CHECK <dev> ok files=<n> torn=<n> | EKKO-CHECK <dev> BAD <why>   (ekko.check=1)
#   EKKO-DONE                                             ekko.check=1: every disk checked, powering off
# Modes (kernel command line): default: mount /dev/vd* (ext4 or XFS) at /mnt/<dev>, start qemu-ga on
# the virtio-serial port org.qemu.guest_agent.0 if there is one, run the workload on every mount;
# ekko.check=1: mount every /dev/vd* read-only, check its journal, power off.
export PATH=/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run /mnt
while read -r m; do insmod "/lib/modules/$m.ko" || echo "EKKO-ERROR insmod $m" > /dev/console; done < /lib/modules/order

say() { echo "$*" > /dev/console; }

# Journal: "add <name> <sha256>" after the file <name> is written and fsync'ed; "rm <name>" before it
# is removed. Consistent (frozen, or crash + journal replay): every file added and not removed exists
# with its checksum. A line without its newline (a crash mid-append) is counted as torn.
check_journal() {
    dir=$1
    [ -f "$dir/journal" ] || { echo "BAD no journal"; return; }
    awk -v dir="$dir" '
        $1 == "add" && NF == 3 && length($3) == 64 { sum[$2] = $3; live[$2] = 1; next }
        $1 == "rm" && NF == 2 { delete live[$2]; next }
        { torn++ }
        END {
            n = 0
            for (f in live) {
                cmd = "sha256sum " dir "/w/" f " 2>/dev/null"; got = ""
                cmd | getline got; close(cmd); split(got, a, " ")
                if (a[1] != sum[f]) { print "BAD " f " expected " sum[f] " got " (a[1] == "" ? "nothing" : a[1]); exit 1 }
                n++
            }
            printf "ok files=%d torn=%d\n", n, torn + 0
        }' "$dir/journal"
}

workload() {
    mnt=$1; i=0; paused=0
    mkdir -p "$mnt/w"
    [ -f "$mnt/journal" ] && i=$(awk '$1 == "add" { sub("^f", "", $2); if ($2 + 0 > n) n = $2 + 0 } END { print n + 0 }' "$mnt/journal")
    while :; do
        if [ -e /run/ekko-pause ]; then
            [ $paused = 1 ] || { paused=1; sync; say "EKKO-PAUSED $mnt"; }
            sleep 0.1; continue
        fi
        [ $paused = 0 ] || { paused=0; say "EKKO-RESUMED $mnt"; }
        i=$((i + 1)); f=f$i
        dd if=/dev/urandom of="$mnt/w/$f" bs=4096 count=$((1 + RANDOM % 48)) 2>/dev/null
        sync "$mnt/w/$f"
        s=$(sha256sum "$mnt/w/$f"); s=${s%% *}
        echo "add $f $s" >> "$mnt/journal"; sync "$mnt/journal"
        old=$((i - 60))
        if [ $old -gt 0 ] && [ -e "$mnt/w/f$old" ]; then
            echo "rm f$old" >> "$mnt/journal"; sync "$mnt/journal"; rm -f "$mnt/w/f$old"
        fi
        say "EKKO-W $mnt $i $(date +%s)"
    done
}

if grep -q 'ekko.check=1' /proc/cmdline; then
    for d in /dev/vd?; do
        [ -b "$d" ] || continue
        m=/mnt/${d##*/}; mkdir -p "$m"
        # no noload/norecovery: on a read-only disk a file system that needs its journal replayed
        # does not mount, which is what the check is for
        if mount -o ro -t ext4 "$d" "$m" 2>/dev/null || mount -o ro -t xfs "$d" "$m" 2>/dev/null; then
            say "EKKO-CHECK ${d##*/} $(check_journal "$m")"
            umount "$m"
        else
            say "EKKO-CHECK ${d##*/} BAD cannot mount"
        fi
    done
    say "EKKO-DONE"
    sync; poweroff -f
fi

mounts=""
for d in /dev/vd?; do
    [ -b "$d" ] || continue
    m=/mnt/${d##*/}; mkdir -p "$m"
    if mount -t ext4 "$d" "$m" 2>/dev/null || mount -t xfs "$d" "$m" 2>/dev/null; then
        mounts="$mounts $m"
    else
        say "EKKO-ERROR cannot mount $d"
    fi
done
port=none
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
if [ "$port" != none ]; then
    qemu-ga -m virtio-serial -p "$port" -t /run -F/etc/qemu/fsfreeze-hook > /dev/console 2>&1 &
fi
for m in $mounts; do workload "$m" & done
say "EKKO-READY agent=$port mounts=${mounts# }"
while :; do sleep 3600; done

#!/usr/bin/env bash
# Builds the test guest's initramfs (tests/harness/guest.py boots it): Debian's kernel from /boot, and
# an initramfs of busybox-static + Debian's qemu-ga with the libraries ldd names + the kernel modules
# for virtio-blk, virtio-console, ext4 and XFS (with their dependencies, insmod'ed in order by /init).
#   scripts/build-test-guest.sh [OUTDIR]      (default /var/cache/ekko-test-guest)
# Writes OUTDIR/<key>/{vmlinuz,initrd.gz} and prints that directory. <key> hashes this script, the
# guest's init (tests/harness/guest_init.sh) and the kernel version: a change to either rebuilds, and
# an unchanged tree reuses the cached build. Nothing here is committed to the repository.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/var/cache/ekko-test-guest}
INIT=$HERE/tests/harness/guest_init.sh
KVER=${EKKO_GUEST_KERNEL:-$(ls /boot | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)}
[ -n "$KVER" ] && [ -r "/boot/vmlinuz-$KVER" ] || { echo "build-test-guest: no kernel in /boot (apt-get install linux-image-amd64)" >&2; exit 1; }
for f in /bin/busybox /usr/sbin/qemu-ga; do
    [ -x "$f" ] || { echo "build-test-guest: $f missing (apt-get install busybox-static qemu-guest-agent)" >&2; exit 1; }
done
KEY=$(cat "$0" "$INIT" <(echo "$KVER") | sha256sum | cut -c1-16)
DEST=$OUT/$KEY
if [ -s "$DEST/initrd.gz" ] && [ -s "$DEST/vmlinuz" ]; then echo "$DEST"; exit 0; fi

mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.build-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
R=$WORK/root
mkdir -p "$R"/{bin,sbin,dev,proc,sys,run,tmp,data,xfs,etc/qemu/fsfreeze-hook.d,lib/modules,usr/sbin}
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done

# qemu-ga and every library it links (ldd: path after "=>", or the loader's absolute path)
cp /usr/sbin/qemu-ga "$R/usr/sbin/qemu-ga"
ldd /usr/sbin/qemu-ga | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done
[ -e "$R/lib64/ld-linux-x86-64.so.2" ] || { echo "build-test-guest: ldd of qemu-ga gave no loader" >&2; exit 1; }

# Kernel modules in dependency order (modinfo -F depends, depth first). crc32c_generic first: ext4,
# jbd2 and xfs ask the crypto API for "crc32c" at mount time, and there is no modprobe to load it then.
ORDER=()
add_module() {
    local m=$1 dep
    for have in "${ORDER[@]:-}"; do [ "$have" = "$m" ] && return 0; done
    for dep in $(modinfo -k "$KVER" -F depends "$m" | tr ',' ' '); do add_module "$dep"; done
    ORDER+=("$m")
}
for m in crc32c_generic virtio_pci virtio_blk virtio_console ext4 xfs; do add_module "$m"; done
: > "$R/lib/modules/order"
for m in "${ORDER[@]}"; do
    src=$(modinfo -k "$KVER" -F filename "$m")
    case "$src" in
        *.ko.xz) xz -dc "$src" > "$R/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$src" > "$R/lib/modules/$m.ko" ;;
        *.ko) cp "$src" "$R/lib/modules/$m.ko" ;;
        *) echo "build-test-guest: module $m: unexpected file $src" >&2; exit 1 ;;
    esac
    echo "$m" >> "$R/lib/modules/order"
done

# The guest agent's fsfreeze hook, as Debian ships it in spirit: run every executable of
# fsfreeze-hook.d with "freeze" or "thaw"; the test guest's own hook logs both on the console.
cat > "$R/etc/qemu/fsfreeze-hook" <<'EOF'
#!/bin/sh
for h in /etc/qemu/fsfreeze-hook.d/*; do [ -x "$h" ] && "$h" "$@"; done
exit 0
EOF
cat > "$R/etc/qemu/fsfreeze-hook.d/50-console" <<'EOF'
#!/bin/sh
echo "EKKO-HOOK $1" > /dev/console
EOF
chmod 0755 "$R/etc/qemu/fsfreeze-hook" "$R/etc/qemu/fsfreeze-hook.d/50-console"
install -m 0755 "$INIT" "$R/init"

(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"
cp "/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
mkdir -p "$WORK/out" && mv "$WORK/initrd.gz" "$WORK/vmlinuz" "$WORK/out/"
rm -rf "$DEST" && mv "$WORK/out" "$DEST"
# earlier builds (another init, another kernel) are of no use any more
for old in "$OUT"/*/; do
    [ "${old%/}" = "$DEST" ] || [ ! -s "${old}initrd.gz" ] || rm -rf "${old%/}"
done
echo "$DEST"

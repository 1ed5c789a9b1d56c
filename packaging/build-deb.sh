#!/usr/bin/env bash
# Builds the Debian package of ekko from the git tree with dpkg-deb (no debhelper needed: what CI
# on Debian 12 has after `make deps`):
#   packaging/build-deb.sh OUTDIR [VERSION]      -> OUTDIR/ekko_VERSION_amd64.deb (its path on stdout)
# The C extension is built for Debian's python3 (the one the package runs on), and qemu.qmp, which
# Debian lacks, is carried from the venv (requirements.txt pins it) under /usr/lib/ekko/vendor.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: build-deb.sh OUTDIR [VERSION]}
VERSION=${2:-$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$HERE/setup.py")}
VENV=${EKKO_VENV:-$HERE/.venv}
PY=/usr/bin/python3
ARCH=$(dpkg --print-architecture)
PYDIST=usr/lib/python3/dist-packages
STAGE=$(mktemp -d /tmp/ekko-deb-XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
R=$STAGE/root
mkdir -p "$R/DEBIAN" "$R/$PYDIST" "$R/usr/bin" "$R/usr/lib/ekko/vendor/qemu" "$R/lib/systemd/system" \
         "$R/etc/ekko" "$R/etc/libvirt/hooks/qemu.d" "$R/usr/share/doc/ekko"

# the package's Python modules: what git tracks (no byte code, no build leftovers)
(cd "$HERE" && git ls-files -z 'ekko_libvirt/*.py' 'ekko_libvirt/*.pyi') | (cd "$HERE" && xargs -0 cp --parents -t "$R/$PYDIST")
ext=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -shared -fPIC -O3 -Wall $($PY -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])') \
    "$HERE/ekko_libvirt/format/_segcore.c" -lzstd -lcrypto -o "$R/$PYDIST/ekko_libvirt/format/_segcore$ext"
gcc -shared -fPIC -O3 -Wall $($PY -c 'import sysconfig; print("-I" + sysconfig.get_paths()["include"])') \
    "$HERE/ekko_libvirt/_directio.c" -o "$R/$PYDIST/ekko_libvirt/_directio$ext"

qmp=$("$VENV/bin/python" -c 'import os, qemu.qmp; print(os.path.dirname(qemu.qmp.__file__))')
cp -r "$qmp" "$R/usr/lib/ekko/vendor/qemu/qmp"
find "$R/usr/lib/ekko/vendor" -name __pycache__ -type d -prune -exec rm -rf {} +
echo /usr/lib/ekko/vendor > "$R/$PYDIST/ekko-vendor.pth"
for lic in "$(dirname "$(dirname "$qmp")")"/qemu_qmp-*.dist-info/licenses/*; do       # its license travels with it
    [ -f "$lic" ] && install -m 0644 "$lic" "$R/usr/share/doc/ekko/qemu.qmp.$(basename "$lic")"
done

install -m 0755 "$HERE/packaging/deb/ekko" "$R/usr/bin/ekko"
install -m 0644 "$HERE/packaging/ekko-agent.service" "$R/lib/systemd/system/ekko-agent.service"
install -m 0600 "$HERE/packaging/deb/ekko.yaml" "$R/etc/ekko/ekko.yaml"
# the hook, baked with the paths of the package's config (agent/spool.py render_hook); not a conffile:
# `remove` takes it away, so libvirt stops calling into a removed ekko
PYTHONPATH="$HERE" $PY -c '
import sys
from ekko_libvirt.agent import spool
src = open(sys.argv[1]).read()
sys.stdout.write(spool.render_hook(src, spool.DEFAULT_SPOOL_DIR, "/var/lib/ekko",
                                   "/usr/lib/python3/dist-packages/ekko_libvirt/agent/hookformat.py"))
' "$HERE/hooks/qemu" > "$R/etc/libvirt/hooks/qemu.d/ekko"
chmod 0755 "$R/etc/libvirt/hooks/qemu.d/ekko"
install -m 0644 "$HERE/README.md" "$HERE/ekko.yaml.example" "$HERE/packaging/ekko-alerts.yml" "$R/usr/share/doc/ekko/"

for s in postinst prerm postrm; do install -m 0755 "$HERE/packaging/deb/$s" "$R/DEBIAN/$s"; done
echo /etc/ekko/ekko.yaml > "$R/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$R" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$size/" "$HERE/packaging/deb/control.in" \
    > "$R/DEBIAN/control"
mkdir -p "$OUT"
deb="$OUT/ekko_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$R" "$deb" >&2
echo "$deb"

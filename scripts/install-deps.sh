#!/usr/bin/env bash
# Installs everything `make demo`, `make test` and `make bench` need on Debian 12, as root.
# Idempotent: apt skips what is there; the venv is created once and pip only adds what is missing.
#   scripts/install-deps.sh [core|all]
#     core: QEMU + libnbd + the Python venv (enough for `make demo`)
#     all : core + libvirtd + Swift (what the full test suite runs against)
set -euo pipefail
WHAT=${1:-all}
HERE=$(cd "$(dirname "$0")/.." && pwd)
VENV=${EKKO_VENV:-$HERE/.venv}

CORE_PKGS="qemu-system-x86 qemu-utils qemu-block-extra python3-libnbd libnbd-bin python3-venv python3-dev gcc pkg-config
 libzstd-dev libxxhash-dev python3-zstandard python3-prometheus-client"
# libzstd-dev + libxxhash-dev: the C extension ekko_libvirt/format/_segcore.c (segment.py's data path with
# the GIL released) links Debian's libzstd and inlines xxhash.h. python3-zstandard: Debian's zstandard links
# that same libzstd, so the Python path (and the tests comparing the two) writes the very same zstd frames;
# pip's wheel bundles its own zstd (1.5.6 in 0.23), whose frames may differ from 1.5.4's.
ALL_PKGS="$CORE_PKGS libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev python3-libvirt
 seabios ipxe-qemu swift swift-proxy swift-account swift-container swift-object python3-swiftclient memcached xfsprogs
 fuse3 nbdkit nbdkit-plugin-python python3-xxhash python3-yaml python3-cryptography
 linux-image-amd64 python3-guestfs libguestfs-tools gdisk prometheus busybox-static qemu-guest-agent cpio
 rabbitmq-server"
# rabbitmq-server: the message bus between ekko-api and the agents (oslo.messaging), started by the tests on
# their own node name, ports and directory (tests/harness/rabbitmq.py); never as the system's service here.
# python3-prometheus-client: the agent's metrics (agent.metrics; the venv sees Debian's, as a Debian package of
# ekko would); prometheus: only its promtool, which tests the example alert rules (packaging/ekko-alerts.yml)
# against the metrics of a real run. Its own service is not started here (policy-rc.d below).
# fuse3 (libfuse3 + fusermount3): tests/harness/crashfs.py, the power-cut file system of
# tests/integration/test_store_crash.py, through mfusepy (requirements-test.txt: pure ctypes, no build)
# nbdkit + nbdkit-plugin-python: `ekko serve` (ekko_libvirt/serve/plugin.py runs in nbdkit's embedded system
# python3.11, which imports from Debian's dist-packages: python3-xxhash, -yaml, -cryptography, -zstandard,
# -swiftclient); `ekko mount` uses nbdfuse (libnbd-bin) and fusermount3 (fuse3)
# linux-image-amd64 + python3-guestfs + libguestfs-tools: `ekko files` (serve/files.py), a libguestfs
# appliance (supermin builds it from the host's packages, with this kernel: /boot is empty without it) that
# reads the served disk; python3-guestfs exists for the system python3.11 only (the venv sees it). gdisk:
# sgdisk, which tests/integration/test_files.py partitions its images with. Measured here (2 cores,
# 2026-12-05): the first launch ever (supermin building the appliance in /var/tmp/.guestfs-0) ~9 s before
# failing under KVM; each launch after 15-30 s under TCG (load from other work) (nested KVM refuses the appliance's -cpu host:
# "failed to set MSR 0x10a"; serve/files.py then retries with TCG).
# busybox-static + qemu-guest-agent + cpio (+ linux-image-amd64): the test guest (tests/harness/guest.py), an
# initramfs of busybox and Debian's qemu-ga that scripts/build-test-guest.sh builds once into
# /var/cache/ekko-test-guest (the tests call it; never committed). qemu-ga is only copied out of its package:
# nothing of it runs on the host (no systemd here; policy-rc.d below keeps its postinst from starting it).
case "$WHAT" in core) PKGS=$CORE_PKGS ;; all) PKGS=$ALL_PKGS ;; *) echo "usage: $0 [core|all]" >&2; exit 2 ;; esac

missing=$(for p in $PKGS; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done)
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    # No systemd here: policy-rc.d keeps the postinst scripts from trying to start daemons.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing
    rm -f /usr/sbin/policy-rc.d
fi

# libnbd's Python binding exists only as Debian's python3-libnbd, built for /usr/bin/python3.11:
# the venv must be made by that interpreter and see its system site-packages.
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3.11 -m venv --system-site-packages "$VENV"
fi
# One zstd in the venv: the system's. A zstandard that pip put into the venv (an older install-deps, or
# a dependency's) shadows Debian's python3-zstandard; remove it when its zstd is not the system libzstd.
# Then requirements.txt's zstandard>=0.19 is already satisfied by Debian's.
venv_zstd=$("$VENV/bin/python" -c 'import zstandard; print("%d.%d.%d" % zstandard.ZSTD_VERSION)' 2>/dev/null || true)
sys_zstd=$(/usr/bin/python3.11 -c 'import ctypes; v = ctypes.CDLL("libzstd.so.1").ZSTD_versionNumber(); print(f"{v // 10000}.{v // 100 % 100}.{v % 100}")')
if [ -n "$venv_zstd" ] && [ "$venv_zstd" != "$sys_zstd" ]; then
    echo "install-deps: the venv's zstandard bundles zstd $venv_zstd, the system has $sys_zstd: using Debian's python3-zstandard" >&2
    "$VENV/bin/python" -m pip uninstall -q -y zstandard
fi
# requirements-api.txt (ekko-api: Flask, gunicorn, keystonemiddleware, oslo.*) in core too: pure Python, and
# `make lint` (mypy over the whole package) and `make unit` (the API's unit tests) run after core only.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt" \
    -r "$HERE/requirements-test.txt" -r "$HERE/requirements-api.txt"
# Editable install; it also builds the C extension in place (setup.py ext_modules). `make` rebuilds it
# when _segcore.c changes (Makefile: native).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$HERE"
"$VENV/bin/python" -c 'import nbd, qemu.qmp, xxhash, zstandard, yaml, cryptography' || {
    echo "install-deps: the venv at $VENV cannot import its dependencies" >&2; exit 1; }
if [ "$WHAT" = all ]; then
    "$VENV/bin/python" -c 'import guestfs' || {
        echo "install-deps: the venv at $VENV cannot import guestfs (python3-guestfs)" >&2; exit 1; }
    # Glance for the restore-as-image tests: from PyPI into a venv of its own under /var/cache (once, ~30 s)
    (cd "$HERE" && "$VENV/bin/python" -m tests.harness.glance install)
    # Keystone for the ekko-api tests (auth_token, the openstack CLI plugin): PyPI, its own venv under /var/cache (~30 s)
    (cd "$HERE" && "$VENV/bin/python" -m tests.harness.keystone install)
fi
"$VENV/bin/python" -c 'from ekko_libvirt.format import _segcore; from ekko_libvirt import _directio' || {
    echo "install-deps: the C extensions ekko_libvirt/format/_segcore.c, ekko_libvirt/_directio.c did not build" >&2; exit 1; }
echo "install-deps: ok ($WHAT) venv=$VENV" >&2

"""The scaling figures of issue 6 that do not need the peers:

- extent discovery on a 1 TiB sparse qcow2 with 1,000 dirty extents (ekko's own reader, in process,
  against qemu-nbd exporting the bitmap), and the full-disk walk of the same disk;
- `ekko backup` full and incremental (1,000 guest writes) on that 1 TiB disk through the CLI and a
  QEMU: wall time and peak RSS, to compare with the RSS on W;
- manifest write + load (commit to a local store, load back) for a 16 TiB disk whose every segment
  holds distinct data (the worst case), and its size.
"""

import os
import random
import subprocess
import time
from typing import Dict

import ekko_side
import procs
from procs import Vm
from workload import qemu_nbd

from ekko_libvirt.store import catalog
from ekko_libvirt.format import manifest as mf
from ekko_libvirt.engine.base import Export
from ekko_libvirt.nbd.reader import ExportReader
from ekko_libvirt.store.local import LocalStore

TiB = 1 << 40
EXTENT = 64 << 10
SEED_SPARSE = 6101


def _sparse_offsets(size: int, count: int, seed: int):
    """`count` 64 KiB-aligned offsets, no two adjacent (so each is its own dirty extent)."""
    rnd = random.Random(seed)
    return sorted(i * 2 * EXTENT for i in rnd.sample(range(size // (2 * EXTENT)), count))


def build_sparse(path: str, size: int, extents: int) -> None:
    """A sparse qcow2 with `extents` 64 KiB writes recorded in persistent bitmap 'b0'."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, str(size)],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", path, "b0"], check=True)
    cmds = []
    for k, off in enumerate(_sparse_offsets(size, extents, SEED_SPARSE)):
        cmds += ["-c", f"write -P {k % 251 + 1} {off} {EXTENT}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True, stdout=subprocess.DEVNULL)


def discovery(workdir: str, image: str, segment_size: int) -> Dict:
    """Time ekko's reader planning the backup (block status walk -> segment plans)."""
    out = {}
    sock = os.path.join(workdir, "sparse.nbd")
    with qemu_nbd(image, sock, bitmap="b0"):
        for kind, ctx in (("incremental", "qemu:dirty-bitmap:b0"), ("full", None)):
            t0 = time.monotonic()
            r = ExportReader(Export(sock, "", ctx), 1 << 20, 4)
            try:
                plans = list(r.plans(segment_size))
            finally:
                r.close()
            out[kind] = {"seconds": time.monotonic() - t0, "segments_planned": len(plans),
                         "segments_with_data": sum(1 for p in plans if not p.is_zero)}
    return out


def sparse_backups(workdir: str, image: str, overrides: Dict, writes: int) -> Dict:
    """ekko full, then `writes` 64 KiB guest writes, then an incremental, on a big sparse disk."""
    vm = Vm(workdir, image).start()
    ekko = ekko_side.Ekko(workdir, ekko_side.ekko_config(workdir, vm.qmp_socket, overrides))
    try:
        full, jf = ekko("backup", "w", "--full", qemu_pid=vm.pid)
        pattern = os.path.join(workdir, "w64k.bin")
        with open(pattern, "wb") as f:
            f.write(random.Random(SEED_SPARSE + 1).randbytes(EXTENT))
        os.chmod(pattern, 0o644)
        for off in _sparse_offsets(vm_size(image), writes, SEED_SPARSE + 2):
            vm.guest_write(pattern, off, EXTENT)
        inc, ji = ekko("backup", "w", "--incremental", qemu_pid=vm.pid)
    finally:
        vm.stop()
    return {"full": {"seconds": full.wall, "rss_mib": full.maxrss_mib, "cpu_s": full.cpu,
                     "qemu_cpu_s": full.qemu_cpu, "read_bytes": jf["backup"]["read_bytes"]},
            "incremental": {"seconds": inc.wall, "rss_mib": inc.maxrss_mib, "cpu_s": inc.cpu,
                            "qemu_cpu_s": inc.qemu_cpu, "read_bytes": ji["backup"]["read_bytes"],
                            "dirty_writes": writes}}


def vm_size(image: str) -> int:
    import json
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", image], capture_output=True, check=True)
    return int(json.loads(info.stdout)["virtual-size"])


def manifest_roundtrip(workdir: str, disk_size: int, segment_size: int) -> Dict:
    """Commit and load the manifest of a disk whose every segment holds distinct data."""
    n = mf.segment_count(disk_size, segment_size)
    rnd = random.Random(6201)
    digests = bytearray().join(rnd.randbytes(min(1 << 24, n * 16 - k)) for k in range(0, n * 16, 1 << 24))
    table = mf.SegmentTable(n, bytearray(b"\x01" * n), digests)
    m = mf.Manifest(backup_id=catalog.new_backup_id(), target="big", virtual_size=disk_size,
                    segment_size=segment_size, table=table)
    store = LocalStore(os.path.join(workdir, "manifest-store"))
    t0 = time.monotonic()
    key = catalog.commit(store, m)
    write_s = time.monotonic() - t0
    size = os.path.getsize(os.path.join(store.root, *key.split("/")))
    del m, table
    t0 = time.monotonic()
    back = catalog.load(store, key)
    load_s = time.monotonic() - t0
    ok = back.table.count == n and back.table.data_count() == n
    store.delete(key)
    return {"disk_tib": disk_size / TiB, "segment_size": segment_size, "entries": n, "write_s": write_s,
            "load_s": load_s, "bytes": size, "roundtrip_ok": ok}

#!/usr/bin/env python3
"""Writes tests/data/golden/: stores made by THIS release, which every later release must still
list, verify (deep) and restore byte-exact (tests/unit/test_golden_stores.py). Run it only to
add the stores of a new format version; never to "fix" a failing golden test.

    .venv/bin/python scripts/make_golden_stores.py [--out tests/data/golden]

Each store is written the way an operator writes one: a QEMU disk (tests/harness/qemu.py) that
the guest-write steps below fill, and the real CLI (`ekko backup`, `ekko protect`, `ekko verify`).
Three stores, segment size 64 KiB, disk DISK_SIZE (16 whole segments and a 20 KiB tail):

    plain        compression off
    compressed   zstd (the default)
    encrypted    zstd + encryption (the key file is in the directory: test data, not a secret)

each with a full and two incrementals (data, text, two equal segments, zero segments, a data
segment zeroed later, the partial last segment), the full protected, every backup verified.
What the disk holds at each backup is `disk_states(SEED)`: regenerated from the seed by anyone,
and recorded as SHA-256 in expected.json. Also manifest-v1.bin: one format-1 manifest built
with fixed fields (`golden_manifest()`), which manifest.decode must read as they are.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

KiB = 1024
SEG = 64 * KiB
DISK_SIZE = 16 * SEG + 20 * KiB
SEED = 20261205
FLAVORS = ("plain", "compressed", "encrypted")
FORMAT_VERSION = 1


def steps(seed: int = SEED):
    """The guest writes before each of the three backups: [("data", offset, bytes) |
    ("zero", offset, length)], the same for every flavor."""
    rng = random.Random(seed)
    text = b"".join(b"%06d ekko golden store, format 1: a line of compressible text\n" % i for i in range(5000))
    same = rng.randbytes(SEG)
    full = [("data", 0, rng.randbytes(3 * SEG)),            # segments 0-2: incompressible
            ("data", 4 * SEG, text[:4 * SEG]),               # 4-7: compressible
            ("data", 8 * SEG, same), ("data", 9 * SEG, same),   # 8, 9: one object for two segments
            ("data", 16 * SEG, rng.randbytes(DISK_SIZE - 16 * SEG))]   # the partial last segment
    # 3 and 10-15 stay zero: never stored
    inc1 = [("data", 2 * SEG + 1000, rng.randbytes(5000)),  # part of a segment
            ("zero", 5 * SEG, SEG),                          # a data segment becomes zero
            ("data", 12 * SEG, rng.randbytes(SEG))]          # a zero segment gets data
    inc2 = [("data", 16 * SEG + 100, rng.randbytes(300)),   # the tail again
            ("data", 13 * SEG, same)]                         # an object the store already has
    return [full, inc1, inc2]


def disk_states(seed: int = SEED):
    """The disk's content at each backup: bytes, one per backup."""
    disk = bytearray(DISK_SIZE)
    out = []
    for writes in steps(seed):
        for kind, off, arg in writes:
            if kind == "data":
                disk[off:off + len(arg)] = arg
            else:
                disk[off:off + arg] = bytes(arg)
        out.append(bytes(disk))
    return out


def golden_manifest():
    """A format-1 manifest with fixed fields: 5 segments (the last one partial), two equal."""
    from ekko_libvirt.format import manifest as mf
    seg = SEG
    table = mf.SegmentTable(5)
    digests = [bytes(range(i, i + 16)) for i in (1, 17, 33)]
    for i, d in ((0, digests[0]), (1, digests[1]), (3, digests[0]), (4, digests[2])):
        table.set_data(i, d)
    table.set_zero(2)
    return mf.Manifest(
        backup_id="20261205T120000000Z-a1b2c3", target="vm1.vda", virtual_size=4 * seg + 1536,
        segment_size=seg, table=table, kind="incremental", reason="bitmap ekko-x recorded every write since",
        parent="20261204T120000000Z-d4e5f6", generation={"bitmap": "ekko-20261205T120000000Z-a1b2c3",
                                                         "granularity": 65536},
        disk={"node": "disk0", "filename": "/var/lib/nova/instances/x/disk", "format": "qcow2"},
        created="2026-12-05T12:00:00+00:00", timings={"started": 1796472000.0, "finished": 1796472001.5,
                                                      "seconds": 1.5},
        counts={"segments": 5, "data_segments": 4, "segments_backed_up": 2, "zero_segments": 1,
                "read_bytes": 2 * seg, "new_segments": 1, "stored_bytes": 1000, "reused_segments": 1,
                "healed_segments": 0, "restored_segments": 0},
        labels={"project": "p1"}, hash="xxh3-128", compression="zstd")


def config(workdir: str, store: str, flavor: str, disk=None) -> dict:
    cfg = {"store": {"type": "local", "path": store}, "state_dir": os.path.join(workdir, "state"),
           "run_dir": os.path.join(workdir, "run"), "segment_size": "64KiB", "workers": 2,
           "compression": {"enabled": flavor != "plain"}}
    if disk is not None:
        cfg["targets"] = {"vm1.vda": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}}
    if flavor == "encrypted":
        cfg["encryption"] = {"enabled": True, "key_file": os.path.join(os.path.dirname(store), "{project}.key")}
    return cfg


def ekko(cfg_path: str, *args) -> dict:
    p = subprocess.run([sys.executable, "-m", "ekko_libvirt.cli", "-c", cfg_path, *args, "--json"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    if p.returncode:
        sys.exit(f"ekko {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return json.loads(p.stdout) if p.stdout.strip() else {}


def make_store(flavor: str, out: str, work: str) -> dict:
    import yaml
    from harness.qemu import QemuDisk
    base = os.path.join(out, flavor)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    store = os.path.join(base, "store")
    disk = QemuDisk(work, DISK_SIZE, "qcow2", name=flavor).start()
    try:
        cfg_path = os.path.join(work, f"{flavor}.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(config(work, store, flavor, disk), f)
        if flavor == "encrypted":
            ekko(cfg_path, "key", "create")
        backups = []
        for n, (writes, content) in enumerate(zip(steps(), disk_states())):
            for kind, off, arg in writes:
                disk.write(off, arg) if kind == "data" else disk.write_zeroes(off, arg)
            assert disk.snapshot() == content
            b = ekko(cfg_path, "backup", "vm1.vda", "--full" if n == 0 else "--incremental")["backup"]
            backups.append({"backup_id": b["backup_id"], "kind": b["kind"], "parent": b["parent"],
                            "sha256": hashlib.sha256(content).hexdigest()})
        ekko(cfg_path, "protect", backups[0]["backup_id"])
        ekko(cfg_path, "verify", "--deep")
    finally:
        disk.stop()
    return {"target": "vm1.vda", "virtual_size": DISK_SIZE, "segment_size": SEG, "seed": SEED,
            "compression": flavor != "plain", "encrypted": flavor == "encrypted",
            "protected": [backups[0]["backup_id"]], "backups": backups}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "golden"))
    args = ap.parse_args()
    from ekko_libvirt.format import manifest as mf
    os.makedirs(args.out, exist_ok=True)
    expected = {"format": FORMAT_VERSION, "made_by": "scripts/make_golden_stores.py", "stores": {}}
    work = tempfile.mkdtemp(prefix="ekgold", dir="/tmp")      # short: QMP socket paths
    try:
        for flavor in FLAVORS:
            expected["stores"][flavor] = make_store(flavor, args.out, work)
            print(f"{flavor}: {len(expected['stores'][flavor]['backups'])} backups", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, f"manifest-v{FORMAT_VERSION}.bin"), "wb") as f:
        f.write(mf.encode(golden_manifest()))
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

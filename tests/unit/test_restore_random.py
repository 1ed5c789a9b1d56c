"""Randomized: restores of disks whose data segments mix data and zeros at every granularity
(512 B .. 64 KiB, lone non-zero bytes at the edges of blocks, short last segments of any
length) are byte-exact, to raw and qcow2, new or over an existing file with other content.

A failure prints the seed that reproduces it: EKKO_RESTORE_SEED=<seed> EKKO_RESTORE_ROUNDS=1
runs just that one; EKKO_RESTORE_ROUNDS=<n> runs more (the default keeps the test to seconds).
"""

import json
import os
import random
import subprocess

from conftest import manifest_of, read_raw
from ekko_libvirt.restore.disk import GRAIN, restore
from ekko_libvirt.store.memory import MemoryStore

KiB = 1024
ROUNDS = int(os.environ.get("EKKO_RESTORE_ROUNDS") or 12)


def random_segment(rnd: random.Random, length: int) -> bytes:
    """`length` bytes of blocks (512 B .. 64 KiB) that are zeros, data, or zeros but one byte
    (often a block's first or last)."""
    grain = rnd.choice([512, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB])
    p_zero = rnd.random()
    out = bytearray(length)
    for o in range(0, length, grain):
        n = min(grain, length - o)
        r = rnd.random()
        if r < p_zero:
            continue
        if r < p_zero + (1 - p_zero) / 2:
            out[o:o + n] = rnd.randbytes(n)
        else:
            at = rnd.choice([0, n - 1, rnd.randrange(n)])
            out[o + at] = rnd.randrange(1, 256)
    return bytes(out)


def random_disk(rnd: random.Random, segment_sizes, sector_aligned: bool):
    """(segments, segment size, virtual size): some zero segments (None), a data segment of zeros
    now and then, the rest random_segment; a short last segment of random length, or none."""
    seg = rnd.choice(segment_sizes)
    whole = rnd.randrange(0, 10)
    tail = rnd.choice([0, rnd.randrange(1, seg), seg - 1, 1])
    if sector_aligned:
        tail -= tail % 512
    if whole == 0 and tail == 0:
        whole = 1
    size = whole * seg + tail
    segs = []
    for i in range(-(-size // seg)):
        length = min(seg, size - i * seg)
        kind = rnd.random()
        segs.append(None if kind < 0.2 else bytes(length) if kind < 0.25 else random_segment(rnd, length))
    return segs, seg, size


def disk_bytes(segs, seg, size) -> bytes:
    return b"".join(s if s is not None else bytes(min(seg, size - i * seg)) for i, s in enumerate(segs))


def first_difference(got: bytes, want: bytes):
    """None when equal, else where they first differ (pytest's diff of megabytes takes minutes)."""
    if got == want:
        return None
    n = min(len(got), len(want))
    lo, hi = 0, n           # bisect for the first differing byte
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if got[lo:mid] != want[lo:mid]:
            hi = mid
        else:
            lo = mid
    i = next((k for k in range(lo, hi) if got[k] != want[k]), n)
    return f"first difference at byte {i}; lengths {len(got)}, {len(want)}"


def _check_clean(path, where):
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    assert p.returncode == 0, f"{where}: {p.stdout}{p.stderr}"
    report = json.loads(p.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, f"{where}: {report}"


def test_random_sparse_segments_restore_exactly(workdir):
    base = int(os.environ.get("EKKO_RESTORE_SEED") or random.randrange(1 << 32))
    for r in range(ROUNDS):
        seed = base + r
        where = f"EKKO_RESTORE_SEED={seed} EKKO_RESTORE_ROUNDS=1"
        print(where)
        rnd = random.Random(seed)
        # 96 KiB: not whole clusters, a qcow2 goes through qemu-nbd (slower: now and then)
        sizes = [64 * KiB, 128 * KiB, 256 * KiB] + ([96 * KiB] if r % 3 == 2 else [])
        aligned = rnd.random() < 0.6            # a qcow2's virtual size is whole sectors
        segs, seg, size = random_disk(rnd, sizes, aligned)
        store = MemoryStore()
        m = manifest_of(store, segs, seg, size)
        disk = disk_bytes(segs, seg, size)
        targets = [("new", "raw")] + ([("new", "qcow2")] if aligned else [])
        targets.append((rnd.choice(["longer", "shorter"]), rnd.choice(["raw", "qcow2"] if aligned else ["raw"])))
        for before, fmt in targets:
            out = os.path.join(workdir, f"r{r}-{before}.{fmt}")
            if before != "new":     # a file of other bytes there, replaced with --force
                with open(out, "wb") as f:
                    f.write(b"\xa5" * (size + seg if before == "longer" else max(1, size // 2)))
            res = restore(store, m, out, fmt, workers=rnd.choice([1, 3]), overwrite=before != "new")
            what = f"{where}: {fmt} ({before}), segment size {seg}, disk {size} bytes"
            assert res.segments == sum(1 for s in segs if s is not None) and not res.holes, what
            if fmt == "qcow2":
                _check_clean(out, what)
            got = read_raw(out)
            assert first_difference(got, disk) is None, f"{what}: {first_difference(got, disk)}"
            if fmt == "raw":        # and as sparse as the disk (4 KiB blocks; ext4/tmpfs blocks)
                data = sum(GRAIN for o in range(0, size, GRAIN) if any(disk[o:o + GRAIN]))
                allocated = os.stat(out).st_blocks * 512
                assert allocated <= data + 64 * KiB, f"{what}: {allocated} bytes allocated for {data} of data"
            for p in (out, out + ".raw"):
                if os.path.exists(p):
                    os.unlink(p)

"""Restore is as sparse as the disk: the zero blocks inside data segments are holes in a raw
file and unallocated clusters in a qcow2, and the bytes stay exact (qemu-img compare, check)."""

import json
import os
import random
import subprocess

import pytest

from conftest import manifest_of, read_raw
from ekko_libvirt.restore.disk import GRAIN, data_runs, device_plan, restore
from ekko_libvirt.store.memory import MemoryStore
from tests.unit.test_restore_random import first_difference

KiB, MiB = 1024, 1 << 20
CLUSTER = 64 * KiB


def reference_runs(raw, grain):
    """data_runs the slow, obvious way: block by block, any non-zero byte is data."""
    runs, start = [], None
    for o in range(0, len(raw), grain):
        zero = not any(raw[o:o + grain])
        if zero and start is not None:
            runs.append((start, o))
            start = None
        elif not zero and start is None:
            start = o
    if start is not None:
        runs.append((start, len(raw)))
    return runs


def blocks_with_data(raw, grain):
    """Bytes of the `grain`-sized blocks of `raw` (the last one may be shorter) that hold data."""
    return sum(len(raw[o:o + grain]) for o in range(0, len(raw), grain) if any(raw[o:o + grain]))


def fs_blocks_with_data(segs):
    """Bytes of the whole 4 KiB file system blocks that hold data, over all segments."""
    return sum(GRAIN for s in segs if s for o in range(0, len(s), GRAIN) if any(s[o:o + GRAIN]))


def qemu_img(*args):
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    return p


def check_clean(path):
    p = qemu_img("check", "--output=json", path)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report


def same_as(path, fmt, reference):
    """qemu-img compare of the restored image with a raw reference file, and the same size."""
    size = json.loads(qemu_img("info", "--output=json", "-f", fmt, path).stdout)["virtual-size"]
    if size != os.path.getsize(reference):
        return False, f"virtual size {size}, the disk's {os.path.getsize(reference)}"
    p = qemu_img("compare", "-f", fmt, "-F", "raw", path, reference)
    return p.returncode == 0, p.stdout + p.stderr


def mapped_data(path):
    """Bytes qemu-img map reports as data (allocated) in a qcow2."""
    p = qemu_img("map", "--output=json", path)
    assert p.returncode == 0, p.stderr
    return sum(e["length"] for e in json.loads(p.stdout) if e["data"])


def write_reference(workdir, disk):
    ref = os.path.join(workdir, "ref.raw")
    with open(ref, "wb") as f:
        f.write(disk)
    return ref


# -- data_runs, device_plan (pure) -------------------------------------------------------------
@pytest.mark.parametrize("raw,want", [
    (b"", []),
    (bytes(GRAIN), []),
    (b"\1" + bytes(GRAIN - 1), [(0, GRAIN)]),
    (bytes(GRAIN - 1) + b"\1", [(0, GRAIN)]),                           # the last byte of a block
    (bytes(GRAIN) + b"\1", [(GRAIN, GRAIN + 1)]),                        # a short last block of data
    (b"\1" + bytes(GRAIN) + bytes(1000), [(0, GRAIN)]),                  # a short last block of zeros
    (bytes(3 * GRAIN) + b"\1" * GRAIN + bytes(GRAIN) + b"\1", [(3 * GRAIN, 4 * GRAIN), (5 * GRAIN, 5 * GRAIN + 1)]),
    (b"\1" * (2 * GRAIN) + bytes(GRAIN) + b"\2" * GRAIN, [(0, 2 * GRAIN), (3 * GRAIN, 4 * GRAIN)]),
    (b"\1" * 10, [(0, 10)]),
    (bytes(10), []),
])
def test_data_runs_edges(raw, want):
    assert data_runs(raw) == want == reference_runs(raw, GRAIN)


def test_data_runs_against_the_obvious_version():
    seed = int(os.environ.get("EKKO_RESTORE_SEED") or random.randrange(1 << 32))
    rnd = random.Random(seed)
    for _ in range(400):
        n = rnd.choice([rnd.randrange(1, 70 * KiB), 64 * KiB, GRAIN - 1, GRAIN, GRAIN + 1])
        b = bytearray(n)
        for _ in range(rnd.randrange(6)):
            o, length = rnd.randrange(n), rnd.randrange(1, 9 * KiB)
            b[o:o + length] = rnd.randbytes(len(b[o:o + length]))
        for _ in range(rnd.randrange(3)):           # lone bytes: the sharpest test of the slices
            b[rnd.randrange(n)] = rnd.randrange(1, 256)
        raw = bytes(b)
        grain = rnd.choice([512, GRAIN, 64 * KiB])
        assert data_runs(raw, grain) == reference_runs(raw, grain), f"seed {seed}, n {n}, grain {grain}"


def test_device_plan_covers_the_segment_once_and_zeroes_only_long_gaps():
    seed = int(os.environ.get("EKKO_RESTORE_SEED") or random.randrange(1 << 32))
    rnd = random.Random(seed)
    for _ in range(300):
        length = rnd.choice([1 * MiB, 64 * KiB, 1 * MiB - 1536, 4096])
        raw = bytearray(length)
        for _ in range(rnd.randrange(5)):
            o, n = rnd.randrange(length), rnd.randrange(1, 200 * KiB)
            raw[o:o + n] = b"\1" * len(raw[o:o + n])
        runs = data_runs(bytes(raw))
        plan = device_plan(runs, length, 64 * KiB)
        where = f"seed {seed}, runs {runs}, plan {plan}"
        pos = 0
        for kind, s, e in plan:                     # in order, contiguous, nothing twice
            assert s == pos and s < e, where
            pos = e
        assert pos == length, where
        for kind, s, e in plan:
            if kind == "zero":
                assert e - s >= 64 * KiB and not any(raw[s:e]), where
        for s, e in runs:                           # every data byte is written
            assert any(k == "write" and ws <= s and e <= we for k, ws, we in plan), where


# -- restores ----------------------------------------------------------------------------------
def _sparse_disk(seed):
    """16 segments of 1 MiB, then a short one of 1.5 KiB, data segments holding one or two
    4 KiB blocks each (and a lone byte): data at a segment's very start, its very end, its last
    byte, in a short last segment; whole zero segments between."""
    rnd = random.Random(seed)
    seg = 1 * MiB
    segs = []
    for i in range(16):
        s = bytearray(seg)
        if i == 0:
            s[:GRAIN] = rnd.randbytes(GRAIN)                    # the very start
        elif i == 1:
            s[-GRAIN:] = rnd.randbytes(GRAIN)                   # the very end
        elif i == 2:
            s[-1] = 0x5a                                        # only the last byte
        elif i in (5, 11):
            segs.append(None)                                   # a zero segment
            continue
        else:
            for _ in range(rnd.randrange(1, 3)):
                o = rnd.randrange(seg // GRAIN) * GRAIN
                s[o:o + GRAIN] = rnd.randbytes(GRAIN)
        segs.append(bytes(s))
    tail = bytearray(1536)
    tail[1024:] = rnd.randbytes(512)                            # short last segment, data at its end
    segs.append(bytes(tail))
    return segs, seg, 16 * seg + len(tail)


def test_raw_restore_of_sparse_data_segments_allocates_the_data_only(workdir):
    segs, seg, size = _sparse_disk(11)
    store = MemoryStore()
    m = manifest_of(store, segs, seg, size)
    disk = b"".join(s or bytes(seg) for s in segs)
    out = os.path.join(workdir, "out.raw")
    restore(store, m, out, "raw", workers=3)
    assert first_difference(read_raw(out), disk) is None
    data = fs_blocks_with_data(segs)
    allocated = os.stat(out).st_blocks * 512
    # before: every data segment whole (15 MiB); now the 4 KiB blocks that hold data
    assert allocated <= data + 64 * KiB, (allocated, data)


def test_qcow2_restore_maps_only_the_clusters_that_hold_data(workdir):
    segs, seg, size = _sparse_disk(12)
    store = MemoryStore()
    m = manifest_of(store, segs, seg, size)
    disk = b"".join(s or bytes(seg) for s in segs)
    out = os.path.join(workdir, "out.qcow2")
    restore(store, m, out, "qcow2", workers=3)
    check_clean(out)
    ok, why = same_as(out, "qcow2", write_reference(workdir, disk))
    assert ok, why
    assert mapped_data(out) == blocks_with_data(disk, CLUSTER)
    info = json.loads(qemu_img("info", "--output=json", out).stdout)
    data = fs_blocks_with_data(segs)
    # the data's 4 KiB blocks, and the metadata: header, refcount table and block, L1, one L2
    assert info["actual-size"] <= data + 5 * CLUSTER, (info["actual-size"], data)


def test_qcow2_through_qemu_nbd_is_sparse_too(workdir):
    """A segment size that is not whole clusters (only a hand-made manifest has one) goes through
    qemu-nbd: the zero blocks are not written there either, so a cluster of a segment that holds
    only zeros stays unallocated."""
    rnd = random.Random(13)
    seg = 96 * KiB
    segs = [rnd.randbytes(GRAIN) + bytes(seg - GRAIN) for _ in range(32)]     # data in the first 4 KiB
    store = MemoryStore()
    m = manifest_of(store, segs, seg)
    disk = b"".join(segs)
    out = os.path.join(workdir, "out.qcow2")
    restore(store, m, out, "qcow2", workers=2)
    check_clean(out)
    ok, why = same_as(out, "qcow2", write_reference(workdir, disk))
    assert ok, why
    assert mapped_data(out) == blocks_with_data(disk, CLUSTER) == 32 * CLUSTER     # of 48


def test_the_restored_image_is_exact_where_zero_blocks_sit_between_data(workdir):
    """Alternating 4 KiB blocks of data and zeros, a lone byte in the first and the last byte
    of blocks: a zero check on the wrong slice shows up as a wrong byte here."""
    rnd = random.Random(14)
    seg = 256 * KiB
    segs = []
    for i in range(8):
        s = bytearray(seg)
        for b in range(0, seg, 2 * GRAIN):
            s[b:b + GRAIN] = rnd.randbytes(GRAIN)
        s[GRAIN + 0] = 1                # first byte of a zero block
        s[3 * GRAIN + GRAIN - 1] = 2    # last byte of a zero block
        segs.append(bytes(s))
    store = MemoryStore()
    m = manifest_of(store, segs, seg)
    disk = b"".join(segs)
    for fmt in ("raw", "qcow2"):
        out = os.path.join(workdir, f"alt.{fmt}")
        restore(store, m, out, fmt, workers=3)
        if fmt == "qcow2":
            check_clean(out)
        assert first_difference(read_raw(out), disk) is None, fmt


def test_a_damaged_segment_is_an_unallocated_hole_in_a_qcow2(workdir):
    """--allow-damaged: the damaged segment's clusters are not mapped (they read as zeros), the
    image stays clean, the rest is exact."""
    from ekko_libvirt.format import segment
    rnd = random.Random(15)
    seg = 256 * KiB
    segs = [rnd.randbytes(seg) for _ in range(4)]
    store = MemoryStore()
    m = manifest_of(store, segs, seg)
    key = segment.segment_key(segment.digest(segs[2]))
    blob = bytearray(store.get(key))
    blob[-1] ^= 1
    store.put(key, bytes(blob))
    out = os.path.join(workdir, "d.qcow2")
    res = restore(store, m, out, "qcow2", workers=2, allow_damaged=True)
    assert [h.index for h in res.holes] == [2]
    check_clean(out)
    disk = segs[0] + segs[1] + bytes(seg) + segs[3]
    ok, why = same_as(out, "qcow2", write_reference(workdir, disk))
    assert ok, why
    assert mapped_data(out) == 3 * seg

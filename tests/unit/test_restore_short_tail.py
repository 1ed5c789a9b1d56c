"""A disk whose size is not a multiple of the segment size ends in a short segment: restored to
raw and to qcow2 (ekko's writer, and qemu-nbd for a segment size that is not whole clusters),
byte-exact, with the short segment holding data, zeros, or data then zeros."""

import json
import os
import random
import subprocess

import pytest

from conftest import manifest_of, read_raw
from ekko_libvirt.store.memory import MemoryStore
from ekko_libvirt.restore.disk import restore
from tests.unit.test_restore_random import first_difference

KiB, MiB = 1024, 1 << 20


def _disk(size, seg, tail, seed):
    """Segments of a `size`-byte disk: data in the first, a middle and the last whole segment
    (the last whole one's data reaching its very end), zeros elsewhere; the short last segment
    is `tail`: "data" (random, its last byte non-zero), "zero" (a zero segment), "data+zeros"
    (its first 512 bytes data, the rest zeros) or "zero-data" (stored as data, all zeros)."""
    rnd = random.Random(seed)
    n = -(-size // seg)
    short = size - (n - 1) * seg
    assert 0 < short < seg
    segs = [None] * n
    for i in (0, n // 2, n - 2):
        segs[i] = rnd.randbytes(seg)
    segs[n - 2] = segs[n - 2][:-1] + b"\xff"
    if tail == "data":
        segs[-1] = rnd.randbytes(short - 1) + b"\x01"
    elif tail == "data+zeros":
        segs[-1] = rnd.randbytes(512) + bytes(short - 512)
    elif tail == "zero-data":
        segs[-1] = bytes(short)
    return segs


SIZES = [
    (8 * MiB + 1536, 1 * MiB),                  # 1.5 KiB past the last whole segment
    (64 * MiB + 64 * KiB + 512, 64 * KiB),      # 1026 segments, the last one 512 bytes
    (3 * MiB + 4 * KiB + 1024, 256 * KiB),      # a short segment that is not whole 4 KiB blocks
]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("tail", ["data", "zero", "data+zeros", "zero-data"])
@pytest.mark.parametrize("size,seg", SIZES, ids=[f"{s}-{g}" for s, g in SIZES])
def test_a_short_last_segment_is_restored_exactly(workdir, size, seg, tail, fmt):
    segs = _disk(size, seg, tail, seed=size ^ seg)
    store = MemoryStore()
    m = manifest_of(store, segs, seg, size)
    assert m.table.count == len(segs)
    disk = b"".join(s if s is not None else bytes(min(seg, size - i * seg)) for i, s in enumerate(segs))
    assert len(disk) == size
    out = os.path.join(workdir, f"out.{fmt}")
    res = restore(store, m, out, fmt, workers=3)
    assert res.segments == sum(1 for s in segs if s is not None) and not res.holes
    if fmt == "qcow2":
        _check_clean(out)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", out], capture_output=True,
                                         text=True, check=True).stdout)
        assert info["virtual-size"] == size
    else:
        assert os.path.getsize(out) == size
    assert first_difference(read_raw(out), disk) is None


@pytest.mark.parametrize("tail", ["data", "data+zeros"])
def test_a_short_last_segment_through_qemu_nbd(workdir, tail):
    """96 KiB segments (not whole clusters: only a hand-made manifest has them) go through qemu-nbd."""
    size, seg = 2 * MiB + 1536, 96 * KiB
    segs = _disk(size, seg, tail, seed=7)
    store = MemoryStore()
    m = manifest_of(store, segs, seg, size)
    disk = b"".join(s if s is not None else bytes(seg) for s in segs)
    out = os.path.join(workdir, "out.qcow2")
    restore(store, m, out, "qcow2", workers=2)
    _check_clean(out)
    assert first_difference(read_raw(out), disk) is None


def _check_clean(path):
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report

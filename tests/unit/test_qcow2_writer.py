"""ekko's qcow2 writer (restore's output): images qemu-img calls clean and reads back exactly."""

import json
import os
import subprocess

import pytest

from ekko_libvirt.restore import qcow2

MiB = 1 << 20


def _write(path, virtual_size, seg, contents):
    """contents: {segment index: bytes}; -> the image at path."""
    idx = sorted(contents)
    lay = qcow2.plan(virtual_size, seg, idx)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for rank, i in enumerate(idx):
            os.pwrite(fd, contents[i], lay.host_offset(rank))
        qcow2.finish(fd, lay, idx)
    finally:
        os.close(fd)
    return lay


def _check(path):
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    return report


def _read(path, tmp_path):
    raw = str(tmp_path / "out.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw], check=True)
    with open(raw, "rb") as f:
        return f.read()


@pytest.mark.parametrize("virtual_size,seg,indexes", [
    (64 * MiB, 1 * MiB, [0, 1, 2, 63]),                     # small, last segment whole
    (1024 * MiB + 5 * MiB + 1536, 1 * MiB, [0, 511, 512, 1000, 1029]),   # crosses L2 regions, short tail
    (1100 * MiB, 4 * MiB, [127, 128, 274]),                 # 4 MiB segments around a region boundary
    (64 * MiB, 64 << 10, list(range(0, 1024, 3))),          # one cluster per segment
    (8 * MiB, 1 * MiB, []),                                 # nothing but zeros
])
def test_clean_image_with_the_data_in_place(tmp_path, virtual_size, seg, indexes):
    contents = {i: bytes([i % 250 + 1]) * min(seg, virtual_size - i * seg) for i in indexes}
    path = str(tmp_path / "d.qcow2")
    _write(path, virtual_size, seg, contents)
    _check(path)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["virtual-size"] == virtual_size and info["cluster-size"] == 65536
    want = bytearray(virtual_size)
    for i, d in contents.items():
        want[i * seg:i * seg + len(d)] = d
    assert _read(path, tmp_path) == bytes(want)


def test_a_huge_sparse_disk_has_small_metadata(tmp_path):
    """16 TiB with data in three places: the L1 table and two refcount blocks, no more."""
    seg = 1 * MiB
    size = 16 << 40
    idx = [0, (8 << 40) // seg, size // seg - 1]
    lay = qcow2.plan(size, seg, idx)
    assert len(lay.l2_tables) == 3
    assert lay.file_size < 2 * MiB + 3 * seg
    path = str(tmp_path / "h.qcow2")
    _write(path, size, seg, {i: b"\x07" * seg for i in idx})
    _check(path)
    p = subprocess.run(["qemu-img", "map", "--output=json", path], capture_output=True, text=True, check=True)
    data = [(e["start"], e["length"]) for e in json.loads(p.stdout) if e["data"]]
    assert data == [(i * seg, seg) for i in idx]


def test_segment_sizes_that_are_not_whole_clusters_are_refused():
    assert not qcow2.can_write(32 << 10)
    with pytest.raises(ValueError, match="segment size 32768 is not a multiple of the 65536-byte cluster"):
        qcow2.plan(MiB, 32 << 10, [0])


def test_clusters_not_marked_allocated_stay_unallocated(workdir):
    """An Allocation maps only the clusters written: the others read as zeros, have refcount 0
    (no leak), and take no room; a region whose clusters are all unmarked keeps an empty L2."""
    seg = 1 * MiB
    size = 1100 * MiB + 1536                                # three regions, a short last segment
    idx = [0, 3, 600, 1100]                                 # 600: region 1, left all zeros
    lay = qcow2.plan(size, seg, idx)
    alloc = qcow2.Allocation(lay)
    contents = {0: (0, 64 << 10), 3: (seg - 65536, seg), 1100: (0, 1536)}   # rank order: 0, 1, -, 3
    path = os.path.join(workdir, "a.qcow2")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for rank, i in enumerate(idx):
            if i in contents:
                s, e = contents[i]
                os.pwrite(fd, bytes([rank + 1]) * (e - s), lay.host_offset(rank) + s)
                alloc.mark(rank, [(s, e)])
        qcow2.finish(fd, lay, idx, alloc)
    finally:
        os.close(fd)
    _check(path)
    p = subprocess.run(["qemu-img", "map", "--output=json", path], capture_output=True, text=True, check=True)
    data = [(e["start"], e["length"]) for e in json.loads(p.stdout) if e["data"]]
    assert data == [(0, 65536), (4 * seg - 65536, 65536), (1100 * seg, 1536)]
    ref = os.path.join(workdir, "ref.raw")                         # sparse: compare reads block status
    with open(ref, "wb") as f:
        f.truncate(size)
        for off, byte, n in ((0, 1, 65536), (4 * seg - 65536, 2, 65536), (1100 * seg, 4, 1536)):
            os.pwrite(f.fileno(), bytes([byte]) * n, off)
    p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, ref], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert os.stat(path).st_blocks * 512 < 1 * MiB          # the reserved clusters are holes

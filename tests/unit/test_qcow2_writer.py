"""ekko's qcow2 writer (restore's output): images qemu-img calls clean and reads back exactly."""

import json
import os
import subprocess

import pytest

from ekko_libvirt import qcow2

MiB = 1 << 20


def _write(path, virtual_size, seg, contents):
    """contents: {segment index: bytes}; -> the image at path."""
    idx = sorted(contents)
    lay = qcow2.plan(virtual_size, seg, [(i, contents[i]) for i in idx])
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
    lay = qcow2.plan(size, seg, [(i, i) for i in idx])
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
    with pytest.raises(ValueError):
        qcow2.plan(MiB, 32 << 10, [(0, b"d")])


# -- repeated segments share clusters -----------------------------------------------------------

def _qemu_io(path, cmd):
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], capture_output=True, text=True)
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    return p.stdout


def test_repeated_segments_share_clusters_and_a_guest_write_copies(tmp_path):
    seg = 1 * MiB
    a, b = b"\xaa" * seg, b"\xbb" * seg
    contents = {0: a, 1: b, 2: b"\x01" * seg, 3: a, 7: a, 8: b, 9: b"\x02" * seg}
    path = str(tmp_path / "s.qcow2")
    lay = _write(path, 64 * MiB, seg, contents)
    assert list(lay.shared_ranks) == [3, 4, 5]          # indexes 3, 7, 8
    assert [lay.slot(r) for r in range(7)] == [0, 1, 2, 0, 0, 1, 3]
    assert lay.refs == {0: 3, 1: 2}
    assert lay.file_size == lay.data + 4 * seg          # four slots, not seven
    _check(path)
    want = bytearray(64 * MiB)
    for i, d in contents.items():
        want[i * seg:(i + 1) * seg] = d
    assert _read(path, tmp_path) == bytes(want)
    # a guest write into one of three sharers copies the cluster: the other two keep their data
    _qemu_io(path, "write -P 0x5a 3145728 65536")
    _check(path)
    want[3 * seg:3 * seg + 65536] = b"\x5a" * 65536
    assert _read(path, tmp_path) == bytes(want)


def test_sharing_is_bounded_by_the_refcount_width(tmp_path, monkeypatch):
    seg = 64 << 10
    pure = qcow2.plan((qcow2.MAX_REFS + 2) * seg, seg, ((i, b"x") for i in range(qcow2.MAX_REFS + 2)))
    assert qcow2.MAX_REFS == 0xFFFF and pure.refs == {0: qcow2.MAX_REFS, 1: 2}
    monkeypatch.setattr(qcow2, "MAX_REFS", 3)
    path = str(tmp_path / "r.qcow2")
    lay = _write(path, 8 * seg, seg, {i: b"\x33" * seg for i in range(8)})
    assert lay.refs == {0: 3, 1: 3, 2: 2}
    _check(path)
    assert _read(path, tmp_path) == b"\x33" * (8 * seg)


def test_what_is_not_shared():
    seg = 1 * MiB
    # a digest evicted from the window starts a new copy
    lay = qcow2.plan(8 * seg, seg, [(0, "a"), (1, "b"), (2, "c"), (3, "a"), (4, "c")], window=2)
    assert list(lay.shared_ranks) == [4] and lay.refs == {2: 2}
    # share=False: one slot each
    lay = qcow2.plan(8 * seg, seg, [(0, "a"), (1, "a")], share=False)
    assert not lay.refs and lay.slot(1) == 1
    # a short last segment shares with nothing (its digest cannot equal a whole segment's anyway)
    lay = qcow2.plan(2 * seg + 4096, seg, [(0, "a"), (2, "a")])
    assert not lay.refs

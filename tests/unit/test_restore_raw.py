"""Restore of a manifest to a raw file or ekko's qcow2, against an in-memory store (real backups
are covered by the integration tests)."""

import os

import pytest

from ekko_libvirt import manifest as mf
from ekko_libvirt import segment
from ekko_libvirt.errors import IntegrityError
from ekko_libvirt.restore import RecentSegments, restore
from ekko_libvirt.store.memory import MemoryStore

SEG = 64 << 10


class CountingStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.gets = {}

    def get(self, key):
        self.gets[key] = self.gets.get(key, 0) + 1
        return super().get(key)


def _backup(store, contents):
    """A manifest whose segment i holds contents[i] (None: a zero segment)."""
    t = mf.SegmentTable(len(contents))
    for i, raw in enumerate(contents):
        if raw is None:
            t.set_zero(i)
            continue
        enc = segment.encode(raw)
        store.put(enc.key, enc.blob)
        t.set_data(i, enc.digest)
    return mf.Manifest("20260101T000000000Z-abcdef", "t1", len(contents) * SEG, SEG, t, kind="full")


def test_repeated_segments_are_fetched_once_and_restored_everywhere(tmp_path):
    a, b, c = (os.urandom(SEG) for _ in range(3))
    contents = [a, b, a, None, b, a, c] * 20
    store = CountingStore()
    m = _backup(store, contents)
    out = str(tmp_path / "disk.raw")
    res = restore(store, m, out, "raw", workers=3)
    with open(out, "rb") as f:
        assert f.read() == b"".join(x or bytes(SEG) for x in contents)
    assert res.segments == sum(1 for x in contents if x is not None)
    # three distinct segments: a few fetches each at most (threads may race on the first)
    assert sum(store.gets.values()) <= 3 * 3, store.gets


def test_a_damaged_repeated_segment_is_a_hole_everywhere(tmp_path):
    a, b = os.urandom(SEG), os.urandom(SEG)
    contents = [a, b, a, b, a]
    store = MemoryStore()
    m = _backup(store, contents)
    key = segment.segment_key(segment.digest(a))
    blob = bytearray(store.get(key))
    blob[-1] ^= 1
    store.put(key, bytes(blob))
    with pytest.raises(IntegrityError, match=key):
        restore(store, m, str(tmp_path / "x.raw"), "raw", workers=2)
    assert not os.path.exists(tmp_path / "x.raw")
    res = restore(store, m, str(tmp_path / "y.raw"), "raw", workers=2, allow_damaged=True)
    assert sorted(h.index for h in res.holes) == [0, 2, 4]
    with open(tmp_path / "y.raw", "rb") as f:
        assert f.read() == b"".join(bytes(SEG) if x is a else x for x in contents)


def test_recent_segments_keeps_the_last_n():
    r = RecentSegments(2)
    r.put(b"a", b"1")
    r.put(b"b", b"2")
    assert r.get(b"a") == b"1"          # a is now the most recent
    r.put(b"c", b"3")
    assert r.get(b"b") is None and r.get(b"a") == b"1" and r.get(b"c") == b"3"


def test_qcow2_restore_shares_repeats_fetches_them_once_and_reports_damage_everywhere(tmp_path):
    import subprocess
    a, b, c = (os.urandom(SEG) for _ in range(3))
    contents = [a, b, a, None, b, a, c] * 20
    store = CountingStore()
    m = _backup(store, contents)
    out = str(tmp_path / "disk.qcow2")
    res = restore(store, m, out, "qcow2", workers=3)
    assert res.segments == sum(1 for x in contents if x is not None)
    assert sum(store.gets.values()) <= 3 * 3, store.gets
    raw = str(tmp_path / "back.raw")
    subprocess.run(["qemu-img", "check", out], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", out, raw], check=True)
    with open(raw, "rb") as f:
        assert f.read() == b"".join(x or bytes(SEG) for x in contents)
    # three distinct segments of data: three data clusters (after a few of metadata), not 120
    assert os.path.getsize(out) < 8 * SEG + 3 * SEG
    # a damaged repeated segment: every index that uses it is a hole, none reads another's data
    key = segment.segment_key(segment.digest(a))
    blob = bytearray(store.get(key))
    blob[-1] ^= 1
    store.put(key, bytes(blob))
    res = restore(store, m, str(tmp_path / "y.qcow2"), "qcow2", workers=2, allow_damaged=True)
    assert sorted(h.index for h in res.holes) == [i for i, x in enumerate(contents) if x is a]
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(tmp_path / "y.qcow2"), raw], check=True)
    with open(raw, "rb") as f:
        assert f.read() == b"".join(bytes(SEG) if (x is a or x is None) else x for x in contents)

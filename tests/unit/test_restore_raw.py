"""Restore of a manifest to a raw file, against an in-memory store (the qcow2 path and real
backups are covered by the integration tests)."""

import os

import pytest

from conftest import manifest_of
from ekko_libvirt.format import segment
from ekko_libvirt.errors import IntegrityError
from ekko_libvirt.restore.disk import RecentSegments, restore
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
    return manifest_of(store, contents, SEG)


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


def test_only_files_are_restored_to_never_devices_or_directories(tmp_path):
    """The partial image is renamed over the target at the end: over a device node (an LVM
    volume) that would replace the node. Refused, with --force too, before anything is written."""
    from ekko_libvirt.errors import UsageError
    store = MemoryStore()
    m = _backup(store, [os.urandom(SEG)])
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    # (no real device here: on a broken build the test itself would replace the node)
    for target, kind in ((fifo, "not a regular file"), (str(tmp_path), "a directory")):
        with pytest.raises(UsageError, match=f"is {kind}: ekko restores to image files"):
            restore(store, m, target, "raw", overwrite=True)
    import stat
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo"]

"""serve/disk.py (ServedDisk, what the NBD plugin serves) against a memory store: every read
equals the disk, from any offset and length, with a cache too small to hold the disk, with
read-ahead and several threads reading at once; zero segments never reach the store; a damaged
or missing segment fails the reads that touch it (naming it) and nothing else; block status is
the manifest's ZERO/DATA runs."""

import os
import random
import threading

import pytest

from conftest import manifest_of
from ekko_libvirt.format import segment
from ekko_libvirt.serve.disk import MAX_EXTENTS, SegmentUnreadable, ServedDisk
from ekko_libvirt.store.memory import MemoryStore

KiB = 1024
SEG = 64 * KiB


class CountingStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.gets = []

    def get(self, key):
        self.gets.append(key)
        return super().get(key)


def make_disk(rnd, n_full=23, tail=1536, repeat=True):
    """Segments: random, zero, a repeated one (same digest at several offsets), and a short last
    segment of `tail` bytes. -> (store, manifest, expected bytes)."""
    rep = rnd.randbytes(SEG)
    contents = []
    for _ in range(n_full):
        r = rnd.random()
        contents.append(None if r < 0.3 else rep if repeat and r < 0.45 else rnd.randbytes(SEG))
    contents.append(rnd.randbytes(tail) if tail else None)
    size = n_full * SEG + (tail or SEG)
    store = CountingStore()
    m = manifest_of(store, contents, SEG, virtual_size=size)
    expected = b"".join(c if c is not None else bytes(SEG) for c in contents[:-1])
    expected += contents[-1] if contents[-1] is not None else bytes(tail or SEG)
    store.gets.clear()
    return store, m, expected


def read(disk, offset, length):
    buf = bytearray(length)
    disk.read(buf, offset)
    return bytes(buf)


@pytest.mark.parametrize("cache_segments,readahead", [(2, 0), (2, 3), (64, 4)])
def test_random_reads_equal_the_disk(cache_segments, readahead):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rnd = random.Random(seed)
    store, m, expected = make_disk(rnd)
    disk = ServedDisk(store, m, cache_bytes=cache_segments * SEG, readahead=readahead, workers=3)
    try:
        size = len(expected)
        for _ in range(400):
            kind = rnd.random()
            if kind < 0.2:      # spans segments
                off = rnd.randrange(0, size - 1)
                n = rnd.randrange(1, min(size - off, 4 * SEG) + 1)
            elif kind < 0.4:    # the short last segment and the end of the disk
                off = rnd.randrange(size - SEG - 2000, size - 1)
                n = rnd.randrange(1, size - off + 1)
            elif kind < 0.6:    # sequential 4 KiB-aligned pieces
                off = rnd.randrange(0, size // 4096) * 4096
                n = min(rnd.choice((4096, 65536, 131072)), size - off)
            else:               # unaligned, small
                off = rnd.randrange(0, size - 1)
                n = rnd.randrange(1, min(size - off, 3000) + 1)
            assert read(disk, off, n) == expected[off:off + n], f"seed {seed}: read {n} at {off}"
            assert len(disk._cache) <= disk.capacity
        assert read(disk, 0, size) == expected, f"seed {seed}: whole disk"
    finally:
        disk.close()


def test_threads_reading_at_once_with_readahead_and_a_tiny_cache():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rnd = random.Random(seed)
    store, m, expected = make_disk(rnd, n_full=40)
    disk = ServedDisk(store, m, cache_bytes=3 * SEG, readahead=4, workers=4)
    size, errors = len(expected), []

    def reader(k):
        r = random.Random(seed + k)
        pos = r.randrange(0, size)
        for _ in range(150):
            if r.random() < 0.3:
                pos = r.randrange(0, size)
            n = min(r.randrange(1, 3 * SEG), size - pos)
            if n <= 0:
                pos = 0
                continue
            if read(disk, pos, n) != expected[pos:pos + n]:
                errors.append((k, pos, n))
            pos += n
    threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    disk.close()
    assert errors == [], f"seed {seed}"
    assert len(disk._cache) <= disk.capacity


def test_zero_segments_never_reach_the_store_and_repeats_are_fetched_once():
    rnd = random.Random(3)
    store, m, expected = make_disk(rnd)
    disk = ServedDisk(store, m, cache_bytes=64 * SEG, readahead=0)
    assert read(disk, 0, len(expected)) == expected
    distinct = {segment.segment_key(d) for _, d in m.table.data_entries()}
    assert sorted(store.gets) == sorted(distinct)
    for first, count in m.table.zero_runs():
        store.gets.clear()
        assert read(disk, first * SEG, count * SEG) == bytes(count * SEG)
        assert store.gets == []


def test_a_damaged_or_missing_segment_fails_its_reads_only():
    rnd = random.Random(5)
    store, m, expected = make_disk(rnd, repeat=False)
    data = [i for i, _ in m.table.data_entries()]
    bad, gone = data[2], data[5]
    bad_key = segment.segment_key(m.table.get(bad))
    blob = bytearray(store.get(bad_key))
    blob[-1] ^= 1
    store.put(bad_key, bytes(blob))
    store.delete(segment.segment_key(m.table.get(gone)))
    disk = ServedDisk(store, m, readahead=2)
    try:
        with pytest.raises(SegmentUnreadable, match=f"segment {bad} at disk offset {bad * SEG} \\({bad_key}\\): "
                                                    "content does not match its digest"):
            read(disk, bad * SEG + 100, 10)
        with pytest.raises(SegmentUnreadable,
                           match=f"segment {gone} at disk offset {gone * SEG} .*: missing from the store"):
            read(disk, gone * SEG - 10, 20)          # spans into it from a good segment: fails whole
        # the same read again fails again (a failure is not cached), and everything else reads right
        with pytest.raises(SegmentUnreadable):
            read(disk, bad * SEG, SEG)
        for i in range(m.table.count):
            if i in (bad, gone):
                continue
            lo, hi = i * SEG, min((i + 1) * SEG, len(expected))
            assert read(disk, lo, hi - lo) == expected[lo:hi]
    finally:
        disk.close()


def test_a_segment_of_the_wrong_length_is_refused():
    """A manifest whose last (short) segment names a full-size object: the bytes are intact but
    do not fit; serving a prefix of them would be a wrong disk."""
    rnd = random.Random(8)
    full = rnd.randbytes(SEG)
    store = MemoryStore()
    m = manifest_of(store, [rnd.randbytes(SEG), full], SEG, virtual_size=SEG + 512)
    disk = ServedDisk(store, m, readahead=0)
    with pytest.raises(SegmentUnreadable, match=f"{SEG} bytes where the disk needs 512"):
        read(disk, SEG, 512)


def test_extents_are_the_manifest_runs():
    rnd = random.Random(11)
    store, m, expected = make_disk(rnd)
    disk = ServedDisk(store, m, readahead=0)
    for _ in range(200):
        off = rnd.randrange(0, len(expected))
        n = rnd.randrange(1, len(expected) - off + 1)
        runs = disk.extents(off, n)
        assert runs[0][0] == off
        pos = off
        for o, length, zero in runs:
            assert o == pos and length > 0
            for i in range(o // SEG, (o + length - 1) // SEG + 1):
                assert (m.table.get(i) is None) == zero
            pos += length
        assert pos == off + n          # few runs here: all of the range is answered
        for a, b in zip(runs, runs[1:], strict=False):
            assert a[2] != b[2]        # runs are maximal


def test_extents_of_a_huge_sparse_disk_are_bounded():
    from ekko_libvirt.format import manifest as mf
    n = 1 << 20
    t = mf.SegmentTable(n)
    for i in range(0, n, 2):           # alternating data/zero: a million runs
        t.set_data(i, b"\x01" * 16)
    m = mf.Manifest("20260101T000000000Z-abcdef", "t1", n * SEG, SEG, t)
    disk = ServedDisk(MemoryStore(), m, readahead=0)
    runs = disk.extents(0, n * SEG)
    assert len(runs) == MAX_EXTENTS and runs[0] == (0, SEG, False) and runs[1] == (SEG, SEG, True)

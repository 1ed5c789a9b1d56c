"""The backup's worker loop (_SegmentCopier.run) against a fake stream and in-memory stores:
every segment lands in the table; a failing store stops every worker and ends the stream."""

import os
import threading

import pytest

from ekko_libvirt.format import segment
from ekko_libvirt.engine.base import Export
from ekko_libvirt.errors import StoreError
from ekko_libvirt.format.manifest import SegmentTable
from ekko_libvirt.nbd.extents import SegmentPlan
from ekko_libvirt.backup.copy import _SegmentCopier
from ekko_libvirt.backup.options import BackupOptions
from ekko_libvirt.store.memory import MemoryStore

SEG = 64 << 10


class Buf:
    def __init__(self, data):
        self.data = data
        self.released = False
        self.fleece = None          # no fleece file: nothing to compare

    def release(self):
        self.released = True


class FakeStream:
    """What SegmentStream yields: (plan, buffer) in disk order, buffer None for a zero plan."""

    def __init__(self, items):
        self.items = items
        self.closed = threading.Event()
        self.taken = 0

    def __iter__(self):
        for it in self.items:
            if self.closed.is_set():
                return
            self.taken += 1
            yield it

    def close(self):
        self.closed.set()


class FakeReader:
    def __init__(self, items):
        self.s = FakeStream(items)
        self.export = Export("/nonexistent", "fake", None)

    def stream(self, plans, buffers):
        return self.s


def _threads_back_to(n, timeout=5.0):
    """Workers signal they are done just before their thread ends: give them that instant."""
    import time
    deadline = time.monotonic() + timeout
    while threading.active_count() > n and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count() == n


def _items(contents):
    out = []
    for i, raw in enumerate(contents):
        if raw is None:
            out.append((SegmentPlan(i, i * SEG, SEG, ()), None))
        else:
            out.append((SegmentPlan(i, i * SEG, SEG, ((i * SEG, SEG),)), Buf(raw)))
    return out


def _copier(items, store, workers=3):
    return _SegmentCopier(FakeReader(items), store, set(), BackupOptions("t", workers=workers,
                                                                         segment_size=SEG), track=False)


def test_every_segment_lands_in_the_table_and_duplicates_are_stored_once():
    a, b = os.urandom(SEG), os.urandom(SEG)
    contents = [a, None, b, a, bytes(SEG), b] * 10
    items = _items(contents)
    store = MemoryStore()
    c = _copier(items, store)
    table = SegmentTable(len(contents))
    seen = []
    c.run(None, table, lambda end, size: seen.append(end), len(contents) * SEG)
    for i, raw in enumerate(contents):
        want = None if raw is None or raw == bytes(SEG) else segment.digest(raw)
        assert table.get(i) == want, i
    assert sorted(store.list("segments/")) == sorted({segment.segment_key(segment.digest(x)) for x in (a, b)})
    assert all(buf.released for _, buf in items if buf is not None)
    assert len(seen) == len(contents)
    assert c.stats.segments_backed_up == len(contents)
    assert c.stats.zero_segments == 20


def test_a_failing_store_stops_the_workers_and_ends_the_stream():
    class Failing(MemoryStore):
        puts = 0

        def put(self, key, data):
            Failing.puts += 1
            if Failing.puts == 5:
                raise StoreError("disk full")
            super().put(key, data)

    items = _items([os.urandom(SEG) for _ in range(200)])
    c = _copier(items, Failing())
    before = threading.active_count()
    with pytest.raises(StoreError, match="disk full"):
        c.run(None, SegmentTable(200), None, 200 * SEG)
    assert c.reader.s.closed.is_set()
    assert c.reader.s.taken < 200              # stopped early, did not read the rest
    assert _threads_back_to(before)            # every worker ended


def test_a_watch_that_raises_stops_the_copy_and_the_commit_check():
    """The scratch guard's watch: called while workers run and between exists() batches."""
    from ekko_libvirt.errors import ScratchSpaceLow
    from ekko_libvirt.backup.copy import _missing

    class SlowStore(MemoryStore):
        def put(self, key, data):
            threading.Event().wait(0.01)
            super().put(key, data)

    items = _items([os.urandom(SEG) for _ in range(400)])
    c = _copier(items, SlowStore(), workers=2)
    calls = []

    def watch():
        calls.append(1)
        if len(calls) == 2:
            raise ScratchSpaceLow("/scratch", "low")
    before = threading.active_count()
    with pytest.raises(ScratchSpaceLow):
        c.run(None, SegmentTable(400), None, 400 * SEG, watch)
    assert c.reader.s.closed.is_set() and c.reader.s.taken < 400
    assert _threads_back_to(before)
    store = MemoryStore()
    calls.clear()
    with pytest.raises(ScratchSpaceLow):
        _missing(store, [os.urandom(16) for _ in range(1000)], 2, watch)
    assert len(calls) == 2
    assert _missing(store, [b"x" * 16] * 3, 2, lambda: None) == {b"x" * 16}


def test_workers_meeting_the_same_new_content_store_and_count_it_once():
    """Field: "stored 7 new" where 4 distinct segments were new. Workers that met the same digest
    at the same time each asked exists(), each heard no, each stored it. The store's exists()
    here holds its first caller until a second one comes (or a second passes): the old code
    always had a second caller for the same digest."""
    class Racy(MemoryStore):
        def __init__(self):
            super().__init__()
            self.puts, self.calls, self.second = 0, 0, threading.Event()

        def exists(self, key):
            self.calls += 1
            if self.calls == 2:
                self.second.set()
            self.second.wait(1.0)
            return super().exists(key)

        def put(self, key, data):
            self.puts += 1
            super().put(key, data)

    a = os.urandom(SEG)
    store = Racy()
    c = _copier(_items([a] * 16), store, workers=8)
    c.run(None, SegmentTable(16), None, 16 * SEG)
    assert store.puts == 1
    assert (c.stats.new_segments, c.stats.reused_segments) == (1, 15)

"""gc: what the mutation run of lifecycle/gc.py showed no test pinned down (docs/mutation.md): a
segment exactly `grace` old, counters over several segments, names that are not ours and manifests
that vanish or cannot be read in the middle of a listing, several backups racing gc, the report's
fields and the progress callbacks. Segments are put under their names with any bytes: gc only
lists, stats and deletes them."""

import datetime
import logging

from ekko_libvirt.format import manifest as mf
from ekko_libvirt.format import segment
from ekko_libvirt.lifecycle import gc
from ekko_libvirt.store import catalog, markers
from ekko_libvirt.store.memory import MemoryStore

HOUR = 3600.0
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def seg_key(i):
    return segment.segment_key(i.to_bytes(16, "big"))


def commit(store, target, day, digests, n=None):
    t = mf.SegmentTable(n or len(digests))
    for i, d in enumerate(digests):
        t.set_data(i, d)
    bid = catalog.new_backup_id(datetime.datetime(2026, 1, day, tzinfo=datetime.timezone.utc))
    return catalog.commit(store, mf.Manifest(bid, target, t.count * 4096, 4096, t)), bid


def test_the_grace_is_inclusive_and_every_deletion_counts():
    """grace 1 h at T0 + 2 h: put before T0 + 1 h goes; put at T0 + 1 h exactly (as old as the grace)
    and after stays: the grace is what protects the segments of a running backup."""
    clock = Clock()
    store = MemoryStore(clock)
    for i, (age_h, size) in enumerate([(0, 10), (0.25, 20), (0.5, 40), (1, 1), (1.5, 2), (1.9, 3)]):
        clock.now = T0 + age_h * HOUR
        store.put(seg_key(i + 1), bytes(size))
    clock.now = T0 + 2 * HOUR
    rep = gc.collect(store, grace_hours=1, workers=1, now=clock)     # 6 candidates, 4 in flight at most
    assert (rep.deleted, rep.deleted_bytes, rep.kept_young, rep.unreferenced, rep.segments) == (3, 70, 3, 6, 6)
    assert sorted(store.list("segments/")) == sorted(seg_key(i) for i in (4, 5, 6))
    assert (rep.dry_run, rep.grace_hours, rep.cutoff) == (False, 1, T0 + HOUR)
    d = rep.as_dict()
    assert (d["ok"], d["deleted"], d["dry_run"], d["raced"]) == (True, 3, False, {})
    dry = gc.collect(store, grace_hours=0.5, dry_run=True, now=clock)
    assert (dry.dry_run, dry.grace_hours, dry.deleted) == (True, 0.5, 1)


def test_names_that_are_not_ours_do_not_end_the_scan():
    """A foreign object listed first under segments/ is left alone; the garbage after it still goes."""
    clock = Clock()
    store = MemoryStore(clock)
    foreign = ["segments/000/not-hex", "segments/000/" + "AB" * 16, "segments/abc/" + "ab" * 16]
    for k in foreign + [seg_key(5), seg_key(6)]:
        store.put(k, b"x")
    clock.now += 10 * HOUR
    rep = gc.collect(store, grace_hours=1, now=clock)
    assert rep.deleted == 2 and sorted(store.list("segments/")) == sorted(foreign)


def test_a_manifest_pruned_between_list_and_get_does_not_end_the_mark():
    """Those listed after it are still marked: their segments are not garbage."""
    clock = Clock()
    store = MemoryStore(clock)
    store.put(seg_key(1), b"x")
    store.put(seg_key(2), b"y")
    commit(store, "t1", 2, [(1).to_bytes(16, "big")])
    commit(store, "t1", 3, [(2).to_bytes(16, "big")])
    clock.now += 10 * HOUR
    real_list = store.list

    def with_a_vanished_manifest(prefix=""):
        keys = list(real_list(prefix))
        if prefix.startswith(catalog.PREFIX):       # an older backup, pruned since this listing
            keys.append(catalog.manifest_key("t1", catalog.new_backup_id(
                datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))))
        return iter(keys)
    store.list = with_a_vanished_manifest
    rep = gc.collect(store, grace_hours=1, now=clock)
    assert rep.deleted == 0 and rep.referenced == 2 and rep.manifests == 2
    assert sorted(store.list("segments/")) == [seg_key(1), seg_key(2)]


def test_backups_that_race_gc_are_all_found_past_an_unreadable_one(caplog):
    """Three manifests land while gc deletes the segment two of them reuse; the first of them is
    unreadable. Both readers are named in the report, the damaged marker and the log."""
    clock = Clock()
    store = MemoryStore(clock)
    d = (7).to_bytes(16, "big")
    store.put(segment.segment_key(d), b"x")
    clock.now += 10 * HOUR
    real_delete = store.delete
    late = []

    def delete_then_commit(key):
        real_delete(key)
        if key.startswith("segments/") and not late:
            k, _ = commit(store, "t1", 1, [d])
            store.put(k, b"not a manifest")
            late.extend([commit(store, "t1", 2, [d])[1], commit(store, "t2", 3, [d])[1]])
    store.delete = delete_then_commit
    with caplog.at_level(logging.ERROR, logger="ekko_libvirt.lifecycle.gc"):
        rep = gc.collect(store, grace_hours=1, now=clock)
    key = segment.segment_key(d)
    assert not rep.ok and rep.raced == {key: sorted(late)}
    assert rep.manifests == 2
    marker = markers.read_damaged(store, d)
    assert (marker["segment"], marker["problem"], marker["used_by"]) == \
        (key, "deleted by gc while a backup that reused it committed", sorted(late))
    assert caplog.messages == [f"backup(s) {late[0]}, {late[1]} committed while gc ran and name {key}, which gc "
                               "deleted: marked damaged; the next backup of that disk stores it again"]


def test_progress_of_every_phase_and_the_time_taken():
    """mark: per manifest of the first look only; sweep: every 10000 listed and at the end;
    delete: every 1000 candidates and at the end. Without a callback gc runs the same."""
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(1, 10002):
        store.put(seg_key(i), b"")
    commit(store, "t1", 1, [(1).to_bytes(16, "big")])
    commit(store, "t1", 2, [(2).to_bytes(16, "big")])
    clock.now += 10 * HOUR
    real_list = store.list

    def list_then_commit(prefix=""):
        keys = list(real_list(prefix))
        if prefix == "segments/":                   # a backup commits while gc lists segments
            commit(store, "t2", 3, [(3).to_bytes(16, "big")])
        return iter(keys)
    store.list = list_then_commit
    ticks = iter([clock.now, clock.now + 1.23456])
    seen = []
    rep = gc.collect(store, grace_hours=1, dry_run=True, progress=lambda *a: seen.append(a), now=lambda: next(ticks))
    assert rep.seconds == 1.235 and rep.manifests == 3
    assert [e for e in seen if e[0] == "mark"] == [("mark", 1, 2), ("mark", 2, 2)]
    assert [e for e in seen if e[0] == "sweep"] == [("sweep", 10000, None), ("sweep", 10001, None)]
    assert [e for e in seen if e[0] == "delete"] == [("delete", n, 9998) for n in range(1000, 9001, 1000)] + \
        [("delete", 9998, 9998)]
    assert len(seen) == 14
    store.list = real_list
    assert gc.collect(store, grace_hours=1, now=clock).deleted == 9998

"""gc (mark and sweep with a grace period), the stat() store capability, the lifecycle markers,
and sampled/recorded verification, on memory and local stores with synthetic backups."""

import json
import os
import time

import pytest

from ekko_libvirt.store import catalog, markers
from ekko_libvirt.lifecycle import gc, verify
from ekko_libvirt.format import manifest as mf, segment
from ekko_libvirt.errors import IntegrityError, ObjectNotFound
from ekko_libvirt.nbd.extents import SegmentPlan, whole_segment, with_extra_segments
from ekko_libvirt.store.local import LocalStore
from ekko_libvirt.store.memory import MemoryStore

SEG = 4096
HOUR = 3600.0


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def blocks(*tags):
    return [tag.encode() * (SEG // len(tag)) + bytes(SEG % len(tag)) for tag in tags]


def put_backup(store, target, raw_blocks):
    table = mf.SegmentTable(len(raw_blocks))
    for i, raw in enumerate(raw_blocks):
        if raw is None:
            continue
        enc = segment.encode(raw)
        store.put(enc.key, enc.blob)
        table.set_data(i, enc.digest)
    m = mf.Manifest(catalog.new_backup_id(), target, len(raw_blocks) * SEG, SEG, table)
    return catalog.commit(store, m), m


def seg_keys(store):
    return set(store.list("segments/"))


def key_of(raw):
    return segment.segment_key(segment.digest(raw))


# -- store stat -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "local"])
def test_stat_reports_size_and_put_time(kind, tmp_path):
    """The put time comes from the store's own clock: the memory store's (a fake one here), the
    file system's for the local store, bracketed by two files written on the same file system."""
    def stamp(name):
        if kind == "memory":
            return clock()
        with open(tmp_path / name, "wb"):
            pass
        return os.stat(tmp_path / name).st_mtime

    clock = Clock()
    store = MemoryStore(clock) if kind == "memory" else LocalStore(str(tmp_path / "store"))
    before = stamp("before")
    store.put("a/b", b"12345")
    after = stamp("after")
    info = store.stat("a/b")
    assert info.key == "a/b" and info.size == 5
    assert before <= info.mtime <= after, (before, info.mtime, after)
    with pytest.raises(ObjectNotFound, match="a/none"):
        store.stat("a/none")


def test_local_clean_temp_removes_only_old_temp_files(tmp_path):
    store = LocalStore(str(tmp_path))
    store.put("segments/abc/x", b"data")
    d = os.path.join(str(tmp_path), "segments", "abc")
    old, young = os.path.join(d, "y.tmp-1"), os.path.join(d, "z.tmp-2")
    for p in (old, young):
        with open(p, "wb") as f:
            f.write(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.clean_temp(time.time() - HOUR) == 1
    assert not os.path.exists(old) and os.path.exists(young)
    assert store.exists("segments/abc/x")


# -- gc ------------------------------------------------------------------------------------------------
def test_gc_deletes_only_unreferenced_segments_older_than_the_grace():
    clock = Clock()
    store = MemoryStore(clock)
    b = blocks("keep", "shared", "gone", "young")
    k1, _ = put_backup(store, "t1", [b[0], b[1]])
    k2, _ = put_backup(store, "t1", [b[2], b[1]])
    store.delete(k2)                                     # pruned: "gone" is garbage now
    clock.now += 2 * HOUR
    k3, _ = put_backup(store, "t2", [b[3]])
    store.delete(k3)                                     # garbage, but only 0 h old
    clock.now += 60

    dry = gc.collect(store, grace_hours=1, dry_run=True, now=clock)
    assert (dry.deleted, dry.kept_young, dry.unreferenced, dry.segments) == (1, 1, 2, 4)
    assert seg_keys(store) == {key_of(x) for x in b}     # dry run: nothing deleted

    rep = gc.collect(store, grace_hours=1, now=clock)
    assert rep.ok and rep.deleted == 1 and rep.kept_young == 1
    assert rep.manifests == 1 and rep.referenced == 2
    assert seg_keys(store) == {key_of(b[0]), key_of(b[1]), key_of(b[3])}
    assert rep.deleted_bytes > 0
    catalog.load(store, k1)                              # the survivor is whole

    clock.now += 2 * HOUR
    assert gc.collect(store, grace_hours=1, now=clock).deleted == 1
    assert seg_keys(store) == {key_of(b[0]), key_of(b[1])}


def test_gc_keeps_what_a_manifest_committed_during_the_mark_names():
    """A backup that commits after gc listed manifests: its segments are found by the second look."""
    clock = Clock()
    store = MemoryStore(clock)
    b = blocks("a", "b")
    put_backup(store, "t1", [b[0]])
    enc = segment.encode(b[1])
    store.put(enc.key, enc.blob)                          # written by a backup still running
    clock.now += 10 * HOUR
    real_list = store.list

    def list_then_commit(prefix=""):
        keys = list(real_list(prefix))
        if prefix == "segments/":                          # gc is sweeping: the backup commits now
            t = mf.SegmentTable(1)
            t.set_data(0, enc.digest)
            catalog.commit(store, mf.Manifest(catalog.new_backup_id(), "t2", SEG, SEG, t))
        return iter(keys)
    store.list = list_then_commit
    rep = gc.collect(store, grace_hours=0, now=clock)
    assert rep.deleted == 0 and rep.manifests == 2
    assert store.exists(enc.key)


def test_gc_marks_a_segment_damaged_when_a_backup_commits_it_during_the_sweep():
    """The residual race: the segment is deleted, then a manifest naming it lands. gc cannot undo
    the delete, so it marks the segment damaged (the next backup stores it again) and says so."""
    clock = Clock()
    store = MemoryStore(clock)
    raw = blocks("reused")[0]
    k, m = put_backup(store, "t1", [raw])
    store.delete(k)
    clock.now += 10 * HOUR
    real_delete = store.delete

    def delete_then_commit(key):
        real_delete(key)
        if key.startswith("segments/"):
            catalog.commit(store, mf.Manifest(catalog.new_backup_id(), "t1", SEG, SEG, m.table.copy()))
    store.delete = delete_then_commit
    rep = gc.collect(store, grace_hours=0, now=clock)
    assert not rep.ok and list(rep.raced) == [key_of(raw)]
    assert markers.damaged_digests(store) == {segment.digest(raw)}


def test_gc_stops_on_an_unreadable_manifest_and_deletes_nothing():
    clock = Clock()
    store = MemoryStore(clock)
    b = blocks("a", "b")
    put_backup(store, "t1", [b[0]])
    k2, _ = put_backup(store, "t1", [b[1]])
    blob = bytearray(store.get(k2))
    blob[20] ^= 1
    store.put(k2, bytes(blob))
    clock.now += 100 * HOUR
    with pytest.raises(IntegrityError) as e:
        gc.collect(store, grace_hours=0, now=clock)
    assert k2 in str(e.value) and "before deleting anything" in str(e.value)
    assert len(seg_keys(store)) == 2


def test_gc_leaves_foreign_objects_and_tidies_stale_markers(tmp_path):
    store = LocalStore(str(tmp_path))
    b = blocks("a", "b")
    k1, m1 = put_backup(store, "t1", [b[0]])
    k2, m2 = put_backup(store, "t1", [b[1]])
    markers.protect(store, "t1", m1.backup_id)
    markers.write_verify(store, markers.VerifyState(m2.backup_id, "t1", time.time(), True, 1.0, True))
    markers.mark_damaged(store, segment.digest(b[1]), key_of(b[1]), "test", [m2.backup_id])
    markers.mark_damaged(store, segment.digest(b[0]), key_of(b[0]), "test", [m1.backup_id])
    store.put("segments/zzz/not-a-digest", b"foreign")
    store.delete(k2)
    tmp = os.path.join(str(tmp_path), "segments", "stray.tmp-0001")
    with open(tmp, "wb") as f:
        f.write(b"x")
    os.utime(tmp, (1, 1))
    rep = gc.collect(store, grace_hours=0)
    assert rep.deleted == 1 and rep.temp_removed == 1
    assert store.exists("segments/zzz/not-a-digest")
    # verify/ of the deleted backup and damaged/ of its deleted segment are gone; the rest stays
    assert set(store.list("verify/")) == set()
    assert set(store.list("damaged/")) == {markers.damaged_key(segment.digest(b[0]))}
    assert set(store.list("protected/")) == {markers.protected_key("t1", m1.backup_id)}
    assert rep.markers_removed == 2


def test_gc_reports_progress_per_phase():
    store = MemoryStore()
    for i in range(3):
        put_backup(store, "t1", blocks(f"b{i}"))
    seen = []
    gc.collect(store, 0, progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert ("mark", 3, 3) in seen and ("sweep", 3, None) in seen


# -- markers ----------------------------------------------------------------------------------------
def test_markers_are_small_json_objects():
    store = MemoryStore()
    markers.protect(store, "dom.vda", "20240101T000000000Z-abcdef", now=0)
    assert json.loads(store.get("protected/dom.vda/20240101T000000000Z-abcdef")) == {
        "backup_id": "20240101T000000000Z-abcdef", "target": "dom.vda", "protected_at": "1970-01-01T00:00:00+00:00"}
    assert markers.protected(store) == {"dom.vda/20240101T000000000Z-abcdef"}
    d = bytes(range(16))
    markers.mark_damaged(store, d, segment.segment_key(d), "missing", ["b2", "b1"], now=0)
    assert json.loads(store.get("damaged/" + d.hex()))["used_by"] == ["b1", "b2"]
    assert markers.damaged_digests(store) == {d}
    s = markers.VerifyState("b1", "t1", 100.0, False, 0.05, True)
    markers.write_verify(store, s)
    assert markers.read_verify(store, "t1", "b1") == s
    assert s.covers(deep=False, sample=0.05, since=50) and not s.covers(deep=True, sample=0.05, since=50)
    assert not s.covers(deep=False, sample=0.5, since=50) and not s.covers(deep=False, sample=0.05, since=150)


# -- verify: sampling, skipping by past results, recording ----------------------------------------------
def test_sampler_picks_about_the_fraction_and_is_stable_per_salt():
    digests = [segment.digest(i.to_bytes(4, "little")) for i in range(20000)]
    pick = verify.sampler(0.05, salt=1)
    n = sum(map(pick, digests))
    assert 800 < n < 1200
    assert [pick(d) for d in digests[:500]] == [verify.sampler(0.05, salt=1)(d) for d in digests[:500]]
    other = verify.sampler(0.05, salt=2)
    assert [other(d) for d in digests] != [pick(d) for d in digests]          # another run, another sample
    assert all(map(verify.sampler(1.0), digests[:10]))
    with pytest.raises(ValueError, match=r"sample must be in \(0, 1\], not 0"):
        verify.sampler(0)


def test_verify_run_records_marks_every_user_and_skips_recent_passes():
    store = MemoryStore()
    b = blocks("a", "b", "c")
    k1, m1 = put_backup(store, "t1", [b[0], b[1]])
    k2, m2 = put_backup(store, "t1", [b[0], b[2]])
    k3, m3 = put_backup(store, "t2", [b[2]])

    first = verify.run(store, [k1, k2, k3], deep=True, now=1000.0)
    assert first.report.ok and len(first.checked) == 3
    assert markers.read_verify(store, "t1", m1.backup_id).ok

    # a second run within a day skips all; a deeper demand does not skip shallow results
    again = verify.run(store, [k1, k2, k3], deep=True, since_days=1, now=2000.0)
    assert len(again.skipped) == 3 and again.report.segments_checked == 0
    blob = bytearray(store.get(key_of(b[2])))
    blob[-1] ^= 0x40
    store.put(key_of(b[2]), bytes(blob))
    # verify only k3: the damage marks k2 too, which uses the same segment
    found = verify.run(store, [k3], deep=True, now=3000.0)
    assert not found.report.ok
    assert found.marked == [markers.damaged_key(segment.digest(b[2]))]
    assert found.report.used_by[key_of(b[2])] == {m2.backup_id, m3.backup_id}
    mark = markers.read_damaged(store, segment.digest(b[2]))
    assert mark["used_by"] == sorted([m2.backup_id, m3.backup_id]) and mark["problem"].startswith("segment ")
    s2 = markers.read_verify(store, "t1", m2.backup_id)
    assert not s2.ok and s2.damaged_segments == (key_of(b[2]),)
    # a failed result is never a reason to skip
    nxt = verify.run(store, [k1, k2, k3], deep=True, since_days=1, now=3500.0)
    assert sorted(nxt.skipped) == [k1] and sorted(nxt.checked) == sorted([k2, k3])

    # repaired (as a backup's healing would): a deep run clears the mark, a shallow one would not
    enc = segment.encode(b[2])
    store.put(enc.key, enc.blob)
    assert verify.run(store, [k2, k3], deep=False, now=4000.0).cleared == []
    healed = verify.run(store, [k2, k3], deep=True, now=5000.0)
    assert healed.report.ok and healed.cleared == [markers.damaged_key(segment.digest(b[2]))]
    assert markers.damaged_digests(store) == set()


def test_verify_on_a_store_that_refuses_writes_still_reports_what_it_found():
    """A read-only replica: the check runs, damage is reported; the results are not stored,
    and the run says why instead of failing."""
    from ekko_libvirt.errors import StoreError

    class ReadOnly(MemoryStore):
        frozen = False

        def put(self, key, data):
            if self.frozen:
                raise StoreError(f"cannot write {key}: Read-only file system")
            super().put(key, data)

    store = ReadOnly()
    b = blocks("a", "b")
    k1, m1 = put_backup(store, "t1", [b[0], b[1]])
    blob = bytearray(store.get(key_of(b[1])))
    blob[-1] ^= 0x40
    store.put(key_of(b[1]), bytes(blob))
    store.frozen = True
    run = verify.run(store, [k1], deep=True, now=1000.0)
    assert not run.report.ok and key_of(b[1]) in run.report.damaged
    assert "Read-only file system" in run.not_recorded
    assert run.marked == [] and markers.damaged_digests(store) == set()
    assert markers.read_verify(store, "t1", m1.backup_id) is None


def test_verify_sample_checks_a_share_of_the_segments():
    store = MemoryStore()
    raws = [i.to_bytes(4, "little") * (SEG // 4) for i in range(400)]
    k, _ = put_backup(store, "t1", raws)
    rep = verify.run(store, [k], sample=0.1, salt=7).report
    assert 15 < rep.segments_checked < 70
    assert markers.read_verify(store, "t1", k.rsplit("/", 1)[1]).sample == 0.1


# -- self-healing plans -----------------------------------------------------------------------------
def test_with_extra_segments_merges_in_index_order():
    def p(i):
        return SegmentPlan(i, i * SEG, SEG, ())
    out = list(with_extra_segments(iter([p(1), p(4)]), [2, 4, 7], SEG, 8 * SEG - 100))
    assert [x.index for x in out] == [1, 2, 4, 7]
    assert out[2] is not None and out[2].reads == ()                 # 4 came from the reader's plans
    assert out[1] == whole_segment(2, SEG, 8 * SEG)
    assert out[3] == SegmentPlan(7, 7 * SEG, SEG - 100, ((7 * SEG, SEG - 100),))   # the short tail
    assert [x.index for x in with_extra_segments(iter([]), [0, 3], SEG, 4 * SEG)] == [0, 3]
    assert [x.index for x in with_extra_segments(iter([p(0)]), [], SEG, 4 * SEG)] == [0]

"""verify and gc on stores of tens of thousands of segments (issue 21), checked against counts
made independently of ekko's code (a walk of the directory, sets of names), and on stores that
try to fool a merge of sorted listings: foreign names, uppercase hex, temp files, a listing out
of order or repeating, a listing that fails half-way, a manifest deleted during the run, an
empty store. The same at a million segments by hand: bench/store_scale.py --damage 100.

The segment objects are real (the project's encoder) but tiny: 32-byte counters."""

import os
import random
import time

import pytest

from ekko_libvirt.errors import StoreError
from ekko_libvirt.format import manifest as mf
from ekko_libvirt.format import segment
from ekko_libvirt.lifecycle import gc, verify
from ekko_libvirt.store import catalog
from ekko_libvirt.store.local import LocalStore
from ekko_libvirt.store.memory import MemoryStore

HOUR = 3600.0
SEG = 4096
N = 50_000


def raw(i: int) -> bytes:
    return i.to_bytes(8, "little") * 4


def write_segments(root: str, indices, mtime=None):
    """Segment files as the local store lays them out, without its fsyncs; -> {index: key}."""
    keys = {}
    for i in indices:
        enc = segment.encode(raw(i))
        path = os.path.join(root, *enc.key.split("/"))
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "wb") as f:
            f.write(enc.blob)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        keys[i] = enc.key
    return keys


def commit(store, target, keys, day):
    t = mf.SegmentTable(len(keys))
    for n, key in enumerate(keys):
        t.set_data(n, segment.digest_from_key(key))
    bid = f"202601{day:02d}T000000000Z-{day:06x}"
    return catalog.commit(store, mf.Manifest(bid, target, t.count * SEG, SEG, t))


def files_under(root: str, sub: str = "segments"):
    """Every file name below root/sub, found by a plain walk (not ekko's listing)."""
    out = set()
    for dirpath, _, names in os.walk(os.path.join(root, sub)):
        for n in names:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """N segments: 7/8 named by three overlapping manifests, the last 1/8 named by none."""
    root = str(tmp_path_factory.mktemp("scale") / "store")
    store = LocalStore(root)
    old = time.time() - 10 * HOUR
    keys = write_segments(root, range(N), mtime=old)
    referenced = N * 7 // 8
    window = referenced * 3 // 4
    step = (referenced - window) // 2
    manifests = [commit(store, "vm.vda", [keys[i] for i in range(k * step, k * step + window)], k + 1)
                 for k in range(2)]
    manifests.append(commit(store, "vm.vdb", [keys[i] for i in range(referenced - window, referenced)], 3))
    return root, keys, referenced, manifests


@pytest.mark.parametrize("how", ["listing", "one each"])
def test_verify_finds_every_deleted_and_flipped_segment(big_store, how):
    """100 deleted and 100 flipped among N: existence names exactly the deleted (by listing or by
    a check each, the same answer), deep both; each with every backup that uses it. The damage
    is repaired afterwards (the store is shared by the tests of this module)."""
    root, keys, referenced, manifests = big_store
    store = LocalStore(root)
    rng = random.Random(21)
    picks = rng.sample(range(referenced), 200)
    gone, flipped = {keys[i] for i in picks[:100]}, {keys[i] for i in picks[100:]}
    for k in gone:
        os.unlink(os.path.join(root, *k.split("/")))
    for k in flipped:
        path = os.path.join(root, *k.split("/"))
        with open(path, "r+b") as f:
            blob = bytearray(f.read())
            blob[-1] ^= 0x01
            f.seek(0)
            f.write(blob)
    try:
        check(store, manifests, referenced, gone, flipped, how)
    finally:
        write_segments(root, picks)


def check(store, manifests, referenced, gone, flipped, how):
    list_from = 0 if how == "listing" else 10 ** 9
    shallow = verify.verify(store, manifests, list_from=list_from)
    assert shallow.by_listing == (how == "listing")
    assert set(shallow.damaged) == gone and set(shallow.damaged.values()) == {"missing"}
    assert shallow.segments_checked == referenced
    users = {}
    for key in manifests:
        m = catalog.load(store, key)
        for _, d in m.table.data_entries():
            users.setdefault(segment.segment_key(d), set()).add(m.backup_id)
    assert all(shallow.used_by[k] == users[k] for k in gone)
    if how == "listing":
        deep = verify.verify(store, manifests, deep=True, workers=4)
        assert set(deep.damaged) == gone | flipped
        assert all(deep.used_by[k] == users[k] for k in gone | flipped)


def test_gc_deletes_exactly_the_unreferenced_objects_older_than_the_grace(big_store):
    """(After the verify tests: it deletes the store's garbage, which they do not use.)"""
    root, keys, referenced, _ = big_store
    store = LocalStore(root)
    young = write_segments(root, range(N, N + 300))       # garbage, but put just now
    foreign = {"segments/ABC/" + "AB" * 16, "segments/abc/not-hex", "segments/abc/" + "ab" * 16,
               "segments/" + "cd" * 16, "segments/abc/sub/" + "ab" * 16}
    for k in foreign:
        path = os.path.join(root, *k.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"not ours")
        os.utime(path, (1, 1))
    before = files_under(root)
    named = {keys[i] for i in range(referenced)}
    expected_gone = {k for k in before if k not in named and k not in foreign and k not in young.values()}
    assert len(expected_gone) == N - referenced

    rep = gc.collect(store, grace_hours=1, workers=3)
    after = files_under(root)
    assert before - after == expected_gone
    assert (rep.deleted, rep.kept_young, rep.referenced, rep.manifests) == (N - referenced, 300, referenced, 3)
    assert rep.segments == N + 300 + len(foreign) and rep.unreferenced == N - referenced + 300
    again = gc.collect(store, grace_hours=1)
    assert (again.deleted, files_under(root)) == (0, after)


# -- stores that try to fool the merge --------------------------------------------------------------
def small_store(tmp_path, n=40):
    root = str(tmp_path / "small")
    store = LocalStore(root)
    keys = write_segments(root, range(n), mtime=time.time() - 10 * HOUR)
    k1 = commit(store, "t1", [keys[i] for i in range(n // 2)], 1)
    return store, keys, k1


def test_foreign_names_temp_files_and_uppercase_copies_are_not_segments(tmp_path):
    """A missing segment is missing even when the listing holds its name in uppercase, as a temp
    file, or under the wrong fan-out directory."""
    store, keys, k1 = small_store(tmp_path)
    victim = keys[3]
    h = victim.rsplit("/", 1)[1]
    os.unlink(os.path.join(store.root, *victim.split("/")))
    for k in (f"segments/{h[:3].upper()}/{h.upper()}", f"segments/000/{h}", f"segments/{h[:3]}/{h}x"):
        store.put(k, b"imposter")
    with open(os.path.join(store.root, "segments", h[:3], h + ".tmp-123456"), "wb") as f:
        f.write(b"half written")
    rep = verify.verify(store, [k1], list_from=0)
    assert rep.by_listing and rep.damaged == {victim: "missing"}


class Listing(MemoryStore):
    """A memory store whose sorted listing is bent by `bend(keys) -> iterator`."""

    def __init__(self, bend):
        super().__init__(clock=lambda: 1_000.0)
        self.bend = bend

    def list_sorted(self, prefix=""):
        keys = list(super().list_sorted(prefix))
        return self.bend(keys) if prefix == "segments/" else iter(keys)


def fill(store, n=30):
    keys = []
    for i in range(n):
        enc = segment.encode(raw(i))
        store.put(enc.key, enc.blob)
        keys.append(enc.key)
    k1 = commit(store, "t1", keys[: n // 2], 1)
    return keys, k1


def swapped(keys):
    keys = list(keys)
    keys[5], keys[6] = keys[6], keys[5]
    return iter(keys)


def repeated(keys):
    """A page boundary handled twice: the last name of a page comes again at the next."""
    return iter(keys[:10] + keys[9:])


def failing(keys):
    yield from keys[:7]
    raise StoreError("cannot list ekko/segments/*: 503 Service Unavailable still after 5 retries")


@pytest.mark.parametrize("bend, problem", [(swapped, "not in ascending order"),
                                           (repeated, r"listed twice"),
                                           (failing, "503 Service Unavailable")],
                         ids=["out of order", "repeated", "fails half-way"])
def test_a_listing_that_cannot_be_trusted_fails_verify_and_gc_deletes_nothing(bend, problem):
    store = Listing(bend)
    keys, k1 = fill(store)
    with pytest.raises(StoreError, match=problem):
        verify.run(store, [k1], list_from=0, now=2000.0)
    with pytest.raises(StoreError, match=problem):
        gc.collect(store, grace_hours=0, now=lambda: 100_000.0)
    assert sorted(store.list("segments/")) == sorted(keys)


def test_an_empty_store_and_a_store_without_segments():
    store = MemoryStore()
    rep = verify.verify(store, [], list_from=0)
    assert rep.ok and rep.segments_checked == 0 and rep.backups == []
    assert gc.collect(store, grace_hours=0).segments == 0
    keys, k1 = fill(store)
    for k in keys:
        store.delete(k)
    rep = verify.verify(store, [k1], list_from=0)
    assert set(rep.damaged) == set(keys[:15]) and not rep.ok


def test_a_manifest_deleted_during_verify_is_gone_not_damaged():
    store = MemoryStore()
    keys, k1 = fill(store)
    k2 = commit(store, "t1", keys[15:], 2)
    real_get = store.get

    def get(key):
        if key == k2:
            store.delete(k2)                       # pruned between the listing and the read
        return real_get(key)
    store.get = get
    store.delete(keys[0])
    rep = verify.verify(store, [k1, k2], list_from=0)
    assert rep.gone == [k2] and set(rep.damaged) == {keys[0]}
    assert rep.used_by[keys[0]] == {k1.rsplit("/", 1)[1]}


def test_store_directories_are_0700(tmp_path):
    """Every directory the local store creates, the namespace's parents included."""
    root = tmp_path / "store" / "projects" / "p1"
    store = LocalStore(str(root))
    enc = segment.encode(raw(1))
    store.put(enc.key, enc.blob)
    b = store.batch()
    b.put(segment.encode(raw(2)).key, segment.encode(raw(2)).blob)
    b.flush()
    store.put("manifests/t1/x", b"m")
    for d in (tmp_path / "store", tmp_path / "store" / "projects", root, root / "segments", root / "manifests",
              root / "manifests" / "t1", root / enc.key.rsplit("/", 1)[0]):
        assert oct(os.stat(d).st_mode & 0o777) == "0o700", d


def test_progress_counts_segments_with_rate_and_eta():
    """verify's line counts segments (not bytes); gc's listing phase has no total: count and rate."""
    from ekko_libvirt.progress import Progress
    p = Progress("verify", enabled=False, unit="segments")
    assert p.line(250_000, 1_000_000, 2.0) == "verify:  25.0% 250,000/1,000,000 segments 125,000/s ETA    6s"
    assert Progress("gc sweep", enabled=False, unit="listed").line(30_000, None, 0.5) == \
        "gc sweep: 30,000 listed 60,000/s"
    assert Progress("restore", enabled=False).line(1 << 30, 4 << 30, 1.0).startswith("restore:  25.0% 1.0 GiB/4.0 GiB")

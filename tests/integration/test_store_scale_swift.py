"""verify and gc by listing on a real Swift (issue 21): the container listing comes in pages
(listing_page_size: small here, so page boundaries fall on every kind of name), is merged with
the sorted digests the manifests name, and must give the same answers as a check of each object.
The million-segment figures: bench/store_scale.py."""

import concurrent.futures as cf
import random
import time

from ekko_libvirt.format import manifest as mf
from ekko_libvirt.format import segment
from ekko_libvirt.lifecycle import gc, verify
from ekko_libvirt.store import catalog
from tests.swift_fixtures import make_swift_store  # noqa: F401  (fixture)

HOUR = 3600.0
N = 900
GARBAGE = 60


def raw(i: int) -> bytes:
    return i.to_bytes(8, "little") * 4


def put_all(store, indices):
    encs = [segment.encode(raw(i)) for i in indices]
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda e: store.put(e.key, e.blob), encs))
    return [e.key for e in encs]


def commit(store, keys, day):
    t = mf.SegmentTable(len(keys))
    for n, key in enumerate(keys):
        t.set_data(n, segment.digest_from_key(key))
    return catalog.commit(store, mf.Manifest(f"202601{day:02d}T000000000Z-{day:06x}", "vm.vda", t.count * 4096,
                                             4096, t))


def test_verify_and_gc_by_listing_on_swift(make_swift_store):  # noqa: F811
    store = make_swift_store(listing_page_size=13)
    keys = put_all(store, range(N))
    used = keys[:N - GARBAGE]
    manifests = [commit(store, used[:600], 1), commit(store, used[200:], 2)]
    foreign = ["segments/ABC/" + "AB" * 16, "segments/abc/not-hex", "segments/" + "ab" * 16]
    for k in foreign:
        store.put(k, b"not ours")
    rng = random.Random(21)
    picks = rng.sample(range(N - GARBAGE), 80)
    gone, flipped = {used[i] for i in picks[:40]}, {used[i] for i in picks[40:]}
    for k in gone:
        store.delete(k)
    for k in flipped:
        blob = bytearray(store.get(k))
        blob[-1] ^= 0x01
        store.put(k, bytes(blob))

    listed = verify.verify(store, manifests, list_from=0)
    assert listed.by_listing and set(listed.damaged) == gone and listed.segments_checked == N - GARBAGE
    each = verify.verify(store, manifests, list_from=10 ** 9)
    assert not each.by_listing and each.damaged == listed.damaged
    deep = verify.verify(store, manifests, deep=True, workers=8)
    assert set(deep.damaged) == gone | flipped

    rep = gc.collect(store, grace_hours=1, workers=8, now=lambda: time.time() + 2 * HOUR)
    assert (rep.deleted, rep.unreferenced, rep.referenced) == (GARBAGE, GARBAGE, N - GARBAGE)
    assert rep.segments == N - 40 + len(foreign)
    left = set(store.list("segments/"))
    assert left == (set(used) - gone) | set(foreign)


def test_a_page_boundary_on_every_name(make_swift_store):  # noqa: F811
    """One name per page: every boundary falls exactly on a digest, shared or not."""
    store = make_swift_store(listing_page_size=1)
    keys = put_all(store, range(12))
    k1 = commit(store, keys[:8], 1)
    store.delete(keys[2])
    store.delete(keys[7])
    rep = verify.verify(store, [k1], list_from=0)
    assert set(rep.damaged) == {keys[2], keys[7]}
    g = gc.collect(store, grace_hours=0, now=lambda: time.time() + HOUR)
    assert g.deleted == 4 and set(store.list("segments/")) == set(keys[:8]) - {keys[2], keys[7]}


def test_listing_by_ranges_is_the_listing(make_swift_store, monkeypatch):  # noqa: F811
    """A big container's segments/ are listed as key ranges by several connections at once
    (store/ranged_listing.py): on the real Swift the result must be the plain listing, name for
    name, also for names sitting exactly on, just before and just after a range bound."""
    from ekko_libvirt.store import ranged_listing

    store = make_swift_store(listing_page_size=7, threads=4)
    keys = put_all(store, range(150))
    # the ranges list_sorted will use once the 8 x 4 edge names below are there too
    parts = ranged_listing.ranges(ranged_listing.range_count(150 + 8 * 4, 7, 4))
    assert len(parts) > 20
    edge = []
    for lo, _ in parts[1:9]:
        edge += [lo, lo + "0", lo[:-1], lo + "-"]
    for k in edge:
        store.put(k, b"foreign")
    plain = list(store.list("segments/"))
    assert plain == sorted(set(keys) | set(edge))
    used = []
    real = ranged_listing.in_order
    monkeypatch.setattr(ranged_listing, "in_order",
                        lambda fetch, ps, workers: used.append((len(ps), workers)) or real(fetch, ps, workers))
    assert list(store.list_sorted("segments/")) == plain
    assert used == [(len(parts), 4)]
    store.config = store.config.__class__(**{**store.config.__dict__, "threads": 1})
    assert list(store.list_sorted("segments/")) == plain

"""Which segments a store has, by listing (backup/presence.py), against a set-based reference:
never "present" for a segment that is not stored, whatever else the listing holds."""

import os

from hypothesis import given, strategies as st

from ekko_libvirt.backup import presence
from ekko_libvirt.backup.copy import _SegmentCopier
from ekko_libvirt.backup.options import BackupOptions
from ekko_libvirt.format import segment
from ekko_libvirt.format.manifest import SegmentTable
from ekko_libvirt.nbd.extents import SegmentPlan
from ekko_libvirt.store.memory import MemoryStore
from tests.unit.test_copier import Buf, FakeReader

digests = st.binary(min_size=16, max_size=16)


@given(st.lists(digests, max_size=200), st.lists(digests, max_size=50), st.randoms())
def test_listed_answers_exactly_the_listed_digests(stored, asked, rnd):
    ds = list(stored)
    rnd.shuffle(ds)                 # packed from any order
    listed = presence.Listed(presence.pack_sorted(ds))
    assert len(listed) == len(set(stored))
    for d in asked + stored:
        assert listed.exists(d) == (d in set(stored))


@given(st.lists(digests, max_size=200))
def test_pack_sorted_is_the_sorted_set(ds):
    packed = presence.pack_sorted(ds)
    assert packed == b"".join(sorted(set(ds)))
    assert presence.pack_sorted(sorted(ds)) == packed      # the streaming (in order) path


def test_names_that_are_not_segment_keys_never_count_as_present():
    d = bytes(range(1, 17))
    h = d.hex()
    hostile = [f"segments/{h[:3]}/{h.upper()}", f"segments/{h[:3]}/{h}.tmp-1", f"segments/{h[:3]}/.tmp-{h}",
               f"segments/fff/{h}", f"segments/{h}", f"segments/{h[:3]}/{h}/x", f"manifests/{h[:3]}/{h}",
               f"segments/{h[:3]}/{h[:-1]}g", f"segments/{h[:3]}/{h[:-2]}", "segments/", ""]
    store = MemoryStore()
    for k in hostile:
        if k and not k.endswith("/"):
            store.put(k, b"junk")
    assert not presence.Listed.of(store).exists(d)
    store.put(segment.segment_key(d), b"x")
    listed = presence.Listed.of(store)
    assert listed.exists(d) and len(listed) == 1


class ListingStore(MemoryStore):
    """A store that prefers listing (as Swift does for a full): exists() must not be asked."""

    def __init__(self):
        super().__init__()
        self.exists_calls = 0
        self.listings = 0

    def prefers_listing(self, checks):
        return True

    def exists(self, key):
        self.exists_calls += 1
        return super().exists(key)

    def list(self, prefix=""):
        self.listings += 1
        return super().list(prefix)


def test_a_full_asks_one_listing_and_stores_what_a_stray_name_only_pretends_to_have():
    store = ListingStore()
    seg = 64 << 10
    datas = [os.urandom(seg) for _ in range(6)]
    have = segment.encode(datas[0])
    store.put(have.key, have.blob)                                   # really there: reused
    fake = segment.digest(datas[1]).hex()
    store.put(f"segments/{fake[:3]}/{fake.upper()}", b"junk")        # not a segment key: stored
    store.put(f"segments/{fake[:3]}/{fake}.tmp-9", b"junk")
    items = [(SegmentPlan(i, i * seg, seg, ((i * seg, seg),)), Buf(d)) for i, d in enumerate(datas)]
    reader = FakeReader(items)
    present = presence.presence(store, len(items))
    copier = _SegmentCopier(reader, store, set(), BackupOptions(target="t", workers=2), track=False,
                            present=present)
    table = SegmentTable(len(items))
    copier.run(iter(()), table, None, len(items) * seg)
    copier.batch.flush()
    assert store.listings == 1 and store.exists_calls == 0
    assert copier.stats.reused_segments == 1 and copier.stats.new_segments == 5
    for i, d in enumerate(datas):
        assert segment.decode(store.get(segment.segment_key(table.get(i))), table.get(i)) == d


def test_missing_by_listing_against_the_reference():
    store = ListingStore()
    kept = [os.urandom(16) for _ in range(30)]
    gone = [os.urandom(16) for _ in range(7)]
    for d in kept:
        store.put(segment.segment_key(d), b"x")
    assert presence.missing(store, set(kept) | set(gone)) == set(gone)
    assert store.exists_calls == 0
    assert presence.missing(MemoryStore(), set(kept)) is None      # a store that prefers exists()

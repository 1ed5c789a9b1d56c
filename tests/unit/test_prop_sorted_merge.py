"""Property tests of the sorted-stream merges (ekko_libvirt/lifecycle/sorted_merge.py) and the
on-disk digest runs (digest_sets.py) against a reference written with Python sets:

    merge(listed, wanted)   every digest of either side exactly once: only listed = L - W,
                            only wanted = W - L, both = |L & W|; each output list ascending,
                            batches in ascending order
    union(streams)          the sorted distinct union
    difference(a, b)        sorted(A - B);   intersection(a, b)   sorted(A & B)
    DigestSorter            any order, repeats, any chunk size -> sorted distinct digests

The streams are cut into blocks at random places (empty blocks included), so a block boundary
falls exactly on a digest both sides hold, on the first or last digest, or nowhere; the digests
are drawn from a small alphabet so that the two sides share many. A stream that is not strictly
ascending (a swap, a repeat inside a block or across a boundary) raises OrderError.
"""

from typing import List

from unittest import mock

import pytest
from hypothesis import given, strategies as st

from ekko_libvirt.format import manifest as mf
from ekko_libvirt.lifecycle import digest_sets, sorted_merge
from ekko_libvirt.lifecycle.sorted_merge import OrderError

# 16-byte digests from a small space (shared prefixes, so comparisons reach late bytes)
digest = st.builds(lambda a, b: bytes([a]) * 8 + b.to_bytes(8, "big"), st.integers(0, 3), st.integers(0, 40))
digest_sets_ = st.sets(digest, max_size=60)


@st.composite
def blocks_of(draw, values):
    """sorted(values) cut into consecutive blocks at random points (some empty)."""
    items = sorted(values)
    cuts = sorted(draw(st.lists(st.integers(0, len(items)), max_size=8)))
    out, start = [], 0
    for c in cuts + [len(items)]:
        out.append(items[start:c])
        start = c
    return out


def flat(blocks) -> List[bytes]:
    return [d for b in blocks for d in b]


@given(st.data(), digest_sets_, digest_sets_)
def test_merge_puts_every_digest_on_exactly_one_side(data, listed, wanted):
    batches = list(sorted_merge.merge(data.draw(blocks_of(listed)), data.draw(blocks_of(wanted))))
    only_listed = flat(b.only_listed for b in batches)
    only_wanted = flat(b.only_wanted for b in batches)
    assert only_listed == sorted(listed - wanted)
    assert only_wanted == sorted(wanted - listed)
    assert sum(b.both for b in batches) == len(listed & wanted)
    # batches advance: everything in a batch is above everything in the previous one
    tops = [max(b.only_listed + b.only_wanted) for b in batches if b.only_listed or b.only_wanted]
    assert tops == sorted(tops)


@given(st.data(), st.lists(digest_sets_, max_size=5))
def test_union_is_the_sorted_distinct_union(data, sets):
    streams = [data.draw(blocks_of(s)) for s in sets]
    assert flat(sorted_merge.union(streams)) == sorted(set().union(*sets))


@given(st.data(), digest_sets_, digest_sets_)
def test_difference_and_intersection(data, a, b):
    assert flat(sorted_merge.difference(data.draw(blocks_of(a)), data.draw(blocks_of(b)))) == sorted(a - b)
    assert flat(sorted_merge.intersection(data.draw(blocks_of(a)), data.draw(blocks_of(b)))) == sorted(a & b)


@given(st.data(), st.lists(digest, min_size=2, max_size=40).filter(lambda xs: xs != sorted(set(xs))))
def test_a_stream_out_of_order_or_repeating_is_refused(data, xs):
    """Any list that is not strictly ascending, however it is cut into blocks: OrderError
    naming the two digests, from whichever side it is on; never a quiet answer."""
    cut = data.draw(st.integers(0, len(xs)))
    bad = [xs[:cut], xs[cut:]]
    side = data.draw(st.sampled_from(["listed", "wanted"]))
    good = [[bytes(16)]] if data.draw(st.booleans()) else []
    args = (bad, good) if side == "listed" else (good, bad)
    with pytest.raises(OrderError, match="is not in ascending order") as e:
        list(sorted_merge.merge(*args, "the listing", "the wanted digests"))
    assert e.value.what == ("the listing" if side == "listed" else "the wanted digests")
    assert e.value.found <= e.value.previous


def test_order_error_names_the_place():
    a, b = bytes(15) + b"\x02", bytes(15) + b"\x01"
    with pytest.raises(OrderError, match=f"the listing is not in ascending order: {b.hex()} came after {a.hex()}"):
        list(sorted_merge.merge([[a], [b]], []))
    with pytest.raises(OrderError, match=r"\(listed twice\)"):
        list(sorted_merge.merge([[a, a]], [[a]], "the listing"))


@given(values=st.lists(digest, max_size=300), chunk=st.integers(1, 50), via_table=st.booleans(),
       budget=st.integers(1, 64), least=st.integers(1, 8))
def test_sorter_gives_sorted_distinct_digests_whatever_the_chunk(values, chunk, via_table, budget, least,
                                                                 tmp_path_factory):
    """...and whatever the merge's block per run (digest_sets.merge_block: runs of many digests
    read a few at a time, so a block of one run ends anywhere in another's)."""
    tmp = str(tmp_path_factory.mktemp("runs"))
    with mock.patch.object(digest_sets, "MERGE_BUDGET", budget), \
            mock.patch.object(digest_sets, "MIN_MERGE_BLOCK", least), \
            digest_sets.DigestSorter(tmp, chunk=chunk) as sorter:
        if via_table:
            t = mf.SegmentTable(len(values))
            for i, d in enumerate(values):
                t.set_data(i, d)
            sorter.add_table(t)
        else:
            sorter.add(values)
        result = sorter.finish()
    with result:
        assert list(result) == sorted(set(values)) and len(result) == len(set(values))
        for d in values[:5]:
            assert result.contains(d)
        assert not result.contains(b"\xff" * 16)

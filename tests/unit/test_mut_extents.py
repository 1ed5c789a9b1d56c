"""Extents: what the mutation run of nbd/extents.py showed no test pinned down (docs/mutation.md):
several healing re-reads around and between the plans, and the messages of the two refusals."""

import itertools

import pytest

from ekko_libvirt.nbd.extents import SegmentPlan, flat_to_extents, split_reads, with_extra_segments

SEG = 4096


def p(i):
    return SegmentPlan(i, i * SEG, SEG, ((i * SEG + 100, 10),))      # a plan that reads part of its segment


@pytest.mark.parametrize("plans, extra, want", [
    ([5], [0, 1, 2, 7, 8], [0, 1, 2, 5, 7, 8]),          # several extra indices before the first plan
    ([1, 4], [2, 4, 5, 7], [1, 2, 4, 5, 7]),              # one that a plan reads already, then the next one
    ([1, 3, 9], [0, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 9]),
])
def test_healing_adds_each_extra_segment_once_in_index_order(plans, extra, want):
    # islice: a wrong walk that repeats an index for ever still ends the test
    out = list(itertools.islice(with_extra_segments(iter([p(i) for i in plans]), extra, SEG, 10 * SEG),
                                len(want) + 5))
    assert [x.index for x in out] == want
    assert all(x == p(x.index) if x.index in plans else x.reads == ((x.index * SEG, SEG),) for x in out)


def test_refusals_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"^NBD server sent an extent of length 0 at 4196$"):
        flat_to_extents(4096, [100, 0, 0, 0])
    with pytest.raises(ValueError, match=r"^request size must be positive, not 0$"):
        split_reads([(0, 10)], 0)

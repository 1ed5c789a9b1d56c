"""A ZERO answer of the fleecing view is trusted only where the fleece file holds nothing
(nbd.extents.distrust_zero, nbd.reader.fleece_written): QEMU 7.2 reports ranges the guest zeroed
after the view's instant as ZERO, while the view holds their old data."""

import os

from hypothesis import given, strategies as st

from ekko_libvirt.nbd.extents import STATE_HOLE, STATE_ZERO, distrust_zero
from ekko_libvirt.nbd.reader import fleece_written

SIZE = 256


@st.composite
def layouts(draw):
    cuts = sorted(set(draw(st.lists(st.integers(1, SIZE - 1), max_size=8))))
    bounds = [0] + cuts + [SIZE]
    alloc = [(a, b, draw(st.sampled_from([0, STATE_ZERO, STATE_HOLE, STATE_HOLE | STATE_ZERO])))
             for a, b in zip(bounds, bounds[1:])]
    wcuts = sorted(set(draw(st.lists(st.integers(0, SIZE), max_size=8))))
    written = [(a, b - a) for a, b in zip(wcuts[::2], wcuts[1::2]) if b > a]
    return alloc, written


def zero_map(extents):
    out = [None] * SIZE
    for s, e, f in extents:
        for i in range(s, e):
            assert out[i] is None, "extents overlap"
            out[i] = bool(f & STATE_ZERO)
    return out


@given(layouts())
def test_zero_survives_exactly_where_nothing_was_written(layout):
    alloc, written = layout
    got = distrust_zero(alloc, written)
    w = [False] * SIZE
    for off, n in written:
        for i in range(off, off + n):
            w[i] = True
    before, after = zero_map(alloc), zero_map(got)
    assert after == [z and not w[i] for i, z in enumerate(before)]
    # the other flags are kept, the extents stay in order and tile the same range
    assert [e[0] for e in got] == sorted(e[0] for e in got) and got[0][0] == 0 and got[-1][1] == SIZE
    flags_before = {i: f & ~STATE_ZERO for s, e, f in alloc for i in range(s, e)}
    assert all(f & ~STATE_ZERO == flags_before[i] for s, e, f in got for i in range(s, e))


def test_fleece_written_finds_the_data_of_a_sparse_file(tmp_path):
    path = str(tmp_path / "fleece")
    blk = os.statvfs(str(tmp_path)).f_bsize
    with open(path, "wb") as f:
        f.truncate(64 * blk)
        f.seek(3 * blk)
        f.write(b"x" * blk)
        f.seek(10 * blk)
        f.write(b"y" * (2 * blk))
    got = fleece_written(path, 0, 64 * blk)
    covered = {i for off, n in got for i in range(off // blk, (off + n) // blk)}
    assert {3, 10, 11} <= covered and covered <= set(range(64))
    assert all(off >= 0 and off + n <= 64 * blk for off, n in got)
    assert fleece_written(path, 20 * blk, 30 * blk) == []


def test_a_fleece_file_that_cannot_be_read_distrusts_everything(tmp_path):
    assert fleece_written(str(tmp_path / "gone"), 100, 900) == [(100, 800)]

"""Property tests of the segment planner (ekko_libvirt/nbd/extents.py) against a byte-level model.

The model is brute force on purpose: a disk of a few thousand bytes, one flag per byte for each
meta context, and "what a backup must produce" computed byte by byte. Inputs are what an NBD
server may send: extents of any length (not multiples of 512 or of the segment size), ending
anywhere, the last one running past the request and past the disk, the replies cut into random
chunks, HOLE without ZERO (a hole over a backing file: it has data).

Profiles (tests/conftest.py): `make test` runs a few derandomized examples, `make torture` many.
"""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from ekko_libvirt.nbd import reader as reader_mod
from ekko_libvirt.nbd.extents import (DIRTY, STATE_ZERO, CoverageTracker, SegmentPlan, flat_to_extents, plan_segments, split_reads, whole_segment, with_extra_segments)

ALLOC_FLAGS = st.sampled_from([0, 1, 2, 3])     # DATA, HOLE (data from a backing file), ZERO, HOLE|ZERO
DIRTY_FLAGS = st.sampled_from([0, 1])
DIRTY_CTX = "qemu:dirty-bitmap:ekko-gen"


def n_segments(size, seg):
    return -(-size // seg)


# -- inputs ----------------------------------------------------------------------------------------
@st.composite
def disks(draw):
    """(segment size, disk size): any positive segment size, and a disk whose last segment is
    usually short (sizes that are not a multiple of the segment size or of 512)."""
    seg = draw(st.one_of(st.integers(1, 48), st.sampled_from([64, 512, 1000, 1024])))
    nseg = draw(st.integers(0, 10))
    size = 0 if nseg == 0 else draw(st.one_of(
        st.integers((nseg - 1) * seg + 1, nseg * seg), st.just(nseg * seg)))
    return seg, size


@st.composite
def tilings(draw, size, seg, flags):
    """Extents (start, end, flags) that tile [0, end) with end >= size: the last one may run
    past the disk, as a server's may. Boundaries favour segment boundaries and their
    neighbours, where the off-by-ones live."""
    near_boundary = st.integers(0, max(0, size // seg)).flatmap(
        lambda k: st.sampled_from([k * seg - 1, k * seg, k * seg + 1]))
    point = st.one_of(st.integers(1, max(1, size - 1)), near_boundary)
    cuts = sorted(c for c in draw(st.sets(point, max_size=12)) if 0 < c < size)
    end = size + draw(st.one_of(st.just(0), st.integers(1, 3 * seg)))
    bounds = [0] + cuts + ([end] if end > 0 else [])
    return [(a, b, draw(flags)) for a, b in zip(bounds, bounds[1:])]


def per_byte(tiling, size, bit):
    """For each byte of the disk: whether its extent has `bit` set."""
    out = [None] * size
    for start, end, flags in tiling:
        for b in range(start, min(end, size)):
            out[b] = bool(flags & bit)
    assert None not in out, "test bug: the tiling does not cover the disk"
    return out


# -- the reference ---------------------------------------------------------------------------------
def reference_plans(size, seg, zero, dirty, first=0, stop=None):
    """[(index, offset, length, reads)]: a segment is planned iff one of its bytes is dirty
    (every segment for a full: dirty None); it reads exactly the maximal runs of bytes that
    base:allocation does not report as ZERO (all of it without allocation info: zero None)."""
    out = []
    stop = n_segments(size, seg) if stop is None else stop
    for i in range(first, stop):
        s, e = i * seg, min((i + 1) * seg, size)
        if dirty is not None and not any(dirty[s:e]):
            continue
        reads, b = [], s
        while b < e:
            if zero is not None and zero[b]:
                b += 1
                continue
            a = b
            while b < e and not (zero is not None and zero[b]):
                b += 1
            reads.append((a, b - a))
        out.append((i, s, e - s, tuple(reads)))
    return out


def as_tuples(plans):
    return [(p.index, p.offset, p.length, p.reads) for p in plans]


def restore_from(plans, size, current, old, request_size):
    """What a backup of `plans` on top of the previous image `old` restores to: each planned
    segment read request by request (zeros where nothing is read), every other byte as before.
    Also checks that every request stays inside its segment and the disk."""
    image = bytearray(old)
    for p in plans:
        buf = bytearray(p.length)
        for off, n in split_reads(p.reads, request_size):
            assert 0 < n <= request_size, (off, n, request_size)
            assert p.offset <= off and off + n <= p.offset + p.length <= size, (p, off, n)
            buf[off - p.offset:off - p.offset + n] = current[off:off + n]
        image[p.offset:p.offset + p.length] = buf
    return bytes(image)


@st.composite
def scenarios(draw, allow_no_alloc=True):
    """A disk: its allocation and dirty extents (None: no allocation info / a full backup), its
    content now (zero where ZERO says so, anything elsewhere, HOLE included) and the image the
    parent backup holds (equal to now wherever the bitmap says clean)."""
    seg, size = draw(disks())
    alloc = draw(st.one_of(st.none(), tilings(size, seg, ALLOC_FLAGS)) if allow_no_alloc
                 else tilings(size, seg, ALLOC_FLAGS))
    dirty = draw(st.one_of(st.none(), tilings(size, seg, DIRTY_FLAGS)))
    zero = per_byte(alloc, size, STATE_ZERO) if alloc is not None else None
    dirt = per_byte(dirty, size, DIRTY) if dirty is not None else None
    rnd = draw(st.randoms(use_true_random=False))
    current = bytes(0 if zero is not None and zero[b] else rnd.choice((0, 1, 0x5A, 0xFF)) for b in range(size))
    if dirt is None:
        old = bytes([0xA5]) * size            # a full: the "parent" knows nothing
    else:
        old = bytes(c ^ 0xFF if dirt[b] else c for b, c in enumerate(current))
    return SimpleNamespace(seg=seg, size=size, alloc=alloc, dirty=dirty, zero=zero, dirt=dirt,
                           current=current, old=old)


def check_plan_properties(plans, d):
    """The properties, spelled out (the exact comparison with the reference implies them, but a
    failure message naming the property is quicker to read)."""
    idx = [p.index for p in plans]
    assert idx == sorted(set(idx)), f"segments out of order or repeated: {idx}"
    for p in plans:
        s, e = p.index * d.seg, min((p.index + 1) * d.seg, d.size)
        assert (p.offset, p.length) == (s, e - s), f"segment {p.index} has the wrong bounds: {p}"
        pos = s
        for off, n in p.reads:
            assert n > 0 and pos <= off and off + n <= e, f"read ({off}, {n}) outside segment {p} or out of order"
            pos = off + n
        if p.is_zero and d.zero is not None:
            assert all(d.zero[s:e]), f"segment {p.index} planned as zero but holds non-ZERO bytes"
    planned = set(idx)
    for b in range(d.size):
        if d.dirt is None or d.dirt[b]:
            assert b // d.seg in planned, f"dirty byte {b} in an unplanned segment {b // d.seg}"
            p = plans[idx.index(b // d.seg)]
            read = any(off <= b < off + n for off, n in p.reads)
            assert read or (d.zero is not None and d.zero[b]), f"dirty byte {b} neither read nor proven zero"


# -- plan_segments ---------------------------------------------------------------------------------
@given(d=scenarios(), data=st.data())
def test_plan_segments_matches_byte_model_in_any_windows(d, data):
    n = n_segments(d.size, d.seg)
    # the reader plans window by window; any split of [0, n) must give the same plans
    cuts = sorted(data.draw(st.sets(st.integers(0, n), max_size=4)) | {0, n})
    plans = []
    for a, b in zip(cuts, cuts[1:]):
        window = plan_segments(a, b, d.seg, d.size, d.alloc, d.dirty)
        assert all(a <= p.index < b for p in window), f"window [{a}, {b}) planned {[p.index for p in window]}"
        plans += window
    check_plan_properties(plans, d)
    assert as_tuples(plans) == reference_plans(d.size, d.seg, d.zero, d.dirt)
    request = data.draw(st.integers(1, 3 * d.seg), label="request_size")
    assert restore_from(plans, d.size, d.current, d.old, request) == d.current


@given(d=scenarios(allow_no_alloc=False))
def test_only_the_zero_bit_lets_a_read_be_skipped(d):
    """HOLE alone is data (a hole over a backing file); clearing HOLE everywhere changes nothing,
    setting it everywhere changes nothing, clearing ZERO makes every byte of a planned segment read."""
    plans = as_tuples(plan_segments(0, n_segments(d.size, d.seg), d.seg, d.size, d.alloc, d.dirty))
    for alloc in ([(s, e, f & ~1) for s, e, f in d.alloc], [(s, e, f | 1) for s, e, f in d.alloc]):
        assert as_tuples(plan_segments(0, n_segments(d.size, d.seg), d.seg, d.size, alloc, d.dirty)) == plans
    no_zero = [(s, e, f & ~STATE_ZERO) for s, e, f in d.alloc]
    for i, s, length, reads in as_tuples(plan_segments(0, n_segments(d.size, d.seg), d.seg, d.size, no_zero, d.dirty)):
        assert reads == ((s, length),)


# -- split_reads -----------------------------------------------------------------------------------
@given(reads=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 5000)), max_size=6),
       request=st.integers(1, 6000))
def test_split_reads_cuts_at_request_size_and_loses_nothing(reads, request):
    # ranges in order, not overlapping (as plans give them)
    ranges, pos = [], 0
    for gap, n in reads:
        ranges.append((pos + gap, n))
        pos += gap + n
    out = split_reads(ranges, request)
    assert all(0 < n <= request for _, n in out)
    want = [b for off, n in ranges for b in range(off, off + n)]
    assert [b for off, n in out for b in range(off, off + n)] == want
    # each range gives ceil(n / request) pieces, all full but its last
    assert len(out) == sum(n_segments(n, request) for _, n in ranges)


@pytest.mark.parametrize("request_size", [0, -1])
def test_split_reads_refuses_a_request_size_that_cannot_make_progress(request_size):
    """A request size of 0 (read.request_size: 0 is accepted by the config) used to loop forever."""
    with pytest.raises(ValueError):
        split_reads([(0, 10)], request_size)


# -- flat_to_extents -------------------------------------------------------------------------------
@given(offset=st.integers(0, 1 << 40), pairs=st.lists(st.tuples(st.integers(1, 1 << 32), st.integers(0, 3)), max_size=8))
def test_flat_to_extents_tiles_from_the_request_offset(offset, pairs):
    flat = [x for pair in pairs for x in pair]
    ext = flat_to_extents(offset, flat)
    assert [(e - s, f) for s, e, f in ext] == pairs
    assert [s for s, _, _ in ext] == ([offset] + [e for _, e, _ in ext])[:len(ext)]


@given(offset=st.integers(0, 1 << 20), pairs=st.lists(st.tuples(st.integers(1, 100), st.integers(0, 3)), max_size=5),
       where=st.integers(0, 5), bad=st.sampled_from([0, -1]))
def test_flat_to_extents_refuses_an_empty_or_negative_extent(offset, pairs, where, bad):
    pairs = list(pairs)
    pairs.insert(min(where, len(pairs)), (bad, 0))
    with pytest.raises(ValueError):
        flat_to_extents(offset, [x for pair in pairs for x in pair])


# -- with_extra_segments / whole_segment -----------------------------------------------------------
@given(d=scenarios(), data=st.data())
def test_with_extra_segments_adds_each_missing_index_once_in_order(d, data):
    n = n_segments(d.size, d.seg)
    plans = plan_segments(0, n, d.seg, d.size, d.alloc, d.dirty)
    extra = sorted(data.draw(st.sets(st.integers(0, max(0, n - 1)), max_size=n)) if n else [])
    out = list(with_extra_segments(iter(plans), extra, d.seg, d.size))
    assert [p.index for p in out] == sorted({p.index for p in plans} | set(extra))
    by_index = {p.index: p for p in plans}
    for p in out:
        if p.index in by_index:
            assert p is by_index[p.index], "a segment the plans already read must come from the plans"
        else:
            s, e = p.index * d.seg, min((p.index + 1) * d.seg, d.size)
            assert p == SegmentPlan(p.index, s, e - s, ((s, e - s),)) == whole_segment(p.index, d.seg, d.size)
    # healed segments come back whole, whatever the allocation said
    assert restore_from(out, d.size, d.current, d.old, d.seg) == d.current


# -- CoverageTracker -------------------------------------------------------------------------------
def reply(truth, start, k, overshoot):
    """k extents of `truth` from `start` on (the first cut at `start`); the last one cut at
    `overshoot` bytes past its start or left as the truth has it."""
    i = next(j for j, (s, e, _) in enumerate(truth) if s <= start < e)
    out = [(max(s, start), e, f) for s, e, f in truth[i:i + k]]
    if overshoot is not None:
        s, e, f = out[-1]
        out[-1] = (s, min(e, s + overshoot), f)
    return out


@given(seg_size=disks(), ncontexts=st.integers(1, 2), data=st.data())
def test_coverage_tracker_never_runs_ahead_and_windows_tile_the_disk(seg_size, ncontexts, data):
    """Rounds as the reader makes them: a request at position(), one reply per context starting
    there (a context that is ahead gets extents it already has), each cut after a random number
    of extents, the last one running past the disk or not; after every reply ready() is checked
    against the coverage the test keeps itself, and sometimes the ready window is taken."""
    seg, size = seg_size
    n = n_segments(size, seg)
    names = ["base:allocation", DIRTY_CTX][:ncontexts]
    truth = {c: data.draw(tilings(size, seg, ALLOC_FLAGS), label=c) for c in names}
    flags = {c: [next(f for s, e, f in truth[c] if s <= b < e) for b in range(size)] for c in names}
    t = CoverageTracker(names, seg, size)
    cov = {c: 0 for c in names}
    windows = []

    def check_ready():
        start, end = t.ready()
        low = min(cov.values())
        want = n if low >= size else low // seg
        assert start == (windows[-1][1] if windows else 0)
        assert end == max(want, start), f"ready() says [{start}, {end}), covered {cov}"
        assert end == n or end * seg <= low, f"ready() runs past the coverage {cov}: {end}"
        return start, end

    while True:
        start, end = check_ready()
        if start == n:
            break                   # every segment handed out
        if end > start and (min(cov.values()) >= size or data.draw(st.booleans(), label="take")):
            windows.append((start, end))
            t.take(end)
            # what is kept still describes every byte from the cut to the coverage, exactly
            cut = end * seg
            for c in names:
                kept = t.extents[c]
                assert all(a < b for a, b, _ in kept) and all(x[1] <= y[0] for x, y in zip(kept, kept[1:]))
                for b in range(cut, cov[c]):
                    hits = [f for s, e, f in kept if s <= b < e]
                    assert hits == [flags[c][b]], f"{c}: byte {b} is described by {hits}, truth {flags[c][b]}"
            continue
        pos = t.position()
        if pos >= size:
            continue
        for c in data.draw(st.permutations(names), label="order"):
            k = data.draw(st.integers(1, 3), label="k")
            overshoot = data.draw(st.one_of(st.none(), st.integers(1, 2 * seg)), label="overshoot")
            ext = reply(truth[c], pos, k, overshoot)
            t.add(c, ext)
            cov[c] = max(cov[c], min(ext[-1][1], size))
            assert t.covered[c] == cov[c] and t.position() == min(cov.values())
            check_ready()
    assert windows == [] if n == 0 else (windows[0][0] == 0 and windows[-1][1] == n)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(windows, windows[1:]))


# -- the whole walk: ExportReader.plans over a fake NBD server -------------------------------------
class FakeServer:
    """block_status as an NBD server may answer it: per context, the extents from the requested
    offset, cut after a random number of them (the server may describe less than asked), the
    last one running past the request and the disk or not, contexts in either order."""

    def __init__(self, truth, data):
        self.truth, self.data, self.calls = truth, data, 0

    def block_status(self, count, offset, cb):
        self.calls += 1
        assert self.calls < 1000, "the reader does not make progress"
        names = list(self.truth)
        for c in self.data.draw(st.permutations(names), label="order"):
            k = self.data.draw(st.integers(1, 4), label="k")
            overshoot = self.data.draw(st.one_of(st.none(), st.integers(1, 3 * count)), label="overshoot")
            ext = reply(self.truth[c], offset, k, overshoot)
            cb(c, offset, [x for s, e, f in ext for x in (e - s, f)], 0)


def fake_reader(d, data):
    r = reader_mod.ExportReader.__new__(reader_mod.ExportReader)
    truth = {}
    if d.alloc is not None:
        truth[reader_mod.ALLOCATION] = d.alloc
    if d.dirty is not None:
        truth[DIRTY_CTX] = d.dirty
    r.export = SimpleNamespace(dirty_context=DIRTY_CTX if d.dirty is not None else None)
    r.has_allocation = d.alloc is not None
    r.size = d.size
    r.h = FakeServer(truth, data)
    return r


@given(d=scenarios(), data=st.data())
def test_reader_walk_plans_exactly_the_reference_and_restores_the_disk(d, data):
    plans = list(fake_reader(d, data).plans(d.seg))
    check_plan_properties(plans, d)
    assert as_tuples(plans) == reference_plans(d.size, d.seg, d.zero, d.dirt)
    request = data.draw(st.integers(1, 3 * d.seg), label="request_size")
    assert restore_from(plans, d.size, d.current, d.old, request) == d.current

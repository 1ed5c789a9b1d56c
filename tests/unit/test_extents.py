from ekko_libvirt.nbd.extents import CoverageTracker, flat_to_extents, plan_segments, segment_indices, split_reads

S = 100  # segment size for readable numbers
DATA, ZERO, HOLE_ZERO = 0, 2, 3


def test_flat_to_extents():
    assert flat_to_extents(50, [10, 0, 20, 3]) == [(50, 60, 0), (60, 80, 3)]


def test_full_reads_only_non_zero_ranges():
    alloc = [(0, 150, DATA), (150, 300, HOLE_ZERO), (300, 320, DATA), (320, 400, ZERO)]
    plans = plan_segments(0, 4, S, 400, alloc, None)
    assert [(p.index, p.reads) for p in plans] == [
        (0, ((0, 100),)), (1, ((100, 50),)), (2, ()), (3, ((300, 20),))]
    assert plans[2].is_zero


def test_incremental_only_dirty_segments_and_dirty_zero_is_recorded_as_zero():
    alloc = [(0, 200, DATA), (200, 400, ZERO)]
    dirty = [(0, 120, 0), (120, 130, 1), (130, 250, 0), (250, 260, 1), (260, 400, 0)]
    plans = plan_segments(0, 4, S, 400, alloc, dirty)
    # segment 1 is dirty and has data; segment 2 is dirty but now reads as zero: a zero entry
    assert [(p.index, p.reads) for p in plans] == [(1, ((100, 100),)), (2, ())]


def test_dirty_extent_spanning_segments_and_last_short_segment():
    dirty = [(90, 310, 1)]
    assert list(segment_indices(0, 4, S, dirty)) == [0, 1, 2, 3]
    plans = plan_segments(0, 4, S, 350, None, dirty)
    assert plans[-1].length == 50 and plans[-1].reads == ((300, 50),)


def test_no_allocation_info_reads_everything():
    plans = plan_segments(0, 2, S, 200, None, None)
    assert [p.reads for p in plans] == [((0, 100),), ((100, 100),)]


def test_split_reads():
    assert split_reads([(0, 250), (300, 10)], 100) == [(0, 100), (100, 100), (200, 50), (300, 10)]


def test_coverage_tracker_emits_only_segments_covered_by_every_context():
    t = CoverageTracker(["a", "d"], S, 400)
    t.add("a", [(0, 250, 0)])
    t.add("d", [(0, 120, 0), (120, 500, 1)])      # overshoots the disk: clipped
    assert t.position() == 250
    assert t.ready() == (0, 2)
    t.take(2)
    assert t.extents["a"] == [(0, 250, 0)] and t.extents["d"] == [(120, 400, 1)]
    t.add("a", [(200, 400, 2)])                    # overlapping re-report is trimmed
    assert t.extents["a"] == [(0, 250, 0), (250, 400, 2)]
    assert t.ready() == (2, 4)
    t.take(4)
    assert t.extents["a"] == [] and t.extents["d"] == []

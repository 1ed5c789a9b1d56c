"""Pure: NBD block-status replies -> the segments a backup must read.

block_status answers per meta context with a flat list [length, flags, length, flags, ...]
starting at the requested offset. The two contexts do not end at the same place, and the last
extent may run past what was asked:

    request          |<------------------- count ------------------->|
    base:allocation  |--data--|---zero---|--data-------------|
    dirty-bitmap     |---clean----|-dirty-|--clean----------------------------|
    covered          |<------------- min(ends) ------------->|
    emitted          |seg 0 |seg 1 |seg 2 |seg 3 |   (only segments wholly covered)

A segment is read when it is dirty (incremental) or always (full); inside it only the ranges
that base:allocation does not report as ZERO are read. ZERO is flag bit 1; HOLE (bit 0) alone
does not mean zero (a hole over a backing file has data).
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

STATE_HOLE = 1
STATE_ZERO = 2
DIRTY = 1

Extent = Tuple[int, int, int]          # (start, end, flags)
Range = Tuple[int, int]                # (offset, length)


@dataclass(frozen=True)
class SegmentPlan:
    index: int
    offset: int
    length: int
    reads: Tuple[Range, ...]           # empty: the segment is all zeros, nothing to read

    @property
    def is_zero(self) -> bool:
        return not self.reads


def flat_to_extents(offset: int, entries: Sequence[int]) -> List[Extent]:
    out = []
    pos = offset
    for i in range(0, len(entries) - 1, 2):
        length, flags = entries[i], entries[i + 1]
        if length <= 0:
            raise ValueError(f"NBD server sent an extent of length {length} at {pos}")
        out.append((pos, pos + length, flags))
        pos += length
    return out


def segment_indices(start_index: int, end_index: int, seg: int,
                    dirty: Optional[Sequence[Extent]]) -> Iterable[int]:
    """Indices in [start_index, end_index) to back up: all of them for a full, else those
    touched by a dirty extent."""
    if dirty is None:
        yield from range(start_index, end_index)
        return
    last = start_index - 1
    for start, end, flags in dirty:
        if not flags & DIRTY:
            continue
        first = max(start // seg, start_index, last + 1)
        stop = min(-(-end // seg), end_index)
        for i in range(first, stop):
            yield i
        last = max(last, stop - 1)


def data_ranges(seg_start: int, seg_end: int, alloc: Sequence[Extent], hint: int = 0) -> Tuple[Tuple[Range, ...], int]:
    """Ranges of [seg_start, seg_end) that are not ZERO, merged; `hint` is where to start
    scanning `alloc` (sorted), returned updated so a walk over segments stays linear."""
    i = hint
    while i < len(alloc) and alloc[i][1] <= seg_start:
        i += 1
    next_hint = i
    ranges: List[Range] = []
    while i < len(alloc) and alloc[i][0] < seg_end:
        start, end, flags = alloc[i]
        if not flags & STATE_ZERO:
            a, b = max(start, seg_start), min(end, seg_end)
            if ranges and ranges[-1][0] + ranges[-1][1] == a:
                ranges[-1] = (ranges[-1][0], b - ranges[-1][0])
            else:
                ranges.append((a, b - a))
        i += 1
    return tuple(ranges), next_hint


def plan_segments(start_index: int, end_index: int, seg: int, disk_size: int,
                  alloc: Optional[Sequence[Extent]], dirty: Optional[Sequence[Extent]]) -> List[SegmentPlan]:
    """Plans for the segments in [start_index, end_index) that need backing up. `alloc` None
    means the server gave no allocation info: read everything."""
    plans = []
    hint = 0
    for i in segment_indices(start_index, end_index, seg, dirty):
        s, e = i * seg, min((i + 1) * seg, disk_size)
        if alloc is None:
            reads: Tuple[Range, ...] = ((s, e - s),)
        else:
            reads, hint = data_ranges(s, e, alloc, hint)
        plans.append(SegmentPlan(i, s, e - s, reads))
    return plans


def whole_segment(index: int, seg: int, disk_size: int) -> SegmentPlan:
    """A plan that reads all of segment `index`, whatever the allocation says."""
    s, e = index * seg, min((index + 1) * seg, disk_size)
    return SegmentPlan(index, s, e - s, ((s, e - s),))


def with_extra_segments(plans: Iterable[SegmentPlan], extra: Sequence[int], seg: int,
                        disk_size: int) -> Iterator[SegmentPlan]:
    """`plans` (in index order) plus a whole-segment read of each index in `extra` (sorted) that
    `plans` lacks, still in index order. Self-healing re-reads segments the bitmap calls clean:

        plans   |  1  |     |  4  |     |     |
        extra         2     4           7
        out     |  1  |  2  |  4  |     |  7  |   (4 comes from plans: it already reads the segment)
    """
    k = 0
    for p in plans:
        while k < len(extra) and extra[k] < p.index:
            yield whole_segment(extra[k], seg, disk_size)
            k += 1
        if k < len(extra) and extra[k] == p.index:
            k += 1
        yield p
    for i in extra[k:]:
        yield whole_segment(i, seg, disk_size)


def split_reads(reads: Sequence[Range], max_request: int) -> List[Range]:
    """Cut read ranges into requests the server accepts."""
    if max_request <= 0:
        raise ValueError(f"request size must be positive, not {max_request}")
    out = []
    for off, length in reads:
        while length > 0:
            n = min(length, max_request)
            out.append((off, n))
            off += n
            length -= n
    return out


class CoverageTracker:
    """Accumulates block-status replies of several contexts and says which segments are wholly
    covered by all of them, dropping extents nobody needs any more (memory stays flat)."""

    def __init__(self, contexts: Sequence[str], seg: int, disk_size: int):
        self.seg = seg
        self.size = disk_size
        self.extents: Dict[str, List[Extent]] = {c: [] for c in contexts}
        self.covered = {c: 0 for c in contexts}
        self.next_index = 0

    def add(self, context: str, extents: Iterable[Extent]) -> None:
        lst = self.extents[context]
        cov = self.covered[context]
        for start, end, flags in extents:
            start = max(start, cov)
            end = min(end, self.size)
            if start < end:
                lst.append((start, end, flags))
                cov = end
        self.covered[context] = cov

    def position(self) -> int:
        """Where the next block-status request should start."""
        return min(self.covered.values())

    def ready(self) -> Tuple[int, int]:
        """[next_index, end_index) of segments wholly covered by every context."""
        pos = self.position()
        end_index = -(-self.size // self.seg) if pos >= self.size else pos // self.seg
        return self.next_index, max(end_index, self.next_index)

    def take(self, end_index: int) -> None:
        """Segments below end_index are planned: forget extents that end before them."""
        self.next_index = end_index
        cut = end_index * self.seg
        for lst in self.extents.values():
            k = 0
            while k < len(lst) and lst[k][1] <= cut:
                k += 1
            if k:
                del lst[:k]

"""Merges of sorted streams of segment digests, a block at a time (pure: no I/O).

gc and verify compare what the store holds (its listing of segments/, in name order) with what
the manifests name (sorted on disk by digest_sets.py): a digest only the listing has is garbage
to gc, one only the manifests name is missing to verify. At 10^7 segments neither side fits in
a Python set (~100 bytes a digest), so both come as streams of *blocks*: lists of digests,
strictly ascending within a block and from one block to the next. A merge holds one block of
each side and does its per-digest work in C (bisect, set operations, sort), not in a Python
loop per digest.

    listed  [a c d] [f g]          wanted  [b c] [d e f h]
    bound = min(last of each held block) = c:  listed a c | wanted b c  -> only listed a, only
            wanted b, both c
    bound = d: listed d | wanted d             -> both d
    bound = g: listed f g | wanted e f         -> only listed g, only wanted e, both f
    listed ends: the rest of wanted (h) is wanted only

A stream that goes backwards or repeats a digest stops the merge with OrderError: comparing
by merge is only right on sorted input, and a store whose listing is not sorted must fail the
command, never pass it as "nothing missing".
"""

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence


class OrderError(ValueError):
    """A stream handed to a merge is not strictly ascending."""

    def __init__(self, what: str, previous: bytes, found: bytes):
        self.what, self.previous, self.found = what, previous, found
        super().__init__(f"{what} is not in ascending order: {found.hex()} came after {previous.hex()}"
                         + (" (listed twice)" if found == previous else ""))


@dataclass
class Batch:
    """One step of merge(): digests up to a bound, each list ascending."""
    only_listed: List[bytes] = field(default_factory=list)
    only_wanted: List[bytes] = field(default_factory=list)
    both: int = 0                    # how many digests both sides have (up to the bound)


def check_block(block: Sequence[bytes], previous: Optional[bytes], what: str) -> None:
    """Raise OrderError unless `block` is strictly ascending and starts after `previous`. The
    common case (it is) costs two C passes: a sort of sorted input and a set."""
    if not block:
        return
    if previous is not None and block[0] <= previous:
        raise OrderError(what, previous, block[0])
    as_list = list(block)
    if sorted(as_list) == as_list and len(set(as_list)) == len(as_list):
        return
    for a, b in itertools.pairwise(as_list):      # only on failure: find the place for the message
        if b <= a:
            raise OrderError(what, a, b)


class _Side:
    """One stream of blocks and the unconsumed rest of its current block."""

    def __init__(self, blocks: Iterable[Sequence[bytes]], what: str):
        self.blocks = iter(blocks)
        self.what = what
        self.block: Sequence[bytes] = []
        self.pos = 0
        self.last: Optional[bytes] = None        # the last digest seen: the next block starts after it
        self.done = False

    def fill(self) -> None:
        """Hold a block with something left in it, unless the stream has ended."""
        while not self.done and self.pos >= len(self.block):
            nxt = next(self.blocks, None)
            if nxt is None:
                self.done = True
                return
            check_block(nxt, self.last, self.what)
            if nxt:
                self.block, self.pos, self.last = nxt, 0, nxt[-1]

    def take_upto(self, bound: bytes) -> List[bytes]:
        end = bisect.bisect_right(self.block, bound, self.pos)
        out = list(self.block[self.pos:end])
        self.pos = end
        return out

    def take_rest(self) -> List[bytes]:
        out = list(self.block[self.pos:])
        self.pos = len(self.block)
        return out


def merge(listed: Iterable[Sequence[bytes]], wanted: Iterable[Sequence[bytes]],
          what_listed: str = "the listing", what_wanted: str = "the wanted digests") -> Iterator[Batch]:
    """Compare two sorted block streams: every digest lands in exactly one Batch, as only
    listed, only wanted, or both (counted). Batches come in ascending order of digests."""
    a, b = _Side(listed, what_listed), _Side(wanted, what_wanted)
    while True:
        a.fill()
        b.fill()
        if a.done and b.done:
            return
        if b.done:
            yield Batch(only_listed=a.take_rest())
            continue
        if a.done:
            yield Batch(only_wanted=b.take_rest())
            continue
        bound = min(a.block[-1], b.block[-1])
        yield _compare(a.take_upto(bound), b.take_upto(bound))


def _compare(listed: List[bytes], wanted: List[bytes]) -> Batch:
    if not wanted:
        return Batch(only_listed=listed)
    if not listed:
        return Batch(only_wanted=wanted)
    ls, ws = set(listed), set(wanted)
    common = len(ls & ws)
    if common == len(ls) == len(ws):
        return Batch(both=common)
    return Batch(only_listed=[d for d in listed if d not in ws] if common else listed,
                 only_wanted=[d for d in wanted if d not in ls] if common else wanted, both=common)


def union(streams: Sequence[Iterable[Sequence[bytes]]], what: str = "a sorted run") -> Iterator[List[bytes]]:
    """k sorted block streams -> one sorted block stream of their distinct digests. Each step
    takes, from every stream, what lies up to the smallest last digest of the held blocks, and
    sorts that (timsort merges the already sorted pieces in C) and drops repeats."""
    sides = [_Side(s, what) for s in streams]
    while True:
        for s in sides:
            s.fill()
        live = [s for s in sides if not s.done]
        if not live:
            return
        bound = min(s.block[-1] for s in live)
        pieces: List[bytes] = []
        for s in live:
            pieces += s.take_upto(bound)
        if len(live) > 1:
            pieces.sort()
            pieces = list(dict.fromkeys(pieces))      # sorted: drops the repeats, keeps the order
        yield pieces


def difference(a: Iterable[Sequence[bytes]], b: Iterable[Sequence[bytes]]) -> Iterator[List[bytes]]:
    """The digests of sorted stream `a` that sorted stream `b` does not hold, as sorted blocks."""
    for batch in merge(a, b, "the first run", "the second run"):
        if batch.only_listed:
            yield batch.only_listed


def intersection(a: Iterable[Sequence[bytes]], b: Iterable[Sequence[bytes]]) -> Iterator[List[bytes]]:
    """The digests both sorted streams hold, as sorted blocks."""
    sa, sb = _Side(a, "the first run"), _Side(b, "the second run")
    while True:
        sa.fill()
        sb.fill()
        if sa.done or sb.done:
            return
        bound = min(sa.block[-1], sb.block[-1])
        left, right = sa.take_upto(bound), set(sb.take_upto(bound))
        common = [d for d in left if d in right]
        if common:
            yield common

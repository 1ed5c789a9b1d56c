"""A sorted listing of segments/ fetched as many key ranges at once, yielded in order.

One Swift listing request returns at most a page (10,000 names) and the next can only be asked
for when the previous has arrived (its last name is the next marker), so a listing of 10^7
segments is 1,000 round trips one after the other, each mostly waiting for the container server.
Segment names are hashes, spread evenly over `segments/<hhh>/<32 hex>`: the key space can be cut
into ranges of about a page each by the first four hex digits of the digest, listed concurrently
by a few connections, and still handed to the caller in ascending order, because ranges are
handed over whole and in order.

Memory is bounded by the window: the range being handed over and at most `workers + 1` ranges
ahead of it (each ~ one page of names) are held at a time; a range further ahead is not asked for
until the caller has started on the one at the front.

The ranges are exact. Range i holds the names n with bound[i] < n <= bound[i+1]: Swift's `marker`
excludes names up to and including it, and `end_marker` excludes names from it on, so the upper
bound is passed as bound + "\\x01" (no name lies strictly between a bound and it: that name would
have to be bound + "\\x00...", and Swift refuses NUL in names). The first range has no lower
bound but the prefix and the last no upper bound, so every name under the prefix is in exactly one
range, foreign names included. A bound itself (segments/abc/abcd) is never a valid segment name:
those have 32 hex digits.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Tuple

SEGMENTS = "segments/"
DIGITS = 4                      # the bounds cut the key space by the digest's first 4 hex digits
MAX_RANGES = 16 ** DIGITS
# Connections listing at once. Measured on the test Swift (one container server, 1M names): one
# 48-50k names/s, two 71k/s, four 80k/s, eight 80k/s; each range held costs ~1 MiB of names.
MAX_WORKERS = 4

Range = Tuple[Optional[str], Optional[str]]     # (marker, end_marker): None = unbounded


def ranges(count: int) -> List[Range]:
    """`count` ranges covering segments/ in ascending order: (marker, end_marker) for each."""
    count = max(1, min(count, MAX_RANGES))
    bounds = []
    for i in range(1, count):
        h = f"{i * MAX_RANGES // count:0{DIGITS}x}"
        bounds.append(f"{SEGMENTS}{h[:3]}/{h}")
    lows: List[Optional[str]] = [None, *bounds]
    highs: List[Optional[str]] = [b + "\x01" for b in bounds] + [None]
    return list(zip(lows, highs, strict=True))


def range_count(objects: int, page: int, workers: int) -> int:
    """About one page of names per range (a range listed in one request), at least one range per
    worker when there are several pages, and one range when everything fits in a page or two."""
    pages = -(-max(objects, 0) // page)
    if pages <= 2 or workers <= 1:
        return 1
    return min(MAX_RANGES, max(pages, workers))


def in_order(fetch: Callable[[Range], List[str]], parts: List[Range], workers: int) -> Iterator[str]:
    """The names of every range in `parts`, range after range, each fetched by `fetch` in one of
    `workers` threads, at most workers + 1 ranges ahead of the one handed over. A fetch's error is raised
    here when its range's turn comes; on any exit (error, or the caller stopping early) ranges
    not started are cancelled and the ones running are waited for: no thread outlives this."""
    if len(parts) == 1 or workers <= 1:
        for part in parts:
            yield from fetch(part)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ekko-list")
    pending: List[Future] = []
    try:
        ahead = iter(parts)
        for part in ahead:
            pending.append(pool.submit(fetch, part))
            if len(pending) > workers:
                break
        while pending:
            names = pending.pop(0).result()
            nxt = next(ahead, None)
            if nxt is not None:
                pending.append(pool.submit(fetch, nxt))
            yield from names
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)

"""store/ranged_listing.py: key ranges that cover segments/ exactly, fetched concurrently and
handed over in order. The fetch here answers as Swift does (marker and end_marker exclusive,
name order by UTF-8 bytes) from a plain sorted list, so the output must be that list, whatever
the names, the number of ranges and workers, and wherever the names fall next to a bound."""

import bisect
import random
import threading

import pytest

from ekko_libvirt.store import ranged_listing as rl


def swift_like(names):
    """A fetch over `names` with Swift's semantics (prefix segments/ applied by the caller)."""
    ordered = sorted(names, key=lambda n: n.encode())
    raw = [n.encode() for n in ordered]

    def fetch(part):
        marker, end = part
        lo = 0 if marker is None else bisect.bisect_right(raw, marker.encode())
        hi = len(raw) if end is None else bisect.bisect_left(raw, end.encode())
        return ordered[lo:hi]
    return ordered, fetch


def hostile_names(rng, bounds):
    """Valid segment names, and foreign names on, just below and just above each bound."""
    names = set()
    for _ in range(rng.randrange(0, 400)):
        h = f"{rng.getrandbits(128):032x}"
        names.add(f"segments/{h[:3]}/{h}")
    for b in rng.sample(bounds, min(len(bounds), 20)):
        names.update({b, b + "\x01", b + "\x02", b + "0", b[:-1], b[:-1] + chr(ord(b[-1]) - 1) + "~", b + "/x"})
    names.update({"segments/", "segments/ABC/" + "AB" * 16, "segments/zzz", "segments/fff/ffff" + "f" * 28})
    return names


@pytest.mark.parametrize("seed", range(40))
def test_every_name_once_in_order(seed):
    rng = random.Random(seed)
    count = rng.choice([1, 2, 3, 7, 16, 100, 4096, rl.MAX_RANGES, rl.MAX_RANGES + 5])
    parts = rl.ranges(count)
    bounds = [p[0] for p in parts if p[0] is not None]
    ordered, fetch = swift_like(hostile_names(rng, bounds))
    workers = rng.choice([1, 2, 4])
    got = list(rl.in_order(fetch, parts, workers))
    assert got == ordered, f"seed {seed}: {count} ranges, {workers} workers"


def test_ranges_are_contiguous_and_ascending():
    for count in (1, 2, 3, 10, 65536, 10 ** 6):
        parts = rl.ranges(count)
        assert len(parts) == min(count, rl.MAX_RANGES)
        assert parts[0][0] is None and parts[-1][1] is None
        for (lo, hi), (nlo, _) in zip(parts, parts[1:], strict=False):
            assert hi == nlo + "\x01" and (lo is None or lo < nlo)


def test_range_count_about_a_page_each():
    assert rl.range_count(0, 10000, 4) == 1
    assert rl.range_count(20000, 10000, 4) == 1          # two pages: one range, no threads
    assert rl.range_count(20001, 10000, 4) == 4          # three pages: a range per worker at least
    assert rl.range_count(10 ** 7, 10000, 4) == 1000
    assert rl.range_count(10 ** 12, 10000, 4) == rl.MAX_RANGES
    assert rl.range_count(10 ** 7, 10000, 1) == 1


def test_window_bounds_the_ranges_held():
    """No more than workers + 1 ranges are asked for beyond the one being handed over."""
    asked, lock = [], threading.Lock()
    parts = rl.ranges(50)

    def fetch(part):
        with lock:
            asked.append(part)
        return [part[0] or ""]
    it = rl.in_order(fetch, parts, 3)
    try:
        for taken in range(1, 20):
            next(it)
            with lock:
                assert len(asked) <= taken + 3 + 1, (taken, len(asked))
    finally:
        it.close()


def test_an_error_is_raised_in_turn_and_no_thread_is_left():
    parts = rl.ranges(30)

    def fetch(part):
        if part == parts[7]:
            raise OSError("listing failed")
        return [part[0] or "first"]
    got = []
    with pytest.raises(OSError, match="listing failed"):
        for name in rl.in_order(fetch, parts, 4):
            got.append(name)
    assert got == ["first"] + [p[0] for p in parts[1:7]]
    assert not [t for t in threading.enumerate() if t.name.startswith("ekko-list")]


def test_stopping_early_leaves_no_thread():
    it = rl.in_order(lambda part: [part[0] or ""] * 3, rl.ranges(100), 4)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ekko-list")]

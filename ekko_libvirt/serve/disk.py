"""One backup's disk as a read-only block device: reads and block status straight from its
manifest and its segments, for the NBD server (plugin.py) and anything else that wants bytes of
a backup without restoring it.

    read(buf, offset)   fills buf with the disk's bytes at offset: zero segments as zeros (the
                        store is not asked), data segments fetched, decoded and re-hashed
                        (format.segment.decode) before a byte of them is copied out
    extents(off, n)     (offset, length, is_zero) runs from the manifest's ZERO/DATA flags

Never a wrong byte: a segment that is missing, damaged (its content does not match its digest)
or of another length than its place in the disk needs fails the whole read with a
SegmentUnreadable naming the segment, its key and its disk offset; nothing of it is copied.

Memory is bounded whatever the disk's size: a cache of at most `cache_bytes` of decoded
segments (least recently used out first, at least two segments), plus the segments being
fetched right now (at most one per reading thread and `readahead` more). The cache is keyed by
digest: in one store a digest names one content (the content's hash, or under encryption its
keyed name), so a segment repeated across the disk is fetched once. A ServedDisk serves one
manifest of one store; two stores (two projects, two keys) never share a ServedDisk.

A segment wanted by several readers at once (two clients, or a read and the read-ahead) is
fetched once: the first asks the store, the others wait for its result (`_inflight`), which is
the same verified bytes object. The read-ahead fetches the next `readahead` data segments when
a read touches segment i and segment i - 1 was read recently (one sequential reader, or several
connections of one, such as nbdcopy's, reading neighbouring parts); its failures are dropped
(the read that needs the segment fetches it again and reports the problem).
"""

import collections
import concurrent.futures as cf
import logging
import threading
from typing import Dict, List, Set, Tuple

from ..errors import IntegrityError, ObjectNotFound, StoreError
from ..format import segment
from ..format.manifest import FLAG_DATA, FLAG_ZERO, Manifest
from ..store.base import Store
from .. import units

log = logging.getLogger(__name__)

DEFAULT_CACHE = 64 * units.MiB
DEFAULT_READAHEAD = 4
MAX_EXTENTS = 1024          # runs returned by one extents() call (a client asks again for the rest)


class SegmentUnreadable(Exception):
    """A read met a segment it cannot serve: missing, damaged, or the store failed."""

    def __init__(self, index: int, offset: int, key: str, problem: str):
        problem = problem.removeprefix(f"segment {key}: ")
        self.index, self.offset, self.key, self.problem = index, offset, key, problem
        super().__init__(f"segment {index} at disk offset {offset} ({key}): {problem}")


class ServedDisk:
    def __init__(self, store: Store, m: Manifest, cache_bytes: int = DEFAULT_CACHE,
                 readahead: int = DEFAULT_READAHEAD, workers: int = 4):
        self.store, self.m = store, m
        self.size, self.seg = m.virtual_size, m.segment_size
        self.capacity = max(2, cache_bytes // self.seg)
        self.readahead = max(0, readahead)
        self._cache: "collections.OrderedDict[bytes, bytes]" = collections.OrderedDict()
        self._inflight: Dict[bytes, cf.Future] = {}
        self._lock = threading.Lock()
        self._recent: "collections.deque[int]" = collections.deque(maxlen=64)
        self._prefetching: Set[int] = set()
        self._pool = cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="ekko-serve-ahead") \
            if self.readahead else None
        self._zeros = bytes(self.seg)
        self.fetches = 0            # segments asked of the store (tests, bench)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # -- reads ------------------------------------------------------------------------------------
    def read(self, buf, offset: int) -> None:
        """Fill `buf` (a writable buffer) with the disk's bytes [offset, offset + len(buf))."""
        out = memoryview(buf).cast("B")
        end = offset + len(out)
        if offset < 0 or end > self.size:
            raise ValueError(f"read [{offset}, {end}) outside the disk (size {self.size})")
        pos = offset
        while pos < end:
            index = pos // self.seg
            start = index * self.seg
            stop = min(start + self.seg, self.size, end)
            into = out[pos - offset:stop - offset]
            d = self.m.table.get(index)
            if d is None:
                into[:] = memoryview(self._zeros)[:stop - pos]
            else:
                raw = self._segment(index, d)
                into[:] = memoryview(raw)[pos - start:stop - start]
            pos = stop
        self._ahead(offset // self.seg, (end - 1) // self.seg if end > offset else offset // self.seg)

    def _length(self, index: int) -> int:
        return min(self.seg, self.size - index * self.seg)

    def _segment(self, index: int, d: bytes) -> bytes:
        """The verified bytes of data segment `index` (digest d): from the cache, from a fetch
        already under way, or fetched here."""
        with self._lock:
            raw = self._cache.get(d)
            if raw is not None:
                self._cache.move_to_end(d)
            else:
                fut = self._inflight.get(d)
                owner = fut is None
                if owner:
                    fut = self._inflight[d] = cf.Future()
        if raw is not None:
            return self._checked(index, d, raw)
        assert fut is not None          # set above whenever raw is None
        if not owner:
            return self._checked(index, d, fut.result())
        try:
            raw = self._fetch(index, d)
        except BaseException as e:
            with self._lock:
                del self._inflight[d]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._inflight[d]
            self._cache[d] = raw
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        fut.set_result(raw)
        return raw

    def _checked(self, index: int, d: bytes, raw: bytes) -> bytes:
        """A cached or shared segment has the length segment `index` needs (one digest names
        one content, so it has: this is the belt to that brace)."""
        if len(raw) != self._length(index):
            raise SegmentUnreadable(index, index * self.seg, segment.segment_key(d),
                                    f"{len(raw)} bytes where the disk needs {self._length(index)}")
        return raw

    def _fetch(self, index: int, d: bytes) -> bytes:
        key = segment.segment_key(d)
        offset = index * self.seg
        self.fetches += 1
        try:
            raw = segment.decode(self.store.get(key), d, codec=self.store.codec)
        except ObjectNotFound as e:
            raise SegmentUnreadable(index, offset, key, "missing from the store") from e
        except (IntegrityError, StoreError) as e:
            raise SegmentUnreadable(index, offset, key, str(e)) from e
        if len(raw) != self._length(index):
            raise SegmentUnreadable(index, offset, key, f"{len(raw)} bytes where the disk needs {self._length(index)}")
        return raw

    # -- read-ahead -------------------------------------------------------------------------------
    def _ahead(self, first: int, last: int) -> None:
        if self._pool is None:
            return
        with self._lock:
            sequential = first == 0 or (first - 1) in self._recent or first in self._recent
            for i in range(first, last + 1):
                if i not in self._recent:
                    self._recent.append(i)
            if not sequential:
                return
            todo: List[Tuple[int, bytes]] = []
            flags = self.m.table.flags
            i = last + 1
            while len(todo) < self.readahead and i < self.m.table.count:
                i = flags.find(FLAG_DATA, i)
                if i < 0 or i > last + 4 * self.readahead:
                    break
                d = self.m.table.get(i)
                assert d is not None            # a DATA flag
                if d not in self._cache and d not in self._inflight and i not in self._prefetching:
                    todo.append((i, d))
                i += 1
            if len(self._prefetching) + len(todo) > 2 * self.readahead:
                todo = todo[:max(0, 2 * self.readahead - len(self._prefetching))]
            self._prefetching.update(i for i, _ in todo)
        for i, d in todo:
            self._pool.submit(self._prefetch, i, d)

    def _prefetch(self, index: int, d: bytes) -> None:
        try:
            self._segment(index, d)
        except SegmentUnreadable as e:       # the read that needs it fetches again and reports it
            log.debug("read-ahead: %s", e)
        except Exception:   # noqa: BLE001 - a prefetch must not kill the pool thread; the read reports
            log.debug("read-ahead of segment %d failed", index, exc_info=True)
        finally:
            with self._lock:
                self._prefetching.discard(index)

    # -- block status -----------------------------------------------------------------------------
    def extents(self, offset: int, count: int) -> List[Tuple[int, int, bool]]:
        """(offset, length, is_zero) runs covering [offset, offset + count) (or a prefix of it,
        at most MAX_EXTENTS runs), in order, the first starting at offset."""
        end = min(offset + count, self.size)
        flags = self.m.table.flags
        out: List[Tuple[int, int, bool]] = []
        pos = offset
        while pos < end and len(out) < MAX_EXTENTS:
            i = pos // self.seg
            kind = flags[i]
            nxt = flags.find(FLAG_DATA if kind == FLAG_ZERO else FLAG_ZERO, i)
            run_end = self.size if nxt < 0 else min(nxt * self.seg, self.size)
            stop = min(run_end, end)
            out.append((pos, stop - pos, kind == FLAG_ZERO))
            pos = stop
        return out


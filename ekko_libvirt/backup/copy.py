"""The data path of one disk: NBD export -> reader -> segments (hash, compress, verify) -> store.

copy_segments() reads the segments a plan names from the point-in-time view, stores the new ones
through a store batch, and before it returns, with the export still open:
  - flushes the batch: every segment durable and visible;
  - the commit-time check (_recheck): every segment the manifest will name still exists (gc
    may have removed one this backup reused: it is stored again from the export);
  - the read-back check (_read_back): segments of the view are read again and must be what the
    table says, carried-over ones included.
"""

import concurrent.futures as cf
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Set

from ..store import catalog, markers
from ..store.base import Store
from .. import heap, units
from ..format import segment
from ..engine.bitmaps import GenerationPlan
from ..errors import ReaderError, ReadBackMismatch, StoreError
from ..faults import crash_point, pause_point
from ..format.manifest import Manifest, SegmentTable, segment_count
from ..nbd.extents import SegmentPlan, whole_segment, with_extra_segments
from ..nbd.reader import ExportReader, SegmentReader
from . import presence, scratch
from .options import BackupOptions

log = logging.getLogger(__name__)


@dataclass
class Stats:
    segments_backed_up: int = 0
    zero_segments: int = 0
    read_bytes: int = 0
    new_segments: int = 0
    stored_bytes: int = 0
    reused_segments: int = 0
    healed_segments: int = 0        # marked damaged in the store, read again and stored over
    restored_segments: int = 0      # vanished before commit (gc), stored again from the export
    read_back_seconds: float = 0.0  # the read-back check (a timing, not a count: in the manifest's timings)

    def as_dict(self) -> Dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "read_back_seconds"}



def copy_segments(export, store: Store, plan: GenerationPlan, size: int, parent: Optional[Manifest],
                   opts: BackupOptions, progress, watch: Optional[Callable[[], None]] = None
                   ) -> "tuple[SegmentTable, Stats]":
    """`watch`: called every scratch.WATCH_INTERVAL while segments are read; it raises to stop
    the backup (scratch.ScratchGuard.watcher)."""
    heap.keep_buffers_on_heap()     # segment-sized buffers: no mmap + page faults each time
    seg = plan.segment_size
    # An incremental's table starts as its parent's and is TAKEN OVER, not copied (the caller
    # does not use parent.table afterwards): one table in memory instead of two, 17 MiB per TiB
    # at 1 MiB segments. Dedup against the parent goes through store.exists() like any other
    # segment; a set of the parent's digests cost ~80 bytes per segment (1.3 GiB for a full
    # 16 TiB disk) to save an exists() on the rare dirty segment whose content the parent had.
    table = parent.table if parent is not None else SegmentTable(segment_count(size, seg))
    known: set = set()
    # Self-healing: segments of the parent that verify marked damaged are read again, although
    # the bitmap says they are clean, and stored over the damaged object.
    damaged = markers.damaged_digests(store)
    heal = sorted(i for i, d in parent.table.data_entries() if d in damaged) if parent is not None and damaged else []
    if heal:
        log.warning("%s: reading %d segment(s) again that are marked damaged in the store (self-healing)",
                    opts.target, len(heal))
    reader = ExportReader(export, opts.request_size, opts.in_flight)
    # A full asks about every distinct segment: on Swift one listing beats a HEAD each (an
    # incremental asks about its few dirty ones). The segment count bounds the questions.
    present = presence.presence(store, table.count) if parent is None else presence.PerObject(store)
    copier = _SegmentCopier(reader, store, known, opts, damaged, track=parent is not None, present=present)
    try:
        if reader.size != size:
            raise ReaderError(f"NBD export is {reader.size} bytes, the disk {size}: refusing a torn view")
        plans = reader.plans(seg)
        if heal:
            plans = with_extra_segments(plans, heal, seg, size)
        copier.run(plans, table, progress, size, watch)
        copier.batch.flush()        # every segment durable and visible before the check and the commit
        pause_point("after-segments")
        _recheck(copier, table, parent, seg, size, watch)
        copier.batch.flush()
        t0 = time.monotonic()
        _read_back(copier, table, seg, size)
        copier.stats.read_back_seconds = time.monotonic() - t0
    except BaseException:
        copier.batch.abort()
        raise
    finally:
        copier.close()
        reader.close()
    for d in copier.healed:
        try:
            markers.clear_damaged(store, d)
        except StoreError as e:     # the segment is good now; a stale mark costs one more re-read
            log.warning("cannot clear the damaged mark of %s: %s", segment.segment_key(d), e)
    return table, copier.stats


def _recheck(copier: "_SegmentCopier", table: SegmentTable, parent: Optional[Manifest], seg: int, size: int,
             watch: Optional[Callable[[], None]] = None) -> None:
    """The commit-time check: every segment the manifest will name still exists.

    gc deletes unreferenced segments older than its grace period. Segments this backup PUT are
    young; segments it REUSED (found by exists(), or carried over from the parent) may be old and
    unreferenced if the backups that named them were pruned meanwhile. If the parent manifest
    still exists, it protected everything carried over from it, and only the segments this
    backup read need checking; otherwise every segment of the table is checked. A vanished one
    is read again from the export (still open: the same point-in-time view) and stored."""
    store = copier.store
    parent_alive = parent is not None and store.exists(catalog.manifest_key(parent.target, parent.backup_id))
    # marked damaged since the backup started: gc marks a segment it deleted under a backup that
    # committed meanwhile, and that backup may be our parent
    late = markers.damaged_digests(store) - set(copier.damaged)
    if late:
        late = {d for _, d in table.data_entries() if d in late}
    if parent_alive and copier.touched is not None:
        wanted = copier.touched | late
    else:
        wanted = table.unique_digests()
    if watch is not None:
        watch()
    missing = presence.missing(store, wanted)     # one listing when the store prefers it
    if missing is None:
        missing = _missing(store, wanted, max(2, copier.opts.workers * 2), watch)
    if not missing:
        return
    log.warning("%s: %d segment(s) vanished from the store before the commit (gc?): storing them again "
                "from the export", copier.opts.target, len(missing))
    w = copier._worker()
    for i, d in table.data_entries():
        if d not in missing:
            continue
        data = w.read(whole_segment(i, seg, size))
        nd = None if segment.is_zero(data) else copier.codec.name(data)
        if nd == d:
            copier.store_segment(data, d, restored_segments=1)
            missing.discard(d)
            if d in late:
                copier.healed.add(d)        # its mark goes with the others after the check
            continue
        # The export differs from what the chain recorded for a segment the bitmap called clean:
        # the change tracking missed writes, here and who knows where else. No patching this one.
        raise ReadBackMismatch(copier.opts.target, i, i * seg, _named(d), _named(nd))


def read_back_indices(count: int, wanted: int, rnd: random.Random) -> List[int]:
    """Which segments the read-back check reads: the first and the last always, then a random
    sample up to `wanted` (READ_BACK_ALL: every one). Pure."""
    if wanted == units.READ_BACK_ALL or wanted >= count:
        return list(range(count))
    middle = range(1, count - 1)
    return sorted({0, count - 1, *rnd.sample(middle, min(len(middle), max(0, wanted - 2)))})


def _read_back(copier: "_SegmentCopier", table: SegmentTable, seg: int, size: int) -> None:
    """The read-back check, last before the commit: segments of the still-open point-in-time view
    are read again and named, and must be what the manifest is about to say, carried-over
    segments of an incremental included: that is where a dirty bitmap that missed writes shows
    (disabled, cleared or broken behind our back), which nothing else would notice."""
    indices = read_back_indices(table.count, copier.opts.read_back, random.Random())
    log.debug("%s: read-back check of segment(s) %s", copier.opts.target, indices)
    w = copier._worker()
    for i in indices:
        plan = whole_segment(i, seg, size)
        data = w.read(plan)
        found = None if segment.is_zero(data) else copier.codec.name(data)
        expected = table.get(i)
        if found != expected:
            raise ReadBackMismatch(copier.opts.target, i, plan.offset, _named(expected), _named(found))


def _named(d: Optional[bytes]) -> str:
    return "zeros" if d is None else segment.segment_key(d)


def _missing(store: Store, digests: Iterable[bytes], workers: int,
             watch: Optional[Callable[[], None]] = None) -> Set[bytes]:
    """The digests whose segment object does not exist; exists() in parallel, in batches. The
    export stays open meanwhile (a vanished segment is read again from it), and a full's check
    on Swift takes a HEAD per segment: `watch` looks at the scratch space between batches."""
    out: Set[bytes] = set()
    it = iter(digests)
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="ekko-check") as pool:
        while True:
            if watch is not None:
                watch()
            batch = list(itertools.islice(it, 256))
            if not batch:
                return out
            for d, ok in zip(batch, pool.map(lambda x: store.exists(segment.segment_key(x)), batch), strict=True):
                if not ok:
                    out.add(d)


class _SegmentCopier:
    """A reader thread (nbd.reader.SegmentStream) reads ahead into a fixed pool of buffers;
    worker threads take each segment: zero check -> encode (hash, compress, verify) -> store.
    Memory: the pool, 2 segments per worker + 2, whatever the disk size."""

    def __init__(self, reader: ExportReader, store: Store, known: set, opts: BackupOptions,
                 damaged: "set | frozenset" = frozenset(), track: bool = True,
                 present: Optional[presence.Presence] = None):
        self.reader = reader
        self.store = store
        self.present = present if present is not None else presence.PerObject(store)   # a Listed may be empty: falsy
        self.batch = store.batch()    # segment puts: durable together at each flush
        self.codec = store.codec    # names segments: xxh3-128, or keyed in an encrypted store
        self.known = known
        self.opts = opts
        self.damaged = damaged      # digests marked damaged: stored again, never reused
        self.healed: set = set()
        # digests this run read (for the commit-time check); a full checks its whole table instead
        self.touched: Optional[set] = set() if track else None
        self.stats = Stats()
        self._local = threading.local()
        self._conns: List[SegmentReader] = []
        self._lock = threading.Lock()

    def run(self, plans, table: SegmentTable, progress, size: int,
            watch: Optional[Callable[[], None]] = None) -> None:
        """The workers take (plan, buffer) pairs from the stream themselves, one at a time, and
        record their segment in the table: no hand-over through a pool, its futures and a
        semaphore for each of a full's thousands of segments (profiled: a tenth of the CPU)."""
        # Reads run ahead in their own thread into a fixed pool of buffers (2 per worker + 2):
        # while workers hash, compress and store, the next segments are already in flight.
        stream = self.reader.stream(plans, buffers=self.opts.workers * 2 + 2)
        items = iter(stream)
        take = threading.Lock()         # the stream is a generator: one taker at a time
        stop = threading.Event()
        failed: List[BaseException] = []

        def work(done: threading.Event) -> None:
            try:
                while not stop.is_set():
                    with take:
                        item = next(items, None)
                    if item is None:
                        return
                    self._settle(item, table, progress, size)
            except BaseException as e:   # noqa: BLE001 - raised in the caller's thread below
                failed.append(e)
                stop.set()
            finally:
                done.set()

        # Waited for with events, not Thread.join: on Python 3.11 a join interrupted by a signal
        # handler's exception (SIGTERM, Ctrl-C) can mark a running thread stopped, and a second
        # join then returns at once (measured: the batch was aborted while a worker still put a
        # segment, which left its temp file). An Event.wait has no such state to lose.
        started: List[threading.Event] = []
        try:
            for i in range(self.opts.workers):
                done = threading.Event()
                threading.Thread(target=work, args=(done,), name=f"ekko-seg_{i}", daemon=True).start()
                started.append(done)
            for done in started:
                while not done.wait(scratch.WATCH_INTERVAL):
                    if watch is not None and not failed:
                        watch()
        finally:
            stop.set()          # interrupted (SIGTERM) while waiting: the workers finish their segment
            stream.close()      # and one waiting for the stream is woken up
            for done in started:
                done.wait()
        if failed:
            raise failed[0]

    def _settle(self, item, table: SegmentTable, progress, size: int) -> None:
        p, buf = item
        if p.is_zero:
            # Nothing to read: a sparse 1 TiB disk has a million of these, settled with one lock.
            with self._lock:
                self.stats.segments_backed_up += 1
                self.stats.zero_segments += 1
                table.set_zero(p.index)
                if progress:
                    progress(p.offset + p.length, size)
            return
        index, d, end = self._one(p, buf)
        with self._lock:
            if d is None:
                table.set_zero(index)
            else:
                table.set_data(index, d)
            if progress:
                progress(end, size)

    def _one(self, p: SegmentPlan, buf):
        try:
            return self._process(p, buf)
        finally:
            buf.release()           # the stream may read the next segment into it

    def _process(self, p: SegmentPlan, buf):
        """A segment with data to read (zero plans are settled in _settle), read into `buf`."""
        self._count(segments_backed_up=1)
        data = buf.data
        crash_point("during-read")
        pause_point("during-read")      # a worker waits; the main thread goes on watching (tests)
        self._count(read_bytes=sum(n for _, n in p.reads))
        if segment.is_zero(data):
            self._count(zero_segments=1)
            return p.index, None, p.offset + p.length
        d = self.codec.name(data)
        with self._lock:
            heal = d in self.damaged and d not in self.healed
            if heal:
                self.healed.add(d)
            if self.touched is not None:
                self.touched.add(d)
            # The first worker to meet a digest decides for it; another worker with the same
            # content meanwhile reuses it (should the first fail, the whole backup fails).
            claimed = heal or d not in self.known
            self.known.add(d)
        if heal:
            # exists() would say yes to a corrupt object: overwrite it with verified data
            self.store_segment(data, d, healed_segments=1)
        elif not claimed or self.present.exists(d):
            self._count(reused_segments=1)
        else:
            self.store_segment(data, d)
        return p.index, d, p.offset + p.length

    def store_segment(self, data, d: bytes, **counts) -> None:
        enc = segment.encode(data, self.opts.compression_level, self.opts.compress, d, codec=self.codec)
        crash_point("during-store")
        self.batch.put(enc.key, enc.blob)
        self._count(new_segments=1, stored_bytes=len(enc.blob), **counts)

    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _worker(self) -> SegmentReader:
        w = getattr(self._local, "reader", None)
        if w is None:
            w = self._local.reader = self.reader.worker()
            with self._lock:
                self._conns.append(w)
        return w

    def close(self) -> None:
        for w in self._conns:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001 - closing a connection must not hide the real error
                log.debug("closing NBD worker connection: %s", e)



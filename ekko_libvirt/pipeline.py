"""One backup of one disk: export -> reader -> segmenter -> store -> manifest commit -> retire.

The order is the safety argument:
  1. every segment is durable in the store before the manifest that names it is written;
  2. the manifest is the commit point;
  3. the old bitmap generation is retired only after the commit; any failure before it merges
     the new generation back, so no dirty block is ever forgotten.
"""

import concurrent.futures as cf
import datetime
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from . import catalog, segment
from .engine.bitmaps import INCREMENTAL, ChainHead, GenerationPlan, plan_generation
from .errors import EkkoError, LockBusy, ReaderError
from .faults import crash_point
from .manifest import Manifest, SegmentTable, segment_count
from .nbd.extents import SegmentPlan
from .nbd.reader import ExportReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupOptions:
    target: str
    force_full: bool = False
    require_incremental: bool = False
    segment_size: int = 4 << 20
    granularity: int = 64 << 10
    bitmap_prefix: str = "ekko-"
    compress: bool = True
    compression_level: int = 1
    workers: int = 3
    request_size: int = 1 << 20
    in_flight: int = 4
    lock_dir: str = "/var/lib/ekko/locks"
    labels: Dict = field(default_factory=dict)


@dataclass
class Stats:
    segments_backed_up: int = 0
    zero_segments: int = 0
    read_bytes: int = 0
    new_segments: int = 0
    stored_bytes: int = 0
    reused_segments: int = 0

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest
    key: str
    notes: List[str]


class TargetLock:
    """One backup per target at a time, across processes (flock dies with its holder)."""

    def __init__(self, lock_dir: str, target: str):
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(lock_dir, f"{target}.lock")
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LockBusy(f"another ekko job is working on {os.path.basename(self.path)[:-5]}") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def chain_head(store, target: str):
    """(ChainHead, entry) of the newest committed backup, or (None, None)."""
    entry = catalog.head(store, target)
    if entry is None:
        return None, None
    h = entry.header
    gen = h.get("generation") or {}
    return ChainHead(h["backup_id"], gen.get("bitmap"), gen.get("granularity"), h["virtual_size"],
                     h["segment_size"]), entry


def run_backup(engine, store, opts: BackupOptions, progress: Optional[Callable[[int, int], None]] = None) -> BackupResult:
    with TargetLock(opts.lock_dir, opts.target):
        head, head_entry = chain_head(store, opts.target)
        notes, broken = engine.recover(head.bitmap if head else None)
        info = engine.inspect()
        backup_id = catalog.new_backup_id()
        plan = plan_generation(info, head, backup_id=backup_id, prefix=opts.bitmap_prefix,
                               granularity=opts.granularity, segment_size=opts.segment_size,
                               force_full=opts.force_full, require_incremental=opts.require_incremental,
                               broken_reason=broken)
        log.info("%s: %s backup %s: %s", opts.target, plan.kind, backup_id, plan.reason)
        parent = catalog.load(store, head_entry.key) if plan.kind == INCREMENTAL else None
        started = time.time()
        session = engine.begin(plan, info.virtual_size)
        try:
            crash_point("after-transaction")
            table, stats = copy_segments(session.export, store, plan, info.virtual_size, parent, opts, progress)
            session.close_export()
            m = build_manifest(opts, info, plan, backup_id, table, stats, started)
            crash_point("before-commit")
            key = catalog.commit(store, m)
        except BaseException:
            session.abort()
            raise
        crash_point("after-commit")
        session.commit()
        return BackupResult(m, key, notes)


def build_manifest(opts, info, plan: GenerationPlan, backup_id, table, stats: Stats, started: float) -> Manifest:
    finished = time.time()
    counts = stats.as_dict()
    counts.update(segments=table.count, data_segments=table.data_count())
    return Manifest(
        backup_id=backup_id, target=opts.target, virtual_size=info.virtual_size,
        segment_size=plan.segment_size, table=table, kind=plan.kind, reason=plan.reason,
        parent=plan.parent,
        generation={"bitmap": plan.new_bitmap, "granularity": plan.granularity} if plan.new_bitmap else None,
        disk={"node": info.node, "filename": info.filename, "format": info.format},
        created=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        timings={"started": started, "finished": finished, "seconds": round(finished - started, 3)},
        counts=counts, labels=dict(opts.labels))


def copy_segments(export, store, plan: GenerationPlan, size: int, parent: Optional[Manifest],
                   opts: BackupOptions, progress) -> "tuple[SegmentTable, Stats]":
    seg = plan.segment_size
    table = parent.table.copy() if parent is not None else SegmentTable(segment_count(size, seg))
    known = parent.table.unique_digests() if parent is not None else set()
    reader = ExportReader(export, opts.request_size, opts.in_flight)
    copier = _SegmentCopier(reader, store, known, opts)
    try:
        if reader.size != size:
            raise ReaderError(f"NBD export is {reader.size} bytes, the disk {size}: refusing a torn view")
        copier.run(reader.plans(seg), table, progress, size)
    finally:
        copier.close()
        reader.close()
    return table, copier.stats


class _SegmentCopier:
    """Worker threads, each with its own NBD connection: read -> zero check -> encode (hash,
    compress, verify) -> store. At most 2 segments per worker are in memory at once."""

    def __init__(self, reader: ExportReader, store, known: set, opts: BackupOptions):
        self.reader = reader
        self.store = store
        self.known = known
        self.opts = opts
        self.stats = Stats()
        self._local = threading.local()
        self._conns = []
        self._lock = threading.Lock()

    def run(self, plans, table: SegmentTable, progress, size: int) -> None:
        limit = threading.BoundedSemaphore(self.opts.workers * 2)
        with cf.ThreadPoolExecutor(self.opts.workers, thread_name_prefix="ekko-seg") as pool:
            pending = set()
            try:
                for p in plans:
                    limit.acquire()
                    fut = pool.submit(self._one, p)
                    fut.add_done_callback(lambda _f: limit.release())
                    pending.add(fut)
                    pending = self._collect(pending, table, progress, size, block=False)
                self._collect(pending, table, progress, size, block=True)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise

    def _collect(self, pending, table, progress, size, block: bool):
        done, rest = cf.wait(pending, return_when=cf.ALL_COMPLETED if block else cf.FIRST_COMPLETED,
                             timeout=None if block else 0)
        for f in done:
            index, d, end = f.result()
            if d is None:
                table.set_zero(index)
            else:
                table.set_data(index, d)
            if progress:
                progress(end, size)
        return rest

    def _one(self, p: SegmentPlan):
        self._count(segments_backed_up=1)
        if p.is_zero:
            self._count(zero_segments=1)
            return p.index, None, p.offset + p.length
        data = self._worker().read(p)
        crash_point("during-read")
        self._count(read_bytes=sum(n for _, n in p.reads))
        if segment.is_zero(data):
            self._count(zero_segments=1)
            return p.index, None, p.offset + p.length
        d = segment.digest(data)
        key = segment.segment_key(d)
        if d in self.known or self.store.exists(key):
            self._count(reused_segments=1)
        else:
            enc = segment.encode(data, self.opts.compression_level, self.opts.compress, d)
            crash_point("during-store")
            self.store.put(enc.key, enc.blob)
            self._count(new_segments=1, stored_bytes=len(enc.blob))
            with self._lock:
                self.known.add(d)
        return p.index, d, p.offset + p.length

    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _worker(self):
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


def describe_error(e: BaseException) -> str:
    return str(e) if isinstance(e, EkkoError) else f"{type(e).__name__}: {e}"

"""Garbage collection: delete the segments no manifest references, safely while backups run.

    mark    read every manifest, ONE AT A TIME, into a set of referenced digests (16 bytes
            each: a million distinct segments cost about 100 MB; no manifest is held longer than
            it takes to walk its table)
    sweep   list segments/; an unreferenced segment is a candidate. Before deleting, manifests
            committed since the mark are marked too; then each candidate is stat()ed and deleted
            only if it was last put before  cutoff = gc start - grace
    check   manifests committed during the sweep are read: if one names a segment just deleted
            (a backup lost the race, see below), the segment is marked damaged/ so that the next
            backup of that disk stores it again, and gc reports it (exit 3)
    tidy    markers that refer to nothing (verify/ and protected/ of deleted backups, damaged/ of
            deleted segments) and the local store's stray '.tmp-' files older than the cutoff

Why a backup running at the same time loses nothing:
  - a segment it PUT is younger than the cutoff as long as the backup takes less than the grace
    period (default 24 h), so the sweep keeps it;
  - a segment it REUSES (carried over from its parent, or found by exists()) may be old; the
    backup checks at commit time that each still exists and stores again, from its export,
    any that vanished (backup/copy.py, _recheck). A parent manifest that still exists at that check
    protects everything carried over from it: it was visible to every mark in between.
  - what remains is a backup whose commit check runs just before gc deletes a segment it reused
    and whose manifest lands just after gc's second look at manifests: the check phase sees that
    manifest and marks the segment damaged; a backup building on it stores the segment again (at
    its commit check if it is already running, else by healing).

Memory: the referenced set, plus the list of unreferenced keys (the garbage of this run).
Clocks: the cutoff is this host's clock, a segment's age the store's (mtime, X-Timestamp);
keep their skew far below the grace period.

An unreadable manifest stops gc before anything is deleted: the segments it names are unknown,
so nothing can be called garbage. `ekko verify` reports it; `ekko prune` removes it.
"""

import concurrent.futures as cf
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from ..store import catalog, markers
from ..store.base import Store
from ..format import segment
from ..errors import IntegrityError, KeyMismatch, ManifestError, ObjectNotFound, UsageError

log = logging.getLogger(__name__)

SEGMENTS = "segments/"
HOUR = 3600.0

# progress(phase, done, total): phase is "mark", "sweep" (total None: the listing's length is
# unknown) or "delete"
ProgressFn = Callable[[str, int, Optional[int]], None]


@dataclass
class GCReport:
    dry_run: bool
    grace_hours: float
    cutoff: float                     # Unix seconds: unreferenced segments put before this go
    manifests: int = 0
    referenced: int = 0               # distinct segments named by manifests
    segments: int = 0                 # segment objects listed
    unreferenced: int = 0
    kept_young: int = 0               # unreferenced, but put after the cutoff
    deleted: int = 0                  # (would be, with dry_run)
    deleted_bytes: int = 0
    temp_removed: int = 0
    markers_removed: int = 0
    raced: Dict[str, List[str]] = field(default_factory=dict)   # deleted segment key -> backups naming it
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.raced

    def as_dict(self) -> Dict:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


class _Marker:
    """The referenced set, and which manifests it already holds."""

    def __init__(self, store: Store, progress: Optional[ProgressFn]):
        self.store = store
        self.progress = progress
        self.referenced: Set[bytes] = set()
        self.seen: Set[str] = set()

    def mark_new(self, phase_progress: bool = False) -> None:
        """Add the digests of every manifest not seen yet, one manifest in memory at a time."""
        keys = [k for k in catalog.keys(self.store) if k not in self.seen]
        for n, key in enumerate(keys, 1):
            try:
                m = catalog.load(self.store, key)
            except ObjectNotFound:
                continue                                   # pruned between list and get
            except ManifestError as e:
                raise IntegrityError(f"gc stopped before deleting anything: manifest {key} is unreadable ({e}); "
                                     f"the segments it names are unknown. Restore it, or remove it "
                                     f"(ekko prune deletes unreadable manifests), then run gc again") from e
            except KeyMismatch as e:
                raise UsageError(f"gc stopped before deleting anything: {e}; without that key the segments "
                                 f"it names are unknown") from e
            self.referenced.update(d for _, d in m.table.data_entries())
            self.seen.add(key)
            del m
            if phase_progress and self.progress:
                self.progress("mark", n, len(keys))


def collect(store: Store, grace_hours: float, dry_run: bool = False, workers: int = 4,
            progress: Optional[ProgressFn] = None, now: Optional[Callable[[], float]] = None) -> GCReport:
    clock = now or time.time
    started = clock()
    report = GCReport(dry_run, grace_hours, started - grace_hours * HOUR)

    marker = _Marker(store, progress)
    marker.mark_new(phase_progress=True)

    candidates = _unreferenced(store, marker.referenced, report, progress)
    # Manifests committed while we marked and listed: their segments are not garbage.
    marker.mark_new()
    candidates = [(k, d) for k, d in candidates if d not in marker.referenced]

    deleted = _sweep(store, candidates, report, dry_run, workers, progress)

    if not dry_run:
        _check_late_manifests(store, marker, deleted, report)
        _tidy(store, marker.referenced, report)
    report.manifests = len(marker.seen)
    report.referenced = len(marker.referenced)
    report.seconds = round(clock() - started, 3)
    return report


def _unreferenced(store: Store, referenced: Set[bytes], report: GCReport,
                  progress: Optional[ProgressFn]) -> List[Tuple[str, bytes]]:
    out = []
    for key in store.list(SEGMENTS):
        report.segments += 1
        if progress and report.segments % 10000 == 0:
            progress("sweep", report.segments, None)
        try:
            d = segment.digest_from_key(key)
        except ValueError:
            continue
        if segment.segment_key(d) != key:
            continue                                       # not a name we write: never ours to delete
        if d not in referenced:
            out.append((key, d))
    if progress:
        progress("sweep", report.segments, None)
    report.unreferenced = len(out)
    return out


def _sweep(store: Store, candidates: List[Tuple[str, bytes]], report: GCReport, dry_run: bool, workers: int,
           progress: Optional[ProgressFn]) -> Set[bytes]:
    """stat + delete each candidate put before the cutoff; returns the digests deleted."""
    deleted: Set[bytes] = set()

    def one(item):
        key, d = item
        try:
            info = store.stat(key)
        except ObjectNotFound:
            return key, d, None
        if info.mtime >= report.cutoff:
            return key, d, -1
        if not dry_run:
            store.delete(key)
        return key, d, info.size

    with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="ekko-gc") as pool:
        for n, (_key, d, size) in enumerate(_bounded(pool, one, candidates, workers * 4), 1):
            if size == -1:
                report.kept_young += 1
            elif size is not None:
                report.deleted += 1
                report.deleted_bytes += size
                deleted.add(d)
            if progress and (n % 1000 == 0 or n == len(candidates)):
                progress("delete", n, len(candidates))
    return deleted


def _bounded(pool, fn, items: Iterable, depth: int) -> Iterator:
    """pool.map with at most `depth` items in flight (a million candidates are not a million futures)."""
    pending: List[cf.Future] = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.pop(0).result()
    for f in pending:
        yield f.result()


def _check_late_manifests(store: Store, marker: _Marker, deleted: Set[bytes], report: GCReport) -> None:
    """A backup committed during the sweep that names a segment we deleted lost the race: mark
    the segment damaged so the next backup of that disk stores it again."""
    late = [k for k in catalog.keys(store) if k not in marker.seen]
    users: Dict[bytes, List[str]] = {}
    for key in late:
        try:
            m = catalog.load(store, key)
        except (ObjectNotFound, ManifestError, KeyMismatch):
            continue
        marker.seen.add(key)
        for _, d in m.table.data_entries():
            marker.referenced.add(d)
            if d in deleted:
                users.setdefault(d, []).append(m.backup_id)
    for d, ids in users.items():
        key = segment.segment_key(d)
        log.error("backup(s) %s committed while gc ran and name %s, which gc deleted: marked damaged; "
                  "the next backup of that disk stores it again", ", ".join(ids), key)
        markers.mark_damaged(store, d, key, "deleted by gc while a backup that reused it committed", ids)
        report.raced[key] = sorted(set(ids))


def _tidy(store: Store, referenced: Set[bytes], report: GCReport) -> None:
    live = {k[len(catalog.PREFIX):] for k in catalog.keys(store)}
    stale = markers.stale(store, live, lambda d: d in referenced)
    report.markers_removed = markers.delete_quietly(store, stale)
    report.temp_removed = store.clean_temp(report.cutoff)

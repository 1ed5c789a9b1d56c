"""Garbage collection: delete the segments no manifest references, safely while backups run.

    mark    read every manifest, ONE AT A TIME, into a sorted run of referenced digests on disk
            (digest_sets.py: packed 16-byte digests, sorted a chunk at a time and merged; no
            manifest is held longer than it takes to walk its table, no Python object per digest)
    sweep   list segments/ in name order and merge it with the referenced run (sorted_merge.py):
            a segment only the listing has is a candidate, written to a run of its own. Before
            deleting, manifests committed since the mark are marked too and their digests taken
            out of the candidates; then each candidate is stat()ed and deleted only if it was
            last put before  cutoff = gc start - grace
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

Memory: flat (a few tens of MiB whatever the number of segments): the referenced digests, the
candidates and the deleted ones are sorted runs in a temporary directory (32 bytes per digest at
most, under $TMPDIR or `tmpdir`), streamed in blocks; at most 4 x workers batches of candidates
are in flight. A listing that fails or comes out of order stops gc before it deletes anything.
Clocks: the cutoff is this host's clock, a segment's age the store's (mtime, X-Timestamp);
keep their skew far below the grace period.

An unreadable manifest stops gc before anything is deleted: the segments it names are unknown,
so nothing can be called garbage. `ekko verify` reports it; `ekko prune` removes it.
"""

import concurrent.futures as cf
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from ..store import catalog, markers
from ..store.base import Store
from ..format import segment
from ..errors import IntegrityError, KeyMismatch, ManifestError, ObjectNotFound, StoreError, UsageError
from . import digest_sets, sorted_merge
from .digest_sets import DigestSorter, SortedDigests

log = logging.getLogger(__name__)

SEGMENTS = "segments/"
HOUR = 3600.0
LIST_PROGRESS = 10000        # listed keys between two "sweep" progress calls
DELETE_PROGRESS = 1000       # candidates between two "delete" progress calls
SWEEP_BATCH = 64             # candidates one pool task stats and deletes (a task per object costs more than an unlink)

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
    """The referenced digests, as disjoint sorted runs (one per look at the manifests: the first
    holds nearly everything, the later ones what backups committed meanwhile), and which
    manifests they already hold."""

    def __init__(self, store: Store, progress: Optional[ProgressFn], tmpdir: Optional[str]):
        self.store = store
        self.progress = progress
        self.tmpdir = tmpdir
        self.rounds: List[SortedDigests] = []
        self.seen: Set[str] = set()

    @property
    def referenced(self) -> int:
        return sum(len(r) for r in self.rounds)

    def contains(self, d: bytes) -> bool:
        return any(r.contains(d) for r in self.rounds)

    def mark_new(self, phase_progress: bool = False) -> SortedDigests:
        """Add the digests of every manifest not seen yet, one manifest in memory at a time;
        returns the run of those not referenced before (the new round)."""
        keys = [k for k in catalog.keys(self.store) if k not in self.seen]
        with DigestSorter(self.tmpdir) as sorter:
            for n, key in enumerate(keys, 1):
                try:
                    m = catalog.load_stream(self.store, key)
                    sorter.add_table(m)
                except ObjectNotFound:
                    continue                                   # pruned between list and get
                except ManifestError as e:
                    raise IntegrityError(f"gc stopped before deleting anything: manifest {key} is unreadable "
                                         f"({e}); the segments it names are unknown. Restore it, or remove it "
                                         f"(ekko prune deletes unreadable manifests), then run gc again") from e
                except KeyMismatch as e:
                    raise UsageError(f"gc stopped before deleting anything: {e}; without that key the segments "
                                     f"it names are unknown") from e
                self.seen.add(key)
                del m
                if phase_progress and self.progress:
                    self.progress("mark", n, len(keys))
            found = sorter.finish()
        return self._add_round(found)

    def _add_round(self, found: SortedDigests) -> SortedDigests:
        """Keep the rounds disjoint, so that their lengths add up to the distinct count."""
        new = found
        for old in self.rounds:
            if not len(new):
                break
            rest = digest_sets.write_sorted(sorted_merge.difference(new.blocks(), old.blocks()), self.tmpdir)
            new.close()
            new = rest
        self.rounds.append(new)
        return new

    def close(self) -> None:
        for r in self.rounds:
            r.close()


def collect(store: Store, grace_hours: float, dry_run: bool = False, workers: int = 4,
            progress: Optional[ProgressFn] = None, now: Optional[Callable[[], float]] = None,
            tmpdir: Optional[str] = None) -> GCReport:
    clock = now or time.time
    started = clock()
    report = GCReport(dry_run, grace_hours, started - grace_hours * HOUR)

    with contextlib.ExitStack() as cleanup:
        marker = _Marker(store, progress, tmpdir)
        cleanup.callback(marker.close)
        first = marker.mark_new(phase_progress=True)

        listed = cleanup.enter_context(_unreferenced(store, first, report, progress, tmpdir))
        # Manifests committed while we marked and listed: their segments are not garbage.
        late = marker.mark_new()
        candidates = cleanup.enter_context(
            digest_sets.write_sorted(sorted_merge.difference(listed.blocks(), late.blocks()), tmpdir)
            if len(late) else listed)

        deleted = cleanup.enter_context(_sweep(store, candidates, report, dry_run, workers, progress, tmpdir))

        if not dry_run:
            _check_late_manifests(store, marker, deleted, report)
            _tidy(store, marker, report)
        report.manifests = len(marker.seen)
        report.referenced = marker.referenced
    report.seconds = round(clock() - started, 3)
    return report


def _unreferenced(store: Store, referenced: SortedDigests, report: GCReport,
                  progress: Optional[ProgressFn], tmpdir: Optional[str]) -> SortedDigests:
    """The digests of the segments the listing has and `referenced` does not, as a sorted run.
    Names that are not ones we write (another tool's, uppercase hex) are never ours to delete."""
    counts = digest_sets.ListingCounts()
    told = [0]

    def tick() -> None:
        if progress and counts.listed // LIST_PROGRESS > told[0]:
            told[0] = counts.listed // LIST_PROGRESS
            progress("sweep", told[0] * LIST_PROGRESS, None)

    listed = digest_sets.segment_blocks(store, counts, tick)
    try:
        out = digest_sets.write_sorted(
            (b.only_listed for b in sorted_merge.merge(listed, referenced.blocks(),
                                                       f"the listing of {SEGMENTS} in {store.describe()}",
                                                       "the referenced digests")),
            tmpdir)
    except sorted_merge.OrderError as e:
        raise StoreError(f"gc stopped before deleting anything: {e}; comparing by listing needs it "
                         f"sorted by name") from e
    report.segments = counts.listed
    if progress:
        progress("sweep", counts.listed, None)
    report.unreferenced = len(out)
    return out


def _sweep(store: Store, candidates: SortedDigests, report: GCReport, dry_run: bool, workers: int,
           progress: Optional[ProgressFn], tmpdir: Optional[str]) -> SortedDigests:
    """stat + delete each candidate put before the cutoff; returns the digests deleted (a run:
    _bounded hands the results back in the candidates' order)."""

    def one(d: bytes) -> Optional[int]:
        """The size deleted; -1: too young; None: gone already."""
        key = segment.segment_key(d)
        try:
            info = store.stat(key)
        except ObjectNotFound:
            return None
        if info.mtime >= report.cutoff:
            return -1
        if not dry_run:
            store.delete(key)
        return info.size

    def batch(ds: Sequence[bytes]) -> List[Tuple[bytes, Optional[int]]]:
        return [(d, one(d)) for d in ds]

    total = len(candidates)

    def results() -> Iterator[List[bytes]]:
        n = 0
        with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="ekko-gc") as pool:
            for done in _bounded(pool, batch, _batches(candidates, SWEEP_BATCH), workers * 4):
                gone = []
                for d, size in done:
                    n += 1
                    if size == -1:
                        report.kept_young += 1
                    elif size is not None:
                        report.deleted += 1
                        report.deleted_bytes += size
                        gone.append(d)
                    if progress and (n % DELETE_PROGRESS == 0 or n == total):
                        progress("delete", n, total)
                yield gone
    return digest_sets.write_sorted(results(), tmpdir)


def _batches(digests: SortedDigests, size: int) -> Iterator[List[bytes]]:
    it = iter(digests)
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def _bounded(pool, fn, items: Iterable, depth: int) -> Iterator:
    """pool.map with at most `depth` items in flight (a million candidates are not a million futures)."""
    pending: "deque[cf.Future]" = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _check_late_manifests(store: Store, marker: _Marker, deleted: SortedDigests, report: GCReport) -> None:
    """A backup committed during the sweep that names a segment we deleted lost the race: mark
    the segment damaged so the next backup of that disk stores it again."""
    late = [k for k in catalog.keys(store) if k not in marker.seen]
    users: Dict[bytes, List[str]] = {}
    for key in late:
        try:
            m = catalog.load_stream(store, key)
            with DigestSorter(marker.tmpdir) as sorter:
                sorter.add_table(m)
                named = sorter.finish()
        except (ObjectNotFound, ManifestError, KeyMismatch):
            continue
        marker.seen.add(key)
        with named:
            for block in sorted_merge.intersection(named.blocks(), deleted.blocks()):
                for d in block:
                    users.setdefault(d, []).append(m.backup_id)
            marker._add_round(digest_sets.write_sorted(named.blocks(), marker.tmpdir))
    for d, ids in users.items():
        key = segment.segment_key(d)
        log.error("backup(s) %s committed while gc ran and name %s, which gc deleted: marked damaged; "
                  "the next backup of that disk stores it again", ", ".join(ids), key)
        markers.mark_damaged(store, d, key, "deleted by gc while a backup that reused it committed", ids)
        report.raced[key] = sorted(set(ids))


def _tidy(store: Store, marker: _Marker, report: GCReport) -> None:
    live = {k[len(catalog.PREFIX):] for k in catalog.keys(store)}
    stale = markers.stale(store, live, marker.contains)
    report.markers_removed = markers.delete_quietly(store, stale)
    report.temp_removed = store.clean_temp(report.cutoff)

"""`ekko sync SOURCE DEST`: copy one store's backups into another (a second site), namespace by
namespace (project by project), so that the destination is a store of its own: list, verify,
restore, serve and `ekko files` work from it alone.

For each manifest the destination lacks, target by target, each target's oldest first:

    read it from the source and check it (checksum; an encrypted one opened with the source's key)
    the segments it names that the destination may lack: those its parent (when that parent is
        committed at the destination) does not name, and not copied earlier in this run
    of those, the ones the destination does lack: one exists() each, or (the store prefers it for
        so many) one merge of their sorted digests with the destination's sorted listing
    copy each: the object as the source stores it (sealed stays sealed: the destination never
        needs the key), decoded and re-hashed on the way (in an encrypted store: opened and checked
        against its keyed name); a damaged or missing one is reported and not copied
    flush the destination's batch (every copied segment durable), then -- only if all its
        segments are there -- put the manifest: the commit, as in a backup (format.md invariants
        2 and 4). A manifest whose segment was damaged is not committed.

Why the destination is always consistent: a manifest is put there only after every segment it
names is durable there (present before, or copied and flushed now). Why an interrupted sync
resumes without copying twice: what it copied is durable at the destination and found by the next
run's check (segments nobody names yet are garbage to the destination's gc only after its grace
period). Why the cost grows with the new segments: an incremental's segments are checked only
where they differ from its parent's, already at the destination.

A backup protected at the source is protected at the destination when it is copied (its
protected/ mark follows; later changes of the mark do not). Not copied: verify/ and damaged/
marks (each site's own), and manifests the source no longer has (retention may differ per site:
the destination's are its own).
"""

import logging
import threading
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from ..errors import EkkoError, IntegrityError, KeyMismatch, ManifestError, ObjectNotFound
from ..faults import pause_point
from ..format import manifest as mf
from ..format import segment
from ..format.codec import Codec
from ..store import catalog, markers
from ..store.base import Batch, Store
from . import sorted_merge
from .digest_sets import BLOCK, ListingCounts, segment_blocks

log = logging.getLogger(__name__)

Progress = Callable[[int, Optional[int]], None]          # (bytes copied, None)
# (every manifest key of source and destination, '<target>/<backup id>' of those protected at the
# source) -> the keys wanted at the destination
Select = Callable[[Set[str], Set[str]], Set[str]]
DONE_MAX = 1 << 20          # digests remembered as at the destination (~100 MiB): beyond, asked again


@dataclass
class Failed:
    """A manifest not committed at the destination, and why."""
    key: str
    problem: str
    segments: List[Tuple[str, str]] = field(default_factory=list)     # (segment key, problem)


@dataclass
class SyncReport:
    project: Optional[str]
    source_manifests: int = 0
    already: int = 0                       # manifests the destination had before
    copied: List[str] = field(default_factory=list)          # manifests committed now
    failed: List[Failed] = field(default_factory=list)
    segments_checked: int = 0              # segments whose presence at the destination was asked
    segments_present: int = 0              # of those, already there
    segments_copied: int = 0
    bytes_copied: int = 0                  # as stored (compressed, sealed)
    protected: int = 0                     # protected/ marks copied with their backups
    damaged: Dict[str, str] = field(default_factory=dict)     # source segment key -> problem

    @property
    def ok(self) -> bool:
        return not self.failed


# -- pure decisions -------------------------------------------------------------------------------
def to_copy(source_keys: Iterable[str], dest_keys: Iterable[str]) -> List[str]:
    """Manifest keys the destination lacks, target by target, each target's oldest backup first
    (a parent before its children; one target's table held at a time)."""
    have = set(dest_keys)
    return sorted((k for k in set(source_keys) if k not in have), key=lambda k: tuple(k.rsplit("/", 1)))


def candidates(needed: Set[bytes], parent: Optional[Set[bytes]], done: Set[bytes]) -> Set[bytes]:
    """The segments of a manifest the destination may lack: not its parent's (committed at the
    destination, so all there), not copied or found earlier in this run."""
    out = needed - done
    return out - parent if parent is not None else out


def fetchers(workers: int, store_type: str, options: Dict) -> int:
    """Segments fetched at once: a Swift source answers each GET after a round trip, so its
    `threads` (default 8) come on top of the workers that decode and re-hash (measured: 4 fetching
    gave 0.35x a full backup's throughput Swift -> Swift, bench/sync.py)."""
    if store_type != "swift":
        return workers
    threads = options.get("threads", 8)
    return workers + (threads if isinstance(threads, int) and not isinstance(threads, bool) else 8)


# -- I/O --------------------------------------------------------------------------------------------
def open_object(codec: Codec, key: str, blob: bytes) -> bytes:
    """The plain object under `key` as a source store holds it (sealed: opened with its key)."""
    if not codec.encrypted:
        return blob
    return codec.open(key, blob)     # type: ignore[attr-defined]  # SealedCodec: encrypted codecs open


def verified_segment(codec: Codec, key: str, d: bytes, blob: bytes) -> None:
    """Raise IntegrityError unless `blob` is the segment named `d` (decoded, re-hashed)."""
    try:
        plain = open_object(codec, key, blob)
    except KeyMismatch as e:        # a segment sealed with another key (or not at all): replaced (as SealedStore.get)
        what = f"sealed with another key (fingerprint {e.needed})" if e.needed else "not encrypted"
        raise IntegrityError(f"{key}: {what}: not the object this store wrote") from e
    segment.decode(plain, d, key, codec=codec)


class Syncer:
    """One namespace: `source` is the source store as a backup reads it (sealed when encrypted:
    its codec checks objects), `source_raw` the same store with objects as stored, `dest` the
    destination with objects as stored (never sealed: it gets the source's bytes)."""

    def __init__(self, source: Store, source_raw: Store, dest: Store, project: Optional[str] = None,
                 workers: int = 4, progress: Optional[Progress] = None, cancel: Optional[threading.Event] = None,
                 select: Optional[Select] = None):
        self.codec = source.codec
        self.src = source_raw
        self.dst = dest
        self.workers = max(1, workers)
        self.progress = progress
        self.cancel = cancel
        self.select = select        # a destination's own retention: what it would prune is not copied
        self.report = SyncReport(project)
        self.protected: Set[str] = set()
        self.done: Set[bytes] = set()          # digests known to be at the destination (this run; bounded)
        self.last: Optional[Tuple[str, str, Set[bytes]]] = None   # (target, backup id, digests) last committed

    def run(self) -> SyncReport:
        src_keys = catalog.keys(self.src)
        dst_keys = set(catalog.keys(self.dst))
        todo = to_copy(src_keys, dst_keys)
        self.protected = markers.protected(self.src)
        if self.select is not None:
            wanted = self.select(set(src_keys) | dst_keys, self.protected)
            todo = [k for k in todo if k in wanted]
        self.report.source_manifests = len(src_keys)
        self.report.already = len(set(src_keys) & dst_keys)
        committed = set(dst_keys)
        for key in todo:
            if self.cancel is not None and self.cancel.is_set():
                raise EkkoError("sync interrupted: the destination holds every manifest committed so far")
            self._one(key, committed)
        return self.report

    def _one(self, key: str, committed: Set[str]) -> None:
        try:
            blob = self.src.get(key)
            m = mf.decode(open_object(self.codec, key, blob), key)
        except ObjectNotFound:
            return                              # pruned at the source meanwhile: nothing to copy
        except (ManifestError, IntegrityError, KeyMismatch) as e:
            self.report.failed.append(Failed(key, f"the source manifest cannot be read: {e}"))
            return
        needed = m.table.unique_digests()
        parent = self._parent_digests(m, committed)
        problems = self._copy(candidates(needed, parent, self.done))
        if problems:
            self.report.failed.append(Failed(key, f"{len(problems)} of its segments are damaged or missing at "
                                                  "the source: not committed", problems))
            log.error("%s: not copied: %s", key, "; ".join(p for _, p in problems[:3]))
            return
        if not self.dst.exists(key):            # the commit: every segment it names is durable there
            self.dst.put(key, blob)
        self._copy_protection(m)
        committed.add(key)
        self.report.copied.append(key)
        self.last = (m.target, m.backup_id, needed)
        if len(self.done) > DONE_MAX:
            self.done = set()                   # only spares questions; memory stays bounded

    def _copy_protection(self, m: mf.Manifest) -> None:
        """A backup protected at the source is protected at the destination too (after its
        manifest: the destination's gc removes marks of manifests it does not have). Later
        changes of the mark are not followed."""
        if f"{m.target}/{m.backup_id}" not in self.protected:
            return
        pkey = markers.protected_key(m.target, m.backup_id)
        try:
            if not self.dst.exists(pkey):
                self.dst.put(pkey, self.src.get(pkey))        # as stored: sealed stays sealed
                self.report.protected += 1
        except ObjectNotFound:
            pass                                # unprotected at the source meanwhile

    def _parent_digests(self, m: mf.Manifest, committed: Set[str]) -> Optional[Set[bytes]]:
        """The digests of m's parent when the parent is committed at the destination, else None."""
        if not m.parent or catalog.manifest_key(m.target, m.parent) not in committed:
            return None
        if self.last is not None and self.last[:2] == (m.target, m.parent):
            return self.last[2]
        pkey = catalog.manifest_key(m.target, m.parent)
        for store in (self.src, self.dst):      # the same bytes in both (a parent pruned at the source: dest)
            try:
                return mf.decode(open_object(self.codec, pkey, store.get(pkey)), pkey).table.unique_digests()
            except ObjectNotFound:
                continue
            except (ManifestError, IntegrityError, KeyMismatch):
                return None                     # check every segment instead
        return None

    # -- segments ---------------------------------------------------------------------------------------
    def _missing(self, wanted: Set[bytes]) -> List[bytes]:
        """Of `wanted`, the digests the destination lacks, ascending."""
        self.report.segments_checked += len(wanted)
        if not wanted:
            return []
        ordered = sorted(wanted)
        if self.dst.prefers_listing(len(ordered)):
            blocks = [ordered[i:i + BLOCK] for i in range(0, len(ordered), BLOCK)]
            out: List[bytes] = []
            seen = 0
            for batch in sorted_merge.merge(segment_blocks(self.dst, ListingCounts()), blocks,
                                            "the destination's listing", "the wanted segments"):
                out += batch.only_wanted
                seen += len(batch.only_wanted) + batch.both
                if seen == len(ordered):
                    break                       # the rest of the listing cannot hold any of them
        else:
            out = [d for d in ordered if not self.dst.exists(segment.segment_key(d))]
        self.report.segments_present += len(ordered) - len(out)
        self.done |= set(ordered) - set(out)
        return out

    def _copy(self, wanted: Set[bytes]) -> List[Tuple[str, str]]:
        """Copy the segments of `wanted` the destination lacks, each checked on the way, then
        flush them durable. -> (segment key, problem) of those not copied."""
        missing = self._missing(wanted)
        problems: List[Tuple[str, str]] = []
        if not missing:
            return problems
        batch = self.dst.batch()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="ekko-sync") as pool:
                pending: Set[Future] = set()
                for d in missing:
                    if len(pending) >= 2 * self.workers:
                        problems += self._reap(pending, everything=False)
                    pending.add(pool.submit(self._copy_one, batch, d))
                problems += self._reap(pending, everything=True)
            batch.flush()
        except BaseException:
            batch.abort()
            raise
        return problems

    def _reap(self, pending: Set[Future], everything: bool) -> List[Tuple[str, str]]:
        """Results of finished copies (all of them, or at least one); `pending` keeps the rest."""
        done, rest = wait(pending, return_when=ALL_COMPLETED if everything else FIRST_COMPLETED)
        pending.clear()
        pending |= rest
        out = []
        for f in done:
            d, size, problem = f.result()          # a store error raises here: the sync fails
            if problem is not None:
                key = segment.segment_key(d)
                out.append((key, problem))
                self.report.damaged[key] = problem
                continue
            self.done.add(d)
            self.report.segments_copied += 1
            self.report.bytes_copied += size
            if self.progress is not None:
                self.progress(self.report.bytes_copied, None)
        return out

    def _copy_one(self, batch: Batch, d: bytes) -> Tuple[bytes, int, Optional[str]]:
        key = segment.segment_key(d)
        if self.cancel is not None and self.cancel.is_set():
            raise EkkoError("sync interrupted")
        try:
            blob = self.src.get(key)
        except ObjectNotFound:
            return d, 0, "missing at the source"
        try:
            verified_segment(self.codec, key, d, blob)
        except IntegrityError as e:
            return d, 0, str(e)
        batch.put(key, blob)
        pause_point("sync-segment")
        return d, len(blob), None

"""Check that committed backups can be restored.

Cheap: every segment a manifest names exists. Deep: every segment is fetched, decoded and
re-hashed. Each distinct segment is checked once per run, however many backups use it; a bad
one is reported with every backup that uses it.

`run` adds what a scheduled check needs, with its results in the store (store/markers.py):
    sample      check a random fraction of the distinct segments (chosen by a keyed hash of the
                digest, so the choice is spread evenly and differs from run to run)
    since_days  skip backups whose verify/<backup-id> says they passed, at least as deep and at
                least as large a sample, within that many days
    record      verify/<backup-id> for every backup checked; damaged/<digest> for every bad
                segment, naming EVERY backup that uses it (all manifests are read once more
                when damage was found); such backups get a failed verify/ state too. The next
                backup of a disk whose newest manifest names a damaged segment reads it from
                the disk again and stores it (backup/copy.py): self-healing. A marked
                segment found intact again loses its mark.
"""

import concurrent.futures as cf
import secrets
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Dict, List, Optional, Set, Tuple

import xxhash

from ..store import catalog, markers
from ..store.base import Store
from ..format import segment
from ..errors import IntegrityError, KeyMismatch, ManifestError, ObjectNotFound, StoreError


@dataclass
class VerifyReport:
    backups: List[str] = field(default_factory=list)
    segments_checked: int = 0
    damaged: Dict[str, str] = field(default_factory=dict)        # segment key -> problem
    used_by: Dict[str, Set[str]] = field(default_factory=dict)   # segment key -> backup ids
    bad_manifests: Dict[str, str] = field(default_factory=dict)  # manifest key -> problem
    watched_ok: Set[bytes] = field(default_factory=set)          # digests of `watch` checked and intact
    gone: List[str] = field(default_factory=list)                # manifest keys deleted (pruned) since listed

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.bad_manifests

    def merge(self, other: "VerifyReport") -> "VerifyReport":
        """Reports of several store namespaces as one (segment keys do not collide across them:
        a key is only meaningful with its namespace, and each is listed with its backups)."""
        self.backups += other.backups
        self.segments_checked += other.segments_checked
        self.damaged.update(other.damaged)
        for k, ids in other.used_by.items():
            self.used_by.setdefault(k, set()).update(ids)
        self.bad_manifests.update(other.bad_manifests)
        self.gone += other.gone
        return self

    def damaged_backups(self) -> List[str]:
        ids: Set[str] = set()
        for key in self.damaged:
            ids |= self.used_by.get(key, set())
        return sorted(ids | {k.rsplit("/", 1)[1] for k in self.bad_manifests})


def sampler(fraction: float, salt: Optional[int] = None) -> Callable[[bytes], bool]:
    """A predicate that picks about `fraction` of all digests: a keyed 64-bit hash under a
    threshold. The same salt picks the same digests (tests); a random one differs per run."""
    if not 0 < fraction <= 1:
        raise ValueError(f"sample must be in (0, 1], not {fraction!r}")
    if fraction >= 1:
        return lambda d: True
    seed = secrets.randbits(63) if salt is None else salt
    limit = int(fraction * (1 << 64))
    return lambda d: xxhash.xxh3_64_intdigest(d, seed=seed) < limit


def verify(store: Store, manifest_keys: List[str], deep: bool = False, workers: int = 4,
           progress: Optional[Callable[[int, int], None]] = None,
           pick: Optional[Callable[[bytes], bool]] = None, watch: AbstractSet[bytes] = frozenset()) -> VerifyReport:
    """Check the segments of these manifests (those `pick` selects; all by default). Digests in
    `watch` that are checked and found intact are listed in `watched_ok`."""
    report = VerifyReport()
    wanted: Dict[bytes, Set[str]] = {}
    for key in manifest_keys:
        try:
            m = catalog.load(store, key)
        except ObjectNotFound:
            report.gone.append(key)        # pruned since it was listed (prune may run meanwhile): not damage
            continue
        except (ManifestError, StoreError) as e:
            report.bad_manifests[key] = str(e)
            continue
        report.backups.append(m.backup_id)
        for _, d in m.table.data_entries():
            if pick is None or pick(d):
                wanted.setdefault(d, set()).add(m.backup_id)

    def check(d: bytes) -> Tuple[str, Optional[str]]:
        key = segment.segment_key(d)
        try:
            if deep:
                segment.decode(store.get(key), d, codec=store.codec)
            elif not store.exists(key):
                return key, "missing"
        except IntegrityError as e:
            return key, str(e)
        except StoreError as e:
            return key, str(e)
        return key, None

    total = len(wanted)
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="ekko-verify") as pool:
        for n, (key, problem) in enumerate(pool.map(check, wanted), 1):
            report.segments_checked += 1
            if problem:
                report.damaged[key] = problem
                report.used_by[key] = wanted[segment.digest_from_key(key)]
            elif watch and segment.digest_from_key(key) in watch:
                report.watched_ok.add(segment.digest_from_key(key))
            if progress:
                progress(n, total)
    return report


@dataclass
class VerifyRun:
    report: VerifyReport
    checked: List[str]                  # manifest keys checked this run
    skipped: List[str]                  # manifest keys skipped: verified recently enough
    marked: List[str] = field(default_factory=list)      # damaged/ markers written
    cleared: List[str] = field(default_factory=list)     # damaged/ markers removed (segment intact)
    not_recorded: str = ""              # why the results could not be written (a read-only replica)


def _rel(manifest_key: str) -> "tuple[str, str]":
    """manifests/<target>/<backup-id> -> (target, backup-id)"""
    target, bid = manifest_key[len(catalog.PREFIX):].rsplit("/", 1)
    return target, bid


def run(store: Store, manifest_keys: List[str], deep: bool = False, sample: float = 1.0,
        since_days: Optional[float] = None, workers: int = 4,
        progress: Optional[Callable[[int, int], None]] = None, now: Optional[float] = None,
        salt: Optional[int] = None) -> VerifyRun:
    """verify() plus selection by past results and recording of the results in the store."""
    now = time.time() if now is None else now
    since = now - since_days * 86400 if since_days is not None else None
    checked, skipped = [], []
    for key in manifest_keys:
        state = markers.read_verify(store, *_rel(key)) if since is not None else None
        if since is not None and state is not None and state.covers(deep, sample, since):
            skipped.append(key)
        else:
            checked.append(key)
    # a shallow check cannot tell a corrupt segment from a good one: only a deep one clears marks
    marked_before = markers.damaged_digests(store) if deep else set()
    report = verify(store, checked, deep=deep, workers=workers, progress=progress, pick=sampler(sample, salt),
                    watch=marked_before)
    out = VerifyRun(report, checked, skipped)

    # every backup that uses a damaged segment, not only those checked this run
    damaged = {segment.digest_from_key(k): k for k in report.damaged}
    bad_of: Dict[str, List[str]] = {}          # manifest key -> damaged segment keys it names
    if damaged:
        for key in catalog.keys(store):
            try:
                m = catalog.load(store, key)
            except (ManifestError, ObjectNotFound, KeyMismatch):
                continue
            for _, d in m.table.data_entries():
                if d in damaged:
                    report.used_by.setdefault(damaged[d], set()).add(m.backup_id)
                    bad_of.setdefault(key, []).append(damaged[d])
    def record(write, *args) -> bool:
        """Write one result; after the store refused one (a read-only replica, say), write no
        more: what was found is still reported, and out.not_recorded says why it is not stored."""
        if out.not_recorded:
            return False
        try:
            write(store, *args)
            return True
        except StoreError as e:
            out.not_recorded = str(e)
            return False

    for d, key in damaged.items():
        if record(markers.mark_damaged, d, key, report.damaged[key], report.used_by.get(key, ()), now):
            out.marked.append(markers.damaged_key(d))
    for d in report.watched_ok:
        if record(markers.clear_damaged, d):
            out.cleared.append(markers.damaged_key(d))

    for key in (set(checked) | set(bad_of)) - set(report.gone):
        target, bid = _rel(key)
        problem = report.bad_manifests.get(key, "")
        record(markers.write_verify, markers.VerifyState(
            bid, target, now, deep, sample if key in checked else 0.0, not problem and key not in bad_of,
            tuple(sorted(set(bad_of.get(key, ())))), problem))
    return out

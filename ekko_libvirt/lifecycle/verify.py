"""Check that committed backups can be restored.

Cheap: every segment a manifest names exists. Deep: every segment is fetched, decoded and
re-hashed. Each distinct segment is checked once per run, however many backups use it; a bad
one is reported with every backup that uses it.

Memory is flat in the number of segments and backups (issue 21): the manifests are read one at a
time into a sorted run of the digests to check, on disk (digest_sets.py); the check streams that
run. Existence of many segments is one merge of two sorted streams, the store's listing of
segments/ and that run (sorted_merge.py): a page of 10,000 names on Swift instead of a HEAD per
segment, a directory at a time locally. Few segments (a backup of a small disk) are checked one
exists() each, as is every segment of a deep check (a get each); at most 4 x workers in flight.
Which backups use a damaged segment is found afterwards, by a second pass over the manifests
for the damaged digests only.

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
from typing import AbstractSet, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import xxhash

from ..store import catalog, markers
from ..store.base import Store
from ..format import segment
from ..errors import IntegrityError, KeyMismatch, ManifestError, ObjectNotFound, StoreError
from . import digest_sets, sorted_merge
from .digest_sets import DigestSorter, SortedDigests
from .gc import _bounded

# Existence by listing from this many distinct segments on (below, or when the store says a
# check each is cheaper: one stat or HEAD per segment): listing a local store runs at ~1M names/s,
# so a listing of a store 100x larger than the check still costs less than the stats would.
LIST_FROM = 100_000


@dataclass
class VerifyReport:
    backups: List[str] = field(default_factory=list)
    segments_checked: int = 0
    damaged: Dict[str, str] = field(default_factory=dict)        # segment key -> problem
    used_by: Dict[str, Set[str]] = field(default_factory=dict)   # segment key -> backup ids
    bad_manifests: Dict[str, str] = field(default_factory=dict)  # manifest key -> problem
    watched_ok: Set[bytes] = field(default_factory=set)          # digests of `watch` checked and intact
    gone: List[str] = field(default_factory=list)                # manifest keys deleted (pruned) since listed
    names_damaged: Dict[str, Set[str]] = field(default_factory=dict)   # manifest key -> damaged segment keys
    by_listing: bool = False                                     # existence was checked by a listing

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
        return every
    seed = secrets.randbits(63) if salt is None else salt
    limit = int(fraction * (1 << 64))
    return lambda d: xxhash.xxh3_64_intdigest(d, seed=seed) < limit


def every(d: bytes) -> bool:
    """sampler(1): every digest (verify() knows it and skips the call per digest)."""
    return True


ProgressFn = Callable[[int, int], None]


def verify(store: Store, manifest_keys: List[str], deep: bool = False, workers: int = 4,
           progress: Optional[ProgressFn] = None,
           pick: Optional[Callable[[bytes], bool]] = None, watch: AbstractSet[bytes] = frozenset(),
           users_from: Optional[List[str]] = None, list_from: int = LIST_FROM,
           tmpdir: Optional[str] = None) -> VerifyReport:
    """Check the segments of these manifests (those `pick` selects; all by default). Digests in
    `watch` that are checked and found intact are listed in `watched_ok`. A damaged segment's
    users are looked for in the manifests `users_from` (default: those checked)."""
    report = VerifyReport()
    with _wanted(store, manifest_keys, None if pick is every else pick, report, tmpdir) as wanted:
        total = report.segments_checked = len(wanted)
        if deep or total < list_from and not store.prefers_listing(total):
            problems = _check_each(store, wanted, deep, workers, progress)
        else:
            report.by_listing = True
            problems = _missing_by_listing(store, wanted, progress)
        for d, problem in problems:
            report.damaged[segment.segment_key(d)] = problem
        if watch:
            report.watched_ok = {d for d in watch
                                 if segment.segment_key(d) not in report.damaged and wanted.contains(d)}
    if report.damaged:
        damaged = {segment.digest_from_key(k) for k in report.damaged}
        keys = manifest_keys if users_from is None else users_from
        for key, ds in users_of(store, keys, damaged).items():
            bid = key.rsplit("/", 1)[1]
            report.names_damaged[key] = {segment.segment_key(d) for d in ds}
            for d in ds:
                report.used_by.setdefault(segment.segment_key(d), set()).add(bid)
    return report


def _wanted(store: Store, manifest_keys: Iterable[str], pick: Optional[Callable[[bytes], bool]],
            report: VerifyReport, tmpdir: Optional[str]) -> SortedDigests:
    """The distinct digests the manifests name (those `pick` selects), sorted, on disk. A
    manifest pruned since it was listed is `gone` (prune may run meanwhile): not damage."""
    with DigestSorter(tmpdir) as sorter:
        for key in manifest_keys:
            try:
                m = catalog.load_stream(store, key)
                sorter.add_table(m, pick)
            except ObjectNotFound:
                report.gone.append(key)
                continue
            except (ManifestError, StoreError) as e:
                report.bad_manifests[key] = str(e)
                continue
            report.backups.append(m.backup_id)
            del m
        return sorter.finish()


def _check_each(store: Store, wanted: SortedDigests, deep: bool, workers: int,
                progress: Optional[ProgressFn]) -> Iterator[Tuple[bytes, str]]:
    """(digest, problem) of each damaged segment: a get + decode (deep) or an exists() each."""

    def check(d: bytes) -> Tuple[bytes, Optional[str]]:
        key = segment.segment_key(d)
        try:
            if deep:
                segment.decode(store.get(key), d, codec=store.codec)
            elif not store.exists(key):
                return d, "missing"
        except IntegrityError as e:
            return d, str(e)
        except ObjectNotFound:
            return d, "missing"
        except StoreError as e:
            return d, str(e)
        return d, None

    total = len(wanted)
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="ekko-verify") as pool:
        for n, (d, problem) in enumerate(_bounded(pool, check, wanted, workers * 4), 1):
            if problem:
                yield d, problem
            if progress:
                progress(n, total)


def _missing_by_listing(store: Store, wanted: SortedDigests,
                        progress: Optional[ProgressFn]) -> Iterator[Tuple[bytes, str]]:
    """The wanted digests the store's listing of segments/ does not have, by one merge."""
    counts = digest_sets.ListingCounts()
    total, done = len(wanted), 0
    try:
        for batch in sorted_merge.merge(digest_sets.segment_blocks(store, counts), wanted.blocks(),
                                        f"the listing of segments/ in {store.describe()}", "the wanted digests"):
            for d in batch.only_wanted:
                yield d, "missing"
            done += batch.both + len(batch.only_wanted)
            if progress and (batch.both or batch.only_wanted):
                progress(done, total)
    except sorted_merge.OrderError as e:
        raise StoreError(f"verify cannot compare by listing: {e}; nothing was found missing or intact") from e
    if progress:
        progress(total, total)


def users_of(store: Store, manifest_keys: Iterable[str], damaged: Set[bytes]) -> Dict[str, Set[bytes]]:
    """manifest key -> the digests of `damaged` it names (only manifests naming one), one
    manifest in memory at a time. Unreadable or vanished manifests name nothing here."""
    out: Dict[str, Set[bytes]] = {}
    for key in manifest_keys:
        try:
            m = catalog.load(store, key)
        except (ManifestError, ObjectNotFound, KeyMismatch, StoreError):
            continue
        found: Set[bytes] = set()
        for flags, packed in digest_sets.table_blocks(m.table):
            found |= damaged.intersection(digest_sets.data_digests(flags, packed))
        if found:
            out[key] = found
    return out


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
        salt: Optional[int] = None, list_from: int = LIST_FROM, tmpdir: Optional[str] = None) -> VerifyRun:
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
                    watch=marked_before, users_from=catalog.keys(store), list_from=list_from, tmpdir=tmpdir)
    out = VerifyRun(report, checked, skipped)

    # every backup that uses a damaged segment, not only those checked this run (verify's
    # second pass went over every manifest of the store)
    damaged = {segment.digest_from_key(k): k for k in report.damaged}
    bad_of = report.names_damaged          # manifest key -> damaged segment keys it names

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

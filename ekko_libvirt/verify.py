"""Check that committed backups can be restored.

Cheap: every segment a manifest names exists. Deep: every segment is fetched, decoded and
re-hashed. Each distinct segment is checked once per run, however many backups use it; a bad
one is reported with every backup that uses it.
"""

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

from . import catalog, segment
from .errors import IntegrityError, ManifestError, StoreError


@dataclass
class VerifyReport:
    backups: List[str] = field(default_factory=list)
    segments_checked: int = 0
    damaged: Dict[str, str] = field(default_factory=dict)        # segment key -> problem
    used_by: Dict[str, Set[str]] = field(default_factory=dict)   # segment key -> backup ids
    bad_manifests: Dict[str, str] = field(default_factory=dict)  # manifest key -> problem

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.bad_manifests

    def damaged_backups(self) -> List[str]:
        ids: Set[str] = set()
        for key in self.damaged:
            ids |= self.used_by.get(key, set())
        return sorted(ids | {k.rsplit("/", 1)[1] for k in self.bad_manifests})


def verify(store, manifest_keys: List[str], deep: bool = False, workers: int = 4,
           progress: Optional[Callable[[int, int], None]] = None) -> VerifyReport:
    report = VerifyReport()
    wanted: Dict[bytes, Set[str]] = {}
    for key in manifest_keys:
        try:
            m = catalog.load(store, key)
        except (ManifestError, StoreError) as e:
            report.bad_manifests[key] = str(e)
            continue
        report.backups.append(m.backup_id)
        for _, d in m.table.data_entries():
            wanted.setdefault(d, set()).add(m.backup_id)

    def check(d: bytes):
        key = segment.segment_key(d)
        try:
            if deep:
                segment.decode(store.get(key), d)
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
            if progress:
                progress(n, total)
    return report

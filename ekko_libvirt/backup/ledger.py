"""What this host committed: the newest backup of each target, kept outside the store.

The store is the source of truth for what backups exist; it cannot testify to what it lost. A
deleted Swift container or an emptied directory looks like a store that never had backups:
`verify` would say "0 backups OK" and the next backup "first backup of this disk". So every
commit also writes, on the host, `<state_dir>/ledger/<target>.json`:

    {"target": ..., "backup_id": <newest committed by this host>, "committed": <unix s>,
     "store": <where, for messages>, "full_required": <reason or null>}

A committed backup may later leave the store only through prune, and prune never deletes the
newest backup of a target. So the ledger's backup may be missing only if a newer backup of the
target is in the store (another host took it, then prune went on); otherwise the store lost
backups, and verify, status and the next backup say so (`vanished`).

`full_required`: a reason the next backup must be a full that only this host knows (the
read-back check found the export disagreeing with the chain). Cleared by the next commit.
"""

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, TypeGuard

from ..durable import write_json_atomic
from ..errors import EkkoError

log = logging.getLogger(__name__)


class LedgerError(EkkoError):
    pass


@dataclass(frozen=True)
class Record:
    target: str
    backup_id: Optional[str]
    committed: float
    store: str
    full_required: Optional[str] = None


def vanished(record: Optional[Record], present_ids: Iterable[str]) -> TypeGuard[Record]:
    """Whether the store lost backups of the record's target: its backup is gone and no newer
    backup of the target is there (ids sort by time). Pure. True only for a record."""
    if record is None or record.backup_id is None:
        return False
    ids = set(present_ids)
    return record.backup_id not in ids and not any(i > record.backup_id for i in ids)


def vanished_reason(record: Record) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.committed))
    return (f"backup {record.backup_id} of {record.target}, committed by this host on {when}, is gone from "
            f"{record.store} and no newer backup of it is there: the store lost backups "
            "(container deleted, directory emptied, or another store configured?)")


class Ledger:
    def __init__(self, state_dir: str):
        self.dir = os.path.join(state_dir, "ledger")

    def _path(self, target: str) -> str:
        return os.path.join(self.dir, f"{target}.json")

    def get(self, target: str) -> Optional[Record]:
        path = self._path(target)
        try:
            with open(path) as f:
                d = json.load(f)
            return Record(d["target"], d.get("backup_id"), float(d.get("committed", 0)), d.get("store", "the store"),
                          d.get("full_required"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A damaged record must not stop backups; it only loses the vanished check once.
            log.warning("ignoring the unreadable ledger record %s: %s", path, e)
            return None

    def records(self) -> List[Record]:
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        return [r for r in (self.get(n[:-5]) for n in names) if r is not None]

    def committed(self, target: str, backup_id: str, store: str) -> None:
        """After a commit: this backup is the newest of `target` this host committed."""
        self._write(Record(target, backup_id, time.time(), store))

    def require_full(self, target: str, reason: str, store: str) -> None:
        old = self.get(target)
        self._write(Record(target, old.backup_id if old else None, old.committed if old else time.time(),
                           old.store if old else store, reason))

    def _write(self, r: Record) -> None:
        path = self._path(r.target)
        try:
            write_json_atomic(path, r.__dict__)
        except OSError as e:
            raise LedgerError(f"cannot write the ledger record {path}: {e.strerror or e}") from e


def vanished_reasons(ledger: "Ledger", stores, targets: Optional[Iterable[str]] = None) -> List[str]:
    """For every target this host committed (or just those of `targets`): the reason, if the
    given stores (every namespace of the configured store) lost its backups."""
    from ..store import catalog
    wanted = None if targets is None else set(targets)
    out = []
    for r in ledger.records():
        if wanted is not None and r.target not in wanted:
            continue
        ids = [k.rsplit("/", 1)[1] for st in stores for k in catalog.keys(st, r.target)]
        if vanished(r, ids):
            out.append(vanished_reason(r))
    return out

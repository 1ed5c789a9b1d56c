"""A target's chain before a backup: what the store's manifests and this host's ledger say, and
what the ledger learns from the backup's end (commit, or a failure that demands a full)."""

import logging
from dataclasses import dataclass
from typing import Optional

from ..store import catalog
from ..store.base import Store
from ..engine.bitmaps import ChainHead, generation_name, known_generations
from ..errors import ReadBackMismatch
from ..format.manifest import Manifest
from .ledger import Ledger, LedgerError, vanished, vanished_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainView:
    """What the store (and this host's ledger) say about a target's chain, before a backup."""
    head: Optional[ChainHead]             # what an incremental builds on; None: nothing to build on
    entry: Optional[catalog.Entry]        # the head's manifest (a locked one too: chain_key_reason)
    committed_generation: Optional[str]   # the newest backup's generation, even if its manifest is damaged
    known: frozenset                      # generation names ekko created for this target
    broken: Optional[str] = None          # why nothing can be built on although backups exist


def look_at_chain(store: Store, target: str, prefix: str, ledger: Optional[Ledger] = None) -> ChainView:
    """One read of the target's manifest headers. A damaged newest manifest breaks the chain
    (the backup before it is not what the disk's generation tracks changes since); so does a
    store that lost backups this host committed (ledger.vanished), or a full the ledger asks for."""
    ch = catalog.chain(store, target)
    known = known_generations(prefix, ch.backup_ids, ch.bitmaps)
    newest, entry = ch.newest, ch.head
    if newest is not None and newest.header is None and not newest.locked:
        return ChainView(head=None, entry=None, committed_generation=generation_name(prefix, newest.backup_id),
                         known=known, broken=f"newest manifest {newest.key} is unreadable ({newest.error})")
    record = ledger.get(target) if ledger is not None else None
    broken = vanished_reason(record) if vanished(record, ch.backup_ids) else \
        record.full_required if record is not None else None
    if entry is None:
        return ChainView(head=None, entry=None, committed_generation=None, known=known, broken=broken)
    if entry.locked:     # sealed with another key: nothing to build on, but its generation is no stray
        return ChainView(head=None, entry=entry, committed_generation=generation_name(prefix, entry.backup_id),
                         known=known, broken=broken)
    h = entry.header
    assert h is not None        # ch.head is readable, or locked (above)
    gen = h.get("generation") or {}
    head = ChainHead(backup_id=h["backup_id"], bitmap=gen.get("bitmap"), granularity=gen.get("granularity"),
                     virtual_size=h["virtual_size"], segment_size=h["segment_size"])
    return ChainView(head=head, entry=entry, committed_generation=head.bitmap, known=known, broken=broken)



def record_commit(ledger: Optional[Ledger], m: Manifest, store: Store) -> None:
    """The ledger follows the commit; a failure to write it costs the vanished check, not the backup."""
    if ledger is None:
        return
    try:
        ledger.committed(m.target, m.backup_id, store.describe())
    except LedgerError as e:
        log.warning("%s: backup %s is committed, but %s", m.target, m.backup_id, e)



def record_failure(ledger: Optional[Ledger], target: str, e: BaseException, store: Store) -> None:
    """A read-back mismatch means the chain's change tracking cannot be trusted: the next backup
    of the target must be a full, whatever the bitmaps look like then."""
    if ledger is None or not isinstance(e, ReadBackMismatch):
        return
    try:
        ledger.require_full(target, f"the read-back check of a failed backup found the export differing from "
                            f"the chain (segment {e.index})", store.describe())
    except LedgerError as le:
        log.warning("%s: %s: the next backup may not know it must be a full", target, le)



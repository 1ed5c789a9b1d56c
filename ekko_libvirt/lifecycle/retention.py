"""Retention applied to a store: what `ekko prune` and the agent's prune after a scheduled backup
both run. The decisions are prune.plan's (pure); this module lists, asks and deletes.

    list      the manifests of one store namespace (every target, or one), with protected/ markers
    plan      prune.plan, with the policy of each target (`policy_for(target, labels)`: labels are
              those of the target's newest readable manifest: domain_uuid, domain_name, ...)
    delete    each manifest no rule keeps, unless it was protected since the listing; its verify/
              marker goes with it. Segments stay: gc frees them.
"""

import datetime
from typing import Callable, Dict, List, Mapping, Optional

from ..store import catalog, markers
from ..store.base import Store
from . import prune

PolicyFor = Callable[[str, Mapping], Optional[prune.Policy]]


def prune_store(store: Store, policy_for: PolicyFor, target: Optional[str] = None,
                tz: datetime.tzinfo = prune.UTC, dry_run: bool = False) -> List[Dict]:
    """-> one row per backup (by target, oldest first): backup_id, target, time, keep, reasons,
    deleted, policy. `keep` is False for the backups deleted (or, dry run, that would be)."""
    prot = markers.protected(store)
    entries = list(catalog.entries(store, target))
    labels: Dict[str, Mapping] = {}
    for e in entries:                        # sorted by backup id: the newest readable one wins
        if e.header is not None:
            labels[e.target] = e.header.get("labels") or {}

    def policy(t: str) -> Optional[prune.Policy]:
        return policy_for(t, labels.get(t, {}))
    backups = [prune.Backup(e.backup_id, e.target, prune.backup_time(e.backup_id),
                            f"{e.target}/{e.backup_id}" in prot, e.header is not None, e.locked)
               for e in entries]
    rows = []
    for d in prune.plan(backups, policy, tz):
        b, reasons, deleted = d.backup, list(d.reasons), False
        if not d.keep and not dry_run:
            if markers.is_protected(store, b.target, b.backup_id):     # protected since we listed
                reasons = ["protected"]
            else:
                store.delete(catalog.manifest_key(b.target, b.backup_id))
                markers.forget_backup(store, b.target, b.backup_id)
                deleted = True
        keep = d.keep or not (deleted or dry_run)     # not kept: deleted, or would be
        rows.append({"backup_id": b.backup_id, "target": b.target,
                     "time": b.time.isoformat() if b.time else None, "keep": keep, "reasons": reasons,
                     "deleted": deleted, "policy": (policy(b.target) or prune.Policy()).describe()})
    return rows

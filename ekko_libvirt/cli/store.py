"""`ekko list` and `ekko show`: the backups as the store holds them (manifests, read from the
store itself), with their protected and verify markers."""

from typing import Any, Dict, Optional

from .. import units
from ..store import catalog, markers
from ..store.factory import open_store
from .lookup import locate_all, namespaces_of
from .render import EXIT_OK, describe_consistency, describe_verified, emit, print_backup, summary, verified


def _marks(store, target: str, backup_id: str, protected: Optional[set] = None,
           verified_names: Optional[set] = None) -> Dict:
    """protected + verified of one backup, from its markers in the store. `protected`/`verified_names`:
    the marker names listed once for many backups ('<target>/<backup-id>'); None: look it up."""
    rel = f"{target}/{backup_id}"
    prot = rel in protected if protected is not None else markers.is_protected(store, target, backup_id)
    state = markers.read_verify(store, target, backup_id) if verified_names is None or rel in verified_names else None
    return {"protected": prot, "verified": verified(state)}


def cmd_list(cfg, args) -> int:
    """Every backup, or those of TARGET: a target, or a libvirt domain (its disks' targets,
    catalog.named: the store tells, libvirtd is not asked)."""
    rows = []
    for ns in namespaces_of(cfg, args.project):
        store = open_store(cfg, ns)
        if args.target is None:
            found = list(catalog.entries(store))
        else:
            found = sorted((e for t in catalog.named(store, args.target) for e in catalog.entries(store, t)),
                           key=lambda e: (e.backup_id, e.target))
        if not found:
            continue
        protected = markers.protected(store)
        verified_names = {k[len(markers.VERIFY):] for k in store.list(markers.VERIFY)}
        for e in found:
            row: Dict[str, Any]
            if e.locked:
                row = {"key": e.key, "locked": e.error, "key_fingerprint": e.key_fingerprint}
            else:
                row = summary(e.header, e.key) if e.header else {"key": e.key, "damaged": e.error}
            row["project"] = ns
            row.update(_marks(store, e.target, e.backup_id, protected, verified_names))
            rows.append(row)
    if args.json:
        emit({"ok": True, "backups": rows})
        return EXIT_OK
    if not rows:
        print("no backups" + (f" of {args.target!r}: no target or libvirt domain of that name has backups in the "
                              "store" if args.target else ""))
    for r in rows:
        if "damaged" in r:
            print(f"{r['key']}  DAMAGED MANIFEST: {r['damaged']}")
            continue
        if "locked" in r:
            print(f"{r['key']}  LOCKED: {r['locked']}")
            continue
        print(f"{r['backup_id']}  {r['target']:<16} {r['kind']:<11} {units.human(r['virtual_size']):>10} disk  "
              f"{units.human(r['stored_bytes'] or 0):>10} new  {describe_consistency(r['consistency']):<17} "
              f"parent={r['parent'] or '-'}"
              f"{'  PROTECTED' if r['protected'] else ''}  {describe_verified(r['verified'])}")
    return EXIT_OK


def cmd_show(cfg, args) -> int:
    """One backup: by id or id prefix, or a target's or a domain's newest; every disk of a domain
    backup unless --disk picks one."""
    shown = []
    for store, key in locate_all(cfg, args.project, args.backup, args.disk):
        m = catalog.load(store, key)
        shown.append((key, m, _marks(store, m.target, m.backup_id)))
    if args.json:
        out = [dict(m.header(), key=key, data_segments=m.table.data_count(), **marks) for key, m, marks in shown]
        emit({"ok": True, "backup": out[0] if len(out) == 1 else None, "backups": out})
        return EXIT_OK
    for i, (_key, m, marks) in enumerate(shown):
        if i:
            print()
        print_backup(m, marks)
    return EXIT_OK

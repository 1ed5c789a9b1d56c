"""The lifecycle commands (issue 5): `ekko verify` (--sample, --since-days), `ekko prune`,
`ekko protect` / `ekko unprotect`, `ekko gc`; each takes --json and uses the exit codes of
render.py (3: damage found)."""

import datetime
import sys
from typing import List, Optional

from .. import units
from ..agent.settings import AgentSettings
from ..backup.ledger import Ledger, vanished_reasons
from ..errors import UsageError
from ..lifecycle import prune
from ..lifecycle.gc import collect
from ..lifecycle.prune import RetentionConfig
from ..lifecycle.retention import prune_store
from ..lifecycle.verify import run as verify_run
from ..store import catalog, markers
from ..store.factory import namespaces, open_store
from .lookup import locate, locate_all, namespaces_of
from ..progress import Progress
from .render import EXIT_DAMAGED, EXIT_OK, emit, progress_bar


# -- verify -----------------------------------------------------------------------------------
def _keys_named(store, name: Optional[str]) -> List[str]:
    """Manifest keys of a target, or of every disk of the libvirt domain so named; all if None."""
    if not name:
        return catalog.keys(store)
    return [k for t in catalog.named(store, name) for k in catalog.keys(store, t)]


def cmd_verify(cfg, args) -> int:
    vanished = []
    if args.backup:
        store, key = locate(cfg, args.project, args.backup, args.disk)
        groups = [(store, [key])]
    else:
        groups = [(st, _keys_named(st, args.target)) for st in (open_store(cfg, ns)
                                                                 for ns in namespaces_of(cfg, args.project))]
        # what this host committed must still be there: an emptied store is not "0 backups OK"
        everywhere = [st for st, _ in groups] if not args.project else [open_store(cfg, ns) for ns in namespaces(cfg)]
        vanished = vanished_reasons(Ledger(cfg.state_dir), everywhere,
                                    {args.target, *(t for st in everywhere for t in catalog.named(st, args.target))}
                                    if args.target else None)
    bar = progress_bar("verify", args.json, unit="segments")
    try:
        rep, skipped, marked, cleared, not_recorded = None, [], [], [], []
        for store, keys in groups:
            done = verify_run(store, keys, deep=args.deep, sample=args.sample, since_days=args.since_days,
                              workers=cfg.workers + 1, progress=bar)
            part = done.report
            skipped += done.skipped
            marked += done.marked
            cleared += done.cleared
            if done.not_recorded:
                not_recorded.append(done.not_recorded)
            rep = part if rep is None else rep.merge(part)
    finally:
        bar.finish()
    assert rep is not None      # groups: one backup, or every namespace (the root one at least)
    if args.json:
        emit({"ok": rep.ok and not vanished, "deep": args.deep, "backups": rep.backups,
              "segments_checked": rep.segments_checked,
              "damaged_segments": [{"key": k, "problem": p, "used_by": sorted(rep.used_by.get(k, ()))}
                                   for k, p in sorted(rep.damaged.items())],
              "bad_manifests": rep.bad_manifests, "damaged_backups": rep.damaged_backups(),
              "sample": args.sample, "skipped": skipped, "marked": marked, "cleared": cleared,
              "not_recorded": not_recorded, "vanished": vanished})
    else:
        what = "deep (re-hashed)" if args.deep else "existence"
        share = "" if args.sample >= 1 else f" (a {args.sample:.1%} sample)"
        print(f"verified {len(rep.backups)} backup(s), {rep.segments_checked} distinct segments{share}, {what}")
        if skipped:
            print(f"  skipped {len(skipped)} backup(s) verified in the last {args.since_days:g} day(s)")
        if marked:
            print(f"  marked {len(marked)} segment(s) damaged in the store: the next backup of each disk "
                  f"that still holds that data stores them again")
        if cleared:
            print(f"  {len(cleared)} segment(s) marked damaged before are intact now: marks removed")
        for k, p in sorted(rep.damaged.items()):
            print(f"  DAMAGED {k}: {p}\n    used by: {', '.join(sorted(rep.used_by.get(k, ())))}")
        for k, p in sorted(rep.bad_manifests.items()):
            print(f"  BAD MANIFEST {k}: {p}")
        for why in vanished:
            print(f"  VANISHED {why}")
        print("OK" if rep.ok and not vanished else
              f"DAMAGE FOUND in backup(s): {', '.join(rep.damaged_backups())}" if not rep.ok else
              "BACKUPS LOST: the store no longer holds backups this host committed (the next backup of each "
              "such disk is a full that says why)")
    for why in not_recorded:
        sys.stderr.write(f"ekko: warning: the results were not recorded in the store ({why}): `ekko list` "
                         "keeps its old verify state, and damage found is not marked for self-healing\n")
    return EXIT_OK if rep.ok and not vanished else EXIT_DAMAGED


# -- prune / protect / gc ---------------------------------------------------------------------
def cmd_prune(cfg, args) -> int:
    settings = AgentSettings.from_config(cfg)
    given = {r: getattr(args, f"keep_{r}") for r in prune.RULES if getattr(args, f"keep_{r}") is not None}
    if given:
        cli_policy = prune.Policy(**given)
        policy_for = lambda _target, _labels: cli_policy  # noqa: E731
    elif settings.has_retention():
        # the agent's rule too: retention.targets, else the domain's (domains: NAME: retention:), else default
        def policy_for(target, labels):
            return settings.retention_for(target, labels.get("domain_uuid"), labels.get("domain_name"))
    else:
        raise UsageError("no retention rule: give --keep-last/--keep-daily/... or a `retention:` section "
                         f"(or domains: NAME: retention:) in {cfg.source}")
    tz = datetime.datetime.now().astimezone().tzinfo
    assert tz is not None       # astimezone() with no argument always sets the local zone
    rows = []
    for ns in namespaces_of(cfg, args.project):
        store = open_store(cfg, ns)
        # a libvirt domain's name stands for its disks' targets (catalog.named)
        for target in (catalog.named(store, args.target) if args.target else [None]):
            for r in prune_store(store, policy_for, target, tz, args.dry_run):
                r["project"] = ns
                rows.append(r)
    kept = sum(1 for r in rows if r["keep"])
    gone = len(rows) - kept
    if args.json:
        emit({"ok": True, "dry_run": args.dry_run, "kept": kept, "deleted": 0 if args.dry_run else gone,
              "would_delete": gone if args.dry_run else 0, "backups": rows})
        return EXIT_OK
    print(f"prune{' (dry run)' if args.dry_run else ''}: {len(rows)} backup(s): keep {kept}, "
          f"{'would delete' if args.dry_run else 'delete'} {gone}")
    target = None
    for r in rows:
        if r["target"] != target:
            target = r["target"]
            print(f"  {target}  ({r['policy']})")
        action = "keep  " if r["keep"] else ("would delete" if args.dry_run else "DELETED")
        print(f"    {r['backup_id']}  {action:<13} {', '.join(r['reasons'])}")
    if gone and not args.dry_run:
        print("manifests deleted; `ekko gc` frees the segments no other backup uses")
    return EXIT_OK


def cmd_protect(cfg, args) -> int:
    """`ekko protect` and `ekko unprotect`: every disk of BACKUP, or the --disk one."""
    done = []
    for store, key in locate_all(cfg, args.project, args.backup, args.disk):
        target, bid = key[len(catalog.PREFIX):].rsplit("/", 1)
        if args.command == "protect":
            markers.protect(store, target, bid)
            changed = True
        else:
            changed = markers.unprotect(store, target, bid)
        done.append({"backup_id": bid, "target": target, "protected": args.command == "protect", "changed": changed})
    if args.json:
        emit({"ok": True, "backups": done})
        return EXIT_OK
    for d in done:
        state = "protected" if d["protected"] else ("no longer protected" if d["changed"] else "was not protected")
        print(f"{d['backup_id']}  {d['target']}: {state}")
    return EXIT_OK


class _PhaseProgress:
    """gc's progress(phase, done, total): one line per phase (mark: manifests; sweep: segments
    listed, total unknown; delete: candidates), each with its rate and, when known, ETA."""

    UNITS = {"mark": "manifests", "sweep": "listed", "delete": "candidates"}

    def __init__(self, label: str, as_json: bool):
        self.label, self.as_json = label, as_json
        self.phase: Optional[str] = None
        self.bar: Optional[Progress] = None

    def __call__(self, phase: str, done: int, total: Optional[int]) -> None:
        if phase != self.phase:
            self.finish()
            self.phase = phase
            self.bar = progress_bar(f"{self.label} {phase}", self.as_json, unit=self.UNITS.get(phase, ""))
        assert self.bar is not None
        self.bar(done, total)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.finish()
            self.bar = None


def cmd_gc(cfg, args) -> int:
    grace = args.grace_hours if args.grace_hours is not None else RetentionConfig.from_config(cfg).gc_grace_hours
    results = []
    for ns in namespaces_of(cfg, args.project):
        progress = _PhaseProgress(f"gc{' ' + ns if ns else ''}", args.json)
        try:
            rep = collect(open_store(cfg, ns), grace, dry_run=args.dry_run, workers=cfg.workers + 1,
                          progress=progress)
        finally:
            progress.finish()
        results.append((ns, rep))
    ok = all(r.ok for _, r in results)
    if args.json:
        emit({"ok": ok, "dry_run": args.dry_run, "grace_hours": grace,
              "stores": [dict(r.as_dict(), project=ns) for ns, r in results]})
        return EXIT_OK if ok else EXIT_DAMAGED
    for ns, r in results:
        where = f" (project {ns})" if ns else ""
        verb = "would delete" if r.dry_run else "deleted"
        print(f"gc{where}: {r.manifests} backup(s) reference {r.referenced} segment(s); {r.segments} segment(s) "
              f"in the store, {r.unreferenced} unreferenced")
        print(f"  {verb} {r.deleted} ({units.human(r.deleted_bytes)}); kept {r.kept_young} younger than "
              f"{grace:g} h; removed {r.temp_removed} temp file(s) and {r.markers_removed} stale marker(s); "
              f"{r.seconds:.1f} s")
        for key, ids in sorted(r.raced.items()):
            print(f"  RACE: {key} was deleted while backup(s) {', '.join(ids)} committed it: marked damaged, "
                  f"the next backup of that disk stores it again")
    return EXIT_OK if ok else EXIT_DAMAGED

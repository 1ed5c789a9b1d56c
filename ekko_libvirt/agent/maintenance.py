"""The agent's lifecycle work (issue 5): retention after each scheduled backup, gc and sampled
verification on an interval. What is due is decided by scheduler.tasks_plan and the policies come
from settings (both pure); this module runs the work against the store and builds the records the
daemon keeps in the state directory (StateDir.update_lifecycle), which `ekko status` shows.

    prune_domain   after a scheduled backup of a domain committed: the targets of its disks, under
                   their retention policy (settings.retention_for); prune.plan keeps the newest and
                   every protected backup whatever the policy says
    run_gc         gc.collect on every store namespace, one after the other; the grace period
                   (retention.gc_grace_hours) keeps the segments of backups still running
    run_verify     verify.run on every store namespace, one after the other (sample, deep,
                   since_days), its results recorded in the store as `ekko verify` records them

The daemon runs gc and verify in one thread, one after the other: never at the same time. A stop
request cancels gc only before it deletes anything (during its mark and listing phases: once it
deletes, it runs to its end so that its check for racing backups always runs), and verify at its
next segment. One namespace failing does not stop the others; the record says which failed.
"""

import datetime
import logging
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional

from ..store import catalog
from .. import units
from ..errors import EkkoError
from ..lifecycle.retention import PolicyFor, prune_store
from ..lifecycle.prune import UTC, Policy

log = logging.getLogger(__name__)

CANCELLED = "cancelled: the agent is stopping"


class Cancelled(EkkoError):
    """The agent is stopping: the task ends where it is safe to."""


def iso(ns: Optional[int]) -> Optional[str]:
    if not ns:
        return None
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).isoformat(timespec="seconds")


def _record(started_ns: int, stores: List[Dict], summary: str, **extra) -> Dict:
    finished = time.time_ns()
    errors = [f"{s['project'] or 'default'}: {s['error']}" for s in stores if s.get("error")]
    return dict(extra, started=iso(started_ns), started_ns=started_ns, finished=iso(finished), finished_ns=finished,
                seconds=round((finished - started_ns) / 1e9, 3), ok=all(s["ok"] for s in stores),
                error="; ".join(errors) or None, summary=summary, stores=stores)


def failed_record(started_ns: int, error: str) -> Dict:
    """A task that failed as a whole (e.g. the store's namespaces could not be listed)."""
    return _record(started_ns, [{"project": None, "ok": False, "error": error}], f"failed: {error}")


def _ns_name(ns: Optional[str]) -> str:
    return ns or "default"


def _per_namespace(namespaces: Iterable[Optional[str]], cancel: Optional[threading.Event], what: str,
                   work: Callable[[Optional[str]], Dict]) -> List[Dict]:
    """work(ns) for each namespace in turn, one result per namespace. A cancel stops the run (and
    is recorded); any other error is recorded and the next namespace still gets its turn."""
    stores: List[Dict] = []
    for ns in namespaces:
        if cancel is not None and cancel.is_set():
            stores.append({"project": ns, "ok": False, "error": CANCELLED})
            break
        try:
            result = work(ns)
        except Cancelled:
            stores.append({"project": ns, "ok": False, "error": CANCELLED})
            break
        except Exception as e:   # noqa: BLE001 -- recorded; the other namespaces still get their turn
            if not isinstance(e, EkkoError):
                log.exception("%s of namespace %s", what, _ns_name(ns))
            stores.append({"project": ns, "ok": False, "error": str(e)})
            continue
        stores.append(dict({"project": ns}, **result))
    return stores


# -- gc ---------------------------------------------------------------------------------------------
def run_gc(open_store: Callable, namespaces: Iterable[Optional[str]], grace_hours: float, workers: int = 4,
           cancel: Optional[threading.Event] = None) -> Dict:
    from ..lifecycle.gc import collect
    started = time.time_ns()

    def progress(phase, _done, _total):
        if cancel is not None and cancel.is_set() and phase in ("mark", "sweep"):     # nothing deleted yet
            raise Cancelled(CANCELLED)

    def one(ns) -> Dict:
        r = collect(open_store(ns), grace_hours, workers=workers, progress=progress)
        return {"ok": r.ok, "manifests": r.manifests, "segments": r.segments,
                "unreferenced": r.unreferenced, "deleted": r.deleted, "deleted_bytes": r.deleted_bytes,
                "kept_young": r.kept_young, "markers_removed": r.markers_removed, "raced": r.raced,
                "error": None if r.ok else f"{len(r.raced)} segment(s) deleted while a backup committed "
                                           "them: marked damaged, the next backup stores them again"}
    stores = _per_namespace(namespaces, cancel, "gc", one)
    done = [s for s in stores if "deleted" in s]
    summary = (f"deleted {sum(s['deleted'] for s in done)} segment(s) "
               f"({units.human(sum(s['deleted_bytes'] for s in done))}), kept "
               f"{sum(s['kept_young'] for s in done)} younger than {grace_hours:g} h; "
               f"{len(done)} of {len(stores)} namespace(s)")
    return _record(started, stores, summary, grace_hours=grace_hours)


# -- verify -----------------------------------------------------------------------------------------
def run_verify(open_store: Callable, namespaces: Iterable[Optional[str]], settings, workers: int = 4,
               cancel: Optional[threading.Event] = None) -> Dict:
    """`settings`: settings.VerifySettings (sample, deep, since_days)."""
    from ..lifecycle.verify import run
    started = time.time_ns()

    def progress(_done, _total):
        if cancel is not None and cancel.is_set():
            raise Cancelled(CANCELLED)

    def one(ns) -> Dict:
        store = open_store(ns)
        done = run(store, catalog.keys(store), deep=settings.deep, sample=settings.sample,
                   since_days=settings.since_days, workers=workers, progress=progress)
        rep = done.report
        bad = rep.damaged_backups()
        return {"ok": rep.ok, "backups": len(rep.backups), "skipped": len(done.skipped),
                "segments_checked": rep.segments_checked, "damaged_segments": sorted(rep.damaged),
                "bad_manifests": sorted(rep.bad_manifests), "damaged_backups": bad,
                "marked": len(done.marked), "cleared": len(done.cleared),
                "error": None if rep.ok else f"damage found in backup(s) {', '.join(bad)}"}
    stores = _per_namespace(namespaces, cancel, "verify", one)
    done_ = [s for s in stores if "backups" in s]
    how = ("deep" if settings.deep else "existence") + (
        "" if settings.sample >= 1 else f", {settings.sample:.1%} sample")
    summary = (f"checked {sum(s['backups'] for s in done_)} backup(s), "
               f"{sum(s['segments_checked'] for s in done_)} segment(s) ({how}), skipped "
               f"{sum(s['skipped'] for s in done_)} verified recently; {len(done_)} of {len(stores)} namespace(s)")
    bad = sorted({b for s in done_ for b in s["damaged_backups"]})
    if bad:
        summary += f"; DAMAGE in backup(s) {', '.join(bad)}"
    return _record(started, stores, summary, deep=settings.deep, sample=settings.sample,
                   since_days=settings.since_days)


# -- sync (replication) -----------------------------------------------------------------------------
def run_sync(cfg, settings, workers: int = 4, cancel: Optional[threading.Event] = None,
             previous: Optional[Dict] = None, gc_grace_hours: float = 24.0,
             tz: datetime.tzinfo = UTC) -> Dict:
    """`settings`: settings.SyncSettings. `ekko sync SOURCE DEST` for each destination in turn, every
    namespace of the source. Per destination the record keeps `last_complete_ns`: the start of the
    last run after which the destination held every backup of the source (carried over from
    `previous`, the last record, while runs fail or are cut short): how far the replica lags."""
    from ..lifecycle.sync import Syncer, fetchers
    from ..store.factory import namespaces, open_raw_store, open_store
    started = time.time_ns()
    before = {d.get("dest"): d for d in (previous or {}).get("stores") or () if isinstance(d, dict)}
    src_cfg = cfg.with_store(settings.source)
    dests: List[Dict] = []
    for dest in settings.dests:
        last = before.get(dest, {}).get("last_complete_ns")
        entry: Dict = {"project": dest, "dest": dest, "ok": False, "error": None, "last_complete_ns": last}
        dests.append(entry)
        try:
            dst_cfg = cfg.with_store(dest)
            policy = settings.retention_of(dest)
            select = _kept_by(policy, tz) if policy is not None else None
            n = fetchers(workers, src_cfg.store.type, dict(src_cfg.store.options))
            reps = [Syncer(open_store(src_cfg, ns), open_raw_store(src_cfg, ns), open_raw_store(dst_cfg, ns),
                           project=ns, workers=n, cancel=cancel, select=select).run()
                    for ns in namespaces(src_cfg)]
        except Exception as e:   # noqa: BLE001 -- recorded; the other destinations still get their turn
            if not isinstance(e, EkkoError):
                log.exception("sync to %s", dest)
            entry["error"] = str(e)
            continue
        failed = [f.key for r in reps for f in r.failed]
        entry.update(ok=not failed, copied=sum(len(r.copied) for r in reps), failed=failed,
                     already=sum(r.already for r in reps), segments_copied=sum(r.segments_copied for r in reps),
                     bytes_copied=sum(r.bytes_copied for r in reps), namespaces=len(reps),
                     error=f"{len(failed)} backup(s) not copied: damaged or missing segments at the source"
                     if failed else None)
        if not failed:
            entry["last_complete_ns"] = started
        if policy is not None:
            _prune_replica(entry, dst_cfg, policy, gc_grace_hours, workers, tz)
    done = [d for d in dests if "copied" in d]
    summary = (f"copied {sum(d['copied'] for d in done)} backup(s) "
               f"({units.human(sum(d['bytes_copied'] for d in done))}) from {settings.source} to "
               f"{len(done)} of {len(dests)} destination(s)")
    return _record(started, dests, summary, source=settings.source)


def _kept_by(policy: Policy, tz: datetime.tzinfo) -> Callable[[set, set], set]:
    """The manifest keys a destination's policy keeps among those of source and destination
    together: the sync copies only those (what its prune would delete at once is not sent)."""
    from ..lifecycle import prune

    def select(keys: set, protected: set) -> set:
        backups = [prune.Backup(k.rsplit("/", 1)[1], k[len(catalog.PREFIX):].rsplit("/", 1)[0],
                                prune.backup_time(k.rsplit("/", 1)[1]), k[len(catalog.PREFIX):] in protected)
                   for k in keys]
        return {catalog.manifest_key(d.backup.target, d.backup.backup_id)
                for d in prune.plan(backups, lambda _t: policy, tz) if d.keep}
    return select


def _prune_replica(entry: Dict, dst_cfg, policy: Policy, grace_hours: float, workers: int,
                   tz: datetime.tzinfo) -> None:
    """The destination's own retention (agent.sync.retention), then gc there: a replica may keep
    more or less than its source. Recorded in `entry` (pruned, gc_deleted, or prune_error)."""
    from ..lifecycle.gc import collect
    from ..store.factory import namespaces, open_store
    pruned = deleted = 0
    try:
        for ns in namespaces(dst_cfg):
            store = open_store(dst_cfg, ns)
            pruned += sum(1 for r in prune_store(store, _always(policy), None, tz) if r["deleted"])
            deleted += collect(store, grace_hours, workers=workers).deleted
    except Exception as e:   # noqa: BLE001 -- the copy itself went fine; recorded
        if not isinstance(e, EkkoError):
            log.exception("retention of replica %s", entry["dest"])
        entry["prune_error"] = str(e)
    entry.update(pruned=pruned, gc_deleted=deleted)


# -- retention after a scheduled backup ---------------------------------------------------------
def _always(policy: Policy) -> PolicyFor:
    """The policy_for of one target: `policy`, whatever its labels."""
    return lambda _target, _labels: policy


def prune_domain(store, ns: Optional[str], targets: Iterable[str], policy_for: Callable[[str], Optional[Policy]],
                 tz: datetime.tzinfo = UTC) -> Dict:
    """Apply each target's policy (targets without one are left alone). -> the prune record."""
    now = time.time_ns()
    rows: List[Dict] = []
    policies = {}
    for t in sorted(set(targets)):
        policy = policy_for(t)
        if policy is None:
            continue
        policies[t] = policy.describe()
        rows += prune_store(store, _always(policy), t, tz)
    deleted = [f"{r['target']}/{r['backup_id']}" for r in rows if r["deleted"]]
    kept = sum(1 for r in rows if r["keep"])
    return {"time": iso(now), "time_ns": now, "ok": True, "error": None, "project": ns, "policies": policies,
            "kept": kept, "deleted": deleted,
            "summary": f"deleted {len(deleted)} backup(s), kept {kept}, of {len(policies)} disk(s)"}

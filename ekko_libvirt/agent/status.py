"""What `ekko status` shows per domain, from the agent's state directory, the store and libvirt.

    chain        the agent's chain state: ok | check-required | full-required | none, and why
    last backup  the newest backup of each disk in the store (kind, time, reason)
    next         when the scheduler will back the domain up, and why not now
    job          the running job with its progress; else the last job (failed ones with the error)
    pruned       the last retention run after a scheduled backup of the domain
    lifecycle    (host-wide) the agent's last gc and verify: when, outcome, summary, next due

`row` is pure (the facts in, one dict out); `collect` gathers the facts. libvirt is optional:
without it the domains known from the state directory are shown, with their last known state.
"""

import logging
import os
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..store import catalog
from ..units import human
from ..engine import domain_xml as dx
from ..errors import EkkoError
from .scheduler import Decision, DomainStatus, Policy, PolicyOverride, TaskRun, decide, format_interval, task_due
from .state import DomainState, JobRecord, JobStatus, StateDir, StateError, process_alive, read_json, seed_chain

log = logging.getLogger(__name__)


def ns_to_dt(ns: Optional[int]) -> Optional[datetime]:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc) if ns else None


def _iso(ns: Optional[int]) -> Optional[str]:
    dt = ns_to_dt(ns)
    return dt.isoformat(timespec="seconds") if dt else None


def domain_status(uuid: str, st: Optional[DomainState], active: bool, job_running: bool) -> DomainStatus:
    """The scheduler's view of a domain."""
    last = st.chain.last_backup_ns if st is not None else None
    return DomainStatus(uuid, ns_to_dt(last), job_running=job_running, active=active)


def job_dict(job: JobRecord, alive: bool) -> Dict:
    pct = round(100.0 * job.bytes_done / job.bytes_total, 1) if job.bytes_total else None
    status = job.status.value
    if job.status is JobStatus.RUNNING and not alive:
        status = "stale"           # its process is gone; the next agent start settles it
    return {"job_id": job.job_id, "kind": job.kind, "status": status, "started": _iso(job.started_ns),
            "updated": _iso(job.updated_ns), "bytes_done": job.bytes_done, "bytes_total": job.bytes_total,
            "percent": pct, "pid": job.pid, "backup_id": job.backup_id, "error": job.error}


def row(uuid: str, name: Optional[str], active: Optional[bool], st: Optional[DomainState],
        jobs: Sequence[Tuple[JobRecord, bool]], heads: Dict[str, Dict], decision: Optional[Decision],
        pruned: Optional[Dict] = None) -> Dict:
    """One domain's status. `jobs`: its job records (oldest first) with whether their process
    lives; `heads`: per disk the newest backup's header in the store; `pruned`: the agent's record
    of the last retention run on the domain (agent/lifecycle.json)."""
    chain = st.chain if st is not None else None
    running = [(j, a) for j, a in jobs if j.status is JobStatus.RUNNING]
    finished = [j for j, _ in jobs if j.status is not JobStatus.RUNNING]
    return {
        "uuid": uuid,
        "name": name or (st.name if st else None),
        "active": active if active is not None else (st.running if st else None),
        "clean_shutdown": st.clean_shutdown if st else None,
        "last_event": st.last_event if st else None,
        "chain": {"status": chain.status.value, "reason": chain.reason, "last_backup_id": chain.last_backup_id,
                  "last_checkpoint": chain.last_checkpoint, "last_backup": _iso(chain.last_backup_ns)}
        if chain else {"status": "none", "reason": "", "last_backup_id": None, "last_checkpoint": None,
                       "last_backup": None},
        "last_backup": {dev: {"backup_id": h["backup_id"], "kind": h["kind"], "created": h["created"],
                              "reason": h["reason"], "target": h["target"]} for dev, h in sorted(heads.items())},
        "next": None if decision is None else {
            "why": decision.why.value, "due": decision.due,
            "at": decision.next_due.isoformat(timespec="seconds") if decision.next_due else None,
            "interval_s": decision.policy.interval_s, "interval": format_interval(decision.policy.interval_s),
            "window": str(decision.policy.window or "any"),
            "disks": list(decision.policy.disks) if decision.policy.disks else "all"},
        "job": job_dict(*running[-1]) if running else None,
        "last_job": job_dict(finished[-1], alive=False) if finished else None,
        "last_prune": None if not pruned else {k: pruned.get(k) for k in (
            "time", "ok", "error", "summary", "deleted", "kept", "policies", "project")},
    }


# -- the agent's lifecycle work (gc, verify) ------------------------------------------------------
TASKS = ("gc", "verify", "sync")


def last_task_runs(record: Dict) -> Dict[str, TaskRun]:
    """{task: TaskRun} from the lifecycle record (StateDir.load_lifecycle); odd entries are skipped."""
    out = {}
    for name in TASKS:
        rec = record.get(name)
        if not isinstance(rec, dict) or not isinstance(rec.get("started_ns"), int):
            continue
        started = ns_to_dt(rec["started_ns"])       # None for 0: as odd as the rest
        if started is not None:
            out[name] = TaskRun(started, ok=rec.get("ok") is True)
    return out


def lifecycle_info(record: Dict, gc_interval_s: Optional[int], verify, now: datetime, sync=None) -> Dict:
    """Per task: on or off, its settings, the last run (when, ok, error, summary) and when the next
    is due. `verify`: settings.VerifySettings or None; `sync`: settings.SyncSettings or None."""
    runs = last_task_runs(record)
    out = {}
    for name, interval in (("gc", gc_interval_s), ("verify", verify.interval_s if verify else None),
                           ("sync", sync.interval_s if sync else None)):
        rec = record.get(name) if isinstance(record.get(name), dict) else None
        dec = task_due(now, name, interval, runs.get(name))
        info: Dict[str, Any] = {
            "enabled": interval is not None, "interval_s": interval,
            "interval": format_interval(interval) if interval is not None else None,
            "last": None if rec is None else {k: rec.get(k) for k in (
                "started", "finished", "seconds", "ok", "error", "summary")},
            "due": dec.due, "next": dec.next_due.isoformat(timespec="seconds") if dec.next_due else None}
        if name == "gc" and rec is not None:
            info["last"]["grace_hours"] = rec.get("grace_hours")
        if name == "verify" and verify is not None:
            info.update(sample=verify.sample, deep=verify.deep, since_days=verify.since_days)
        if name == "sync":
            info.update(source=sync.source if sync else None, dests=list(sync.dests) if sync else [],
                        lag=_sync_lag(rec, now))
        out[name] = info
    return out


def _sync_lag(rec: Optional[Dict], now: datetime) -> Dict[str, Optional[float]]:
    """Per destination: seconds since the start of the last sync that left it complete (None:
    never complete)."""
    out: Dict[str, Optional[float]] = {}
    for d in (rec or {}).get("stores") or ():
        if isinstance(d, dict) and isinstance(d.get("dest"), str):
            last = d.get("last_complete_ns")
            out[d["dest"]] = round(now.timestamp() - last / 1e9, 1) if isinstance(last, int) else None
    return out


def describe_lifecycle(info: Dict) -> str:
    """The lifecycle part of `ekko status` for people: one line per task."""
    lines = []
    for name, t in info.items():
        if name == "sync" and not t["enabled"] and t["last"] is None:
            continue                  # a host that does not replicate: nothing to say
        if not t["enabled"]:
            key = {"gc": "agent.gc_interval", "verify": "agent.verify", "sync": "agent.sync"}[name]
            last = t["last"]
            lines.append(f"{name + ':':<8}off (no {key})" + (f"; last {last['started']}" if last else ""))
            continue
        last = t["last"]
        what = "never run" if last is None else \
            f"last {last['started']} {'ok' if last['ok'] else 'FAILED'}: {last['error'] or last['summary']}"
        lag = "".join(f"; {d} behind by {'never complete' if s is None else format_interval(max(1, int(s)))}"
                      for d, s in (t.get("lag") or {}).items())
        lines.append(f"{name + ':':<8}{what}; next {'now' if t['due'] else t['next']} (every {t['interval']}){lag}")
    return "\n".join(lines)


def newest_head(heads: Dict[str, Dict]) -> Optional[Tuple[str, Optional[str], int]]:
    """(backup id, checkpoint, start ns) of the newest backup among the disks' heads, or None."""
    best = max(heads.values(), key=lambda h: h["backup_id"], default=None)
    if best is None:
        return None
    gen = best.get("generation") or {}
    started = (best.get("timings") or {}).get("started") or 0
    return best["backup_id"], gen.get("bitmap"), int(started * 1e9)


def domain_heads(xml: str, open_store: Callable) -> Dict[str, Dict]:
    """Per disk of the domain: the header of its newest readable backup in the store."""
    nova = dx.parse_nova(xml)
    name = nova.get("domain_name", "")
    store = open_store(dx.project_namespace(nova))
    out = {}
    for d in dx.parse_disks(xml):
        e = catalog.head(store, dx.target_name(name, d.dev))
        if e is not None and e.header is not None:
            out[d.dev] = e.header
    return out


def collect(sd: StateDir, conn, open_store: Optional[Callable], default: Policy,
            overrides: Callable[[Sequence[Tuple[str, Optional[str]]]], Dict[str, PolicyOverride]],
            only: Optional[str], now: datetime) -> List[Dict]:
    """Rows for every domain libvirt (if `conn`) or the state directory knows; `only`: a name or UUID."""
    doms: Dict[str, Dict] = {}
    if conn is not None:
        for d in conn.listAllDomains():
            doms[d.UUIDString().lower()] = {"name": d.name(), "active": bool(d.isActive()), "dom": d}
    states = {st.uuid: st for st in sd.list_domains()}
    for uuid, state in states.items():
        doms.setdefault(uuid, {"name": state.name, "active": None, "dom": None})
    if only is not None:
        doms = {u: d for u, d in doms.items() if only.lower() == u or only == d["name"]}
    pruned = sd.load_lifecycle().get("prune") or {}
    jobs: Dict[str, List[Tuple[JobRecord, bool]]] = {}
    for j in sd.list_jobs():
        jobs.setdefault(j.uuid, []).append((j, j.status is JobStatus.RUNNING and process_alive(j.pid, j.pid_start)))
    ovs = overrides([(u, d["name"]) for u, d in doms.items()])
    rows = []
    for uuid, d in sorted(doms.items(), key=lambda kv: (kv[1]["name"] or "", kv[0])):
        st = states.get(uuid)
        heads: Dict[str, Dict] = {}
        if d["dom"] is not None and open_store is not None:
            try:
                heads = domain_heads(d["dom"].XMLDesc(0), open_store)
            except EkkoError as e:
                log.warning("%s: cannot read its backups from the store: %s", d["name"], e)
        running = any(a for j, a in jobs.get(uuid, ()) if j.status is JobStatus.RUNNING)
        active = d["active"] if d["active"] is not None else bool(st and st.running)
        seen = newest_head(heads)
        known = seed_chain(st or DomainState(uuid), *seen) if seen else st     # the store knows it
        decision = decide(now, domain_status(uuid, known, active, running), default.merged(ovs.get(uuid)))
        rows.append(row(uuid, d["name"], d["active"], st, jobs.get(uuid, ()), heads, decision,
                        pruned.get(uuid) if isinstance(pruned, dict) else None))
    return rows


def agent_info(sd: StateDir) -> Dict:
    """Whether an agent runs on this state directory (its agent.json and a live pid)."""
    try:
        raw = read_json(os.path.join(sd.root, "agent", "agent.json"))
    except StateError:
        raw = None
    if not isinstance(raw, dict) or not isinstance(raw.get("pid"), int):
        return {"running": False, "pid": None, "since": None}
    alive = process_alive(raw["pid"], raw.get("pid_start"))
    return {"running": alive, "pid": raw["pid"] if alive else None,
            "since": _iso(raw.get("started_ns")) if alive else None}


def describe(r: Dict) -> str:
    """A row for people: a few lines per domain."""
    state = "running" if r["active"] else "shut off" if r["active"] is False else "state unknown"
    ch = r["chain"]
    lines = [f"{r['name'] or '?'}  {r['uuid']}  {state}",
             f"  chain   {ch['status']}" + (f": {ch['reason']}" if ch["reason"] else "")
             + (f" (last backup {ch['last_backup_id']})" if ch["last_backup_id"] else "")]
    for dev, h in r["last_backup"].items():
        lines.append(f"  {dev:<7} {h['backup_id']}  {h['kind']:<11} {h['reason']}")
    nx = r["next"]
    if nx is not None:
        when = "now" if nx["due"] else (nx["at"] or "-")
        lines.append(f"  next    {when} ({nx['why']}; every {nx['interval']}, window {nx['window']}, "
                     f"disks {nx['disks'] if isinstance(nx['disks'], str) else ','.join(nx['disks'])})")
    job = r["job"]
    if job is not None:
        prog = (f"{job['percent']}% ({human(job['bytes_done'])} of {human(job['bytes_total'])})"
                if job["bytes_total"] else "starting")
        lines.append(f"  job     {job['job_id']} {job['status']} {job['kind']}: {prog}, since {job['started']}")
    last = r["last_job"]
    if last is not None and last["status"] != "succeeded":
        lines.append(f"  last job {last['job_id']} {last['status']}: {last['error'] or '-'}")
    pr = r.get("last_prune")
    if pr is not None:
        lines.append(f"  pruned  {pr['time']}: " + (pr["summary"] if pr["ok"] else f"FAILED: {pr['error']}")
                     + (f" ({'; '.join(f'{t} {p}' for t, p in sorted(pr['policies'].items()))})"
                        if pr.get("policies") else ""))
    return "\n".join(lines)


def hook_info(hook_path: str, spool_dir: str) -> Dict:
    """The installed hook and its spool: whether the hook can load its event rule (if it cannot,
    every event is lost), its coalescing bound, and how many events wait or were quarantined."""
    import re
    from .spool import BAD_DIR
    info: Dict = {"path": hook_path, "installed": False, "rule_file": None, "rule_ok": False, "problem": None,
                  "spool_max": None, "waiting": None, "quarantined": None}
    try:
        with open(hook_path, errors="replace") as f:
            text = f.read(1 << 16)
    except FileNotFoundError:
        info["problem"] = "not installed (ekko hook install): libvirt events are not recorded"
        text = None
    except OSError as e:
        info["problem"] = f"unreadable: {e.strerror}"
        text = None
    if text is not None:
        info["installed"] = True
        rule = re.search(r'^RULE_FILE = "([^"\n]*)"$', text, re.M)
        bound = re.search(r"^SPOOL_MAX = (\d+)$", text, re.M)
        info["spool_max"] = int(bound.group(1)) if bound else None
        info["rule_file"] = rule.group(1) if rule else None
        if not info["rule_file"]:
            info["problem"] = "installed by an older ekko (no RULE_FILE): run `ekko hook install` again"
        else:
            try:
                st = os.stat(info["rule_file"])
                if st.st_mode & 0o022 or st.st_uid not in (0, os.getuid()):
                    info["problem"] = (f"the hook refuses its rule file {info['rule_file']} (writable by group or "
                                       "others, or owned by another user): every event is lost")
                else:
                    info["rule_ok"] = True
            except OSError as e:
                info["problem"] = (f"its rule file {info['rule_file']} is gone ({e.strerror}): every event is "
                                   "lost; run `ekko hook install` again")
    try:
        names = os.listdir(spool_dir)
        info["waiting"] = sum(1 for n in names if not n.startswith(".") and n != BAD_DIR)
        info["quarantined"] = sum(1 for n in os.listdir(os.path.join(spool_dir, BAD_DIR))
                                  if not n.endswith(".reason")) if BAD_DIR in names else 0
    except OSError:
        pass
    return info


def describe_hook(info: Dict) -> str:
    """The hook line of `ekko status` for people."""
    spool = "" if info["waiting"] is None else (f"; spool: {info['waiting']} event(s) waiting, "
                                                 f"{info['quarantined']} quarantined")
    if info["problem"]:
        return f"hook:   {info['path']}: {info['problem']}{spool}"
    return f"hook:   {info['path']} (rule ok, coalesces above {info['spool_max']} events){spool}"

"""The agent's Prometheus metrics, derived from what the agent already records. Pure: facts in,
metric families out (metrics_runner.py gathers the facts and exposes them).

Where each figure comes from (nothing is counted twice, nothing kept only for the metrics):

    agent/domains/UUID.json    chain state and reason, start of the last committed backup
    agent/jobs/JOB.json        running job, failures by cause (the records kept keep_jobs_days),
                               failures since the last success, duration of the last job
    the store (newest manifest of each disk, as `ekko status` reads it): per disk the kind and
                               reason, duration, bytes read / stored, segments reused
    agent/lifecycle.json       the last gc and verify: per store namespace (`project`) their
                               outcome, segments and manifests seen, deleted, damaged
    the scheduler's policy     the backup interval of each scheduled domain (for "no backup
                               within 2 x the interval": packaging/ekko-alerts.yml)

Labels: `domain` (libvirt name) and `uuid` on every domain and disk series; `disk` (target dev,
vda) and `target` (`<domain>.<disk>`, the store's name) on disk series; `project` ("default" for
the store's root namespace) on store series. Timestamps are Unix seconds.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .state import ChainStatus, DomainState, JobRecord, JobStatus

Labels = Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    labels: Labels
    value: float


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    samples: Tuple[Sample, ...]
    kind: str = "gauge"


@dataclass(frozen=True)
class DomainFacts:
    uuid: str
    name: str
    state: Optional[DomainState]
    jobs: Tuple[JobRecord, ...] = ()            # its job records, oldest first
    heads: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # disk -> newest manifest header
    interval_s: Optional[int] = None            # None: no scheduled backups
    job_running: bool = False


@dataclass(frozen=True)
class AgentFacts:
    started_ns: int
    libvirt_connected: bool
    max_concurrent: int
    jobs_running: int
    spool_waiting: Optional[int] = None
    spool_quarantined: Optional[int] = None
    hook_ok: Optional[bool] = None
    collected_ns: int = 0
    collect_errors: int = 0                     # facts that could not be read since the agent started
    sync_interval_s: Optional[int] = None       # agent.sync.interval (None: no scheduled sync)


def _s(ns: Optional[int]) -> Optional[float]:
    return ns / 1e9 if ns else None


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


class _Builder:
    """Families in the order they were first named; samples with a value of None are left out."""

    def __init__(self) -> None:
        self.fams: Dict[str, Tuple[str, str, List[Sample]]] = {}

    def add(self, name: str, help_: str, labels: Mapping[str, str], value: Optional[float],
            kind: str = "gauge") -> None:
        fam = self.fams.setdefault(name, (help_, kind, []))
        if value is not None:
            fam[2].append(Sample(tuple(labels.items()), float(value)))

    def families(self) -> List[Family]:
        return [Family(n, h, tuple(s), k) for n, (h, k, s) in self.fams.items()]


def families(domains: Iterable[DomainFacts], lifecycle: Mapping[str, Any], agent: AgentFacts) -> List[Family]:
    b = _Builder()
    _agent(b, agent)
    for d in sorted(domains, key=lambda d: (d.name, d.uuid)):
        _domain(b, d)
        for dev, header in sorted(d.heads.items()):
            _disk(b, d, dev, header)
    for task in ("gc", "verify", "sync"):
        rec = lifecycle.get(task)
        if isinstance(rec, Mapping):
            _task(b, task, rec)
    b.add("ekko_sync_interval_seconds", "agent.sync.interval: how often the agent replicates (absent: it does "
          "not)", {}, agent.sync_interval_s)
    return b.families()


def _agent(b: _Builder, a: AgentFacts) -> None:
    b.add("ekko_agent_up", "1 while the agent runs (these metrics are its own)", {}, 1)
    b.add("ekko_agent_start_time_seconds", "when the agent started", {}, _s(a.started_ns))
    b.add("ekko_agent_libvirt_connected", "1 if the agent is connected to libvirt", {}, int(a.libvirt_connected))
    b.add("ekko_agent_jobs_running", "backup jobs running now", {}, a.jobs_running)
    b.add("ekko_agent_max_concurrent", "agent.max_concurrent: backups that may run at once", {}, a.max_concurrent)
    b.add("ekko_agent_spool_events_waiting", "hook events in the spool not yet taken in", {}, a.spool_waiting)
    b.add("ekko_agent_spool_events_quarantined", "hook events the agent could not read (spool/bad/)", {},
          a.spool_quarantined)
    b.add("ekko_agent_hook_ok", "1 if the libvirt hook is installed and can load its rule file (0: events are lost)",
          {}, None if a.hook_ok is None else int(a.hook_ok))
    b.add("ekko_agent_metrics_collected_timestamp_seconds", "when these figures were gathered", {},
          _s(a.collected_ns))
    b.add("ekko_agent_metrics_collect_errors_total", "figures that could not be gathered (a store that did not "
          "answer, an unreadable record) since the agent started", {}, a.collect_errors, kind="counter")


def _domain(b: _Builder, d: DomainFacts) -> None:
    lab = {"domain": d.name, "uuid": d.uuid}
    chain = d.state.chain if d.state is not None else None
    status = chain.status if chain is not None else ChainStatus.NONE
    for s in ChainStatus:
        b.add("ekko_domain_chain_state", "1 for the chain state the domain is in: ok, none (no backup yet), "
              "check-required, full-required (the chain is broken: the next backup is a full)",
              dict(lab, state=s.value), int(s is status))
    b.add("ekko_domain_chain_info", "the chain state and why (reason empty when ok)",
          dict(lab, state=status.value, reason=chain.reason if chain is not None else ""), 1)
    b.add("ekko_domain_last_success_timestamp_seconds", "start of the domain's last committed backup (absent: "
          "none yet)", lab, _s(chain.last_backup_ns) if chain is not None else None)
    b.add("ekko_domain_last_full_timestamp_seconds", "start of the domain's last committed full backup", lab,
          _s(chain.last_full_ns) if chain is not None else None)
    b.add("ekko_domain_backup_interval_seconds", "the scheduled interval between backups (absent: not scheduled)",
          lab, d.interval_s)
    b.add("ekko_domain_backup_running", "1 while a backup job of the domain runs", lab, int(d.job_running))
    _jobs(b, lab, d.jobs)


def _jobs(b: _Builder, lab: Dict[str, str], jobs: Sequence[JobRecord]) -> None:
    failed = [j for j in jobs if j.status in (JobStatus.FAILED, JobStatus.ABANDONED)]
    causes: Dict[str, int] = {}
    for j in failed:
        cause = j.cause or ("abandoned" if j.status is JobStatus.ABANDONED else "unknown")
        causes[cause] = causes.get(cause, 0) + 1
    for cause, n in sorted(causes.items()):
        b.add("ekko_domain_backup_failures", "failed backup jobs among those recorded (agent.keep_jobs_days), by "
              "cause", dict(lab, cause=cause), n)
    since_ok = 0
    for j in reversed(jobs):
        if j.status is JobStatus.SUCCEEDED:
            break
        if j in failed:
            since_ok += 1
    b.add("ekko_domain_backup_failures_since_success", "failed backup jobs since the last one that succeeded",
          lab, since_ok)
    last_fail = failed[-1] if failed else None
    b.add("ekko_domain_last_failure_timestamp_seconds", "when the last failed backup job ended", lab,
          _s(last_fail.updated_ns) if last_fail else None)
    ok = [j for j in jobs if j.status is JobStatus.SUCCEEDED]
    b.add("ekko_domain_last_backup_duration_seconds", "duration of the last backup job that succeeded (every disk)",
          lab, (ok[-1].updated_ns - ok[-1].started_ns) / 1e9 if ok else None)
    b.add("ekko_domain_last_backup_bytes", "bytes the last successful job read or found zero (its progress "
          "total: every disk's size)", lab, ok[-1].bytes_total if ok else None)


def _disk(b: _Builder, d: DomainFacts, dev: str, h: Mapping[str, Any]) -> None:
    lab = {"domain": d.name, "uuid": d.uuid, "disk": dev, "target": str(h.get("target", ""))}
    timings = _mapping(h.get("timings"))
    counts = _mapping(h.get("counts"))
    kind = str(h.get("kind", ""))
    b.add("ekko_disk_last_backup_info", "the disk's newest backup in the store: id, kind (full | incremental) and "
          "why that kind", dict(lab, backup_id=str(h.get("backup_id", "")), kind=kind,
                                reason=str(h.get("reason", ""))), 1)
    b.add("ekko_disk_last_backup_full", "1 if the disk's newest backup is a full", lab, int(kind == "full"))
    b.add("ekko_disk_last_backup_timestamp_seconds", "when the disk's newest backup finished", lab,
          _num(timings.get("finished")))
    b.add("ekko_disk_last_backup_duration_seconds", "how long the disk's newest backup took", lab,
          _num(timings.get("seconds")))
    b.add("ekko_disk_last_backup_read_bytes", "bytes the disk's newest backup read from the disk", lab,
          _num(counts.get("read_bytes")))
    b.add("ekko_disk_last_backup_stored_bytes", "bytes the disk's newest backup added to the store (compressed)",
          lab, _num(counts.get("stored_bytes")))
    b.add("ekko_disk_last_backup_new_segments", "segments the disk's newest backup stored", lab,
          _num(counts.get("new_segments")))
    reused = _num(counts.get("reused_segments"))
    b.add("ekko_disk_last_backup_reused_segments", "segments the disk's newest backup read and found already in "
          "the store (deduplicated)", lab, reused)
    seg = _num(h.get("segment_size"))
    b.add("ekko_disk_last_backup_reused_bytes", "reused segments x the segment size (the disk's short last "
          "segment counted whole)", lab, reused * seg if reused is not None and seg is not None else None)
    b.add("ekko_disk_size_bytes", "the disk's virtual size at its newest backup", lab, _num(h.get("virtual_size")))


_STORE_FIGURES = {
    "gc": (("manifests", "ekko_store_manifests", "manifests in the store namespace at the last gc"),
           ("segments", "ekko_store_segments", "segment objects in the store namespace at the last gc"),
           ("unreferenced", "ekko_store_gc_unreferenced_segments", "segments no manifest named at the last gc"),
           ("deleted", "ekko_store_gc_deleted_segments", "segments the last gc deleted"),
           ("deleted_bytes", "ekko_store_gc_deleted_bytes", "bytes the last gc deleted"),
           ("kept_young", "ekko_store_gc_kept_young_segments", "unreferenced segments the last gc kept (younger "
                                                                "than the grace period)")),
    "verify": (("backups", "ekko_store_verify_backups", "backups the last verify checked"),
               ("segments_checked", "ekko_store_verify_segments_checked", "segments the last verify checked"),
               ("damaged_segments", "ekko_store_damaged_segments", "segments the last verify found missing or "
                                                                   "damaged"),
               ("damaged_backups", "ekko_store_damaged_backups", "backups using a segment the last verify found "
                                                                 "missing or damaged"),
               ("bad_manifests", "ekko_store_bad_manifests", "manifests the last verify could not read")),
}


def _task(b: _Builder, task: str, rec: Mapping[str, Any]) -> None:
    """The agent's last gc or verify run (maintenance.py's record)."""
    b.add(f"ekko_{task}_last_run_timestamp_seconds", f"when the agent's last {task} started", {},
          _s(rec.get("started_ns")) if isinstance(rec.get("started_ns"), int) else None)
    b.add(f"ekko_{task}_last_run_duration_seconds", f"how long the agent's last {task} took", {},
          _num(rec.get("seconds")))
    b.add(f"ekko_{task}_last_run_ok", f"1 if the agent's last {task} succeeded on every store namespace"
          + (" and found no damage" if task == "verify" else ""), {}, int(rec.get("ok") is True))
    if task == "sync":
        _sync(b, rec)
        return
    for st in rec.get("stores") or ():
        if not isinstance(st, Mapping):
            continue
        lab = {"project": str(st.get("project") or "default")}
        b.add(f"ekko_store_{task}_ok", f"1 if the agent's last {task} of this store namespace succeeded"
              + (" and found no damage" if task == "verify" else ""), lab, int(st.get("ok") is True))
        for key, name, help_ in _STORE_FIGURES[task]:
            v = st.get(key)
            b.add(name, help_, lab, float(len(v)) if isinstance(v, (list, tuple)) else _num(v))


def _sync(b: _Builder, rec: Mapping[str, Any]) -> None:
    """The agent's last sync, per destination store (maintenance.run_sync's record)."""
    for d in rec.get("stores") or ():
        if not isinstance(d, Mapping) or not isinstance(d.get("dest"), str):
            continue
        lab = {"dest": d["dest"]}
        last = d.get("last_complete_ns")
        b.add("ekko_sync_last_complete_timestamp_seconds", "start of the last sync after which the destination "
              "held every backup of the source (its lag: time() minus this)", lab,
              _s(last) if isinstance(last, int) else None)
        b.add("ekko_sync_ok", "1 if the last sync to the destination copied every backup it lacked", lab,
              int(d.get("ok") is True))
        b.add("ekko_sync_backups_copied", "backups the last sync copied to the destination", lab,
              _num(d.get("copied")))
        failed = d.get("failed")
        b.add("ekko_sync_backups_not_copied", "backups the last sync could not copy (damaged or missing segments "
              "at the source)", lab, float(len(failed)) if isinstance(failed, list) else None)
        b.add("ekko_sync_bytes_copied", "bytes (as stored) the last sync copied to the destination", lab,
              _num(d.get("bytes_copied")))

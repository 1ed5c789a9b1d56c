"""The agent's backup jobs: settling what interrupted jobs left, starting the due backups in worker
threads, backing off after failures, and cancelling.

    recover_at_start   jobs whose process died marked ABANDONED (StateDir.recover_stale_jobs) and,
                       with every domain that has a libvirt job record, queued for settling
    check_stale        the same every STALE_CHECK_S for processes that die while the agent runs
                       (a killed `ekko backup`)
    settle             for each queued domain the engine's recovery: abort a libvirt backup job no
                       live process owns, delete its new checkpoint -- before any new backup of it
    start_due          scheduler.plan over every domain libvirt knows; due ones start in worker
                       threads (jobs.run_recorded_backup), at most max_concurrent, never two on one
                       domain (the domain lock); `after_commit` runs in the worker once a backup
                       committed (the agent wires it to retention)
    reap               finished workers: a failure backs off (scheduler.retry_delay_s), a domain
                       another process was backing up is looked at again after BUSY_RETRY_S
    cancel             a job ends at its next segment through its normal failure path (new
                       checkpoint deleted / bitmap generation merged back), nothing committed

Only the agent's loop thread calls these; a worker thread changes nothing here but its own Worker.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from .. import units
from ..backup.options import BackupResult, options_from_config
from ..config import Config
from ..errors import EkkoError, LockBusy
from ..store.base import Store
from .jobs import JobCancelled, run_recorded_backup
from .scheduler import Decision, Policy, plan, retry_delay_s
from .settings import AgentSettings
from .state import DomainState, StateDir, seed_chain
from .status import domain_heads, domain_status, newest_head

log = logging.getLogger("ekko.agent")

STALE_CHECK_S = 30          # how often jobs of dead processes (e.g. a killed `ekko backup`) are looked for
BUSY_RETRY_S = 30           # a domain another process was backing up is looked at again after this

OpenStore = Callable[[Optional[str]], Store]
AfterCommit = Callable[[str, str, List[BackupResult]], None]       # (uuid, name, results)


@dataclass
class Worker:
    uuid: str
    name: str
    interval_s: int
    cancel: threading.Event = field(default_factory=threading.Event)
    started_ns: int = field(default_factory=time.time_ns)
    thread: Optional[threading.Thread] = None
    outcome: str = "running"      # running | ok | busy | failed | cancelled
    force_full: bool = False
    bus_job: Optional[str] = None     # the API's job id of a backup-now request (agent.bus)
    backup_id: Optional[str] = None   # what it committed
    error: Optional[str] = None       # why it did not


OnFinished = Callable[[Worker], None]      # a reaped worker (the agent reports bus jobs with it)


def bitmap_prefix(cfg: Config, name: str, uuid: str) -> str:
    """The checkpoint name prefix of a domain: its libvirt target's, else the default."""
    for t in cfg.targets:
        if t.engine == "libvirt" and t.domain in (name, uuid):
            return t.bitmap_prefix
    return units.DEFAULT_BITMAP_PREFIX


class JobRunner:
    def __init__(self, cfg: Config, settings: AgentSettings, uri: str, sd: StateDir, open_store: OpenStore,
                 wakeup: threading.Event, stopping: threading.Event, after_commit: AfterCommit,
                 on_finished: Optional[OnFinished] = None):
        self.cfg = cfg
        self.settings = settings            # replaced as a whole on SIGHUP (Agent.settings)
        self.uri = uri
        self.sd = sd
        self.open_store = open_store
        self.wakeup = wakeup                # set by a worker when it ends: the loop reaps it at once
        self.stopping = stopping
        self.after_commit = after_commit
        self.on_finished = on_finished
        self.workers: Dict[str, Worker] = {}
        self.to_settle: Set[str] = set()
        self.failures: Dict[str, int] = {}
        self.retry_at: Dict[str, float] = {}
        self.seeded: Set[str] = set()
        self.last_stale_check = 0.0

    # -- what dead jobs left --------------------------------------------------------------------------
    def recover_at_start(self) -> None:
        """Before any new backup: what a dead agent (or `ekko backup`) left is queued for settling."""
        for job in self.sd.recover_stale_jobs():
            log.warning("job %s of domain %s was running when its process %d ended: marked abandoned; "
                        "settling what it left in libvirt", job.job_id, job.uuid, job.pid)
            self.to_settle.add(job.uuid)
        self.reconcile_with_libvirt()
        self.sd.prune_jobs(time.time_ns() - self.settings.keep_jobs_days * 86400 * 10**9)
        self.last_stale_check = time.monotonic()

    def reconcile_with_libvirt(self) -> None:
        """Queue every domain with a libvirt job record: at start, and after libvirtd restarted
        (its backup jobs may have ended or been orphaned meanwhile)."""
        from ..engine.libvirt import CheckpointState
        self.to_settle |= set(CheckpointState(self.cfg.state_dir).job_uuids())

    def settle_later(self, uuids: Iterable[str]) -> None:
        self.to_settle |= set(uuids)

    def check_stale(self) -> None:
        if time.monotonic() - self.last_stale_check <= STALE_CHECK_S:
            return
        self.last_stale_check = time.monotonic()
        for job in self.sd.recover_stale_jobs():
            log.warning("job %s of domain %s: its process %d is gone: marked abandoned", job.job_id, job.uuid,
                        job.pid)
            self.to_settle.add(job.uuid)

    def settle(self, conn: Any) -> None:
        """`conn`: the agent's libvirt connection, None while libvirt is not reachable (then the
        queue waits)."""
        if conn is None:
            return
        for uuid in sorted(self.to_settle):
            if self._settle_one(conn, uuid):
                self.to_settle.discard(uuid)

    def _settle_one(self, conn: Any, uuid: str) -> bool:
        """The engine's recovery for one domain: abort a libvirt backup job no live process owns,
        delete its new checkpoint, forget the old one's metadata. -> False: try again later."""
        import libvirt
        from ..engine.libvirt import Checkpoints, CheckpointState
        from ..backup.transaction import TargetLock
        if uuid in self.workers:
            return True                   # our own job runs there: nothing is stale
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            log.info("domain %s is not defined here (any more): nothing to settle", uuid)
            return True
        try:
            with TargetLock(os.path.join(self.cfg.state_dir, "locks"), f"domain-{dom.UUIDString()}"):
                notes = Checkpoints(dom, CheckpointState(self.cfg.state_dir),
                                    bitmap_prefix(self.cfg, dom.name(), uuid)).recover_job()
        except LockBusy:
            return True                   # a live `ekko backup` owns it, and settles it itself
        except (libvirt.libvirtError, EkkoError) as e:
            msg = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
            log.warning("%s: cannot settle the interrupted backup yet: %s", dom.name(), msg)
            return False
        for n in notes:
            log.warning("%s: %s", dom.name(), n)
        return True

    # -- starting the due backups ---------------------------------------------------------------------
    def start_due(self, conn: Any) -> float:
        """Start the backups that are due now. -> seconds until one may be due."""
        import libvirt
        poll = self.settings.poll_interval_s
        if conn is None or self.stopping.is_set():
            return poll
        try:
            doms = conn.listAllDomains()
            active = {d.UUIDString().lower() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        except libvirt.libvirtError as e:
            log.warning("cannot list the domains: %s", e.get_error_message())
            return poll
        now = datetime.now().astimezone()
        names, statuses, mono = {}, [], time.monotonic()
        for d in doms:
            uuid = d.UUIDString().lower()
            names[uuid] = d.name()
            if self.retry_at.get(uuid, 0) > mono:
                continue          # its last backups failed: backing off
            st = self.sd.load_domain(uuid)
            if (st is None or st.chain.last_backup_id is None) and uuid not in self.seeded:
                st = self._seed(uuid, d) or st
            running = uuid in self.workers or (st is not None and st.job_id is not None)
            statuses.append(domain_status(uuid, st, uuid in active, running))
        p = plan(now, statuses, self.settings.schedule, self.settings.overrides(names.items()),
                 self.settings.max_concurrent)
        for dec in p.start:
            self._start_worker(dec, names[dec.uuid])
        waits = [poll]
        if p.next_wakeup is not None:
            waits.append((p.next_wakeup - now).total_seconds())
        waits += [t - mono for t in self.retry_at.values() if t > mono]
        return max(0.05, min(waits))

    def _seed(self, uuid: str, dom: Any) -> Optional[DomainState]:
        """Learn the last backup of a domain the state does not know from the store (once), so
        that a new agent on a host with backups does not start with a full of every domain."""
        import libvirt
        self.seeded.add(uuid)
        try:
            seen = newest_head(domain_heads(dom.XMLDesc(0), self.open_store))
        except (libvirt.libvirtError, EkkoError) as e:
            log.warning("%s: cannot look up its backups in the store: %s", dom.name(), e)
            return None
        if seen is None:
            return None
        log.info("%s: last backup %s found in the store", dom.name(), seen[0])
        return self.sd.update_domain(uuid, lambda s: seed_chain(s, *seen))

    def _start_worker(self, dec: Decision, name: str) -> None:
        log.info("%s: scheduled backup starts (%s)", name, dec.why.value)
        self._launch(Worker(dec.uuid, name, dec.policy.interval_s), dec.policy)

    def _launch(self, w: Worker, policy: Policy) -> None:
        w.thread = threading.Thread(target=self._run_job, args=(w, policy), name=f"ekko-job-{w.name}", daemon=True)
        self.workers[w.uuid] = w
        w.thread.start()

    def start_now(self, conn: Any, uuid: str, force_full: bool, bus_job: str) -> Optional[str]:
        """A backup asked for now (the API's backup-now, agent.bus): the same worker as a scheduled
        one, outside the schedule and its max_concurrent (someone asked and waits for it).
        -> None when it started, else why not (the job fails with that)."""
        import libvirt
        if self.stopping.is_set():
            return "the agent is stopping"
        if conn is None:
            return f"libvirt at {self.uri} is not reachable from the agent"
        if uuid in self.workers:
            return f"a backup of domain {uuid} is already running on this host"
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return f"no domain {uuid} on this host"
        name = dom.name()
        policy = self.settings.schedule.merged(self.settings.overrides([(uuid, name)]).get(uuid))
        log.info("%s: backup-now %s starts%s", name, bus_job, " (full)" if force_full else "")
        self._launch(Worker(uuid, name, policy.interval_s, force_full=force_full, bus_job=bus_job), policy)
        return None

    def _run_job(self, w: Worker, policy: Policy) -> None:          # the worker thread
        import libvirt
        from ..backup.domain import DomainBackupRequest, run_domain_backup
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            log.error("%s: backup not started: libvirt at %s: %s", w.name, self.uri, e.get_error_message())
            w.outcome, w.error = "failed", f"libvirt at {self.uri}: {e.get_error_message()}"
            self.wakeup.set()
            return
        try:
            base = options_from_config(self.cfg, w.name, bitmap_prefix(self.cfg, w.name, w.uuid))

            def run(c: Any, req: DomainBackupRequest, progress: Callable[[int, int], None]) -> List[BackupResult]:
                return run_domain_backup(c, req, self.open_store, base, self.cfg.state_dir, self.cfg.run_dir,
                                         progress=progress, hold_offline_start=self.sd.offline_backup)
            req = DomainBackupRequest(w.uuid, tuple(policy.disks or ()), force_full=w.force_full)
            results = run_recorded_backup(self.sd, conn, req, run, cancel=w.cancel)
            w.backup_id = results[0].manifest.backup_id if results else None
            w.outcome = "ok"
            log.info("%s: backup %s committed: %s", w.name, results[0].manifest.backup_id if results else "-",
                     ", ".join(f"{r.manifest.disk.get('node')} {r.manifest.kind}" for r in results))
            self.after_commit(w.uuid, w.name, results)
        except LockBusy as e:        # DomainBusy (the agent's lock) or another ekko's backup lock
            w.outcome, w.error = "busy", str(e)
            log.info("%s: %s", w.name, e)
        except JobCancelled as e:
            w.outcome, w.error = "cancelled", str(e)
            log.warning("%s: %s; nothing was committed", w.name, e)
        except EkkoError as e:
            w.outcome, w.error = "failed", str(e)
            log.error("%s: backup failed: %s", w.name, e)
        except Exception as e:   # noqa: BLE001 -- one domain's bug must not take the agent down
            w.outcome, w.error = "failed", f"internal error: {type(e).__name__}: {e}"
            log.exception("%s: backup failed", w.name)
        finally:
            try:
                conn.close()
            except Exception:   # noqa: BLE001
                pass
            self.wakeup.set()

    # -- finished, cancelled --------------------------------------------------------------------------
    def reap(self) -> None:
        for uuid, w in list(self.workers.items()):
            if w.thread is not None and w.thread.is_alive():
                continue
            del self.workers[uuid]
            if w.outcome == "failed":
                n = self.failures[uuid] = self.failures.get(uuid, 0) + 1
                delay = retry_delay_s(n, w.interval_s)
                self.retry_at[uuid] = time.monotonic() + delay
                log.warning("%s: %d failed backup(s) in a row: next try in %d s", w.name, n, delay)
            elif w.outcome == "busy":          # someone else backs it up: look again a little later
                self.retry_at[uuid] = time.monotonic() + BUSY_RETRY_S
            elif w.outcome == "ok":
                self.failures.pop(uuid, None)
                self.retry_at.pop(uuid, None)
            if self.on_finished is not None:
                self.on_finished(w)

    def reset_backoff(self) -> None:
        """A new schedule (SIGHUP) applies at once, also to domains that were backing off."""
        self.retry_at.clear()

    def cancel(self, uuid: str, happened_ns: int) -> bool:
        """Cancel the domain's running backup because of something that happened at `happened_ns`
        (wall clock); an event from before the job started says nothing about it. -> cancelled."""
        w = self.workers.get(uuid)
        if w is None or happened_ns < w.started_ns:
            return False
        w.cancel.set()
        return True

    def cancel_all(self) -> None:
        for w in self.workers.values():
            w.cancel.set()

    def wait(self, deadline: float) -> List[str]:
        """Join the workers until `deadline` (time.monotonic). -> names of those still running."""
        running = []
        for w in list(self.workers.values()):
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
                if w.thread.is_alive():
                    running.append(w.name)
        return running

"""`ekko agent`: the host daemon. Hook events and libvirt's domain events in, backup jobs out.

    main        load settings (fail fast) -> signals -> start -> loop -> finally stop
    start       settle what a dead agent left: stale jobs marked ABANDONED (state.recover_stale_jobs),
                and for every domain with a stale libvirt job the engine's recovery (abort the job,
                delete its new checkpoint) -- before any new backup; then the events the hook kept
                in the spool while the agent was down; READY=1 to systemd
    loop        every poll_interval, or at once when a signal, a libvirt event or a finished job
                wakes it:
                  connection    (re)connect to libvirt; after libvirtd restarted: reconcile
                  spool         hook events, in order, through events.decide / state.apply_event
                                (an event older than the state changes only what it is newer than);
                                at start, events an older agent quarantined that the current rule
                                accepts are moved back from bad/ first
                  libvirt       lifecycle events (events.lifecycle_reactions): QEMU died -> full
                  reconcile     domains whose libvirtd reconnected, or that have a libvirt job
                                record no live job owns: the engine's recovery
                  scheduler     scheduler.plan over every domain libvirt knows; due ones start in
                                worker threads (jobs.run_recorded_backup), at most max_concurrent,
                                never two on one domain (the domain lock); failures back off
                  lifecycle     after a scheduled backup committed: the domain's retention policy on
                                its disks' targets (maintenance.prune_domain, under the domain lock);
                                gc and verify when scheduler.tasks_plan says they are due, in one
                                thread, one after the other; outcomes in agent/lifecycle.json
    stop        SIGTERM/SIGINT: running jobs are cancelled at their next segment and end through
                their normal failure path (new checkpoint deleted / bitmap generation merged back);
                after STOP_GRACE_S the agent exits anyway and its next start settles the rest
    SIGHUP      reload the schedule, per-domain overrides, retention, gc/verify intervals and agent
                limits from the config file

The decisions are in the pure modules (events, scheduler, state, settings); this one does the I/O.
"""

import dataclasses
import fcntl
import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, Optional, Set

from .. import config as config_mod
from ..errors import EkkoError, LockBusy
from .events import EFFECTS, Action, lifecycle_reactions
from ..backup.options import options_from_config
from .jobs import JobCancelled, run_recorded_backup
from . import maintenance
from .scheduler import TaskRun, plan, retry_delay_s, tasks_plan
from .settings import AgentSettings
from .spool import Spool
from ..procs import process_start_ticks
from .state import StateDir, apply_lifecycle, seed_chain, write_json_atomic
from .status import domain_heads, domain_status, last_task_runs, newest_head

log = logging.getLogger("ekko.agent")

STOP_GRACE_S = 100          # below the systemd unit's TimeoutStopSec=120
STALE_CHECK_S = 30          # how often jobs of dead processes (e.g. a killed `ekko backup`) are looked for
RECONNECT_S = 2.0
BUSY_RETRY_S = 30           # a domain another process was backing up is looked at again after this


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about READY=1 / STOPPING=1; nothing without $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", state, e)


class EventLoop:
    """libvirt's default event loop, run in a daemon thread: domain events, keepalive and the
    close callback need it. Registered once per process, before the first connection."""

    def __init__(self):
        import libvirt
        self.libvirt = libvirt
        libvirt.virEventRegisterDefaultImpl()
        libvirt.virEventAddTimeout(500, lambda _t, _o: None, None)     # so the loop sees `stopping`
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ekko-libvirt-events", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            if self.libvirt.virEventRunDefaultImpl() < 0:
                time.sleep(0.1)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(2)


@dataclass
class Worker:
    uuid: str
    name: str
    interval_s: int
    cancel: threading.Event = field(default_factory=threading.Event)
    started_ns: int = field(default_factory=time.time_ns)
    thread: Optional[threading.Thread] = None
    outcome: str = "running"      # running | ok | busy | failed | cancelled


class Agent:
    def __init__(self, cfg, settings: AgentSettings, uri: str, config_path: Optional[str] = None):
        self.cfg = cfg
        self.settings = settings
        self.uri = uri
        self.config_path = config_path
        self.sd = StateDir(cfg.state_dir)
        self.spool = Spool(settings.spool_dir)
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.reload_requested = False
        self.conn = None
        self.conn_lost = False
        self.ever_connected = False
        self.next_connect = 0.0
        self.workers: Dict[str, Worker] = {}
        self.lifecycle: "queue.SimpleQueue" = queue.SimpleQueue()
        self.to_settle: Set[str] = set()
        self.failures: Dict[str, int] = {}
        self.retry_at: Dict[str, float] = {}
        self.seeded: Set[str] = set()
        self.last_stale_check = 0.0
        self.loop: Optional[EventLoop] = None
        self._stores: Dict = {}
        self._stores_lock = threading.Lock()
        self._lock_fd = -1
        self.tasks_thread: Optional[threading.Thread] = None     # gc / verify, one after the other
        self.task_runs: Dict[str, TaskRun] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        from ..engine.libvirt import CheckpointState
        self.sd.ensure()
        self._single_instance()
        self.spool.ensure()
        self.spool.cleanup_tmp()
        back = self.spool.requeue_bad()
        if back:
            log.warning("%d hook event(s) quarantined by an earlier agent are valid events: moved back from %s "
                        "and processed in time order (an event older than the state changes only what it "
                        "is newer than)", len(back), self.spool.bad_dir)
        for job in self.sd.recover_stale_jobs():
            log.warning("job %s of domain %s was running when its process %d ended: marked abandoned; "
                        "settling what it left in libvirt", job.job_id, job.uuid, job.pid)
            self.to_settle.add(job.uuid)
        self.to_settle |= set(CheckpointState(self.cfg.state_dir).job_uuids())
        self.sd.prune_jobs(time.time_ns() - self.settings.keep_jobs_days * 86400 * 10**9)
        self.task_runs = last_task_runs(self.sd.load_lifecycle())     # a restart does not rerun gc/verify
        self.last_stale_check = time.monotonic()
        write_json_atomic(self.pid_path, {"pid": os.getpid(), "pid_start": process_start_ticks(os.getpid()),
                                          "started_ns": time.time_ns(), "uri": self.uri,
                                          "spool_dir": self.settings.spool_dir})
        self.loop = EventLoop()
        self._connect()
        self._settle()            # before any new backup
        self._drain()             # what the hook kept while the agent was down
        log.info("agent ready: libvirt %s (%s), spool %s, state %s, at most %d backup(s) at once",
                 self.uri, "connected" if self.conn is not None else "not reachable yet", self.settings.spool_dir,
                 self.cfg.state_dir, self.settings.max_concurrent)
        sd_notify("READY=1")

    def _single_instance(self) -> None:
        """One agent per state directory: an flock held for the life of the process."""
        path = os.path.join(self.sd.locks_dir, "agent.lock")
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise LockBusy(f"another ekko agent runs on {self.cfg.state_dir} ({self.pid_path}): "
                           "not starting a second one") from None

    @property
    def pid_path(self) -> str:
        return os.path.join(self.cfg.state_dir, "agent", "agent.json")

    def run(self) -> None:
        while not self.stopping.is_set():
            self.wakeup.clear()          # before the round: a wake-up during it starts the next one at once
            try:
                timeout = self.tick()
            except Exception:   # noqa: BLE001 -- logged; the agent keeps serving the other domains
                log.exception("agent loop")
                timeout = self.settings.poll_interval_s
            self.wakeup.wait(timeout)

    def tick(self) -> float:
        """One round of the loop. -> seconds until the next one is needed."""
        if self.reload_requested:
            self._reload()
        self._connect()
        self._drain()
        self._lifecycle_events()
        self._reap()
        if time.monotonic() - self.last_stale_check > STALE_CHECK_S:
            self.last_stale_check = time.monotonic()
            for job in self.sd.recover_stale_jobs():
                log.warning("job %s of domain %s: its process %d is gone: marked abandoned", job.job_id, job.uuid,
                            job.pid)
                self.to_settle.add(job.uuid)
        self._settle()
        return min(self._schedule(), self._maintain())

    def request_stop(self, why: str) -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping (running backups are cancelled)", why)
        self.stopping.set()
        self.wakeup.set()

    def request_reload(self) -> None:
        self.reload_requested = True
        self.wakeup.set()

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        workers = list(self.workers.values())
        for w in workers:
            w.cancel.set()
        deadline = time.monotonic() + STOP_GRACE_S
        for w in workers:
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
                if w.thread.is_alive():
                    log.error("%s: backup still running after %d s: exiting anyway; the next agent start "
                              "settles it", w.name, STOP_GRACE_S)
        if self.tasks_thread is not None:
            self.tasks_thread.join(max(0.0, deadline - time.monotonic()))
            if self.tasks_thread.is_alive():
                log.error("gc/verify still running after %d s: exiting anyway", STOP_GRACE_S)
        self._drop_conn()
        if self.loop is not None:
            self.loop.stop()
        if self._lock_fd >= 0:
            try:
                os.unlink(self.pid_path)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1
        log.info("agent stopped")

    def _reload(self) -> None:
        self.reload_requested = False
        try:
            new = AgentSettings.from_config(config_mod.load(self.config_path))
        except EkkoError as e:
            log.error("SIGHUP: config not reloaded, keeping the old one: %s", e)
            return
        if (new.spool_dir, new.hook_path) != (self.settings.spool_dir, self.settings.hook_path):
            log.warning("SIGHUP: agent.spool_dir / agent.hook_path changes need a restart")
        self.settings = dataclasses.replace(new, spool_dir=self.settings.spool_dir)
        self.retry_at.clear()
        log.info("SIGHUP: schedule, domain overrides, retention, gc/verify intervals and agent limits reloaded")

    # -- libvirt connection and its events --------------------------------------------------------
    def _connect(self) -> None:
        import libvirt
        if self.conn is not None:
            if not self.conn_lost and self.conn.isAlive():
                return
            log.warning("lost the connection to libvirt at %s (libvirtd restarted?): reconnecting", self.uri)
            self._drop_conn()
        if time.monotonic() < self.next_connect:
            return
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            self.next_connect = time.monotonic() + RECONNECT_S
            log.debug("libvirt at %s not reachable: %s", self.uri, e.get_error_message())
            return
        try:
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._on_close, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        except libvirt.libvirtError as e:
            log.warning("libvirt at %s: cannot subscribe to domain events: %s", self.uri, e.get_error_message())
            conn.close()
            self.next_connect = time.monotonic() + RECONNECT_S
            return
        self.conn, self.conn_lost = conn, False
        if self.ever_connected:
            from ..engine.libvirt import CheckpointState
            log.info("reconnected to libvirt at %s: reconciling jobs with it", self.uri)
            self.to_settle |= set(CheckpointState(self.cfg.state_dir).job_uuids())
        self.ever_connected = True

    def _drop_conn(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        for step in (conn.unregisterCloseCallback, conn.close):
            try:
                step()
            except Exception as e:   # noqa: BLE001 -- a dead connection fails every call; it goes anyway
                log.debug("closing the libvirt connection: %s", e)

    def _on_close(self, _conn, reason, _opaque) -> None:      # libvirt's event thread
        self.conn_lost = True
        self.wakeup.set()

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque) -> None:      # libvirt's event thread
        self.lifecycle.put((dom.UUIDString().lower(), dom.name(), event, detail))
        self.wakeup.set()

    def _lifecycle_events(self) -> None:
        while True:
            try:
                uuid, name, event, detail = self.lifecycle.get_nowait()
            except queue.Empty:
                return
            reactions = lifecycle_reactions(event, detail)
            if reactions:
                self.sd.update_domain(uuid, lambda s: apply_lifecycle(s, reactions))
                for r in reactions:
                    if r.action is Action.REQUIRE_FULL:
                        log.warning("%s: %s: its next backup is a full", name, r.reason)

    # -- hook events ------------------------------------------------------------------------------
    def _drain(self) -> None:
        res = self.spool.drain(self.handle_event)
        for name in res.quarantined:
            log.warning("malformed hook event %s moved to %s", name, self.spool.bad_dir)
        if res.error is not None:
            log.error("hook event %s not processed (kept, tried again): %s", res.stopped_at, res.error)

    def handle_event(self, ev) -> None:
        for note in ev.notes:
            log.warning("hook event %s %s %s (%s): %s", ev.domain, ev.op, ev.subop, ev.wall_ns, note)
        st, reactions = self.sd.apply_event(ev, shared_storage=self.settings.shared_storage)
        log.debug("hook event %s %s %s: %s", ev.domain, ev.op, ev.subop, ", ".join(r.action.value for r in reactions))
        for r in reactions:
            if r.action is Action.REQUIRE_FULL:
                log.warning("%s: %s: its next backup is a full", ev.domain, r.reason)
            if r.action not in EFFECTS:
                continue
            if r.action is Action.RECONCILE:
                self.to_settle.add(ev.uuid)
            elif r.action is Action.CHECK_CHAIN:
                log.info("%s: %s (the next backup redefines and validates its checkpoint)", ev.domain, r.reason)
            elif r.action is Action.FAIL_JOB:
                w = self.workers.get(ev.uuid)
                if w is not None and ev.wall_ns >= w.started_ns:
                    log.warning("%s: %s: cancelling its backup", ev.domain, r.reason)
                    w.cancel.set()

    # -- settling what dead jobs left ---------------------------------------------------------------
    def _settle(self) -> None:
        if self.conn is None:
            return
        for uuid in sorted(self.to_settle):
            if self._settle_one(uuid):
                self.to_settle.discard(uuid)

    def _settle_one(self, uuid: str) -> bool:
        """The engine's recovery for one domain: abort a libvirt backup job no live process owns,
        delete its new checkpoint, forget the old one's metadata. -> False: try again later."""
        import libvirt
        from ..engine.libvirt import Checkpoints, CheckpointState
        from ..backup.transaction import TargetLock
        if uuid in self.workers:
            return True                   # our own job runs there: nothing is stale
        try:
            dom = self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            log.info("domain %s is not defined here (any more): nothing to settle", uuid)
            return True
        try:
            with TargetLock(os.path.join(self.cfg.state_dir, "locks"), f"domain-{dom.UUIDString()}"):
                notes = Checkpoints(dom, CheckpointState(self.cfg.state_dir),
                                    self._prefix(dom.name(), uuid)).recover_job()
        except LockBusy:
            return True                   # a live `ekko backup` owns it, and settles it itself
        except (libvirt.libvirtError, EkkoError) as e:
            msg = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
            log.warning("%s: cannot settle the interrupted backup yet: %s", dom.name(), msg)
            return False
        for n in notes:
            log.warning("%s: %s", dom.name(), n)
        return True

    # -- scheduling and jobs ----------------------------------------------------------------------
    def _schedule(self) -> float:
        import libvirt
        poll = self.settings.poll_interval_s
        if self.conn is None or self.stopping.is_set():
            return poll
        try:
            doms = self.conn.listAllDomains()
            active = {d.UUIDString().lower() for d in
                      self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
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

    def _seed(self, uuid: str, dom):
        """Learn the last backup of a domain the state does not know from the store (once)."""
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

    def _start_worker(self, dec, name: str) -> None:
        w = Worker(dec.uuid, name, dec.policy.interval_s)
        w.thread = threading.Thread(target=self._run_job, args=(w, dec.policy), name=f"ekko-job-{name}", daemon=True)
        self.workers[dec.uuid] = w
        log.info("%s: scheduled backup starts (%s)", name, dec.why.value)
        w.thread.start()

    def _run_job(self, w: Worker, policy) -> None:
        import libvirt
        from ..backup.domain import DomainBackupRequest, run_domain_backup
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            log.error("%s: backup not started: libvirt at %s: %s", w.name, self.uri, e.get_error_message())
            w.outcome = "failed"
            self.wakeup.set()
            return
        try:
            base = options_from_config(self.cfg, w.name, self._prefix(w.name, w.uuid))

            def run(c, req, progress):
                return run_domain_backup(c, req, self.open_store, base, self.cfg.state_dir, self.cfg.run_dir,
                                         progress=progress, hold_offline_start=self.sd.offline_backup)
            results = run_recorded_backup(self.sd, conn, DomainBackupRequest(w.uuid, tuple(policy.disks or ())), run,
                                          cancel=w.cancel)
            w.outcome = "ok"
            log.info("%s: backup %s committed: %s", w.name, results[0].manifest.backup_id if results else "-",
                     ", ".join(f"{r.manifest.disk.get('node')} {r.manifest.kind}" for r in results))
            self._prune_after(w, results)
        except LockBusy as e:        # DomainBusy (the agent's lock) or another ekko's backup lock
            w.outcome = "busy"
            log.info("%s: %s", w.name, e)
        except JobCancelled as e:
            w.outcome = "cancelled"
            log.warning("%s: %s; nothing was committed", w.name, e)
        except EkkoError as e:
            w.outcome = "failed"
            log.error("%s: backup failed: %s", w.name, e)
        except Exception:   # noqa: BLE001 -- one domain's bug must not take the agent down
            w.outcome = "failed"
            log.exception("%s: backup failed", w.name)
        finally:
            try:
                conn.close()
            except Exception:   # noqa: BLE001
                pass
            self.wakeup.set()

    def _reap(self) -> None:
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

    # -- lifecycle: retention after a backup, gc and verify on an interval --------------------------
    def _prune_after(self, w: Worker, results) -> None:
        """The domain's retention policy on the targets just backed up, under the domain lock (a
        backup started by hand meanwhile: skipped, the next scheduled backup prunes). Never fails
        the backup: a failure is logged and recorded."""
        from ..engine import domain_xml as dx
        settings = self.settings
        if not settings.prune_after_backup or not results:
            return
        targets = sorted({r.manifest.target for r in results})
        policies = {t: settings.retention_for(t, w.uuid, w.name) for t in targets}
        if all(p is None for p in policies.values()):
            return
        ns = dx.project_namespace(results[0].manifest.labels)
        try:
            with self.sd.lock_domain(w.uuid, "prune"):
                rec = maintenance.prune_domain(self.open_store(ns), ns, targets, policies.get,
                                               datetime.now().astimezone().tzinfo)
        except LockBusy as e:
            log.info("%s: retention not applied now (the next scheduled backup does): %s", w.name, e)
            return
        except Exception as e:   # noqa: BLE001 -- the backup is committed; pruning is tried after the next one
            if not isinstance(e, EkkoError):
                log.exception("%s: prune", w.name)
            log.error("%s: retention not applied: %s", w.name, e)
            rec = {"time": maintenance.iso(time.time_ns()), "time_ns": time.time_ns(), "ok": False,
                   "error": str(e), "project": ns, "summary": f"failed: {e}"}
        else:
            if rec["deleted"]:
                log.info("%s: retention: %s (%s)", w.name, rec["summary"], ", ".join(rec["deleted"]))
        try:
            self.sd.update_lifecycle(lambda r: dict(r, prune=dict(r.get("prune") or {}, **{w.uuid: rec})))
        except EkkoError as e:
            log.warning("%s: cannot record the prune: %s", w.name, e)

    def _tasks(self):
        vs = self.settings.verify
        return (("gc", self.settings.gc_interval_s, self.task_runs.get("gc")),
                ("verify", vs.interval_s if vs is not None else None, self.task_runs.get("verify")))

    def _maintain(self) -> float:
        """Start the due lifecycle tasks (gc, verify) in one thread. -> seconds until one is due."""
        poll = self.settings.poll_interval_s
        if self.stopping.is_set():
            return poll
        now = datetime.now().astimezone()
        p = tasks_plan(now, self._tasks(), self.tasks_thread is not None and self.tasks_thread.is_alive())
        if p.run:
            for name in p.run:        # marked started now: not started again while it runs
                self.task_runs[name] = TaskRun(now, True)
            self.tasks_thread = threading.Thread(target=self._run_tasks, args=(p.run,), name="ekko-lifecycle",
                                                 daemon=True)
            self.tasks_thread.start()
        if p.next_wakeup is None:
            return poll
        return max(0.05, (p.next_wakeup - now).total_seconds())

    def _run_tasks(self, names) -> None:
        from ..store.factory import namespaces
        try:
            for name in names:
                if self.stopping.is_set():
                    break
                started = time.time_ns()
                log.info("%s starts", name)
                try:
                    nss = namespaces(self.cfg)
                    workers = self.cfg.workers + 1
                    if name == "gc":
                        rec = maintenance.run_gc(self.open_store, nss, self.settings.retention.gc_grace_hours,
                                                 workers, self.stopping)
                    elif self.settings.verify is not None:
                        rec = maintenance.run_verify(self.open_store, nss, self.settings.verify, workers,
                                                     self.stopping)
                    else:
                        continue                      # switched off by a SIGHUP meanwhile
                except Exception as e:   # noqa: BLE001 -- recorded; tried again later
                    if not isinstance(e, EkkoError):
                        log.exception("%s", name)
                    rec = maintenance.failed_record(started, str(e))
                self.task_runs[name] = TaskRun(datetime.fromtimestamp(started / 1e9).astimezone(), rec["ok"])
                (log.info if rec["ok"] else log.error)("%s %s: %s", name, "done" if rec["ok"] else "FAILED",
                                                       rec["error"] or rec["summary"])
                try:
                    self.sd.update_lifecycle(lambda r, _n=name, _rec=rec: dict(r, **{_n: _rec}))
                except EkkoError as e:
                    log.warning("cannot record the %s run: %s", name, e)
        finally:
            self.wakeup.set()

    # -- helpers ----------------------------------------------------------------------------------
    def open_store(self, namespace: Optional[str]):
        """One store object per namespace, shared by the jobs (opening a Swift store authenticates)."""
        from ..store.factory import open_store
        with self._stores_lock:
            if namespace not in self._stores:
                self._stores[namespace] = open_store(self.cfg, namespace)
            return self._stores[namespace]

    def _prefix(self, name: str, uuid: str) -> str:
        for t in self.cfg.targets:
            if t.engine == "libvirt" and t.domain in (name, uuid):
                return t.bitmap_prefix
        return "ekko-"


def main(cfg, config_path: Optional[str] = None) -> int:
    """`ekko agent`. -> exit code (0 after SIGTERM/SIGINT)."""
    import libvirt
    settings = AgentSettings.from_config(cfg)          # fail fast: a bad key exits 2 before anything runs
    agent = Agent(cfg, settings, config_mod.libvirt_uri(cfg), config_path)
    # libvirt prints every error to stderr by default, also those we expect and handle (a lookup
    # by name that is a UUID, "no backup job"); the agent logs what matters itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop("SIGINT"))
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    try:
        agent.start()
        agent.run()
    finally:
        agent.stop()
    return 0

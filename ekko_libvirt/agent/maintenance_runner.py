"""When the agent does its lifecycle work, and the records of it. The work itself is in
maintenance.py (prune_domain, run_gc, run_verify); what is due is scheduler.tasks_plan (pure).

    prune_after   in a backup's worker thread, once the backup committed: the domain's retention
                  policy on the targets just backed up, under the domain lock; recorded per domain
                  under "prune" in agent/lifecycle.json
    start_due     gc, verify and sync (agent.sync: replication to other stores) when due, in ONE
                  thread, one after the other (never at the same time, never two runs at once: a
                  sync never meets a gc deleting what it copies); each run recorded under its name
    wait          at stop: gc/verify see `stopping` and end where it is safe to

A restart does not rerun gc or verify: the last runs are read back from the records first
(load_last_runs). Nothing here fails a backup or stops the agent: failures are logged and
recorded, and tried again at the next backup or interval.
"""

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..backup.options import BackupResult
from ..config import Config
from ..errors import EkkoError, LockBusy
from ..store.base import Store
from . import maintenance
from .scheduler import TaskRun, tasks_plan
from .settings import AgentSettings
from .state import StateDir
from .status import last_task_runs

log = logging.getLogger("ekko.agent")

OpenStore = Callable[[Optional[str]], Store]


class MaintenanceRunner:
    def __init__(self, cfg: Config, settings: AgentSettings, sd: StateDir, open_store: OpenStore,
                 wakeup: threading.Event, stopping: threading.Event):
        self.cfg = cfg
        self.settings = settings            # replaced as a whole on SIGHUP (Agent.settings)
        self.sd = sd
        self.open_store = open_store
        self.wakeup = wakeup                # set when gc/verify end: the loop plans the next at once
        self.stopping = stopping            # also the cancel of a running gc/verify
        self.thread: Optional[threading.Thread] = None
        self.task_runs: Dict[str, TaskRun] = {}

    def load_last_runs(self) -> None:
        self.task_runs = last_task_runs(self.sd.load_lifecycle())

    # -- retention after a backup -------------------------------------------------------------------
    def prune_after(self, uuid: str, name: str, results: List[BackupResult]) -> None:
        """The domain's retention policy on the targets just backed up, under the domain lock (a
        backup started by hand meanwhile: skipped, the next scheduled backup prunes). Never fails
        the backup: a failure is logged and recorded."""
        from ..engine import domain_xml as dx
        settings = self.settings
        if not settings.prune_after_backup or not results:
            return
        targets = sorted({r.manifest.target for r in results})
        policies = {t: settings.retention_for(t, uuid, name) for t in targets}
        if all(p is None for p in policies.values()):
            return
        ns = dx.project_namespace(results[0].manifest.labels)
        local_tz = datetime.now().astimezone().tzinfo or timezone.utc        # never None after astimezone()
        try:
            with self.sd.lock_domain(uuid, "prune"):
                rec = maintenance.prune_domain(self.open_store(ns), ns, targets, policies.get, local_tz)
        except LockBusy as e:
            log.info("%s: retention not applied now (the next scheduled backup does): %s", name, e)
            return
        except Exception as e:   # noqa: BLE001 -- the backup is committed; pruning is tried after the next one
            if not isinstance(e, EkkoError):
                log.exception("%s: prune", name)
            log.error("%s: retention not applied: %s", name, e)
            rec = {"time": maintenance.iso(time.time_ns()), "time_ns": time.time_ns(), "ok": False,
                   "error": str(e), "project": ns, "summary": f"failed: {e}"}
        else:
            if rec["deleted"]:
                log.info("%s: retention: %s (%s)", name, rec["summary"], ", ".join(rec["deleted"]))
        try:
            self.sd.update_lifecycle(lambda r: dict(r, prune=dict(r.get("prune") or {}, **{uuid: rec})))
        except EkkoError as e:
            log.warning("%s: cannot record the prune: %s", name, e)

    # -- gc and verify on their intervals -------------------------------------------------------------
    def _tasks(self) -> Sequence[Tuple[str, Optional[int], Optional[TaskRun]]]:
        vs = self.settings.verify
        sy = self.settings.sync
        return (("gc", self.settings.gc_interval_s, self.task_runs.get("gc")),
                ("verify", vs.interval_s if vs is not None else None, self.task_runs.get("verify")),
                ("sync", sy.interval_s if sy is not None else None, self.task_runs.get("sync")))

    def start_due(self) -> float:
        """Start the due tasks (gc, verify) in one thread. -> seconds until one is due."""
        poll = self.settings.poll_interval_s
        if self.stopping.is_set():
            return poll
        now = datetime.now().astimezone()
        p = tasks_plan(now, self._tasks(), self.thread is not None and self.thread.is_alive())
        if p.run:
            for name in p.run:        # marked started now: not started again while it runs
                self.task_runs[name] = TaskRun(now, ok=True)
            self.thread = threading.Thread(target=self._run, args=(p.run,), name="ekko-lifecycle", daemon=True)
            self.thread.start()
        if p.next_wakeup is None:
            return poll
        return max(0.05, (p.next_wakeup - now).total_seconds())

    def _run(self, names: Sequence[str]) -> None:           # the lifecycle thread
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
                    elif name == "sync" and self.settings.sync is not None:
                        rec = maintenance.run_sync(self.cfg, self.settings.sync, self.cfg.workers, self.stopping,
                                                   self.sd.load_lifecycle().get("sync"),
                                                   self.settings.retention.gc_grace_hours,
                                                   datetime.now().astimezone().tzinfo or timezone.utc)
                    elif name == "verify" and self.settings.verify is not None:
                        rec = maintenance.run_verify(self.open_store, nss, self.settings.verify, workers,
                                                     self.stopping)
                    else:
                        continue                      # switched off by a SIGHUP meanwhile
                except Exception as e:   # noqa: BLE001 -- recorded; tried again later
                    if not isinstance(e, EkkoError):
                        log.exception("%s", name)
                    rec = maintenance.failed_record(started, str(e))
                self._record(name, started, rec)
        finally:
            self.wakeup.set()

    def _record(self, name: str, started_ns: int, rec: Dict[str, Any]) -> None:
        self.task_runs[name] = TaskRun(datetime.fromtimestamp(started_ns / 1e9).astimezone(), ok=rec["ok"])
        (log.info if rec["ok"] else log.error)("%s %s: %s", name, "done" if rec["ok"] else "FAILED",
                                               rec["error"] or rec["summary"])
        try:
            self.sd.update_lifecycle(lambda r: dict(r, **{name: rec}))
        except EkkoError as e:
            log.warning("cannot record the %s run: %s", name, e)

    def wait(self, deadline: float) -> bool:
        """Join a running gc/verify until `deadline` (time.monotonic). -> still running."""
        if self.thread is None:
            return False
        self.thread.join(max(0.0, deadline - time.monotonic()))
        return self.thread.is_alive()

"""`ekko agent`: the host daemon. Hook events and libvirt's domain events in, backup jobs out.

    main        load settings (fail fast) -> quiet libvirt's stderr -> signals -> start -> READY=1
                -> run until SIGTERM/SIGINT -> finally stop
    start       one agent per state directory; settle what a dead agent left (JobRunner.
                recover_at_start, then its settle once libvirt answers) -- before any new backup;
                then the events the hook kept in the spool while the agent was down; a new
                supervisor for every instant restore whose own is gone (restore/supervisor.py)
    loop        every poll_interval, or at once when a signal, a libvirt event or a finished job
                wakes it, one round (tick):
                  connection    (re)connect to libvirt; after libvirtd restarted: reconcile
                  spool         hook events, in order, into the domain state (intake)
                  libvirt       lifecycle events into the domain state: QEMU died -> full
                  jobs          finished workers reaped (back-off), stale jobs found, interrupted
                                ones settled, due backups started (JobRunner)
                  maintenance   gc and verify when due; retention runs after each committed backup
                                in its worker (MaintenanceRunner)
                  bus           backup-now requests from the API (agent.bus: bus_link.BusLink)
                                started as workers; their results go back when reaped
    stop        SIGTERM/SIGINT: running jobs are cancelled at their next segment and end through
                their normal failure path (new checkpoint deleted / bitmap generation merged back);
                after STOP_GRACE_S the agent exits anyway and its next start settles the rest
    SIGHUP      reload the schedule, per-domain overrides, retention, gc/verify intervals and agent
                limits from the config file

The parts, each in its module: connection (libvirt connection, its events, reconnecting), intake
(events -> state), job_runner (backups in worker threads, settling, back-off), maintenance_runner
(retention, gc, verify and their records). The Agent only wires them, in one loop thread; the
decisions are in the pure modules (events, scheduler, state, settings).
"""

import dataclasses
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from typing import Dict, Optional

from .. import config as config_mod
from ..config import Config
from ..errors import ConfigError, EkkoError, LockBusy
from ..procs import process_start_ticks
from ..restore import instant
from ..store.base import Store
from . import intake
from .connection import LibvirtConnection
from .events import Action, HookEvent
from .bus_link import BusLink
from .job_runner import JobRunner
from .maintenance_runner import MaintenanceRunner
from .metrics_runner import MetricsRunner
from .settings import AgentSettings
from .spool import Spool
from .state import StateDir, write_json_atomic

log = logging.getLogger("ekko.agent")

STOP_GRACE_S = 100          # below the systemd unit's TimeoutStopSec=120


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


class Agent:
    def __init__(self, cfg: Config, settings: AgentSettings, uri: str, config_path: Optional[str] = None):
        self.cfg = cfg
        self.uri = uri
        self.config_path = config_path
        self.sd = StateDir(cfg.state_dir)
        self.spool = Spool(settings.spool_dir)
        self.wakeup = threading.Event()          # anyone who needs the next round now sets it
        self.stopping = threading.Event()
        self.reload_requested = False
        self._stores: Dict[Optional[str], Store] = {}
        self._stores_lock = threading.Lock()
        self._lock_fd = -1
        self.connection = LibvirtConnection(uri, self.wakeup)
        self.maintenance = MaintenanceRunner(cfg, settings, self.sd, self.open_store, self.wakeup, self.stopping)
        self.bus = BusLink(settings.bus, self.sd, self.wakeup) if settings.bus is not None else None
        self.jobs = JobRunner(cfg, settings, uri, self.sd, self.open_store, self.wakeup, self.stopping,
                              after_commit=self.maintenance.prune_after,
                              on_finished=self.bus.finished if self.bus is not None else None)
        self.metrics = MetricsRunner(settings, self.sd, self.open_store, lambda: self.connection.conn,
                                     lambda: self.jobs.workers, self.stopping)
        self._settings = settings

    @property
    def settings(self) -> AgentSettings:
        return self._settings

    @settings.setter
    def settings(self, new: AgentSettings) -> None:
        # one assignment for every part: a SIGHUP reaches the runners (and their threads) together
        self._settings = self.jobs.settings = self.maintenance.settings = self.metrics.settings = new

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.sd.ensure()
        self._single_instance()
        intake.open_spool(self.spool)
        self.jobs.recover_at_start()
        self.maintenance.load_last_runs()        # a restart does not rerun gc/verify
        write_json_atomic(self.pid_path, {"pid": os.getpid(), "pid_start": process_start_ticks(os.getpid()),
                                          "started_ns": time.time_ns(), "uri": self.uri,
                                          "spool_dir": self.settings.spool_dir})
        self.connection.start()
        self.jobs.settle(self.connection.conn)       # before any new backup
        self._drain()                                # what the hook kept while the agent was down
        for name in instant.resume_supervisors(self.cfg):    # instant restores whose supervisor died
            log.info("instant restore of %s: its supervisor was gone, a new one took over", name)
        self.metrics.start()
        if self.bus is not None:
            self.bus.start()
        log.info("agent ready: libvirt %s (%s), spool %s, state %s, at most %d backup(s) at once",
                 self.uri, "connected" if self.connection.conn is not None else "not reachable yet",
                 self.settings.spool_dir, self.cfg.state_dir, self.settings.max_concurrent)

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
        if self.connection.ensure():
            log.info("reconnected to libvirt at %s: reconciling jobs with it", self.uri)
            self.jobs.reconcile_with_libvirt()
        self._drain()
        for ev in self.connection.take_lifecycle_events():
            intake.apply_lifecycle_event(self.sd, ev)
        self.jobs.reap()
        self.jobs.check_stale()
        self.jobs.settle(self.connection.conn)
        if self.bus is not None:
            self.bus.take(lambda uuid, full, job: self.jobs.start_now(self.connection.conn, uuid, full, job))
        return min(self.jobs.start_due(self.connection.conn), self.maintenance.start_due())

    def request_stop(self, why: str) -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping (running backups are cancelled)", why)
        self.stopping.set()
        self.wakeup.set()

    def request_reload(self) -> None:
        self.reload_requested = True       # read by the loop: a signal handler only flags and wakes
        self.wakeup.set()

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self.jobs.cancel_all()
        deadline = time.monotonic() + STOP_GRACE_S      # one grace period for everything
        for name in self.jobs.wait(deadline):
            log.error("%s: backup still running after %d s: exiting anyway; the next agent start "
                      "settles it", name, STOP_GRACE_S)
        self.jobs.reap()                 # the cancelled ones' results go out on the bus
        if self.bus is not None:
            self.bus.stop()
        if self.maintenance.wait(deadline):
            log.error("gc/verify still running after %d s: exiting anyway", STOP_GRACE_S)
        self.metrics.stop()
        self.connection.close()
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
            # the stores stay those the agent started with (`stores:` changes need a restart)
            new = check_stores(self.cfg, AgentSettings.from_config(config_mod.load(self.config_path)))
        except EkkoError as e:
            log.error("SIGHUP: config not reloaded, keeping the old one: %s", e)
            return
        if (new.spool_dir, new.hook_path) != (self.settings.spool_dir, self.settings.hook_path):
            log.warning("SIGHUP: agent.spool_dir / agent.hook_path changes need a restart")
        if new.metrics != self.settings.metrics:
            log.warning("SIGHUP: agent.metrics changes need a restart")
        if new.bus != self.settings.bus:
            log.warning("SIGHUP: agent.bus changes need a restart")
        self.settings = dataclasses.replace(new, spool_dir=self.settings.spool_dir, metrics=self.settings.metrics,
                                            bus=self.settings.bus)
        self.jobs.reset_backoff()
        log.info("SIGHUP: schedule, domain overrides, retention, gc/verify intervals and agent limits reloaded")

    # -- hook events ------------------------------------------------------------------------------
    def _drain(self) -> None:
        intake.drain_spool(self.spool, self.handle_event)

    def handle_event(self, ev: HookEvent) -> None:
        """One hook event: into the domain's state, then what it means for the domain's jobs."""
        effects = intake.apply_hook_event(self.sd, ev, self.settings.shared_storage)
        uuid = ev.uuid
        if uuid is None:                 # no domain to act on: events.decide says IGNORE only
            return
        for r in effects:
            if r.action is Action.RECONCILE:
                self.jobs.settle_later([uuid])
            elif r.action is Action.FAIL_JOB and self.jobs.cancel(uuid, ev.wall_ns):
                log.warning("%s: %s: cancelling its backup", ev.domain, r.reason)

    # -- shared by the runners --------------------------------------------------------------------
    def open_store(self, namespace: Optional[str]) -> Store:
        """One store object per namespace, shared by the jobs (opening a Swift store authenticates)."""
        from ..store.factory import open_store
        with self._stores_lock:
            if namespace not in self._stores:
                self._stores[namespace] = open_store(self.cfg, namespace)
            return self._stores[namespace]


def check_stores(cfg: Config, settings: AgentSettings) -> AgentSettings:
    """agent.sync names stores of the config (`default`, or under `stores:`): each must exist."""
    for name in ((settings.sync.source, *settings.sync.dests) if settings.sync else ()):
        if name not in cfg.store_names():
            raise ConfigError("agent.sync", f"no store named {name!r} (known: {', '.join(cfg.store_names())}: "
                              "`default` is `store:`, the others are under `stores:`)")
    return settings


def main(cfg: Config, config_path: Optional[str] = None) -> int:
    """`ekko agent`. -> exit code (0 after SIGTERM/SIGINT)."""
    import libvirt
    settings = check_stores(cfg, AgentSettings.from_config(cfg))   # fail fast: a bad key exits 2 before anything runs
    agent = Agent(cfg, settings, config_mod.libvirt_uri(cfg), config_path)
    # libvirt prints every error to stderr by default, also those we expect and handle (a lookup
    # by name that is a UUID, "no backup job"); the agent logs what matters itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop("SIGINT"))
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    try:
        agent.start()
        sd_notify("READY=1")
        agent.run()
    finally:
        agent.stop()
    return 0

"""The supervisor of one instant restore (`ekko _instant-supervise NAME`, spawned by
instant.spawn_supervisor): keeps the backup's servers up and the pulls going until the new domain
no longer needs the export, then stops the servers.

    lock        state_dir/instant/.NAME.lock (flock): one supervisor per job; a second exits at once
    ready       records its PID and start time in the job's record, then tells its spawner
    loop        every POLL_S: look (libvirt: domain, state, block jobs, the XML's backing chain;
                /proc: servers by PID + start time) -> instant_plan.decide -> act -> record progress
    end         complete (every disk pulled: servers stopped), abandoned (domain undefined), or
                SIGTERM (the job stays 'streaming': the next supervisor takes it over)

Everything it needs is in the record and in libvirt, nothing in memory: a supervisor started after
this one died (by the agent at its start, instant.resume_supervisors) carries on where it was.

Polling, not libvirt's events: the state that matters (a server's process, a paused guest, a job
that failed while nobody listened) must be found again anyway after a restart, and one look every
POLL_S costs a few libvirt calls.
"""

import fcntl
import json
import logging
import os
import signal
import threading
import time
from typing import Optional

from .. import procs
from ..errors import EkkoError, UsageError
from . import instant
from .instant_plan import Action, DiskState, InstantJob, World, decide, nbd_backed

log = logging.getLogger("ekko.instant")

POLL_S = 0.25
SAVE_S = 2.0


def _state_of(record: dict) -> dict:
    """A record without the pull's progress counters."""
    return dict(record, disks=[{k: v for k, v in d.items() if k not in ("cur", "end")} for d in record["disks"]])


class Supervisor:
    def __init__(self, cfg, name: str, conn, verbose: int = 0):
        self.cfg = cfg
        self.name = name
        self.conn = conn
        self.verbose = verbose
        self.stop = threading.Event()
        self.saved = 0.0

    def job(self) -> InstantJob:
        job = instant.load(self.cfg, self.name)
        if job is None:
            raise UsageError(f"no instant restore named {self.name!r} ({instant.state_path(self.cfg, self.name)})")
        return job

    def look(self, job: InstantJob) -> World:
        """The world as libvirt and /proc show it now. A domain undefined while we look is gone."""
        import libvirt
        try:
            return self._look(job)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
        return self._gone(job)

    def _gone(self, job: InstantJob) -> World:
        return World(False, False, False, tuple(DiskState(d.dev, True, instant.server_alive(d), None)
                                                for d in job.disks), time.time(), job.last_resume)

    def _look(self, job: InstantJob) -> World:
        import libvirt
        dom = self._domain()
        if dom is None:
            return self._gone(job)
        active = bool(dom.isActive())
        state, reason = dom.state()
        paused_io = active and state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        backed = nbd_backed(dom.XMLDesc(0), {d.dev: d.socket for d in job.disks})
        disks = []
        for d in job.disks:
            info = dom.blockJobInfo(d.dev, 0) if active and d.dev in backed else {}
            jobinfo = (int(info["cur"]), int(info["end"])) if info else None
            if jobinfo:
                d.cur, d.end = jobinfo
            d.done = d.dev not in backed
            disks.append(DiskState(d.dev, d.dev in backed, instant.server_alive(d), jobinfo))
        return World(True, active, paused_io, tuple(disks), time.time(), job.last_resume)

    def act(self, job: InstantJob, a: Action) -> None:
        disk = next((d for d in job.disks if d.dev == a.dev), None)
        if a.kind == "stop_server" and disk is not None:
            instant.stop_server(disk)
        elif a.kind == "restart_server" and disk is not None:
            log.warning("%s: the server of disk %s (pid %s) is gone: starting it again on %s", job.domain, disk.dev,
                        disk.server_pid, disk.socket)
            instant.start_server(self.cfg, disk, self.verbose)
            job.server_restarts += 1
        elif a.kind == "resume":
            log.warning("%s: paused on an I/O error of its disks: resuming it (every server is up)", job.domain)
            self._domain().resume()
            job.guest_resumes += 1
            job.last_resume = time.time()
        elif a.kind == "start_pull" and disk is not None:
            log.info("%s: pulling disk %s (bandwidth %s)", job.domain, disk.dev, job.bandwidth or "unlimited")
            self._domain().blockPull(disk.dev, job.bandwidth, instant.BLOCK_PULL_BANDWIDTH_BYTES)
            job.pulls_started += 1
        elif a.kind in ("complete", "abandon"):
            job.phase = "complete" if a.kind == "complete" else "abandoned"
            job.finished = time.time()
            job.message = ("every disk pulled: the domain no longer depends on the backup, servers stopped"
                           if a.kind == "complete" else "the domain was undefined before its disks were pulled; "
                           "servers stopped")
            for d in job.disks:
                d.done = d.done or a.kind == "complete"
            log.info("%s: %s", job.domain, job.message)

    def round(self) -> InstantJob:
        """One look and what follows from it; the record saved when it changed."""
        import libvirt
        job = self.job()
        before = job.to_dict()
        try:
            world = self.look(job)
        except libvirt.libvirtError as e:
            # libvirtd restarting, a connection lost: the servers and the guest go on without us;
            # look again with a new connection at the next round
            log.warning("%s: libvirt: %s; connecting again", job.domain, e.get_error_message())
            self._reconnect()
            return job
        for a in decide(world):
            try:
                self.act(job, a)
            except (libvirt.libvirtError, EkkoError) as e:
                # Logged and tried again at the next look: a server that cannot start now (the store
                # does not answer) may start later; the guest stays paused meanwhile, never errored.
                job.message = f"{a.kind} {a.dev or ''} failed: {e}".replace("  ", " ")
                log.error("%s: %s", job.domain, job.message)
        after = job.to_dict()
        if _state_of(after) != _state_of(before) or (after != before and time.monotonic() - self.saved >= SAVE_S):
            instant.save(self.cfg, job)          # progress alone: every SAVE_S (each save is two fsyncs)
            self.saved = time.monotonic()
        return job

    def run(self) -> InstantJob:
        while True:
            job = self.round()
            if job.phase != "streaming" or self.stop.wait(POLL_S):
                return job

    def _reconnect(self) -> None:
        import libvirt
        from .. import config
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass
        try:
            self.conn = libvirt.open(config.libvirt_uri(self.cfg))
        except libvirt.libvirtError as e:
            log.warning("%s: libvirt not reachable: %s", self.name, e.get_error_message())

    def _domain(self):
        import libvirt
        try:
            return self.conn.lookupByName(self.name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise


def main(cfg, name: str, ready_fd: Optional[int], verbose: int = 0) -> int:
    """The process's life: lock, record itself, tell the spawner, loop. -> exit code."""
    import libvirt
    from .. import config
    lock_path = os.path.join(cfg.state_dir, "instant", f".{name}.lock")
    os.makedirs(os.path.dirname(lock_path), mode=0o700, exist_ok=True)
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"the instant restore of {name} has a running supervisor already") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(config.libvirt_uri(cfg))
    sup = Supervisor(cfg, name, conn, verbose)
    signal.signal(signal.SIGTERM, lambda *_: sup.stop.set())
    job = sup.job()
    job.supervisor_pid, job.supervisor_ticks = os.getpid(), procs.process_start_ticks(os.getpid())
    instant.save(cfg, job)
    if ready_fd is not None:
        me = {"pid": job.supervisor_pid, "start_ticks": job.supervisor_ticks}
        os.write(ready_fd, (json.dumps(me) + "\n").encode())
        os.close(ready_fd)
    log.info("%s: supervising the instant restore of %s (pid %d)", name, job.backup_id, os.getpid())
    try:
        job = sup.run()
    finally:
        conn.close()
    log.info("%s: supervisor ends, job %s", name, job.phase)
    return 0

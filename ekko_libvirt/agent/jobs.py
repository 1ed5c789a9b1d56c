"""One backup of one libvirt domain as a recorded job: what `ekko backup DOMAIN` and the agent's
worker threads both run.

    lock_domain (never two jobs on one domain) -> begin_job (record: running, pid)
      -> backup.domain.run_domain_backup, progress saved in the job record (at most once a second)
      -> end_job (succeeded | failed, with the error) -> record_backup in the domain's chain state

A job whose process dies stays "running" on disk; the next agent start marks it ABANDONED and
settles what it left in libvirt (job_runner.JobRunner.recover_at_start).
"""

import dataclasses
import logging
import threading
import time
from typing import Callable, List, Optional

from .. import errors
from ..errors import EkkoError
from .state import ChainStatus, DomainState, JobRecord, JobStatus, StateDir, host_clock, record_backup

log = logging.getLogger(__name__)


class JobCancelled(EkkoError):
    """The agent is stopping: the job ends through its normal failure path (nothing committed,
    the new checkpoint / bitmap generation undone)."""


# Why a job failed, in one word: the `cause` label of the metrics' failure counts. The first class
# that matches wins, so subclasses come before their bases.
_CAUSES = (
    (JobCancelled, "cancelled"), (KeyboardInterrupt, "interrupted"), (errors.LockBusy, "busy"),
    (errors.ConfigError, "config"), (errors.UsageError, "usage"), (errors.KeyMismatch, "key-mismatch"),
    (errors.QMPUnavailable, "qemu-unavailable"), (errors.DiskNotFound, "disk-not-found"),
    (errors.IncrementalImpossible, "incremental-impossible"), (errors.ScratchSpaceLow, "scratch-space-low"),
    (errors.EngineError, "engine"), (errors.ReaderError, "nbd-read"), (errors.ReadBackMismatch, "read-back-mismatch"),
    (errors.EncodeMismatch, "encode-mismatch"), (errors.StoreError, "store"), (errors.IntegrityError, "integrity"),
    (EkkoError, "other"))


def failure_cause(e: BaseException) -> str:
    """The cause of a failed job, for counting failures by kind. Pure. libvirt's own errors
    (raised outside the engine's translation) are "libvirt"; anything else is a bug: "internal"."""
    for cls, cause in _CAUSES:
        if isinstance(e, cls):
            return cause
    try:
        import libvirt
        if isinstance(e, libvirt.libvirtError):
            return "libvirt"
    except ImportError:
        pass
    return "internal"


def request_for_chain(req, st: Optional[DomainState]):
    """The agent's chain state over a backup request: a chain the agent knows to be broken (QEMU
    died, migrated without shared storage, unclean host stop) makes the next backup a full,
    with that reason recorded, unless a full was asked for anyway. Pure."""
    if st is None or st.chain.status is not ChainStatus.FULL_REQUIRED or req.force_full or req.chain_broken:
        return req
    return dataclasses.replace(req, chain_broken=st.chain.reason or "the agent found the chain broken")


class JobProgress:
    """The progress callback of a job: saves bytes done/total in the job record (throttled),
    passes the call on, and raises JobCancelled once `cancel` is set."""

    def __init__(self, sd: StateDir, job: JobRecord, passthrough: Optional[Callable[[int, int], None]] = None,
                 cancel: Optional[threading.Event] = None, every_s: float = 1.0, clock=time.monotonic):
        self.sd = sd
        self.job = job
        self.passthrough = passthrough
        self.cancel = cancel
        self.every_s = every_s
        self.clock = clock
        self.last = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise JobCancelled(f"backup job {self.job.job_id} cancelled: the agent is stopping")
        if self.passthrough:
            self.passthrough(done, total)
        self.done = max(self.done, done)      # segments complete out of order
        now = self.clock()
        if self.last is None or now - self.last >= self.every_s or self.done >= total:
            self.last = now
            try:
                self.job = self.sd.save_job(self.job.progressed(self.done, total, time.time_ns()))
            except EkkoError as e:         # progress is informative: never fail a backup for it
                log.warning("cannot record progress of job %s: %s", self.job.job_id, e)


def run_recorded_backup(sd: StateDir, conn, req, run: Callable, *, progress=None,
                        cancel: Optional[threading.Event] = None, on_begin: Optional[Callable] = None) -> List:
    """`run(conn, req, progress)` is backup.domain.run_domain_backup with the store and options
    bound. -> its results. Raises DomainBusy when another job holds the domain."""
    from ..engine.libvirt import lookup_domain
    from ..errors import describe_error
    dom = lookup_domain(conn, req.domain)
    uuid, name = dom.UUIDString().lower(), dom.name()
    kind = "online" if dom.isActive() else "offline"
    with sd.lock_domain(uuid, "backup"):
        st = sd.update_domain(uuid, lambda s: s if s.name == name else dataclasses.replace(s, name=name))
        req = request_for_chain(req, st)
        clock = host_clock()             # orders this backup against hook events of the same boot
        job = sd.begin_job(uuid, kind)
        if on_begin:
            on_begin(job)
        tracker = JobProgress(sd, job, progress, cancel)
        try:
            results = run(conn, req, tracker)
        except BaseException as e:
            sd.end_job(tracker.job, JobStatus.FAILED, error=describe_error(e), cause=failure_cause(e))
            raise
        backup_id = results[0].manifest.backup_id if results else None
        checkpoint = next((r.manifest.generation["bitmap"] for r in results if r.manifest.generation), None)
        sd.end_job(tracker.job, JobStatus.SUCCEEDED, backup_id=backup_id)
        full = bool(results) and all(r.manifest.kind == "full" for r in results)
        if backup_id:
            sd.update_domain(uuid, lambda s: record_backup(s, backup_id, checkpoint, job.started_ns, full, clock))
        return results

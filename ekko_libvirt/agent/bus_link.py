"""The agent's link to the message bus (agent.bus): between AgentBus (api/bus_agent.py, the
oslo.messaging side, its own threads) and the agent's loop.

    backup-now in    AgentEndpoint -> submit (any thread: queued, the loop woken) -> the loop's
                     take() -> JobRunner.start_now, the same workers as the scheduled backups
    results out      JobRunner's on_finished -> finished() -> AgentBus.job_state (done with the
                     backup id | failed with the error)
    heartbeat        report(): the domains and the failing ones, from the agent's state directory
                     (heartbeat_report, pure)

oslo.messaging is imported only when agent.bus is configured.
"""

import logging
import queue
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional

from .. import __version__
from ..errors import ConfigError
from .job_runner import Worker
from .settings import BusSettings
from .state import DomainState, JobRecord, JobStatus, StateDir

log = logging.getLogger("ekko.agent")

StartNow = Callable[[str, bool, str], Optional[str]]       # (uuid, force_full, job id) -> why not | None


def heartbeat_report(domains: Iterable[DomainState], jobs: Iterable[JobRecord]) -> Dict[str, List[Any]]:
    """What a heartbeat tells of the host. Pure. A domain is failing when its newest job failed or
    was abandoned (its process died)."""
    newest: Dict[str, JobRecord] = {}
    for j in jobs:
        if j.uuid not in newest or j.started_ns > newest[j.uuid].started_ns:
            newest[j.uuid] = j
    doms, failing = [], []
    for d in domains:
        doms.append({"uuid": d.uuid, "name": d.name, "running": d.running, "chain": d.chain.status.value,
                     "last_backup_id": d.chain.last_backup_id})
        last = newest.get(d.uuid)
        if last is not None and last.status in (JobStatus.FAILED, JobStatus.ABANDONED):
            failing.append({"uuid": d.uuid, "name": d.name, "job_id": last.job_id, "status": last.status.value,
                            "error": last.error, "cause": last.cause, "when_ns": last.updated_ns})
    return {"domains": doms, "failing": failing}


def bus_outcome(w: Worker) -> Dict[str, Any]:
    """A finished worker as a bus job's final state. Pure."""
    if w.outcome == "ok":
        return {"state": "done", "result": {"backup_id": w.backup_id}, "error": None}
    return {"state": "failed", "result": None, "error": w.error or f"backup ended: {w.outcome}"}


class BusLink:
    def __init__(self, settings: BusSettings, sd: StateDir, wakeup: threading.Event):
        self.settings = settings
        self.sd = sd
        self.wakeup = wakeup
        self.requests: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.bus: Any = None

    def start(self) -> None:
        try:
            from ..api.bus_agent import AgentBus
        except ImportError as e:
            raise ConfigError("agent.bus", f"the message bus needs oslo.messaging ({e}): install "
                              "requirements-api.txt, or remove agent.bus") from e
        self.bus = AgentBus(self.settings, __version__, self.report, self._submit)
        self.bus.start()

    def stop(self) -> None:
        """Requests taken off the bus but not started fail (the API hears it before the bus
        closes); then the bus stops."""
        if self.bus is None:
            return
        for req in self._pending():
            self.bus.job_state(req.job_id, "failed", error="the agent stopped before the backup started")
        self.bus.stop()
        self.bus = None

    def report(self) -> Dict[str, List[Any]]:
        return heartbeat_report(self.sd.list_domains(), self.sd.list_jobs())

    def _submit(self, req: Any) -> None:            # oslo.messaging's server thread
        self.requests.put(req)
        self.wakeup.set()

    def _pending(self) -> List[Any]:
        out = []
        while True:
            try:
                out.append(self.requests.get_nowait())
            except queue.Empty:
                return out

    def take(self, start_now: StartNow) -> None:
        """The loop thread: every request that came in, started or failed at once."""
        for req in self._pending():
            why = start_now(req.domain_uuid, req.force_full, req.job_id)
            if why is None:
                self.bus.job_state(req.job_id, "running")
            else:
                log.warning("backup-now %s of %s not started: %s", req.job_id, req.domain_uuid, why)
                self.bus.job_state(req.job_id, "failed", error=why)

    def finished(self, w: Worker) -> None:
        if w.bus_job is None or self.bus is None:
            return
        out = bus_outcome(w)
        self.bus.job_state(w.bus_job, out["state"], out["result"], out["error"])

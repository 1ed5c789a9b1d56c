"""Agents on the message bus: the agent's side (`ekko agent` with `agent.bus:` in ekko.yaml).

    AgentEndpoint.backup_now   the API's call on topic ekko-agent, server = this host: the request
                               is checked (check_request), handed to the agent's loop (`submit`:
                               the same JobRunner workers as the scheduled backups) and the call
                               returns at once {"accepted": true, "agent_id": ...}
    AgentBus                   one thread ("ekko-bus") owns every cast to the API: register at
                               start, a heartbeat every `heartbeat_interval` (host, agent_id,
                               version, domains, failing, the recent bus jobs), job updates as they
                               come; another ("ekko-bus-server") starts the RPC server, which
                               blocks while the broker is away (the agent does not wait for it)

Nothing here blocks the agent's loop: job_state() only queues; the thread sends. Casts go with
retry=0: while the broker is down a heartbeat is dropped (logged once) and the next one tries a
new connection; the job list in every heartbeat repairs a job update lost that way. The RPC
server reconnects by itself when RabbitMQ comes back (oslo.messaging's rabbit driver).

A request that waited in the agent's queue longer than the API's call_timeout is dropped by
RabbitMQ itself (oslo.messaging publishes a call with that expiration): the API has failed its job
by then, and no backup starts that nobody waits for.

The transport URL carries the bus password: it is never logged (redact_url).
"""

import importlib
import logging
import os
import queue
import re
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import oslo_messaging
from oslo_config import cfg

from ..agent.settings import BusSettings

log = logging.getLogger("ekko.agent.bus")

EXCHANGE = "ekko"           # our own exchange: no topic of ours meets another service's ("openstack")
API_TOPIC = "ekko-api"
AGENT_TOPIC = "ekko-agent"
KEEP_JOBS = 100             # recent bus jobs carried in every heartbeat
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def messaging_conf(conf: cfg.ConfigOpts) -> cfg.ConfigOpts:
    """oslo.messaging 18 reads [oslo_messaging_metrics] and [oslo_messaging_tracing] from the
    ConfigOpts it is given but registers them only on the global cfg.CONF: with a ConfigOpts of
    our own every cast would raise NoSuchOptError. Registered here (a no-op when already there)."""
    for module, group in (("oslo_messaging._metrics.client", "oslo_messaging_metrics"),
                          ("oslo_messaging._tracing.client", "oslo_messaging_tracing")):
        try:
            opts = getattr(importlib.import_module(module), group)
        except (ImportError, AttributeError):       # a version without them does not read them either
            continue
        conf.register_opts(opts, group=group)
    return conf


@dataclass(frozen=True)
class BusRequest:
    """A backup-now request from the API, for the agent's loop."""
    job_id: str
    domain_uuid: str
    force_full: bool


def check_request(job_id: Any, domain_uuid: Any, force_full: Any) -> Tuple[Optional[BusRequest], Optional[str]]:
    """The API's arguments -> (request, None) or (None, why not). Pure."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        return None, "job_id must be 1 to 128 letters, digits, '.', '_' or '-'"
    try:
        u = str(uuid.UUID(domain_uuid)) if isinstance(domain_uuid, str) and len(domain_uuid) <= 64 else None
    except ValueError:
        u = None
    if u is None:
        return None, f"domain_uuid is not a UUID: {str(domain_uuid)[:64]!r}"
    if not isinstance(force_full, bool):
        return None, "force_full must be true or false"
    return BusRequest(job_id, u, force_full), None


def redact_url(url: str) -> str:
    """The transport URL without its passwords (every host of a multi-host URL)."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable transport_url>"
    hosts = []
    for h in p.netloc.split(","):
        user, at, where = h.rpartition("@")
        hosts.append(f"{user.split(':', 1)[0]}:***@{where}" if at else where)
    return urllib.parse.urlunsplit((p.scheme, ",".join(hosts), p.path, "", ""))


class AgentEndpoint:
    """What the API calls on this agent. Runs in oslo.messaging's server threads."""

    target = oslo_messaging.Target(version="1.0")

    def __init__(self, bus: "AgentBus", submit: Callable[[BusRequest], None]):
        self.bus = bus
        self.submit = submit

    def backup_now(self, ctxt: Any, job_id: Any = None, domain_uuid: Any = None,
                   force_full: Any = False) -> Dict[str, Any]:
        req, why = check_request(job_id, domain_uuid, force_full)
        if req is None:
            log.warning("backup-now refused: %s", why)
            return {"accepted": False, "error": why, "agent_id": self.bus.agent_id}
        log.info("backup-now %s of %s%s from the API", req.job_id, req.domain_uuid,
                 " (full)" if req.force_full else "")
        self.bus.job_state(req.job_id, "queued")
        try:
            self.submit(req)
        except Exception as e:   # noqa: BLE001 -- the job says the agent failed, not the bus
            # (oslo.messaging would hand a built-in exception back to the API as that class, and the
            # API would blame the bus for it: found by bench/bus_agents.py)
            log.exception("backup-now %s could not be queued", req.job_id)
            why = f"the agent could not queue the request: {type(e).__name__}"
            self.bus.job_state(req.job_id, "failed", error=why)
            return {"accepted": False, "error": why, "agent_id": self.bus.agent_id}
        return {"accepted": True, "agent_id": self.bus.agent_id}


class AgentBus:
    """`report()` -> {"domains": [...], "failing": [...]}: what the heartbeat tells of this host
    (read from the agent's state directory, in the bus thread)."""

    def __init__(self, settings: BusSettings, version: str, report: Callable[[], Dict[str, List[Any]]],
                 submit: Callable[[BusRequest], None]):
        self.settings = settings
        self.host = settings.host or os.uname().nodename
        self.agent_id = uuid.uuid4().hex           # a new one per start: the API sees a restart
        self.version = version
        self.report = report
        self.submit = submit
        self.jobs: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._outbox: "queue.SimpleQueue[Tuple[str, Dict[str, Any]]]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._server_thread: Optional[threading.Thread] = None
        self._down_logged = False
        self.transport: Any = None
        self.server: Any = None
        self.client: Any = None

    def start(self) -> None:
        conf = cfg.ConfigOpts()
        # no file, no argv, no config dirs: everything comes from ekko.yaml
        conf([], project="ekko-agent-bus", default_config_files=[], default_config_dirs=[])
        self.transport = oslo_messaging.get_rpc_transport(messaging_conf(conf), url=self.settings.transport_url)
        self.client = oslo_messaging.get_rpc_client(self.transport,
                                                    oslo_messaging.Target(exchange=EXCHANGE, topic=API_TOPIC))
        self.server = oslo_messaging.get_rpc_server(
            self.transport, oslo_messaging.Target(exchange=EXCHANGE, topic=AGENT_TOPIC, server=self.host),
            [AgentEndpoint(self, self.submit)])
        self._server_thread = threading.Thread(target=self._start_server, name="ekko-bus-server", daemon=True)
        self._server_thread.start()
        self._thread = threading.Thread(target=self._run, name="ekko-bus", daemon=True)
        self._thread.start()
        log.info("message bus %s: agent on %s (heartbeat every %g s)", redact_url(self.settings.transport_url),
                 self.host, self.settings.heartbeat_interval_s)

    def _start_server(self) -> None:
        try:
            self.server.start()                 # returns once its queues are declared on the broker
        except Exception as e:   # noqa: BLE001 -- logged: the agent runs on without requests from the API
            log.error("message bus: the agent's RPC server did not start: %s: %s", type(e).__name__, e)
            return
        log.info("message bus: taking requests for %s on topic %s", self.host, AGENT_TOPIC)

    def stop(self, flush_s: float = 5.0) -> None:
        """Send what is queued (for at most flush_s), then end the threads, the server, the
        transport. A server still connecting (broker away all along) is left to the process's end."""
        if self._thread is not None:
            self._stopping.set()
            self._wake.set()
            self._thread.join(flush_s + 1)
        if self._server_thread is not None:
            self._server_thread.join(1)
            if self._server_thread.is_alive():
                log.warning("message bus: the RPC server never connected: not waiting for it")
                return
        if self.server is not None:
            self.server.stop()
            self.server.wait()
        if self.transport is not None:
            self.transport.cleanup()

    def job_state(self, job_id: str, state: str, result: Optional[Dict[str, Any]] = None,
                  error: Optional[str] = None) -> None:
        """Record a bus job's new state and queue its update for the API. Never blocks."""
        with self._jobs_lock:
            self.jobs[job_id] = {"state": state, "result": result, "error": error}
            self.jobs.move_to_end(job_id)
            while len(self.jobs) > KEEP_JOBS:
                self.jobs.popitem(last=False)
        self._outbox.put(("job_update", {"host": self.host, "job_id": job_id, "state": state, "result": result,
                                         "error": error}))
        self._wake.set()

    # -- the bus thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        registered = False
        next_beat = 0.0
        while True:
            try:
                if time.monotonic() >= next_beat:
                    sent = self._cast("register" if not registered else "heartbeat", {"report": self._heartbeat()})
                    registered = registered or sent
                    next_beat = time.monotonic() + self.settings.heartbeat_interval_s
                self._flush()
            except Exception:   # noqa: BLE001 -- a bug here must not end the heartbeats for good
                log.exception("message bus: heartbeat thread")
            if self._stopping.is_set():
                return
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            self._wake.clear()

    def _flush(self) -> None:
        while True:
            try:
                method, kwargs = self._outbox.get_nowait()
            except queue.Empty:
                return
            if not self._cast(method, kwargs):
                return      # the broker is away: dropped; the next heartbeat carries the job list

    def _heartbeat(self) -> Dict[str, Any]:
        try:
            seen = self.report()
        except Exception as e:     # noqa: BLE001 -- a heartbeat without domains beats none
            log.warning("heartbeat: cannot read the domains' state: %s", e)
            seen = {"domains": [], "failing": []}
        with self._jobs_lock:
            jobs = dict(self.jobs)
        return {"host": self.host, "agent_id": self.agent_id, "version": self.version,
                "interval_s": self.settings.heartbeat_interval_s, "sent": time.time(), "jobs": jobs, **seen}

    def _cast(self, method: str, kwargs: Dict[str, Any]) -> bool:
        try:
            self.client.prepare(retry=0).cast({}, method, **kwargs)
        except Exception as e:     # noqa: BLE001 -- MessageDeliveryFailure, or the driver's own errors
            if not self._down_logged:
                log.warning("message bus %s: %s not sent (%s); trying again every %g s",
                            redact_url(self.settings.transport_url), method, type(e).__name__,
                            self.settings.heartbeat_interval_s)
                self._down_logged = True
            return False
        if self._down_logged:
            log.info("message bus %s: reachable again", redact_url(self.settings.transport_url))
            self._down_logged = False
        return True

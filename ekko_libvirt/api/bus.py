"""Agents on the message bus (oslo.messaging over RabbitMQ): the API's side, `Bus`.

    agent --cast--> topic ekko-api            register, heartbeat (host, agent_id, version,
                    (any API process)         interval, domains, failing, its recent bus jobs),
                                              job_update (job_id, state, result, error)
    API   --call--> topic ekko-agent,         backup_now(job_id, domain_uuid, force_full)
                    server = HOST             -> {"accepted": true, "agent_id"} once the agent
                                              queued it

    Bus(conf).backup_now(host, domain_uuid, force_full) -> job_id      never blocks longer than
        [bus] call_timeout: an agent whose heartbeats stopped fails the job at once (state
        "failed", error "agent on HOST is not answering (last heartbeat ...)") without a message;
        one that does not take the call in time fails it the same way
    Bus.job(job_id) -> {"id", "state", "result", "error", "host", ...} | None
    Bus.hosts() -> [{"host", "last_heartbeat", "version", "interval_s", "domains", "failing",
                     "alive", "down"}]           ("down": the app's host_of skips that host)

A job ends only by a report of its agent (job_update, or the heartbeat's job list, which repairs a
lost update), or when busrules.py says its agent is gone (silent, or restarted without it).
Reports are checked (busrules.parse_report) before they are stored; a bad one is logged and dropped.
Hosts and jobs live in busdb.py's SQLite file ([bus] state_path), shared by the API's workers:
each worker's RPC server takes its share of the casts on topic ekko-api. The bus credentials are in
[DEFAULT] transport_url (oslo.messaging's own option, secret: oslo.config never logs it).

The agent's side is bus_agent.py (AgentBus, AgentEndpoint), re-exported here.
"""

import logging
import socket
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional

import oslo_messaging
from oslo_config import cfg

from . import busrules
from .bus_agent import (AGENT_TOPIC, API_TOPIC, EXCHANGE, AgentBus, AgentEndpoint,  # noqa: F401 (agent side)
                        messaging_conf)
from .busdb import BusDB

log = logging.getLogger("ekko.api.bus")

BUS_OPTS = [
    cfg.StrOpt("state_path", default="/var/lib/ekko/api/bus.sqlite",
               help="SQLite file of the agents' heartbeats and the backup-now jobs (shared by the API workers)."),
    cfg.FloatOpt("call_timeout", default=5.0, min=0.5,
                 help="Seconds a backup-now request waits for the agent to take it; then the job fails."),
]

Clock = Callable[[], float]
CALL_GRACE_S = 2.0          # beyond call_timeout, before a call stuck in the driver counts as failed


class BusUnreachable(Exception):
    """A call the messaging driver did not finish in time (it is still reconnecting)."""


def list_opts():
    """For oslo-config-generator (entry point oslo.config.opts)."""
    return [("bus", BUS_OPTS)]


class ApiEndpoint:
    """What the agents cast to the API. Runs in oslo.messaging's server threads."""

    target = oslo_messaging.Target(version="1.0")

    def __init__(self, db: BusDB, clock: Clock = time.time):
        self.db = db
        self.clock = clock

    def register(self, ctxt: Any, report: Any = None) -> None:
        r = self._heartbeat(report)
        if r is not None:
            log.info("agent on %s registered (agent %s, version %s, %d domains)", r.host, r.agent_id, r.version,
                     len(r.domains))

    def heartbeat(self, ctxt: Any, report: Any = None) -> None:
        self._heartbeat(report)

    def _heartbeat(self, raw: Any) -> Optional[busrules.Report]:
        try:
            r = busrules.parse_report(raw)
        except busrules.ReportInvalid as e:
            log.warning("a heartbeat that is no agent's report was dropped: %s", e)
            return None
        now = self.clock()
        self.db.save_host(r.host, r.agent_id, r.version, r.interval_s, r.domains, r.failing, now)
        for ch in busrules.reconcile(r, self.db.open_jobs(r.host)):
            if self.db.update_job(ch.job_id, ch.state, ch.result, ch.error, now, host=r.host):
                log.info("job %s on %s: %s%s", ch.job_id, r.host, ch.state, f" ({ch.error})" if ch.error else "")
        return r

    def job_update(self, ctxt: Any, host: Any = None, job_id: Any = None, state: Any = None, result: Any = None,
                   error: Any = None) -> None:
        try:
            ch = busrules.parse_job_update(host, job_id, state, result, error)
        except busrules.ReportInvalid as e:
            log.warning("a job update that is no agent's report was dropped: %s", e)
            return
        if self.db.update_job(ch.job_id, ch.state, ch.result, ch.error, self.clock(), host=host):
            log.info("job %s on %s: %s%s", ch.job_id, host, ch.state, f" ({ch.error})" if ch.error else "")


class Bus:
    """The API's end of the bus. Make it in the process that serves (after a fork: its threads and
    connections do not survive one); stop() ends its server and connections. The RPC server
    starts in a thread of its own: it blocks while the broker is away, a request must not."""

    def __init__(self, conf: cfg.ConfigOpts, listen: bool = True, clock: Clock = time.time):
        conf.register_opts(BUS_OPTS, group="bus")
        self.conf = conf
        self.clock = clock
        self.db = BusDB(conf.bus.state_path)
        self.transport = oslo_messaging.get_rpc_transport(messaging_conf(conf))
        self.client = oslo_messaging.get_rpc_client(self.transport,
                                                    oslo_messaging.Target(exchange=EXCHANGE, topic=AGENT_TOPIC))
        self.server: Any = None
        self._server_thread: Optional[threading.Thread] = None
        self._stuck_calls = False        # a call left in the driver holds its reply-queue lock
        if listen:
            # one server name per host: the API's workers share its queue (one per process would
            # leave a queue behind on the broker for every worker that ever ran)
            target = oslo_messaging.Target(exchange=EXCHANGE, topic=API_TOPIC, server=socket.gethostname())
            self.server = oslo_messaging.get_rpc_server(self.transport, target, [ApiEndpoint(self.db, clock)])
            self._server_thread = threading.Thread(target=self._start_server, name="ekko-api-bus", daemon=True)
            self._server_thread.start()

    def _start_server(self) -> None:
        try:
            self.server.start()
        except Exception as e:   # noqa: BLE001 -- logged: the API answers 503/409 without heartbeats
            log.error("message bus: the API's RPC server did not start: %s: %s", type(e).__name__, e)
            return
        log.info("message bus: taking the agents' reports on topic %s", API_TOPIC)

    def wait_listening(self, timeout: float) -> bool:
        """True once the RPC server took its queues (for tests and start-up checks)."""
        if self._server_thread is None:
            return False
        self._server_thread.join(timeout)
        return not self._server_thread.is_alive()

    def stop(self) -> None:
        if self.server is not None and self.wait_listening(1):
            self.server.stop()
            self.server.wait()
        elif self.server is not None:
            log.warning("message bus: the API's RPC server never connected: not waiting for it")
        self.server = None
        if self._stuck_calls:            # cleanup() would wait for their lock as long as they wait
            log.warning("message bus: calls still wait for the broker: connections left to the process's end")
            return
        self.transport.cleanup()

    # -- for the app --------------------------------------------------------------------------------
    def backup_now(self, host: str, domain_uuid: str, force_full: bool = False) -> str:
        """-> the job id, at once or after at most [bus] call_timeout; the job is failed already
        when the agent is silent, did not take the request in time, or refused it."""
        job_id = "job-" + uuid.uuid4().hex
        why = busrules.not_answering(host, self.db.host(host), self.clock())
        if why is not None:                     # no message: nobody would take it
            log.warning("job %s: %s", job_id, why)
            self.db.add_job(job_id, host, domain_uuid, "failed", why, self.clock())
            return job_id
        self.db.add_job(job_id, host, domain_uuid, "queued", None, self.clock())
        timeout = self.conf.bus.call_timeout
        if self.server is not None and not self.wait_listening(0):
            self._fail(job_id, "the API has not reached the message bus yet (RabbitMQ unreachable since it started)")
            return job_id
        try:
            reply = self._call(host, timeout, job_id=job_id, domain_uuid=domain_uuid, force_full=bool(force_full))
        except oslo_messaging.MessagingTimeout:
            self._fail(job_id, f"agent on {host} is not answering (it did not take the request within "
                               f"{timeout:g} s; {self._last_heartbeat(host)})")
        except oslo_messaging.RemoteError as e:         # the agent's endpoint raised: a bug there
            self._fail(job_id, f"agent on {host} failed on the request: {e.exc_type}")
        except Exception as e:   # noqa: BLE001 -- MessageDeliveryFailure, the driver's errors: the job's error
            self._fail(job_id, f"the message bus did not carry the request to the agent on {host}: "
                               f"{type(e).__name__}")
        else:
            if isinstance(reply, Mapping) and reply.get("accepted"):
                self.db.accepted(job_id, str(reply.get("agent_id") or ""))
            else:
                err = reply.get("error") if isinstance(reply, Mapping) else None
                self._fail(job_id, f"agent on {host} refused the request: {str(err or reply)[:500]}")
        return job_id

    def _call(self, host: str, timeout: float, **kwargs: Any) -> Any:
        """The backup_now call, never longer than timeout + CALL_GRACE_S. retry=0: a broker that is
        down fails it now; the timeout is also the message's expiration on the broker (an agent
        that comes back later does not run a request its caller gave up on). The hard bound is for
        what retry=0 does not cover: the first call of a process creates its reply queue on a
        connection that retries for ever while the broker is away. Such a call goes on in its
        thread and may still be delivered when the broker returns: its job has failed by then and
        stays failed (a final state never changes); a backup it makes is in the store all the same."""
        box: Dict[str, Any] = {}

        def call() -> None:
            try:
                box["reply"] = self.client.prepare(server=host, timeout=timeout, retry=0).call(
                    {}, "backup_now", **kwargs)
            except Exception as e:   # noqa: BLE001 -- handed to the caller's thread as it is
                box["error"] = e
        t = threading.Thread(target=call, name="ekko-api-bus-call", daemon=True)
        t.start()
        t.join(timeout + CALL_GRACE_S)
        if t.is_alive():
            self._stuck_calls = True
            raise BusUnreachable(f"no answer from the message bus within {timeout + CALL_GRACE_S:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("reply")

    def job(self, job_id: str) -> Optional[Dict[str, Any]]:
        j = self.db.job(job_id)
        if j is None or j["state"] in busrules.FINAL:
            return j
        why = busrules.not_answering(j["host"], self.db.host(j["host"]), self.clock())
        if why is not None:
            for ch in busrules.silenced(self.db.open_jobs(j["host"]), why):
                self.db.update_job(ch.job_id, ch.state, ch.result, ch.error, self.clock())
            j = self.db.job(job_id)
        return j

    def hosts(self) -> List[Dict[str, Any]]:
        now = self.clock()
        out = []
        for h in self.db.hosts():
            alive = busrules.not_answering(h["host"], h, now) is None
            out.append({"host": h["host"], "last_heartbeat": busrules.when(h["last_heartbeat"]),
                        "version": h["version"], "interval_s": h["interval_s"], "domains": h["domains"],
                        "failing": h["failing"], "alive": alive, "down": not alive})
        return out

    def _fail(self, job_id: str, why: str) -> None:
        log.warning("job %s: %s", job_id, why)
        self.db.update_job(job_id, "failed", None, why, self.clock())

    def _last_heartbeat(self, host: str) -> str:
        row = self.db.host(host)
        return f"last heartbeat {busrules.when(row['last_heartbeat'])}" if row else "never heartbeated"

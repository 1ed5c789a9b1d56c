"""The agent's metrics, exposed: facts gathered from the state directory, the store and libvirt
every `agent.metrics.interval` in one thread, turned into families by metrics.py (pure), then
served over HTTP (GET /metrics) and/or written to a node_exporter textfile.

    start     the HTTP server (its own thread; a port in use is logged and the agent goes on: backups
              matter more than their metrics, and the failed scrape is what alerts) + the gather thread
    gather    one round: domains (state dir + libvirt), their jobs, the newest manifest of each disk
              (read from the store only when the domain's last backup changed), the lifecycle record,
              the agent's own health; a part that cannot be read is left out and counted
    stop      the textfile is rewritten with ekko_agent_up 0 (a killed agent leaves up 1: the
              collected timestamp then goes stale, which the example alert rules watch)

Scrapes never touch the store or libvirt: they get the last gathered families.
"""

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import EkkoError
from . import metrics
from .metrics import AgentFacts, DomainFacts, Family
from .settings import AgentSettings, MetricsSettings
from .state import JobRecord, JobStatus, StateDir, process_alive
from .status import domain_heads, hook_info

log = logging.getLogger("ekko.agent")


def to_client_families(fams: List[Family]) -> List[Any]:
    """metrics.Family -> prometheus_client's metric families (a counter's name loses its _total:
    the client adds it to the sample)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    out: List[Any] = []
    for f in fams:
        names = sorted({k for s in f.samples for k, _ in s.labels})
        if f.kind == "counter":
            fam: Any = CounterMetricFamily(f.name.removesuffix("_total"), f.help, labels=names)
        else:
            fam = GaugeMetricFamily(f.name, f.help, labels=names)
        for s in f.samples:
            d = dict(s.labels)
            fam.add_metric([d.get(k, "") for k in names], s.value)
        out.append(fam)
    return out


class _Collector:
    """A prometheus_client collector that hands out the last gathered families."""

    def __init__(self) -> None:
        self.families: List[Family] = []

    def collect(self):
        return iter(to_client_families(self.families))


def registry_for(collector: _Collector):
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)         # type: ignore[arg-type]  # a collector by protocol: collect()
    return reg


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _handler(registry) -> type:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:        # noqa: N802 -- http.server's name
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:     # noqa: A002 -- scrapes are not news
            pass
    return Handler


class MetricsRunner:
    def __init__(self, settings: AgentSettings, sd: StateDir, open_store: Callable, conn: Callable[[], Any],
                 workers: Callable[[], Dict[str, Any]], stopping: threading.Event):
        self.settings = settings               # replaced as a whole on SIGHUP (Agent.settings)
        self.sd = sd
        self.open_store = open_store
        self.conn = conn                        # -> the agent's libvirt connection, or None
        self.workers = workers                  # -> the agent's running backup workers by UUID
        self.stopping = stopping
        self.started_ns = time.time_ns()
        self.collector = _Collector()
        self.registry = registry_for(self.collector)
        self.errors = 0
        self.heads: Dict[str, Tuple[Optional[str], Dict[str, Dict]]] = {}   # uuid -> (last backup id, heads)
        self.server: Optional[_Server] = None
        self.threads: List[threading.Thread] = []
        self.wake = threading.Event()

    @property
    def conf(self) -> Optional[MetricsSettings]:
        return self.settings.metrics

    # -- life -----------------------------------------------------------------------------------------
    def start(self) -> None:
        conf = self.conf
        if conf is None:
            return
        self.gather()          # figures before the first scrape
        if conf.listen_host is not None:
            self._serve(conf.listen_host, conf.listen_port)
        t = threading.Thread(target=self._loop, name="ekko-metrics", daemon=True)
        t.start()
        self.threads.append(t)

    def _serve(self, host: str, port: int) -> None:
        cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
        try:
            self.server = cls((host, port), _handler(self.registry))
        except OSError as e:
            log.error("metrics: cannot listen on %s:%d: %s; no HTTP endpoint (the agent goes on)", host, port,
                      e.strerror or e)
            return
        bound = self.server.server_address
        log.info("metrics: serving http://%s:%d/metrics", f"[{host}]" if ":" in host else host, bound[1])
        t = threading.Thread(target=self.server.serve_forever, name="ekko-metrics-http", daemon=True)
        t.start()
        self.threads.append(t)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            conf = self.conf
            self.wake.wait(conf.interval_s if conf is not None else 60)
            self.wake.clear()
            if self.stopping.is_set() or self.conf is None:
                break
            self.gather()

    def stop(self) -> None:
        self.wake.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for t in self.threads:
            t.join(10)
        conf = self.conf
        if conf is not None and conf.textfile:
            fams = [f if f.name != "ekko_agent_up" else Family(f.name, f.help, (metrics.Sample((), 0.0),))
                    for f in self.collector.families]
            self._write_textfile(conf.textfile, fams)

    # -- one round ------------------------------------------------------------------------------------
    def gather(self) -> None:
        try:
            fams = metrics.families(self._domains(), self.sd.load_lifecycle(), self._agent_facts())
        except Exception as e:   # noqa: BLE001 -- the metrics must never take the agent down
            self.errors += 1
            log.exception("metrics: gathering failed: %s", e)
            return
        self.collector.families = fams
        conf = self.conf
        if conf is not None and conf.textfile:
            self._write_textfile(conf.textfile, fams)

    def _write_textfile(self, path: str, fams: List[Family]) -> None:
        from prometheus_client import write_to_textfile
        coll = _Collector()
        coll.families = fams
        try:
            write_to_textfile(path, registry_for(coll))      # a temp file renamed over the old one
        except OSError as e:
            self.errors += 1
            log.error("metrics: cannot write %s: %s", path, e.strerror or e)

    def _agent_facts(self) -> AgentFacts:
        s = self.settings
        hook = hook_info(s.hook_path, s.spool_dir)
        return AgentFacts(started_ns=self.started_ns, libvirt_connected=self.conn() is not None,
                          max_concurrent=s.max_concurrent, jobs_running=len(self.workers()),
                          spool_waiting=hook["waiting"], spool_quarantined=hook["quarantined"],
                          hook_ok=bool(hook["installed"] and hook["rule_ok"]), collected_ns=time.time_ns(),
                          collect_errors=self.errors, sync_interval_s=s.sync.interval_s if s.sync else None)

    def _domains(self) -> List[DomainFacts]:
        states = {st.uuid: st for st in self.sd.list_domains()}
        libvirt_doms: Dict[str, Any] = {}
        conn = self.conn()
        if conn is not None:
            try:
                libvirt_doms = {d.UUIDString().lower(): d for d in conn.listAllDomains()}
            except Exception as e:   # noqa: BLE001 -- libvirt went away: the state directory still knows
                self.errors += 1
                log.warning("metrics: cannot list libvirt's domains: %s", e)
        jobs: Dict[str, List[JobRecord]] = {}
        for j in self.sd.list_jobs():
            jobs.setdefault(j.uuid, []).append(j)
        names = {u: (libvirt_doms[u].name() if u in libvirt_doms else (states[u].name if u in states else None))
                 for u in set(states) | set(libvirt_doms)}
        overrides = self.settings.overrides(names.items())
        running = self.workers()
        out = []
        for uuid, name in names.items():
            st = states.get(uuid)
            policy = self.settings.schedule.merged(overrides.get(uuid))
            live = uuid in running or any(j.status is JobStatus.RUNNING and process_alive(j.pid, j.pid_start)
                                          for j in jobs.get(uuid, ()))
            out.append(DomainFacts(uuid, name or uuid, st, tuple(jobs.get(uuid, ())),
                                   self._heads(uuid, st.chain.last_backup_id if st else None, libvirt_doms.get(uuid)),
                                   policy.interval_s if policy.enabled else None, live))
        return out

    def _heads(self, uuid: str, last_id: Optional[str], dom: Any) -> Dict[str, Dict]:
        """The newest manifest header of each disk: read from the store again only when the
        domain's last backup changed (a backup by the agent or by `ekko backup`)."""
        known = self.heads.get(uuid)
        if known is not None and known[0] == last_id:
            return known[1]
        if dom is None:
            return known[1] if known else {}
        try:
            heads = domain_heads(dom.XMLDesc(0), self.open_store)
        except (EkkoError, OSError) as e:
            self.errors += 1
            log.warning("metrics: cannot read the backups of %s from the store: %s", uuid, e)
            return known[1] if known else {}
        except Exception as e:   # noqa: BLE001 -- libvirtError: the domain went away meanwhile
            self.errors += 1
            log.warning("metrics: cannot read the disks of %s: %s", uuid, e)
            return known[1] if known else {}
        self.heads[uuid] = (last_id, heads)
        return heads

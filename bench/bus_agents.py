#!/usr/bin/env python3
"""The message bus under 200 agents (issue 19: "200 simulated agents heartbeating every 10 s: API
and bus CPU reported; nothing lost").

    .venv/bin/python bench/bus_agents.py                               # 200 agents, 10 s, 60 s measured
    .venv/bin/python bench/bus_agents.py --agents 40 --interval 2 --duration 10      # smoke run

In one run:
  broker    a real RabbitMQ of its own (tests/harness/rabbitmq.py: Debian's rabbitmq-server, its own
            node, ports and directory); its PID is the node's beam.smp
  API       --api-workers processes (default 2: conf.py's [api] workers, what `ekko-api serve`
            forks), each making the API's Bus from an ekko-api.conf file ([DEFAULT] transport_url,
            [bus] state_path, call_timeout) as app.py does: each one's RPC server takes its share of
            the casts on topic ekko-api, all write the same SQLite file (busdb.py)
  agents    --agents AgentBus instances (api/bus_agent.py, each its own transport and connections,
            its own RPC server on topic ekko-agent, server = its host), distinct hosts with
            --domains domains each, spread over --procs processes. A real agent is one process per
            compute host; 200 Python processes with oslo.messaging loaded (~65 MB RSS each with no
            agent in it, measured here; a process of 50 agents: its RSS is printed) on a
            2-core machine would measure the machine's scheduler and memory, not the bus: the
            broker still sees 200 agents' connections, channels and queues. Starts are spread
            over one interval, as agents that started at different times beat at different phases.
            The agents' endpoint answers a backup_now like the real agent (job_state "queued",
            then handed to `submit`), and `submit` reports the job "done" at once (a job_update).
  window    once every agent registered and its RPC server is up: --duration seconds (default 6
            intervals: >= 5 heartbeats per agent) in which the CPU of each side is measured, the
            load average sampled every second, Bus.hosts() asked every interval (no host may be
            down), and --calls backup_now calls made by API worker 0 to random agents, spread over
            the window (each must be accepted by that agent's endpoint; latency p50/p95/max)
  end       Bus.hosts(): every agent alive, none down, its last heartbeat at most one interval
            (+ 2 s) old; then the agents stop (each sends what it has queued) and the heartbeats
            they sent (register + heartbeat casts the driver took) are compared, host by host,
            with the heartbeats the API stored (counted around BusDB.save_host in the API
            processes). One lost, one host down, one call not accepted, one job not "done": exit 1.

Everything started is stopped by its PID (the processes of multiprocessing, the broker's node and
its epmd); the temp directory is removed. Random choices come from --seed (printed). Not part of
`make test`. Output: a table on stdout, JSON in bench/out/.
"""

import argparse
import collections
import datetime
import json
import logging
import multiprocessing as mp
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs  # noqa: E402  (puts the repository root on sys.path)

from tests.harness.rabbitmq import RabbitServer, missing_prerequisites  # noqa: E402

DOMAIN_NS = uuid.UUID("0b6d3c52-7a1e-4c1a-9d64-2f8e1f1b0c19")   # domain uuids derived from host names
START_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 30.0
CALL_GAP_MAX_S = 1.0


def domains_of(host: str, n: int) -> List[Dict[str, Any]]:
    return [{"uuid": str(uuid.uuid5(DOMAIN_NS, f"{host}/{i}")), "name": f"{host}-vm{i}", "running": True}
            for i in range(n)]


def _quiet_logs() -> None:
    # warnings only: the bench's figures are the output; a warning (a cast not sent, a bad
    # report) is worth seeing. No record carries the transport password (bus_agent.redact_url).
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(name)s %(levelname)s %(message)s")
    # py-amqp warns "Received method (60, 30) during closing channel" for every consumer whose
    # channel closes with a delivery on its way (at stop); the heartbeat counts say whether any
    # report was lost, these lines do not
    logging.getLogger("amqp").setLevel(logging.ERROR)


# -- an API process (the Bus as an ekko-api worker makes it) ----------------------------------------------
def api_process(conf_path: str, conn: Connection) -> None:
    _quiet_logs()
    from ekko_libvirt.api import conf as api_conf
    from ekko_libvirt.api.bus import Bus

    bus = Bus(api_conf.load(files=[conf_path]))
    stored: "collections.Counter[str]" = collections.Counter()
    lock = threading.Lock()
    save_host = bus.db.save_host

    def counted(host: str, *args: Any) -> None:       # the endpoint shares this BusDB object
        save_host(host, *args)
        with lock:
            stored[host] += 1
    bus.db.save_host = counted  # type: ignore[method-assign, assignment]  # a counting wrapper
    conn.send(("ready", bus.wait_listening(START_TIMEOUT_S)))
    calls: Dict[str, Any] = {}
    while True:
        cmd, arg = conn.recv()
        if cmd == "hosts":
            conn.send(hosts_summary(bus))
        elif cmd == "calls":
            t = threading.Thread(target=lambda a: calls.update(result=make_calls(bus, *a)), args=(arg,), daemon=True)
            t.start()
            calls["thread"] = t
            conn.send("started")
        elif cmd == "calls_result":
            calls["thread"].join()
            conn.send(calls["result"])
        elif cmd == "stored":
            with lock:
                conn.send(dict(stored))
        elif cmd == "stop":
            bus.stop()
            conn.send("stopped")
            return


def hosts_summary(bus: Any) -> Dict[str, Any]:
    t = time.monotonic()
    hosts = bus.hosts()
    asked_s = time.monotonic() - t
    now = time.time()
    rows = bus.db.hosts()         # the raw times: Bus.hosts() gives them to the second
    return {"n": len(hosts), "alive": sum(h["alive"] for h in hosts), "down": sorted(h["host"] for h in hosts
                                                                                      if h["down"]),
            "max_age_s": max((now - r["last_heartbeat"] for r in rows), default=None),
            "agent_ids": len({r["agent_id"] for r in rows}), "hosts_call_s": asked_s}


def make_calls(bus: Any, targets: List[Tuple[str, str]], gap_s: float) -> List[Dict[str, Any]]:
    """backup_now to each (host, domain) in turn, one every gap_s; the job must be queued and
    carry the agent's id (the agent's endpoint took it)."""
    out = []
    for host, dom in targets:
        t = time.monotonic()
        job_id = bus.backup_now(host, dom)
        took = time.monotonic() - t
        job = bus.db.job(job_id)
        out.append({"host": host, "job_id": job_id, "s": took, "state": job["state"], "agent_id": job["agent_id"],
                    "error": job["error"]})
        time.sleep(max(0.0, gap_s - took))
    return out


def job_states(state_path: str, job_ids: List[str]) -> Dict[str, Optional[str]]:
    from ekko_libvirt.api.busdb import BusDB
    db = BusDB(state_path)
    return {j: (row["state"] if (row := db.job(j)) else None) for j in job_ids}


# -- an agents' process ------------------------------------------------------------------------------
def agents_process(url: str, hosts: List[str], ndomains: int, interval: float, spread_s: float,
                   conn: Connection) -> None:
    _quiet_logs()
    from ekko_libvirt.agent.settings import BusSettings
    from ekko_libvirt.api.bus_agent import AgentBus

    class CountingAgentBus(AgentBus):
        """Counts the casts the driver took (sent) and those it refused, per method."""
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.sent: "collections.Counter[str]" = collections.Counter()
            self.refused: "collections.Counter[str]" = collections.Counter()

        def _cast(self, method: str, kwargs: Dict[str, Any]) -> bool:
            ok = super()._cast(method, kwargs)
            (self.sent if ok else self.refused)[method] += 1
            return ok

    received: Dict[str, List[str]] = collections.defaultdict(list)
    agents: List[CountingAgentBus] = []

    def make(host: str) -> CountingAgentBus:
        def submit(req: Any) -> None:          # the agent's loop would run the backup; report it done
            received[host].append(req.job_id)
            bus.job_state(req.job_id, "done", {"backup_id": "bench-" + req.job_id})
        doms = domains_of(host, ndomains)
        bus = CountingAgentBus(BusSettings(url, host, interval), "bench", lambda: {"domains": doms, "failing": []},
                               submit)
        return bus

    t0 = time.monotonic()
    for i, host in enumerate(hosts):
        time.sleep(max(0.0, t0 + i * spread_s / len(hosts) - time.monotonic()))
        a = make(host)
        a.start()
        agents.append(a)
    for a in agents:
        assert a._server_thread is not None
        a._server_thread.join(START_TIMEOUT_S)
    conn.send(("ready", sum(a._server_thread is not None and not a._server_thread.is_alive() for a in agents)))
    cmd, _ = conn.recv()
    assert cmd == "stop", cmd
    with ThreadPoolExecutor(max_workers=len(agents)) as pool:     # each stop waits on its own threads
        list(pool.map(lambda a: a.stop(), agents))
    conn.send({"sent": {a.host: a.sent["register"] + a.sent["heartbeat"] for a in agents},
               "refused": {a.host: sum(a.refused.values()) for a in agents},
               "job_updates": sum(a.sent["job_update"] for a in agents), "received": dict(received)})


# -- the bench -----------------------------------------------------------------------------------------
class Children:
    """The bench's processes: started with a pipe each, stopped by their PID."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")        # no fork of a process with threads or connections
        self.procs: List[Any] = []

    def start(self, target: Any, *args: Any) -> Tuple[Any, Connection]:
        here, there = self.ctx.Pipe()
        p = self.ctx.Process(target=target, args=(*args, there), daemon=True)
        p.start()
        there.close()
        self.procs.append(p)
        return p, here

    def stop_all(self) -> None:
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()              # SIGTERM to p.pid
                p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def ask(conn: Connection, cmd: str, arg: Any = None, timeout: float = 120.0) -> Any:
    conn.send((cmd, arg))
    if not conn.poll(timeout):
        raise RuntimeError(f"no answer to {cmd!r} within {timeout:g} s")
    return conn.recv()


def expect_ready(conn: Connection, what: str) -> Any:
    if not conn.poll(START_TIMEOUT_S + 60):
        raise RuntimeError(f"{what} not ready within {START_TIMEOUT_S + 60:g} s")
    tag, value = conn.recv()
    assert tag == "ready", tag
    return value


class LoadSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: List[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            with open("/proc/loadavg") as f:
                self.samples.append(float(f.read().split()[0]))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_of(pids: List[int]) -> float:
    return sum(procs.cpu_seconds(p) for p in pids)


def pct(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def wait_registered(api: Connection, n: int, timeout: float) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        h = ask(api, "hosts")
        if h["n"] >= n and h["alive"] == n:
            return h
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {h['n']} of {n} agents registered ({h['alive']} alive) within {timeout:g} s")
        time.sleep(0.5)


def run(args: argparse.Namespace, work: str, children: Children, rabbit: RabbitServer) -> Dict[str, Any]:
    rng = random.Random(args.seed)
    conf_path = os.path.join(work, "ekko-api.conf")
    with open(conf_path, "w") as f:
        f.write(f"[DEFAULT]\ntransport_url = {rabbit.transport_url}\n"
                f"[bus]\nstate_path = {work}/bus.sqlite\ncall_timeout = {args.call_timeout}\n")
    os.chmod(conf_path, 0o600)                        # it holds the bus password
    apis = [children.start(api_process, conf_path) for _ in range(args.api_workers)]
    for i, (_, c) in enumerate(apis):
        if not expect_ready(c, f"API process {i}"):
            raise RuntimeError(f"API process {i}: its RPC server did not reach RabbitMQ")
    hosts = [f"bench-cmp{i:04d}" for i in range(args.agents)]
    groups = [hosts[i::args.procs] for i in range(args.procs)]
    t = time.monotonic()
    agents = [children.start(agents_process, rabbit.transport_url, g, args.domains, args.interval, args.interval)
              for g in groups if g]
    servers = sum(expect_ready(c, "agents' process") for _, c in agents)
    if servers != args.agents:
        raise RuntimeError(f"only {servers} of {args.agents} agents' RPC servers reached RabbitMQ")
    wait_registered(apis[0][1], args.agents, START_TIMEOUT_S)
    start_s = time.monotonic() - t
    print(f"{args.agents} agents registered, RPC servers up, in {start_s:.1f} s; measuring {args.duration:g} s",
          flush=True)

    api_pids = [p.pid for p, _ in apis]
    agent_pids = [p.pid for p, _ in agents]
    beam = rabbit.proc.pid if rabbit.proc else 0
    targets = [(h, rng.choice(domains_of(h, args.domains))["uuid"]) for h in rng.choices(hosts, k=args.calls)]
    gap = min(CALL_GAP_MAX_S, args.duration * 0.8 / max(1, args.calls))
    load = LoadSampler()
    sampler = apis[-1][1]
    before = {"api": cpu_of(api_pids), "agents": cpu_of(agent_pids), "rabbit": procs.cpu_seconds(beam),
              "bench": _own_cpu()}
    t0 = time.monotonic()
    load.start()
    ask(apis[0][1], "calls", (targets, gap))
    samples = []
    while time.monotonic() - t0 < args.duration:
        time.sleep(max(0.0, min(args.interval, t0 + args.duration - time.monotonic())))
        samples.append(ask(sampler, "hosts"))
    wall = time.monotonic() - t0
    after = {"api": cpu_of(api_pids), "agents": cpu_of(agent_pids), "rabbit": procs.cpu_seconds(beam),
             "bench": _own_cpu()}
    load.halt.set()
    rss = {"api": [rss_mib(p) for p in api_pids], "agents": [rss_mib(p) for p in agent_pids], "rabbit": rss_mib(beam)}
    end = ask(sampler, "hosts")
    calls = ask(apis[0][1], "calls_result", timeout=args.calls * (args.call_timeout + 3) + 60)

    stopped = [ask(c, "stop", timeout=120) for _, c in agents]
    sent = {h: n for s in stopped for h, n in s["sent"].items()}
    stored = drain(apis, sent)
    received = {h: j for s in stopped for h, j in s["received"].items()}
    states = job_states(os.path.join(work, "bus.sqlite"), [c["job_id"] for c in calls])
    for _, c in apis:
        ask(c, "stop", timeout=60)
    return {"start_s": start_s, "wall_s": wall, "cpu": {k: after[k] - before[k] for k in before},
            "load": load.samples, "rss": rss, "samples": samples, "end": end, "calls": calls, "sent": sent,
            "stored": stored,
            "refused": sum(n for s in stopped for n in s["refused"].values()),
            "job_updates": sum(s["job_updates"] for s in stopped), "received": received, "states": states}


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def drain(apis: List[Tuple[Any, Connection]], sent: Dict[str, int]) -> Dict[str, int]:
    """The API's stored heartbeats per host, once they add up to what was sent (or the drain timed out)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        stored: "collections.Counter[str]" = collections.Counter()
        for _, c in apis:
            stored.update(ask(c, "stored"))
        if sum(stored.values()) >= sum(sent.values()) or time.monotonic() > deadline:
            return dict(stored)
        time.sleep(0.2)


def verdict(args: argparse.Namespace, r: Dict[str, Any]) -> List[str]:
    """Every way the run can be wrong, one line each; empty when nothing was lost."""
    bad = []
    lost = {h: (n, r["stored"].get(h, 0)) for h, n in r["sent"].items() if r["stored"].get(h, 0) != n}
    if lost:
        bad.append(f"{len(lost)} hosts' heartbeats sent != stored (sent, stored): {dict(list(lost.items())[:5])}")
    extra = set(r["stored"]) - set(r["sent"])
    if extra:
        bad.append(f"heartbeats stored for hosts no agent here is: {sorted(extra)[:5]}")
    if r["refused"]:
        bad.append(f"{r['refused']} casts refused by the driver (the broker never was down)")
    few = {h: n for h, n in r["sent"].items() if n < int(r["wall_s"] // args.interval)}
    if few:
        bad.append(f"{len(few)} agents sent fewer heartbeats than the window holds: {dict(list(few.items())[:5])}")
    for s in [*r["samples"], r["end"]]:
        if s["n"] != args.agents or s["alive"] != args.agents or s["down"] or s["agent_ids"] != args.agents:
            bad.append(f"Bus.hosts(): {s['n']} hosts, {s['alive']} alive, down {s['down'][:5]}, "
                       f"{s['agent_ids']} agent ids")
    if r["end"]["max_age_s"] is None or r["end"]["max_age_s"] > args.interval + 2:
        bad.append(f"a last heartbeat {r['end']['max_age_s']} s old at the end (interval {args.interval:g} s)")
    by_job = {j: h for h, js in r["received"].items() for j in js}
    for c in r["calls"]:
        if c["state"] == "failed" or not c["agent_id"]:
            bad.append(f"backup_now to {c['host']}: {c['state']}, {c['error']}")
        elif by_job.get(c["job_id"]) != c["host"]:
            bad.append(f"backup_now {c['job_id']} to {c['host']} reached {by_job.get(c['job_id'])}")
        elif r["states"].get(c["job_id"]) != "done":
            bad.append(f"job {c['job_id']} on {c['host']} ended {r['states'].get(c['job_id'])}, not done")
    if len(r["calls"]) != args.calls:
        bad.append(f"{len(r['calls'])} of {args.calls} calls made")
    return bad


def report(args: argparse.Namespace, r: Dict[str, Any]) -> Dict[str, Any]:
    wall = r["wall_s"]
    lat = [c["s"] * 1000 for c in r["calls"]]
    beats = sum(r["sent"].values())
    out = {
        "agents": args.agents, "agent_processes": args.procs, "api_workers": args.api_workers,
        "interval_s": args.interval, "window_s": round(wall, 1), "start_s": round(r["start_s"], 1),
        "cpu_s": {k: round(v, 2) for k, v in r["cpu"].items()},
        "core_pct": {k: round(100 * v / wall, 1) for k, v in r["cpu"].items()},
        "heartbeats_sent": beats, "heartbeats_stored": sum(r["stored"].values()),
        "per_agent_min_max": [min(r["sent"].values()), max(r["sent"].values())],
        "heartbeats_per_s": round(beats / (wall + r["start_s"]), 1),
        "job_updates": r["job_updates"],
        "backup_now_ms": {"n": len(lat), "p50": round(statistics.median(lat), 1), "p95": round(pct(lat, 0.95), 1),
                          "max": round(max(lat), 1)} if lat else None,
        "rss_mib": {k: [round(x) for x in v] if isinstance(v, list) else round(v) for k, v in r["rss"].items()},
        "hosts_call_ms_max": round(1000 * max(s["hosts_call_s"] for s in [*r["samples"], r["end"]]), 1),
        "load_1min": {"min": min(r["load"]), "mean": round(statistics.mean(r["load"]), 2),
                      "max": max(r["load"])} if r["load"] else None,
    }
    print(f"\n{args.agents} agents ({args.domains} domains each) in {args.procs} processes, heartbeat every "
          f"{args.interval:g} s; {args.api_workers} API processes; window {wall:.1f} s (start-up {r['start_s']:.1f} s)")
    print(f"{'side':<28}{'CPU s':>8}{'% of a core':>13}")
    names = {"api": f"API ({args.api_workers} processes)", "agents": f"agents ({args.procs} processes)",
             "rabbit": "RabbitMQ (beam.smp)", "bench": "bench main process"}
    for k, name in names.items():
        print(f"{name:<28}{out['cpu_s'][k]:>8.2f}{out['core_pct'][k]:>13.1f}")
    print(f"heartbeats sent {beats}, stored by the API {out['heartbeats_stored']} "
          f"(per agent {out['per_agent_min_max'][0]}-{out['per_agent_min_max'][1]}); job updates {r['job_updates']}")
    print(f"Bus.hosts() at the end: {r['end']['alive']}/{r['end']['n']} alive, down {len(r['end']['down'])}, "
          f"oldest heartbeat {r['end']['max_age_s']:.1f} s; {len(r['samples'])} samples in the window, "
          f"slowest hosts() {out['hosts_call_ms_max']} ms")
    if lat:
        b = out["backup_now_ms"]
        print(f"backup_now to a random agent: n={b['n']} p50 {b['p50']} ms, p95 {b['p95']} ms, max {b['max']} ms")
    print(f"RSS MiB: API {out['rss_mib']['api']}, agents' processes {out['rss_mib']['agents']}, "
          f"beam.smp {out['rss_mib']['rabbit']}")
    if out["load_1min"]:
        ld = out["load_1min"]
        print(f"load average (1 min) during the window: {ld['min']:.2f}-{ld['max']:.2f}, mean {ld['mean']:.2f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--procs", type=int, default=4, help="processes the agents are spread over")
    ap.add_argument("--domains", type=int, default=3, help="domains per agent")
    ap.add_argument("--interval", type=float, default=10.0, help="heartbeat interval, s")
    ap.add_argument("--duration", type=float, default=None, help="measured window, s (default: 6 intervals)")
    ap.add_argument("--api-workers", type=int, default=2, help="API processes (default: conf.py's [api] workers)")
    ap.add_argument("--calls", type=int, default=50, help="backup_now calls during the window")
    ap.add_argument("--call-timeout", type=float, default=5.0, help="[bus] call_timeout")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    args.duration = 6 * args.interval if args.duration is None else args.duration
    args.seed = random.randrange(2**32) if args.seed is None else args.seed
    if args.agents < 1 or args.procs < 1 or args.api_workers < 1 or args.interval < 0.2:
        ap.error("--agents, --procs, --api-workers >= 1 and --interval >= 0.2 (busrules' lower bound)")
    if missing_prerequisites():
        sys.exit(f"RabbitMQ is not installed (missing {missing_prerequisites()}; Debian: rabbitmq-server)")
    print(f"seed {args.seed}", flush=True)
    work = tempfile.mkdtemp(prefix="ekko-bench-bus-", dir="/tmp")
    rabbit = RabbitServer(Path(work) / "rabbit")
    children = Children()
    try:
        rabbit.start()
        r = run(args, work, children, rabbit)
    finally:
        children.stop_all()
        rabbit.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = report(args, r)
    bad = verdict(args, r)
    for line in bad:
        print("WRONG:", line)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(HERE, "out", f"bus-agents-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "result": out, "wrong": bad}, f, indent=1)
    print(f"JSON: {path}; {'NOTHING LOST' if not bad else f'{len(bad)} things wrong'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

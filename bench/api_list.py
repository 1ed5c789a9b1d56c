#!/usr/bin/env python3
"""ekko-api's list endpoints under load (issue 19: 1,000 instances x 30 backups, 50 concurrent
clients, p95 < 200 ms on 2 cores).

    .venv/bin/python bench/api_list.py                          # 1,000 x 30, 50 clients, 20 s per phase
    .venv/bin/python bench/api_list.py --instances 100 --seconds 5 --clients 10     # smoke run

In one run:
  store     a local store: project p1 (Keystone's) with N instances x B backups (one disk each),
            project p2 with a few; manifests made by ekko's own encoder (format/manifest.py) as
            the backup pipeline commits them (all-zero tiny disks: no segment objects), written
            through the local store's batch (one syncfs per 256, not two fsyncs each)
  services  a real Keystone (tests/harness/keystone.py) and `ekko-api --config-file F serve`
            (gunicorn, [api] workers/threads left at conf.py's defaults, index_max_age too)
            behind auth_token against that Keystone; tokens issued by Keystone for p1's and
            p2's members
  cold      the first request that validates p1's token (a 400: an unknown query parameter is
            refused before the index is touched), then the first GET /v1/instances, which
            builds p1's index from the store, with --peers clients asking meanwhile (they must
            get whole answers), then the same request warm
  warm-up   --warmup s of mixed load, reported apart (each worker validates each token once)
  phases    C client threads, each with its own keep-alive HTTP connection, no think time, for
            S seconds per phase:
              instances  GET /v1/instances (first page, 100 of N)
              paging     whole walks of GET /v1/instances?marker=... (every page a request)
              backups    GET /v1/instances/<random uuid>/backups; 1 in 10 by p2's member for
                         p2's instances, 1 in 20 by p1's member for a p2 instance (404)
              mixed      the three above, drawn at random per request
            For each: p50/p95/p99/max latency (ms), requests/s, CPU seconds of ekko-api's
            gunicorn (master + workers) and of Keystone's during the phase, the bench's own CPU
            (the clients share the 2 cores), the 1-minute load average at its end.
            index_max_age is conf.py's 60 s: one refresh from the store falls inside the phases,
            as it would in the field.
Every answer is checked: status, the count of instances/backups, the ids, the project; a walk of
the pages must give the N instances exactly once. One wrong or 5xx answer fails the run (exit 1,
the first ones printed). Random choices come from --seed (printed). Nothing here is part of
`make test`. Output: a table on stdout, JSON in bench/out/.
"""

import argparse
import datetime
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs  # noqa: E402  (puts the repository root on sys.path)

from ekko_libvirt import config as ekko_config  # noqa: E402
from ekko_libvirt.format import manifest as mf  # noqa: E402
from ekko_libvirt.store import catalog  # noqa: E402
from ekko_libvirt.store.factory import open_store  # noqa: E402
from tests.harness.keystone import KeystoneServer, missing_prerequisites  # noqa: E402

HOST = "127.0.0.1"
SEG = 1 << 20
DISK = 4 * SEG
PEERS_AFTER = 0.3                # s after the first list starts, its peers ask (the build takes longer)
PAGE = 100                       # conf.py's page_default: what a client gets without ?limit
VENV_BIN = os.path.dirname(sys.executable)
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# -- the store ------------------------------------------------------------------------------------------
@dataclass
class Project:
    """One Keystone project's backups as the bench made them: instance uuid -> backup ids, oldest first."""
    pid: str
    instances: Dict[str, List[str]] = field(default_factory=dict)


def make_manifest(project: str, inst: str, name: str, bid: str, first: bool) -> mf.Manifest:
    table = mf.SegmentTable(mf.segment_count(DISK, SEG))
    for i in range(table.count):
        table.set_zero(i)
    return mf.Manifest(backup_id=bid, target=f"instance-{name}.vda", virtual_size=DISK, segment_size=SEG,
                       table=table, kind="full" if first else "incremental",
                       reason="first backup of this disk" if first else "", created=bid,
                       counts={"stored_bytes": 1000}, consistency={"level": "crash", "reason": "bench"},
                       labels={"domain_uuid": inst, "domain_name": f"instance-{name}", "instance_uuid": inst,
                               "instance_name": name, "project_id": project})


def fill_project(cfg: ekko_config.Config, project: str, instances: int, backups: int, rng: random.Random) -> Project:
    """`instances` x `backups` manifests in the project's namespace; ids one hour apart, random tails."""
    out = Project(project)
    store = open_store(cfg, project)
    try:
        batch = store.batch()
        for n in range(instances):
            inst = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            ids = out.instances[inst] = []
            for b in range(backups):
                t = T0 + datetime.timedelta(hours=b, seconds=n)
                bid = t.strftime("%Y%m%dT%H%M%S") + f"{t.microsecond // 1000:03d}Z-{rng.getrandbits(24):06x}"
                m = make_manifest(project, inst, f"vm{n}", bid, b == 0)
                if m.hash != store.codec.naming:
                    raise RuntimeError(f"the store names segments by {store.codec.naming}, the manifest by {m.hash}")
                batch.put(catalog.manifest_key(m.target, bid), mf.encode(m))
                ids.append(bid)
        batch.flush()
    finally:
        store.close()
    return out


# -- processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def group_pids(pgid: int) -> List[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def group_cpu(pgid: int) -> Dict[int, float]:
    """utime + stime of each live process of the group (the bench started its leader)."""
    cpu = {}
    for pid in group_pids(pgid):
        try:
            cpu[pid] = procs.cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return cpu


class ApiServer:
    """`ekko-api --config-file F serve` in a session of its own; stopped by its process group."""

    def __init__(self, workdir: str, ks: KeystoneServer, store_root: str, serving: str = ""):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = os.path.join(workdir, "ekko-api.log")
        self.conf_path = self._write_conf(workdir, ks, store_root, serving)
        self.proc: Optional[subprocess.Popen] = None

    def _write_conf(self, d: str, ks: KeystoneServer, store_root: str, serving: str) -> str:
        """serving: more [api] lines (workers, threads); none: conf.py's defaults."""
        ekko_yaml = os.path.join(d, "ekko.yaml")
        with open(ekko_yaml, "w") as f:
            json.dump({"store": {"type": "local", "path": store_root}}, f)   # JSON is YAML
        admin = ks.users["admin"]
        path = os.path.join(d, "ekko-api.conf")
        with open(path, "w") as f:
            os.fchmod(f.fileno(), 0o600)          # the service user's password
            f.write(f"[api]\nekko_config = {ekko_yaml}\nindex_path = {d}/index.sqlite\n"
                    f"bind = {HOST}:{self.port}\n{serving}"
                    f"[keystone_authtoken]\nwww_authenticate_uri = {ks.url}\nauth_url = {ks.url}\n"
                    f"auth_type = password\nusername = {admin.name}\npassword = {admin.password}\n"
                    "project_name = admin\nuser_domain_id = default\nproject_domain_id = default\n"
                    "interface = public\n")
        return path

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([os.path.join(VENV_BIN, "ekko-api"), "--config-file", self.conf_path,
                                          "serve"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:             # up: it answers (401 from auth_token: no token given)
            if self.proc.poll() is not None:
                raise RuntimeError(f"ekko-api exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                c = http.client.HTTPConnection(HOST, self.port, timeout=10)
                c.request("GET", "/v1/instances")
                c.getresponse().read()
                c.close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ekko-api did not answer on {self.url} within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# -- the clients ----------------------------------------------------------------------------------------
class WrongAnswer(Exception):
    """An answer the bench did not expect: what was asked, what came back."""


class Client:
    """One keep-alive HTTP connection; get() -> (status, parsed body). A keep-alive connection the
    server closed between requests is opened again once (counted), never a request that got an answer."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)
        self.reconnects = 0

    def get(self, path: str, token: str) -> Tuple[int, object]:
        for attempt in (0, 1):
            try:
                self.conn.request("GET", path, headers={"X-Auth-Token": token})
                r = self.conn.getresponse()
                data = r.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if attempt:
                    raise
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
                self.reconnects += 1
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data[:200]


@dataclass
class World:
    """What the checks compare answers with."""
    big: Project
    small: Project
    tokens: Dict[str, str] = field(repr=False)          # "p1" / "p2" -> a member's token (secrets)
    big_ids: List[str] = field(default_factory=list)    # p1's instance uuids, sorted (the API's order)

    def __post_init__(self) -> None:
        self.big_ids = sorted(self.big.instances)


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise WrongAnswer(what)


def check_instances_page(w: World, path: str, status: int, body, first: Optional[str]) -> Tuple[List[str], object]:
    """One page of p1's instances: ids in order, each with its backup count and p1's project."""
    expect(status == 200, f"GET {path}: {status} {body!r:.300}")
    assert isinstance(body, dict)
    items = body["instances"]
    start = 0 if first is None else w.big_ids.index(first) + 1
    want = w.big_ids[start:start + PAGE]
    got = [i["id"] for i in items]
    expect(got == want, f"GET {path}: {len(got)} instances, expected {len(want)} starting at {start}")
    for i in items:
        ids = w.big.instances[i["id"]]
        expect(i["backups"] == len(ids) and i["project_id"] == w.big.pid and i["last_backup"]["id"] == ids[-1],
               f"GET {path}: instance {i['id']}: {i['backups']} backups, last {i['last_backup']['id']}, "
               f"project {i['project_id']}; expected {len(ids)}, {ids[-1]}, {w.big.pid}")
    expect(body["next"] == (got[-1] if len(got) == PAGE else None), f"GET {path}: next {body['next']!r}")
    return got, body["next"]


def req_first_page(w: World, c: Client, rng: random.Random) -> List[Tuple[str, float]]:
    t = time.perf_counter()
    status, body = c.get("/v1/instances", w.tokens["p1"])
    dt = time.perf_counter() - t
    check_instances_page(w, "/v1/instances", status, body, None)
    return [("instances", dt)]


def req_walk(w: World, c: Client, rng: random.Random) -> List[Tuple[str, float]]:
    """Every page of p1's instances, marker to marker: each instance exactly once."""
    out, seen, marker = [], [], None
    while True:
        path = "/v1/instances" + (f"?marker={marker}" if marker else "")
        t = time.perf_counter()
        status, body = c.get(path, w.tokens["p1"])
        out.append(("paging", time.perf_counter() - t))
        got, marker = check_instances_page(w, path, status, body, marker)
        seen += got
        if marker is None:
            break
    expect(seen == w.big_ids, f"a walk of the pages gave {len(seen)} instances ({len(set(seen))} distinct), "
                              f"expected {len(w.big_ids)}")
    return out


def req_backups(w: World, c: Client, rng: random.Random) -> List[Tuple[str, float]]:
    roll = rng.random()
    if roll < 0.05:                                   # p1's member asks for p2's instance: 404
        inst, token, want = rng.choice(list(w.small.instances)), w.tokens["p1"], None
    elif roll < 0.15:
        inst = rng.choice(list(w.small.instances))
        token, want = w.tokens["p2"], w.small.instances[inst]
    else:
        inst = rng.choice(w.big_ids)
        token, want = w.tokens["p1"], w.big.instances[inst]
    path = f"/v1/instances/{inst}/backups"
    t = time.perf_counter()
    status, body = c.get(path, token)
    dt = time.perf_counter() - t
    if want is None:
        expect(status == 404, f"GET {path} with p1's token for p2's instance: {status} {body!r:.300}")
        return [("backups", dt)]
    expect(status == 200, f"GET {path}: {status} {body!r:.300}")
    assert isinstance(body, dict)
    got = [b["id"] for b in body["backups"]]
    expect(got == want[::-1] and body["next"] is None and all(b["instance_id"] == inst for b in body["backups"]),
           f"GET {path}: {len(got)} backups, expected {len(want)} (the store's ids, newest first)")
    return [("backups", dt)]


def req_backups_of_big(w: World, c: Client, rng: random.Random) -> List[Tuple[str, float]]:
    inst = rng.choice(w.big_ids)
    path = f"/v1/instances/{inst}/backups"
    t = time.perf_counter()
    status, body = c.get(path, w.tokens["p1"])
    dt = time.perf_counter() - t
    expect(status == 200, f"GET {path}: {status} {body!r:.300}")
    assert isinstance(body, dict)
    expect([b["id"] for b in body["backups"]] == w.big.instances[inst][::-1],
           f"GET {path}: {len(body['backups'])} backups, expected {len(w.big.instances[inst])} "
           "(the store's ids, newest first)")
    return [("backups", dt)]


def req_mixed(w: World, c: Client, rng: random.Random) -> List[Tuple[str, float]]:
    roll = rng.random()
    if roll < 0.4:
        return req_first_page(w, c, rng)
    if roll < 0.5:
        return req_walk(w, c, rng)
    return req_backups(w, c, rng)


PHASES: Dict[str, Callable[[World, Client, random.Random], List[Tuple[str, float]]]] = {
    "instances": req_first_page, "paging": req_walk, "backups": req_backups, "mixed": req_mixed}


# -- a phase --------------------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    name: str
    seconds: float
    latencies: Dict[str, List[float]]
    errors: List[str]
    reconnects: int
    api_cpu: float
    keystone_cpu: float
    bench_cpu: float
    load1: float
    api_pids_changed: bool

    def summary(self) -> Dict:
        out: Dict[str, object] = {
            "phase": self.name, "seconds": round(self.seconds, 2), "errors": len(self.errors),
            "reconnects": self.reconnects, "api_cpu_s": round(self.api_cpu, 2),
            "keystone_cpu_s": round(self.keystone_cpu, 2), "bench_cpu_s": round(self.bench_cpu, 2),
            "load1": round(self.load1, 2), "api_pids_changed": self.api_pids_changed, "kinds": {},
            # what the machine's load cannot change: ekko-api's CPU per answered request
            "api_cpu_ms_per_request": round(self.api_cpu * 1000 / max(1, sum(map(len, self.latencies.values()))), 2)}
        for kind, lat in sorted(self.latencies.items()):
            out["kinds"][kind] = {"requests": len(lat), "rps": round(len(lat) / self.seconds, 1),  # type: ignore
                                  **{k: round(v * 1000, 1) for k, v in pcts(lat).items()}}
        return out


def pcts(values: List[float]) -> Dict[str, float]:
    """Nearest-rank percentiles (seconds)."""
    s = sorted(values)
    if not s:
        return {}

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]
    return {"p50_ms": rank(50), "p95_ms": rank(95), "p99_ms": rank(99), "max_ms": s[-1],
            "mean_ms": statistics.fmean(s)}


def run_phase(name: str, w: World, port: int, clients: int, seconds: float, seed: int, api_pgid: int,
              ks_pgid: int, label: Optional[str] = None) -> PhaseResult:
    fn = PHASES[name]
    lat: Dict[str, List[float]] = {}
    errors: List[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]
    reconnects = [0]

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        c = Client(port)
        mine: List[Tuple[str, float]] = []
        start.wait()
        try:
            while time.monotonic() < stop_at[0] and not errors:
                mine += fn(w, c, rng)
        except (WrongAnswer, OSError, http.client.HTTPException, KeyError, TypeError) as e:
            with lock:
                errors.append(f"client {i}: {type(e).__name__}: {e}")
        finally:
            c.conn.close()
            with lock:
                reconnects[0] += c.reconnects
                for kind, dt in mine:
                    lat.setdefault(kind, []).append(dt)

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    api0, ks0, me0 = group_cpu(api_pgid), group_cpu(ks_pgid), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    api1, ks1, me1 = group_cpu(api_pgid), group_cpu(ks_pgid), resource.getrusage(resource.RUSAGE_SELF)
    return PhaseResult(label or name, wall, lat, errors, reconnects[0],
                       sum(api1.values()) - sum(api0.get(p, 0.0) for p in api1),
                       sum(ks1.values()) - sum(ks0.get(p, 0.0) for p in ks1),
                       (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime), os.getloadavg()[0],
                       set(api0) != set(api1))


# -- the run --------------------------------------------------------------------------------------------
def cold(w: World, port: int, peers: int, seed: int) -> Dict[str, float]:
    """The token's first validation, the index's first build (the first list), then the same
    request warm (seconds). While the first build runs, `peers` other clients ask for p1's first
    page and an instance's backups: each must get the whole answer, never the empty or partial
    index of a build under way (they wait for it)."""
    c = Client(port)
    out: Dict[str, float] = {}
    t = time.perf_counter()
    status, body = c.get("/v1/instances?bench=1", w.tokens["p1"])     # 400 before the index is touched
    out["token_validation_s"] = time.perf_counter() - t
    expect(status == 400, f"GET /v1/instances?bench=1: {status} {body!r:.200}")
    errors: List[str] = []
    during: List[float] = []

    def peer(i: int) -> None:
        pc, rng = Client(port), random.Random(seed + i)
        try:
            for fn in (req_backups_of_big, req_first_page):
                during.extend(dt for _, dt in fn(w, pc, rng))
        except (WrongAnswer, OSError, http.client.HTTPException, KeyError, TypeError) as e:
            errors.append(f"peer {i} during the first build: {type(e).__name__}: {e}")
        finally:
            pc.conn.close()

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(peers)]
    starter = threading.Timer(PEERS_AFTER, lambda: [th.start() for th in threads])
    starter.start()
    t = time.perf_counter()
    status, body = c.get("/v1/instances", w.tokens["p1"])
    out["first_list_s"] = time.perf_counter() - t
    starter.join()
    for th in threads:
        th.join()
    check_instances_page(w, "/v1/instances", status, body, None)
    if errors:
        raise WrongAnswer("; ".join(errors[:5]))
    out["peers_max_s"] = max(during, default=0.0)
    t = time.perf_counter()
    status, body = c.get("/v1/instances", w.tokens["p1"])
    out["warm_list_s"] = time.perf_counter() - t
    check_instances_page(w, "/v1/instances", status, body, None)
    c.conn.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--backups", type=int, default=30)
    ap.add_argument("--small", type=int, default=3, help="instances of the second project (5 backups each)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of mixed load before the phases (0: none)")
    ap.add_argument("--phases", default="instances,paging,backups,mixed")
    ap.add_argument("--workers", type=int, help="ekko-api's [api] workers (default: conf.py's)")
    ap.add_argument("--threads", type=int, help="ekko-api's [api] threads (default: conf.py's)")
    ap.add_argument("--peers", type=int, default=10, help="clients asking while the first build runs")
    ap.add_argument("--seed", type=int, default=random.randrange(1 << 32))
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, store, index)")
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        ap.error(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    if missing_prerequisites():
        sys.exit(f"Keystone is not installed: python -m tests.harness.keystone install ({missing_prerequisites()})")
    print(f"seed {args.seed}", flush=True)
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="ekko-bench-api-")
    ks = KeystoneServer(os.path.join(workdir, "keystone"))
    api: Optional[ApiServer] = None
    try:
        os.makedirs(ks.base_dir)
        log("starting Keystone")
        ks.start()
        store_root = os.path.join(workdir, "store")
        cfg = ekko_config.build({"store": {"type": "local", "path": store_root}})
        t = time.monotonic()
        big = fill_project(cfg, ks.project_ids["p1"], args.instances, args.backups, rng)
        small = fill_project(cfg, ks.project_ids["p2"], args.small, 5, rng)
        log(f"store: {args.instances} x {args.backups} + {args.small} x 5 manifests in {time.monotonic() - t:.1f} s")
        serving = "".join(f"{k} = {v}\n" for k, v in (("workers", args.workers), ("threads", args.threads)) if v)
        api = ApiServer(workdir, ks, store_root, serving)
        api.start()
        assert api.proc is not None and ks.proc is not None
        w = World(big, small, {p: ks.token(ks.users[f"{p}-member"]) for p in ("p1", "p2")})
        try:
            first = cold(w, api.port, args.peers, args.seed)
        except WrongAnswer as e:
            print(f"FAILED before the load: {e}", file=sys.stderr)
            return 1
        log("cold: " + ", ".join(f"{k} {v:.3f}" for k, v in first.items()))
        results = []
        if args.warmup > 0:
            # Every worker validates each token once (concurrently, per thread that first sees it:
            # auth_token has no single flight) and SQLite's pages get cached: measured, reported
            # apart, not held to the target.
            log(f"warm-up: mixed, {args.clients} clients, {args.warmup:.0f} s")
            results.append(run_phase("mixed", w, api.port, args.clients, args.warmup, args.seed - 1, api.proc.pid,
                                     ks.proc.pid, label="warm-up"))
        for i, name in enumerate(phases):
            log(f"phase {name}: {args.clients} clients, {args.seconds:.0f} s")
            r = run_phase(name, w, api.port, args.clients, args.seconds, args.seed + i, api.proc.pid, ks.proc.pid)
            results.append(r)
            if any(r.errors for r in results):
                break
        report(args, first, results)
        errors = [e for r in results for e in r.errors]
        if errors:
            print(f"FAILED: {len(errors)} wrong answers or failed requests; the first:", file=sys.stderr)
            for e in errors[:10]:
                print("  " + e, file=sys.stderr)
            print(f"ekko-api's log: {api.log_path}" if args.keep else "", file=sys.stderr)
            return 1
        return 0
    finally:
        if api is not None:
            api.stop()
        ks.stop()
        left = (group_pids(api.proc.pid) if api is not None and api.proc is not None else []) + ks.running_pids()
        if left:
            print(f"WARNING: processes this bench started are still running: {left}", file=sys.stderr)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(args, first: Dict[str, float], results: List[PhaseResult]) -> None:
    summaries = [r.summary() for r in results]
    print(f"\nekko-api: {args.instances} instances x {args.backups} backups, {args.clients} clients, "
          f"{args.seconds:.0f} s per phase, {os.cpu_count()} cores; gunicorn workers x threads: "
          f"{args.workers or 'default'} x {args.threads or 'default'}")
    print("cold: token validation {token_validation_s:.3f} s, first list (index built) {first_list_s:.3f} s, "
          "the same warm {warm_list_s:.3f} s; slowest answer to the {peers} clients asking during the build "
          "{peers_max_s:.3f} s".format(peers=args.peers, **first))
    print(f"{'phase':<10} {'request':<10} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}"
          f" {'api cpu':>8} {'ms/req':>6} {'ks cpu':>7} {'bench':>6} {'load1':>6}")
    for s in summaries:
        for kind, k in s["kinds"].items():
            print(f"{s['phase']:<10} {kind:<10} {k['rps']:>7.1f} {k['p50_ms']:>7.1f} {k['p95_ms']:>7.1f} "
                  f"{k['p99_ms']:>7.1f} {k['max_ms']:>7.1f} {s['api_cpu_s']:>8.1f} {s['api_cpu_ms_per_request']:>6.2f} "
                  f"{s['keystone_cpu_s']:>7.2f} "
                  f"{s['bench_cpu_s']:>6.1f} {s['load1']:>6.2f}")
        if s["errors"] or s["reconnects"] or s["api_pids_changed"]:
            print(f"  {s['phase']}: {s['errors']} errors, {s['reconnects']} reconnects, "
                  f"api workers changed: {s['api_pids_changed']}")
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    path = os.path.join(HERE, "out", f"api-list-{datetime.datetime.utcnow():%Y%m%dT%H%M%SZ}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "cold": first, "phases": summaries}, f, indent=1)
    print(f"JSON: {path}")


if __name__ == "__main__":
    sys.exit(main())

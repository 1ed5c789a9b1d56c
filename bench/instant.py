#!/usr/bin/env python3
"""Instant restore figures of issue 16 (not part of `make test`): how soon the new domain runs.

    flock /tmp/ekko-libvirtd.lock .venv/bin/python bench/instant.py           # W = 8 GiB, 3 repeats
    flock /tmp/ekko-libvirtd.lock .venv/bin/python bench/instant.py --quick   # W = 1 GiB, 1 repeat

Starts its own libvirtd (tests/harness/libvirtd.py; refuses to use one it did not start). Two
source domains, each backed up once through the real CLI (libvirt engine, so the backup holds the
domain XML): W (bench/workload.py) and a 1 TiB sparse disk (12 MiB written). Then, per repeat,
`ekko restore BACKUP --define NEW --instant --to DIR --json` (a new process: Python start-up,
config, manifest load, a detached nbdkit and its embedded Python, qemu-img create, define, start,
the pull started, the supervisor spawned and ready), timed from its start to its return, when
the domain runs; libvirt's state and the block job's progress are read right after. Target: < 5 s,
the same for both sizes. Then the new domain is destroyed and undefined: its supervisor stops
the server (checked). The first repeat of W (unless --no-stream; of the 1 TiB disk with
--stream-sparse) also times the whole pull, up to STREAM_LIMIT_S (zero segments are holes of the
export: not copied, but block-stream asks for the status of every 512 KiB: 173 s for 1 TiB here).

Writes bench/out/instant-<UTC time>.json. Big files in /tmp/ekko-bench-inst-*, removed at the end.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import yaml  # noqa: E402

import workload  # noqa: E402
from harness.libvirtd import (Libvirtd, destroy_and_undefine, domain_xml, guest_write,  # noqa: E402
                              make_workdir)

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
STREAM_LIMIT_S = 600


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


class Ekko:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, "ekko.yaml")
        self.cfg = {"store": {"type": "local", "path": os.path.join(workdir, "store")},
                    "state_dir": os.path.join(workdir, "state"), "run_dir": os.path.join(workdir, "run")}
        with open(self.path, "w") as f:
            yaml.safe_dump(self.cfg, f)

    def __call__(self, *args: str):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "ekko_libvirt.cli", "-c", self.path, *args, "--json"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"ekko {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
        return wall, json.loads(p.stdout)

    def record(self, name: str) -> dict:
        with open(os.path.join(self.cfg["state_dir"], "instant", f"{name}.json")) as f:
            return json.load(f)


def source(conn, lv, ekko, workdir: str, name: str, image: str) -> str:
    """Define + start a domain on `image`, back it up, shut it off. -> backup id."""
    dom = conn.defineXML(domain_xml(name, [(image, "qcow2", "vda")], lv.dom_type))
    dom.create()
    try:
        if "sparse" in name:
            for off in (0, 300 * GiB, TiB - 4 * MiB):
                guest_write(dom, "vda", off, 4 * MiB, 0x5a, timeout=60)
        wall, j = ekko("backup", name)
        log(f"    backup of {name}: {wall:.1f} s")
        return j["backups"][0]["backup_id"]
    finally:
        dom.destroy()


def instant_once(conn, ekko, bid: str, new: str, target: str, stream: bool) -> dict:
    import libvirt
    wall, j = ekko("restore", bid, "--define", new, "--instant", "--to", target)
    dom = conn.lookupByName(new)
    state = dom.state()
    info = dom.blockJobInfo("vda", 0)
    out = {"command_s": wall, "running": state[0] == libvirt.VIR_DOMAIN_RUNNING,
           "running_s": j["timings"]["running"], "timings": j["timings"],
           "pulled_at_return": int(info["cur"]) if info else None, "size": j["total_bytes"]}
    if stream:
        t0 = time.monotonic()
        while ekko.record(new)["phase"] == "streaming" and time.monotonic() - t0 < STREAM_LIMIT_S:
            time.sleep(0.2)
        out["stream_s"] = time.monotonic() - t0 + wall
        out["stream_phase"] = ekko.record(new)["phase"]
    destroy_and_undefine(conn, new)
    deadline = time.monotonic() + 30
    while ekko.record(new)["phase"] == "streaming" and time.monotonic() < deadline:
        time.sleep(0.1)
    rec = ekko.record(new)
    out["after_undefine"] = rec["phase"]
    from ekko_libvirt import procs
    out["server_left"] = any(d["server_pid"] and procs.process_running(d["server_pid"], d["server_ticks"])
                             for d in rec["disks"])
    os.unlink(os.path.join(ekko.cfg["state_dir"], "instant", f"{new}.json"))
    shutil.rmtree(target, ignore_errors=True)
    return out


def stop_leftovers(state: str) -> None:
    """Supervisors and servers of jobs that did not end (a failed run), by PID and start time."""
    from ekko_libvirt import procs
    from ekko_libvirt.serve import server
    for n in os.listdir(state) if os.path.isdir(state) else []:
        if not n.endswith(".json"):
            continue
        with open(os.path.join(state, n)) as f:
            rec = json.load(f)
        if rec.get("supervisor_pid") and procs.process_running(rec["supervisor_pid"], rec["supervisor_ticks"]):
            os.kill(rec["supervisor_pid"], signal.SIGTERM)
            log(f"stopped the supervisor of {rec['domain']} (pid {rec['supervisor_pid']})")
        for d in rec["disks"]:
            if d["server_pid"] and server.stop_pid(d["server_pid"], d["server_ticks"]):
                log(f"stopped the server of {rec['domain']} {d['dev']} (pid {d['server_pid']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="W of 1 GiB, one repeat")
    p.add_argument("--size-gib", type=float, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-stream", action="store_true", help="do not time the whole pull of W")
    p.add_argument("--stream-sparse", action="store_true", help="also time the whole pull of the 1 TiB disk")
    a = p.parse_args(argv)
    size = int((1 if a.quick else a.size_gib) * GiB)
    repeat = 1 if a.quick else a.repeat
    workdir = make_workdir("ekko-bench-inst-")
    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"nproc": os.cpu_count(), "load": os.getloadavg()}, "w_size": size, "runs": {}}
    lv = Libvirtd(os.path.join(workdir, "libvirt-logs"))
    lv.start()
    conn = lv.connect()
    names = []
    try:
        ekko = Ekko(workdir)
        w = os.path.join(workdir, "w.qcow2")
        log(f"building W ({size / GiB:g} GiB) ...")
        workload.build_image(w, workload.Layout(size), workdir)
        sparse = os.path.join(workdir, "sparse.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", sparse, str(TiB)], check=True)
        bids = {}
        for kind, image in (("w", w), ("sparse", sparse)):
            name = f"ekko-bench-inst-{kind}"
            names.append(name)
            bids[kind] = source(conn, lv, ekko, workdir, name, image)
        for kind in ("w", "sparse"):
            runs = report["runs"][kind] = []
            for i in range(repeat):
                new = f"ekko-bench-inst-{kind}-new"
                names.append(new)
                r = instant_once(conn, ekko, bids[kind], new, os.path.join(workdir, f"{kind}-{i}"),
                                 stream=i == 0 and (kind == "w" and not a.no_stream or a.stream_sparse))
                runs.append(r)
                log(f"    {kind}: domain running after {r['running_s']:.2f} s ({r['timings']}), command "
                    f"{r['command_s']:.2f} s ({r['pulled_at_return']} of "
                    f"{r['size']} bytes pulled then)" + (f"; whole pull {r['stream_s']:.1f} s" if "stream_s" in r
                                                         else "") + f"; undefined -> {r['after_undefine']}, "
                    f"server left: {r['server_left']}")
            report[f"{kind}_median_s"] = statistics.median(r["running_s"] for r in runs)
            report[f"{kind}_command_median_s"] = statistics.median(r["command_s"] for r in runs)
        for kind in ("w", "sparse"):
            m = report[f"{kind}_median_s"]
            log(f"{'W' if kind == 'w' else '1 TiB sparse'}: domain running after {m:.2f} s (median of {repeat}); "
                f"target < 5 s: {'yes' if m < 5 else 'NO'}")
    finally:
        for n in reversed(names):
            try:
                destroy_and_undefine(conn, n)
            except Exception as e:  # noqa: BLE001 - clean up the others
                log(f"cleanup of {n}: {e}")
        stop_leftovers(os.path.join(workdir, "state", "instant"))
        conn.close()
        lv.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    path = os.path.join(HERE, "out", f"instant-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

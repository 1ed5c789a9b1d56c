#!/usr/bin/env python3
"""How a full of W scales with the cores ekko may use (issue 15: "1 to 2 cores >= 1.7x").

    .venv/bin/python bench/cores.py                       # W = 8 GiB, cores 1 and 2 (all here), medians of 2
    .venv/bin/python bench/cores.py --cores 1,2,4,8 --repeat 3 --size-gib 16
    .venv/bin/python bench/cores.py --env EKKO_NATIVE=0   # the pure-Python segment path, for comparison
    .venv/bin/python bench/cores.py --pin-qemu            # QEMU on the same N cores: a host of N cores

Each run: a fresh copy of W behind a QEMU the bench starts (unpinned: it is the same QEMU for
every run), then `taskset -c 0..N-1 ekko backup w --full` into a local store on a fresh directory.
ekko's workers default to the cores it may run on (units.default_workers reads the affinity
mask), so the run with N cores is what a host with N cores gets out of the box. Unpinned, QEMU's
export (1.4 of the full's 6 CPU seconds here) runs on whatever core is idle, so on a 2-core machine
the 1-core run already has a second core for QEMU and the ratio cannot reach 2; --pin-qemu puts
every thread of QEMU on the same N cores (taskset -a): the whole data path on an N-core host.
Reported: wall
seconds, MiB/s of W's virtual size, CPU seconds of ekko and QEMU, and the ratio of each run's
throughput to the 1-core run's. Nothing here is part of `make test`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs  # noqa: E402  (puts the repository root on sys.path)
import workload  # noqa: E402
from ekko_side import ekko_config  # noqa: E402
from procs import Vm  # noqa: E402

import yaml  # noqa: E402

from ekko_libvirt import units  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_full(work: str, base: str, cores: int, env: Dict[str, str], pin_qemu: bool = False) -> Dict:
    image = os.path.join(work, "disk.qcow2")
    procs.copy_image(base, image)
    vm = Vm(work, image).start()
    try:        # the VM is stopped whatever fails from here
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
        if pin_qemu:
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(vm.pid)], check=True, stdout=subprocess.DEVNULL)
        cfg = ekko_config(work, vm.qmp_socket, {})
        path = os.path.join(work, "ekko.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        cmd = ["taskset", "-c", cpus, sys.executable, "-m", "ekko_libvirt.cli", "-c", path, "backup", "w", "--full",
               "--json"]
        r = procs.run(cmd, qemu_pid=vm.pid, env=dict(os.environ, PYTHONPATH=procs.ROOT, **env))
    finally:
        vm.stop()
        os.unlink(image)
        for d in ("store", "state", "run"):
            shutil.rmtree(os.path.join(work, d), ignore_errors=True)
    return {"s": r.wall, "cpu_s": r.cpu, "qemu_cpu_s": r.qemu_cpu, "rss_mib": r.maxrss_mib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=8.0)
    ap.add_argument("--cores", default="", help="comma list (default: 1 and every core here)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for ekko")
    ap.add_argument("--w-cache", metavar="PATH", help="reuse W from PATH (built there if missing)")
    ap.add_argument("--fs", choices=["tmp", "ext4"], default="tmp", help="the work file system (run.py --fs)")
    ap.add_argument("--pin-qemu", action="store_true", help="QEMU's threads on the same cores as ekko (taskset -a)")
    ap.add_argument("--out", help="JSON output (default bench/out/cores-<time>.json)")
    a = ap.parse_args(argv)
    have = len(os.sched_getaffinity(0))
    cores = [int(c) for c in a.cores.split(",")] if a.cores else sorted({1, have})
    if max(cores) > have:
        raise SystemExit(f"--cores asks for {max(cores)} cores, this process may use {have}")
    env = dict(e.split("=", 1) for e in a.env)
    size = int(a.size_gib * units.GiB)
    runs: Dict[int, List[Dict]] = {c: [] for c in cores}
    with procs.work_directory("ekko-bench-cores-", a.fs) as work:
        os.chmod(work, 0o755)
        base = a.w_cache or os.path.join(work, "w.qcow2")
        if not (a.w_cache and os.path.exists(base)):
            workload.build_image(base, workload.Layout(size), work)
        for rep in range(a.repeat):
            for c in (cores if rep % 2 == 0 else cores[::-1]):      # alternate the order: drift evens out
                runs[c].append(one_full(work, base, c, env, a.pin_qemu))
                log(f"round {rep + 1}, {c} core(s): {runs[c][-1]['s']:.2f} s")
    med = {c: statistics.median(x["s"] for x in runs[c]) for c in cores}
    base_c = cores[0]
    report = {"size": size, "cores": cores, "env": env, "pin_qemu": a.pin_qemu, "fs": a.fs, "runs": runs,
              "median_s": med, "speedup": {c: med[base_c] / med[c] for c in cores}, "load_avg": os.getloadavg()}
    out = a.out or os.path.join(HERE, "out", time.strftime("cores-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"| cores | full of W s (median of {a.repeat}) | MiB/s | CPU s ekko + QEMU "
          f"| throughput vs {base_c} core(s) |")
    print("|---|---|---|---|---|")
    for c in cores:
        cpu = statistics.median(x["cpu_s"] for x in runs[c])
        q = statistics.median(x["qemu_cpu_s"] for x in runs[c])
        print(f"| {c} | {med[c]:.2f} | {size / MiB / med[c]:.0f} | {cpu:.1f} + {q:.1f} | {report['speedup'][c]:.2f}x |")
    print(f"JSON: {out}" + (f"; env {env}" if env else "") + ("; QEMU pinned to the same cores" if a.pin_qemu else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

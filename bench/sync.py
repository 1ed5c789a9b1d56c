#!/usr/bin/env python3
"""`ekko sync` of W's backups to a second Swift account, against a full backup of W to Swift (issue 18).

    .venv/bin/python bench/sync.py                        # W = 8 GiB (3 GiB of data), medians of 2
    .venv/bin/python bench/sync.py --size-gib 1 --repeat 1            # smoke run

In one run, against one Swift all-in-one it starts (tests/harness/swift.py), each repetition:
  full        `ekko backup w --full` of W into Swift account test (QEMU, 1 MiB segments, zstd 1)
  sync        `ekko sync default site2`: every segment and the manifest into account test2 (each
              segment fetched, decoded, re-hashed and put: the whole store, as stored)
  D1          82 MiB of the guest's writes (bench/run.py's D1), an incremental backup into test
  sync D1     `ekko sync default site2` again: what it checks and copies must follow D1, not W
Ratio: full_s / sync_s (the same data either way; target >= 0.7). The sync D1 row shows the
segments it checked and copied against D1's size and W's segment count. On this 2-core machine
Swift's servers and ekko share the CPU. Nothing here is part of `make test`.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402
import procs  # noqa: E402  (puts the repository root on sys.path)
import workload  # noqa: E402
from ekko_side import Ekko, ekko_config  # noqa: E402
from procs import Vm  # noqa: E402
from run import d1_files  # noqa: E402

from ekko_libvirt import units  # noqa: E402
from tests.harness.swift import SwiftServer  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def swift_store(server: SwiftServer, account: str, prefix: str, threads: int) -> Dict:
    user, key = server.credentials(account)
    return {"type": "swift", "auth_url": server.auth_url, "auth_version": "1", "user": user, "key": key,
            "container_prefix": prefix, "threads": threads}


def one_round(work: str, base: str, server: SwiftServer, rep: int, threads: int, d1) -> Dict:
    image = os.path.join(work, "disk.qcow2")
    procs.copy_image(base, image)
    vm = Vm(work, image).start()
    try:        # the VM is stopped whatever fails from here
        cfg = ekko_config(work, vm.qmp_socket, {})
        cfg["store"] = swift_store(server, "test", f"bench{rep}a", threads)
        cfg["stores"] = {"site2": swift_store(server, "test2", f"bench{rep}b", threads)}
        ekko = Ekko(work, cfg)
        full, jf = ekko("backup", "w", "--full", qemu_pid=vm.pid)
        sync, js = ekko("sync", "default", "site2")
        peers.write_d1(vm.guest_write, d1)
        vm.flush()
        inc, ji = ekko("backup", "w", "--incremental", qemu_pid=vm.pid)
        sync_d1, jd = ekko("sync", "default", "site2")
    finally:
        vm.stop()
        os.unlink(image)
        shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)
    s, d = js["namespaces"][0], jd["namespaces"][0]
    assert js["ok"] and jd["ok"] and len(s["copied"]) == 1 and len(d["copied"]) == 1, (js, jd)
    return {"full_s": full.wall, "full_cpu_s": full.cpu, "stored_bytes": jf["backup"]["stored_bytes"],
            "sync_s": sync.wall, "sync_cpu_s": sync.cpu, "sync_bytes": s["bytes_copied"],
            "sync_segments": s["segments_copied"], "inc_s": inc.wall, "inc_read_bytes": ji["backup"]["read_bytes"],
            "sync_d1_s": sync_d1.wall, "sync_d1_checked": d["segments_checked"],
            "sync_d1_copied": d["segments_copied"], "sync_d1_bytes": d["bytes_copied"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=8.0, help="virtual size of W (default 8: 3 GiB of data)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8, help="ekko's store.threads on both accounts")
    ap.add_argument("--w-cache", metavar="PATH", help="reuse W from PATH (built there if missing)")
    ap.add_argument("--out", help="JSON output (default bench/out/sync-<time>.json)")
    a = ap.parse_args(argv)
    size = int(a.size_gib * units.GiB)
    layout = workload.Layout(size)
    work = tempfile.mkdtemp(prefix="ekko-bench-sync-", dir="/tmp")
    runs: List[Dict] = []
    try:
        base = a.w_cache or os.path.join(work, "w.qcow2")
        if not (a.w_cache and os.path.exists(base)):
            workload.build_image(base, layout, work)
        d1 = d1_files(work, size)
        with SwiftServer(os.path.join(work, "swift")) as server:
            for rep in range(a.repeat):
                runs.append(one_round(work, base, server, rep, a.threads, d1))
                r = runs[-1]
                log(f"round {rep + 1}: full {r['full_s']:.2f} s, sync {r['sync_s']:.2f} s, "
                    f"sync after D1 {r['sync_d1_s']:.2f} s ({r['sync_d1_copied']} segments)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    report = {"size": size, "threads": a.threads, "d1_bytes": sum(n for _p, _o, n in d1), "runs": runs,
              "median": med, "ratio_full_over_sync": med["full_s"] / med["sync_s"], "load_avg": os.getloadavg()}
    out = a.out or os.path.join(HERE, "out", time.strftime("sync-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    stored = med["stored_bytes"] / MiB
    print(f"| run (medians of {a.repeat}) | s | MiB/s of what W stores | CPU s (ekko) |")
    print("|---|---|---|---|")
    print(f"| ekko backup --full (Swift) | {med['full_s']:.2f} | {stored / med['full_s']:.0f} | {med['full_cpu_s']:.1f} |")
    print(f"| ekko sync (Swift -> Swift, all of W's) | {med['sync_s']:.2f} | {stored / med['sync_s']:.0f} | "
          f"{med['sync_cpu_s']:.1f} |")
    print(f"| ekko sync after D1 ({report['d1_bytes'] // MiB} MiB written) | {med['sync_d1_s']:.2f} | | |")
    print(f"\nfull / sync = {report['ratio_full_over_sync']:.2f} (target >= 0.7); after D1 the sync checked "
          f"{med['sync_d1_checked']:.0f} and copied {med['sync_d1_copied']:.0f} segments "
          f"({units.human(int(med['sync_d1_bytes']))}) of W's {med['sync_segments']:.0f}; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

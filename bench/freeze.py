#!/usr/bin/env python3
"""How long a backup keeps the guest frozen (issue 17: "the benchmark reports the freeze duration on W").

    .venv/bin/python bench/freeze.py                      # W = 8 GiB, 1 full + 5 incrementals
    .venv/bin/python bench/freeze.py --size-gib 1 --incrementals 3

W (bench/workload.py) is attached as the second disk of the test guest (tests/harness/guest.py: a
real Linux with qemu-ga, its own ext4 disk written continuously by its workload; W itself holds no
file system the guest mounts). Each run is `ekko backup w` through the QMP engine with the guest's
agent socket, consistency: filesystem; the freeze is what the manifest records (`freeze_ms`: from
the freeze request to the thaw's answer, the transaction on W's node in between). Between
backups D1 (1% of W in 1 MiB writes) goes into W through HMP qemu-io, so the incrementals carry
as much as bench/run.py's. Reported: median and max of every run's freeze_ms, full and
incrementals apart. Not part of `make test`; results in bench/out/freeze-<time>.json.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs  # noqa: E402  (puts the repository root on sys.path)
import workload  # noqa: E402

import yaml  # noqa: E402

sys.path.insert(0, os.path.join(procs.ROOT, "tests"))
from harness import guest as G  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=int, default=8)
    ap.add_argument("--incrementals", type=int, default=5)
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="ekko-bench-fz-", dir="/tmp")
    g = None
    try:
        w = os.path.join(work, "w.qcow2")
        log(f"building W ({a.size_gib} GiB) ...")
        workload.build_image(w, workload.Layout(a.size_gib * GiB), work)
        data = G.make_fs_disk(os.path.join(work, "data.qcow2"), "ext4", 64 << 20)
        g = G.Guest(work, [data, w]).start()
        g.wait_progress(3)
        cfg = {"store": {"type": "local", "path": os.path.join(work, "store")},
               "state_dir": os.path.join(work, "state"), "run_dir": os.path.join(work, "run"),
               "consistency": "filesystem",
               "targets": {"w": {"engine": "qmp", "qmp_socket": g.qmp_socket, "node": g.node(1),
                                 "guest_agent_socket": g.agent_socket}}}
        path = os.path.join(work, "ekko.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        runs = []
        writes = workload.d1_writes(a.size_gib * GiB)
        for i in range(1 + a.incrementals):
            if i:
                for off, chunk in writes:
                    pat = os.path.join(work, "d1.pat")
                    with open(pat, "wb") as f:
                        f.write(chunk)
                    assert g.admin is not None
                    g.admin.execute("human-monitor-command", {"command-line":
                                    f'qemu-io -d /machine/peripheral/vd1/virtio-backend "write -s {pat} {off} {len(chunk)}"'})
                g.wait_progress(1)
            t = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "ekko_libvirt.cli", "-c", path, "backup", "w", "--json"],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=procs.ROOT))
            if out.returncode:
                raise RuntimeError(f"ekko backup failed: {out.stderr}")
            b = json.loads(out.stdout)["backup"]
            runs.append({"kind": b["kind"], "freeze_ms": b["consistency"]["freeze_ms"],
                         "backup_seconds": round(time.monotonic() - t, 2)})
            log(f"{b['kind']}: frozen {b['consistency']['freeze_ms']} ms, backup {runs[-1]['backup_seconds']} s")
        inc = [r["freeze_ms"] for r in runs if r["kind"] == "incremental"]
        report = {"size_gib": a.size_gib, "accel": g.accel, "loadavg": os.getloadavg(), "runs": runs,
                  "full_ms": runs[0]["freeze_ms"],
                  "incremental_median_ms": statistics.median(inc) if inc else None,
                  "all_median_ms": statistics.median(r["freeze_ms"] for r in runs),
                  "all_max_ms": max(r["freeze_ms"] for r in runs),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
        with open(os.path.join(HERE, "out", f"freeze-{int(time.time())}.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
        return 0
    finally:
        if g is not None:
            g.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

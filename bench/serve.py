#!/usr/bin/env python3
"""`ekko serve` figures of issue 16 (not part of `make test`; ratios in the same run):

    .venv/bin/python bench/serve.py              # W = 8 GiB, 3 repeats
    .venv/bin/python bench/serve.py --quick      # W = 1 GiB, 1 repeat

- first byte: a 1 TiB sparse disk (a few MiB written) backed up by the real CLI; the time from
  starting `ekko serve --json` (a new process: Python start-up, config, manifest load, nbdkit and
  its embedded Python included) to the first 4 KiB read by a libnbd client. Target < 1 s.
- sequential read: `nbdcopy URI null:` of the served full backup of W (the client skips the zero
  segments by block status, as a restore skips them) against `ekko restore` of the same backup
  to qcow2 and to raw (whole commands). Target: served throughput >= 0.7x the restore's, i.e.
  nbdcopy's time <= restore's time / 0.7.

Writes bench/out/serve-<UTC time>.json. Big files in /tmp/ekko-bench-serve-*, removed at the end.
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
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import nbd  # noqa: E402

import ekko_side  # noqa: E402
import procs  # noqa: E402
import workload  # noqa: E402
from procs import Vm  # noqa: E402

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


class Served:
    def __init__(self, ekko, backup_id: str, *extra: str):
        cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "serve", backup_id, "--json", *extra]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ekko.env)
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if line == "}\n":
                break
        self.ready = time.monotonic()
        self.info = json.loads("".join(lines))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.proc.stdout.close()


def first_byte(workdir: str, repeat: int) -> dict:
    image = os.path.join(workdir, "sparse.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(TiB)], check=True)
    data = os.path.join(workdir, "data.bin")
    with open(data, "wb") as f:
        f.write(os.urandom(4 * MiB))
    vm = Vm(workdir, image).start()
    ekko = ekko_side.Ekko(workdir, ekko_side.ekko_config(workdir, vm.qmp_socket, {}))
    try:
        for off in (0, 300 * GiB, TiB - 4 * MiB):
            vm.guest_write(data, off, 4 * MiB)
        vm.flush()
        r, j = ekko("backup", "w", "--full", qemu_pid=vm.pid)
    finally:
        vm.stop()
    bid = j["backup"]["backup_id"]
    runs = []
    for _ in range(repeat):
        s = Served(ekko, bid)
        try:
            h = nbd.NBD()
            h.connect_uri(s.info["uri"])
            h.pread(4096, 0)
            t = time.monotonic()
            h.pread(4096, 300 * GiB)
            h.shutdown()
        finally:
            s.stop()
        runs.append({"first_byte_s": t - s.t0, "ready_s": s.ready - s.t0})
    shutil.rmtree(ekko.store, ignore_errors=True)
    os.unlink(image)
    return {"backup_s": r.wall, "runs": runs, "first_byte_s": statistics.median(x["first_byte_s"] for x in runs),
            "ready_s": statistics.median(x["ready_s"] for x in runs)}


def sequential(workdir: str, size: int, repeat: int) -> dict:
    base = os.path.join(workdir, "w.qcow2")
    workload.build_image(base, workload.Layout(size), workdir)
    vm = Vm(workdir, base).start()
    ekko = ekko_side.Ekko(workdir, ekko_side.ekko_config(workdir, vm.qmp_socket, {}))
    try:
        full, j = ekko("backup", "w", "--full", qemu_pid=vm.pid)
    finally:
        vm.stop()
    os.unlink(base)
    bid = j["backup"]["backup_id"]
    out = {"size": size, "full_s": full.wall, "restore_qcow2_s": [], "restore_raw_s": [], "nbdcopy_s": [],
           "nbdcopy_cpu_s": [], "serve_ready_s": []}
    for _ in range(repeat):
        for fmt in ("qcow2", "raw"):
            target = os.path.join(workdir, f"restored.{fmt}")
            os.sync()
            r, _ = ekko("restore", bid, "--to", target)
            out[f"restore_{fmt}_s"].append(r.wall)
            os.unlink(target)
        os.sync()
        s = Served(ekko, bid)
        try:
            r = procs.run(["nbdcopy", s.info["uri"], "null:"])
        finally:
            s.stop()
        out["nbdcopy_s"].append(r.wall)
        out["nbdcopy_cpu_s"].append(r.cpu)
        out["serve_ready_s"].append(s.ready - s.t0)
    for k in ("restore_qcow2_s", "restore_raw_s", "nbdcopy_s", "serve_ready_s"):
        out[k + "_median"] = statistics.median(out[k])
    # throughput ratio: served / restore = restore time / nbdcopy time
    out["ratio_vs_restore_qcow2"] = out["restore_qcow2_s_median"] / out["nbdcopy_s_median"]
    out["ratio_vs_restore_raw"] = out["restore_raw_s_median"] / out["nbdcopy_s_median"]
    shutil.rmtree(ekko.store, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="W of 1 GiB, one repeat")
    p.add_argument("--size-gib", type=float, default=8)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    size = int((1 if a.quick else a.size_gib) * GiB)
    repeat = 1 if a.quick else a.repeat
    workdir = tempfile.mkdtemp(prefix="ekko-bench-serve-", dir="/tmp")
    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"nproc": os.cpu_count(), "load": os.getloadavg()}}
    try:
        log("1 TiB sparse disk: backup, then serve -> first byte ...")
        os.mkdir(os.path.join(workdir, "fb"))
        report["first_byte"] = first_byte(os.path.join(workdir, "fb"), repeat)
        fb = report["first_byte"]
        log(f"    first byte {fb['first_byte_s']:.2f} s after `ekko serve` started (ready {fb['ready_s']:.2f} s); "
            f"target < 1 s: {'yes' if fb['first_byte_s'] < 1 else 'NO'}")
        log(f"W ({size / GiB:g} GiB): full backup, then restore vs nbdcopy of the served backup ...")
        os.mkdir(os.path.join(workdir, "w"))
        sq = report["sequential"] = sequential(os.path.join(workdir, "w"), size, repeat)
        log(f"    restore qcow2 {sq['restore_qcow2_s_median']:.2f} s, raw {sq['restore_raw_s_median']:.2f} s; "
            f"nbdcopy of the served backup {sq['nbdcopy_s_median']:.2f} s: throughput "
            f"{sq['ratio_vs_restore_qcow2']:.2f}x the qcow2 restore's, {sq['ratio_vs_restore_raw']:.2f}x the raw "
            f"restore's; target >= 0.7x: {'yes' if sq['ratio_vs_restore_qcow2'] >= 0.7 else 'NO'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    path = os.path.join(HERE, "out", f"serve-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""`ekko files BACKUP /` on a 16 GiB disk, and what its time is made of (issue 16; not part of
`make test`):

    .venv/bin/python bench/files.py [--repeat 3] [--size-gib 16]

The disk: GPT, one ext4 over the whole of it (mke2fs -d from a small tree, into a sparse raw
file: nothing mounted), converted to qcow2 and backed up (full) by the real CLI from a QEMU.
Then, alternately, REPEAT times each:
- `before`: the KVM verdict that serve/files.py keeps in libguestfs' cache directory removed
  first: the command tries KVM, fails (nested KVM here), starts again under TCG (what every
  command did before the verdict was kept);
- `after`: the verdict kept: TCG straight away.
Each run is the whole command (wall, a new process), and once per mode the steps inside one
process: server ready, appliance launched, file system mounted, '/' listed.

Writes bench/out/files-<UTC time>.json. Big files in /tmp/ekko-bench-files-*, removed at the end.
"""

import argparse
import datetime
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
sys.path.insert(0, os.path.dirname(HERE))

import ekko_side  # noqa: E402
from procs import Vm  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def make_disk(workdir: str, size: int) -> str:
    tree = os.path.join(workdir, "tree")
    for d in ("etc", "home/ann", "var/log", "usr/bin"):
        os.makedirs(os.path.join(tree, d))
    for i in range(200):
        with open(os.path.join(tree, "usr/bin", f"tool{i}"), "wb") as f:
            f.write(os.urandom(16 * 1024))
    raw = os.path.join(workdir, "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", raw], check=True, capture_output=True)
    part = size - 2 * MiB
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, "-E",
                    f"offset={MiB},nodiscard,lazy_itable_init=1", raw, f"{part // 1024}k"], check=True,
                   capture_output=True)
    image = os.path.join(workdir, "disk.qcow2")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", raw, image], check=True)
    os.unlink(raw)
    return image


def verdict_path() -> str:
    from ekko_libvirt.serve import files
    p = files._verdict_path()
    if p is None:
        raise SystemExit("libguestfs' cache directory is not there yet: run any libguestfs command once")
    return p


def steps(ekko, backup_id: str) -> dict:
    """The steps of one `ekko files BACKUP /`, timed inside this process."""
    from ekko_libvirt import config
    from ekko_libvirt.cli.serve import locate_namespace
    from ekko_libvirt.serve import files, server
    t0 = time.monotonic()
    cfg = config.load(ekko.path)
    ns, key = locate_namespace(cfg, None, backup_id, None)
    out = {}
    with server.serving(cfg, ns, key) as srv:
        out["server_ready_s"] = time.monotonic() - t0
        t = time.monotonic()
        guest = files.Guest(srv.socket)               # launch + list_filesystems + mount
        out["appliance_and_mount_s"] = time.monotonic() - t
        t = time.monotonic()
        entries, _ = guest.listdir("/")
        out["list_s"] = time.monotonic() - t
        out["entries"] = len(entries)
        t = time.monotonic()
        guest.close()
        out["close_s"] = time.monotonic() - t
    out["total_s"] = time.monotonic() - t0
    return out


def kvm_attempt(workdir: str, repeat: int) -> list:
    """What the remembered verdict saves each command: one appliance launch under KVM, failing
    (a 1 MiB raw drive; nothing else). [] when KVM does start the appliance here."""
    import guestfs
    drive = os.path.join(workdir, "tiny.raw")
    with open(drive, "wb") as f:
        f.truncate(MiB)
    out = []
    for _ in range(repeat):
        g = guestfs.GuestFS(python_return_dict=True)
        g.set_backend("direct")
        g.add_drive_opts(drive, format="raw", readonly=1)
        t = time.monotonic()
        try:
            g.launch()
        except RuntimeError:
            out.append(time.monotonic() - t)
        else:
            return []
        finally:
            g.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=16)
    ap.add_argument("--kvm-only", action="store_true", help="only time the failing KVM launch")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="ekko-bench-files-", dir="/tmp")
    result = {"started": datetime.datetime.utcnow().isoformat() + "Z", "size": args.size_gib * GiB,
              "load_before": os.getloadavg()}
    try:
        result["kvm_attempt_s"] = kvm_attempt(workdir, max(args.repeat, 5))
        log(f"failing KVM launches: {[round(x, 2) for x in result['kvm_attempt_s']]}")
        if args.kvm_only:
            return _write(result)
        log(f"building a {args.size_gib} GiB disk")
        image = make_disk(workdir, args.size_gib * GiB)
        vm = Vm(workdir, image).start()
        ekko = ekko_side.Ekko(workdir, ekko_side.ekko_config(workdir, vm.qmp_socket, {}))
        try:
            r, j = ekko("backup", "w", "--full", qemu_pid=vm.pid)
        finally:
            vm.stop()
        bid = j["backup"]["backup_id"]
        result["backup_s"] = r.wall
        verdict = verdict_path()
        runs = {"before": [], "after": []}
        for i in range(args.repeat):
            for mode in ("before", "after"):
                if mode == "before" and os.path.exists(verdict):
                    os.unlink(verdict)
                r, j = ekko("files", bid, "/")
                runs[mode].append({"wall_s": r.wall, "load": os.getloadavg()[0]})
                log(f"{mode} #{i + 1}: {r.wall:.1f} s (load {os.getloadavg()[0]:.1f})")
        result["runs"] = runs
        result["median_s"] = {m: statistics.median(x["wall_s"] for x in v) for m, v in runs.items()}
        for mode in ("before", "after"):
            if mode == "before" and os.path.exists(verdict):
                os.unlink(verdict)
            result[f"steps_{mode}"] = steps(ekko, bid)
            log(f"steps {mode}: {result[f'steps_{mode}']}")
        result["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _write(result)


def _write(result: dict) -> int:
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    out = os.path.join(HERE, "out", f"files-{datetime.datetime.utcnow():%Y%m%dT%H%M%SZ}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    log(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

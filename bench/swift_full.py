#!/usr/bin/env python3
"""A full backup of workload W into Swift against `swift upload` of the same bytes (issue 15).

    .venv/bin/python bench/swift_full.py                   # W = 8 GiB (3 GiB of data), medians of 2
    .venv/bin/python bench/swift_full.py --size-gib 1 --repeat 1       # smoke run
    .venv/bin/python bench/swift_full.py --ekko workers=4 --ekko store.threads=16

In one run, against one Swift all-in-one it starts (tests/harness/swift.py), each repetition:
  ekko        `ekko backup w --full` of W (QEMU, 1 MiB segments, zstd 1, Swift store): whole command
  objects     `swift upload --object-threads T` of W's data cut into segment-size files (the same
              bytes ekko reads, as objects of the segment size, uncompressed)
  image       `swift upload --segment-size 64M --segment-threads T` of W's data as one file
  raw         the same, of W's raw image (`qemu-img convert -O raw`: the virtual size, sparse on
              disk; swift upload reads and sends its zeros too, as it would for any raw image)
Ratios: objects_s / ekko_s (target >= 1.0) and raw_s / ekko_s (the issue's "of the raw image",
target >= 0.8); image_s / ekko_s is the stricter one (only the data, no zeros). Both `swift upload`
runs read their files from the page cache; the data files are written once, untimed. On this
2-core machine Swift's servers and the client share the CPU: CPU seconds are reported with each.
Nothing here is part of `make test`.
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
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs  # noqa: E402  (puts the repository root on sys.path)
import workload  # noqa: E402
from ekko_side import Ekko, ekko_config  # noqa: E402
from procs import Vm  # noqa: E402

from ekko_libvirt import units  # noqa: E402
from tests.harness.swift import SwiftServer  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_data_files(layout: workload.Layout, seg: int, objects_dir: str, image: str) -> int:
    """W's data as seg-size files and as one file; returns the bytes of data."""
    os.makedirs(objects_dir)
    total = 0
    with open(image, "wb") as whole:
        for off, data in workload.chunks(layout):
            whole.write(data)
            for i in range(0, len(data), seg):
                with open(os.path.join(objects_dir, f"{(off + i) // seg:08d}"), "wb") as f:
                    f.write(data[i:i + seg])
            total += len(data)
    return total


def swift_upload(server: SwiftServer, container: str, what: str, cwd: str, extra: List[str]) -> procs.Run:
    swift = os.path.join(os.path.dirname(sys.executable), "swift")
    env = dict(os.environ, **server.env("test"))        # credentials in the environment, not argv
    return procs.run([swift, "upload", *extra, container, what], cwd=cwd, env=env)


def overrides_from(pairs: List[str]) -> Dict:
    import yaml
    out: Dict = {}
    for p in pairs:
        k, _, v = p.partition("=")
        out[k] = yaml.safe_load(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=8.0, help="virtual size of W (default 8: 3 GiB of data)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8, help="swift upload's threads and ekko's store.threads")
    ap.add_argument("--ekko", action="append", default=[], metavar="KEY=VALUE", help="ekko config override")
    ap.add_argument("--w-cache", metavar="PATH", help="reuse W from PATH (built there if missing)")
    ap.add_argument("--out", help="JSON output (default bench/out/swift-full-<time>.json)")
    a = ap.parse_args(argv)
    size = int(a.size_gib * units.GiB)
    layout = workload.Layout(size)
    seg = units.DEFAULT_SEGMENT_SIZE
    work = tempfile.mkdtemp(prefix="ekko-bench-swiftfull-", dir="/tmp")
    runs: Dict[str, List[Dict]] = {"ekko": [], "objects": [], "image": [], "raw": []}
    try:
        base = a.w_cache or os.path.join(work, "w.qcow2")
        if not (a.w_cache and os.path.exists(base)):
            workload.build_image(base, layout, work)
        data = write_data_files(layout, seg, os.path.join(work, "objects"), os.path.join(work, "image"))
        os.makedirs(os.path.join(work, "rawdir"))
        subprocess.run(["qemu-img", "convert", "-O", "raw", base, os.path.join(work, "rawdir", "w.raw")], check=True)
        log(f"W: {units.human(size)}, {units.human(data)} of data; {data // seg} objects of {units.human(seg)}")
        with SwiftServer(os.path.join(work, "swift")) as server:
            user, key = server.credentials("test")
            for rep in range(a.repeat):
                image = os.path.join(work, "disk.qcow2")
                procs.copy_image(base, image)
                vm = Vm(work, image).start()
                try:        # the VM is stopped whatever fails from here (a bad --ekko value too)
                    store = {"type": "swift", "auth_url": server.auth_url, "auth_version": "1", "user": user,
                             "key": key, "container_prefix": f"bench{rep}", "threads": a.threads}
                    cfg = ekko_config(work, vm.qmp_socket, overrides_from(a.ekko))
                    # --ekko store.X=... overrides land in the local store's mapping: carried over
                    cfg["store"] = dict(store, **{k: v for k, v in cfg["store"].items() if k not in ("type", "path")})
                    r, j = Ekko(work, cfg)("backup", "w", "--full", qemu_pid=vm.pid)
                finally:
                    vm.stop()
                    os.unlink(image)
                runs["ekko"].append({"s": r.wall, "cpu_s": r.cpu, "qemu_cpu_s": r.qemu_cpu,
                                     "stored_bytes": j["backup"]["stored_bytes"]})
                r = swift_upload(server, f"objects{rep}", "objects", work, ["--object-threads", str(a.threads)])
                runs["objects"].append({"s": r.wall, "cpu_s": r.cpu})
                r = swift_upload(server, f"image{rep}", "image", work,
                                 ["--segment-size", str(64 * MiB), "--segment-threads", str(a.threads)])
                runs["image"].append({"s": r.wall, "cpu_s": r.cpu})
                r = swift_upload(server, f"raw{rep}", "w.raw", os.path.join(work, "rawdir"),
                                 ["--segment-size", str(64 * MiB), "--segment-threads", str(a.threads)])
                runs["raw"].append({"s": r.wall, "cpu_s": r.cpu})
                log(f"round {rep + 1}: ekko {runs['ekko'][-1]['s']:.2f} s, objects {runs['objects'][-1]['s']:.2f} s, "
                    f"image {runs['image'][-1]['s']:.2f} s, raw {runs['raw'][-1]['s']:.2f} s")
                shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(x["s"] for x in v) for k, v in runs.items()}
    report = {"size": size, "data_bytes": data, "segment_size": seg, "threads": a.threads, "runs": runs,
              "median_s": med, "ratio_objects_over_ekko": med["objects"] / med["ekko"],
              "ratio_image_over_ekko": med["image"] / med["ekko"], "ratio_raw_over_ekko": med["raw"] / med["ekko"],
              "load_avg": os.getloadavg()}
    out = a.out or os.path.join(HERE, "out", time.strftime("swift-full-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    mib = data / MiB     # rates are of W's data for every row, for comparison
    print(f"| run (medians of {a.repeat}) | s | MiB/s of W's data | CPU s (client) |")
    print("|---|---|---|---|")
    for k, label in (("ekko", "ekko backup --full (Swift)"), ("objects", f"swift upload, {seg // MiB} MiB objects"),
                     ("image", "swift upload --segment-size 64M, W's data"),
                     ("raw", "swift upload --segment-size 64M, W's raw image")):
        cpu = statistics.median(x["cpu_s"] for x in runs[k])
        print(f"| {label} | {med[k]:.2f} | {mib / med[k]:.0f} | {cpu:.1f} |")
    print(f"\nobjects / ekko = {report['ratio_objects_over_ekko']:.2f} (target >= 1.0); "
          f"raw image / ekko = {report['ratio_raw_over_ekko']:.2f} (target >= 0.8); "
          f"data only / ekko = {report['ratio_image_over_ekko']:.2f}; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

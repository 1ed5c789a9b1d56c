#!/usr/bin/env python3
"""Restore as a Glance image (api/glance.py) against `ekko restore` to a local qcow2, of the same
backup of W (issue 19: target >= 0.7x the throughput).

    .venv/bin/python bench/glance_restore.py                    # W = 1 GiB (384 MiB of data), medians of 3
    .venv/bin/python bench/glance_restore.py --size-gib 0.5 --repeat 1     # smoke run

In one run: W (bench/workload.py: random, log text, one repeated block, the rest never written)
in a QEMU, `ekko backup w --full` into a local store (1 MiB segments), QEMU stopped; then a real
Glance (tests/harness/glance.py: Glance 33, NoAuth, file store on this machine's disk) and, per
repetition, in rotating order:
  restore     `ekko restore BACKUP --to r.qcow2` (the CLI process, imports included)
  image       the same backup uploaded as a qcow2 image (a process that imports api/glance.py and
              calls upload_backup_as_image, as ekko-api's restore job does), then deleted
  floor       Glance alone: the same qcow2's bytes from memory, in the same HTTP chunks
then the backup as a raw image (every zero byte of the disk sent).
Ratio: restore_s / image_s (the same disk either way). The image also carries the zero clusters
of the data segments (a stream cannot leave holes) and Glance checksums what it stores (md5 and
sha512) on the same two cores. Glance's CPU (its gunicorn processes) is measured around each
upload: where it nears the wall time, Glance's one worker is the limit. The first image of each
run is checked against the restored file (`qemu-img compare` on Glance's stored file). Nothing
here is part of `make test`.
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
from tests.harness.glance import GlanceServer  # noqa: E402

MiB = 1 << 20

# The upload, in a process of its own (as the restore's CLI runs in one): prints {"image_id": ...}.
UPLOAD = """
import json, sys, time
from keystoneauth1 import noauth, session
from ekko_libvirt import config
from ekko_libvirt.api import glance
cfg_path, key, fmt, url = sys.argv[1:5]
cfg = config.load(cfg_path)
s = session.Session(auth=noauth.NoAuth(endpoint=url))
t = time.monotonic()
image_id = glance.upload_backup_as_image(cfg, "default", None, key, "bench-w", fmt, s, endpoint=url)
print(json.dumps({"image_id": image_id, "upload_s": time.monotonic() - t}))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def backup_w(work: str, base: str) -> Dict:
    """`ekko backup w --full` of W -> {ekko, backup_id, key, stored_bytes}; QEMU stopped after."""
    image = os.path.join(work, "disk.qcow2")
    procs.copy_image(base, image)
    vm = Vm(work, image).start()
    try:
        ekko = Ekko(work, ekko_config(work, vm.qmp_socket, {"segment_size": "1MiB"}))
        _run, j = ekko("backup", "w", "--full", qemu_pid=vm.pid)
    finally:
        vm.stop()
        os.unlink(image)
    b = j["backup"]
    return {"ekko": ekko, "backup_id": b["backup_id"], "key": f"manifests/w/{b['backup_id']}",
            "stored_bytes": b["stored_bytes"]}


def restore_once(work: str, b: Dict) -> procs.Run:
    out = os.path.join(work, "r.qcow2")
    if os.path.exists(out):
        os.unlink(out)
    r, _j = b["ekko"]("restore", b["backup_id"], "--to", out)
    return r


def image_once(b: Dict, glance: GlanceServer, fmt: str, restored: str = "") -> Dict:
    """One upload, measured; checked against `restored` when given; the image deleted after."""
    g0 = glance_cpu(glance)
    r = procs.run([sys.executable, "-c", UPLOAD, b["ekko"].path, b["key"], fmt, glance.url], env=b["ekko"].env)
    g1 = glance_cpu(glance)
    out = json.loads(r.stdout)
    image_id = out["image_id"]
    s = glance.session()
    try:
        info = s.request(f"{glance.url}/v2/images/{image_id}", "GET").json()
        if restored:
            stored = os.path.join(glance.images_dir, image_id)
            p = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "qcow2", stored, restored],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"image {image_id} differs from ekko restore's file: {p.stdout}{p.stderr}")
    finally:
        s.request(f"{glance.url}/v2/images/{image_id}", "DELETE")
    return {"run": r, "size": int(info["size"]), "upload_s": out["upload_s"], "glance_cpu_s": g1 - g0}


def glance_cpu(glance: GlanceServer) -> float:
    """CPU seconds Glance's processes (gunicorn's master and worker) have used so far."""
    return sum(procs.cpu_seconds(pid) for pid in glance.running_pids())


def glance_floor(b: Dict, glance: GlanceServer, image: bytes) -> Dict:
    """Glance alone: the same qcow2's bytes, already in memory, uploaded in the same HTTP chunks
    (api/glance.py's upload with a body that costs nothing) -> seconds of create + PUT + show,
    and Glance's CPU seconds meanwhile."""
    from ekko_libvirt.api import glance as ekko_glance
    s = glance.session()
    req = ekko_glance.ImageRequest("bench-floor", "qcow2", {})
    g0, t = glance_cpu(glance), time.monotonic()
    image_id = ekko_glance.upload(s, req, [image], len(image), glance.url)
    took, g1 = time.monotonic() - t, glance_cpu(glance)
    s.request(f"{glance.url}/v2/images/{image_id}", "DELETE")
    return {"floor_s": took, "floor_glance_cpu_s": g1 - g0}


def stream_bytes(b: Dict) -> bytes:
    from ekko_libvirt.restore import stream
    from ekko_libvirt.store import catalog
    from ekko_libvirt.store.factory import open_store
    from ekko_libvirt import config
    st = open_store(config.load(b["ekko"].path))
    try:
        return b"".join(stream.disk_stream(st, catalog.load(st, b["key"]), "qcow2"))
    finally:
        st.close()


def one_round(work: str, b: Dict, glance: GlanceServer, rep: int, verify: bool, image: bytes) -> Dict:
    """restore, image and Glance's floor in rotating order (none always on another's warm cache)."""
    res: Dict = {}
    order = [["restore", "image", "floor"], ["image", "floor", "restore"], ["floor", "restore", "image"]][rep % 3]
    restored = os.path.join(work, "r.qcow2")
    for what in order:
        if what == "restore":
            r = restore_once(work, b)
            res.update(restore_s=r.wall, restore_cpu_s=r.cpu, restore_file_bytes=os.stat(restored).st_blocks * 512)
        elif what == "floor":
            res.update(glance_floor(b, glance, image))
        else:
            check = restored if verify and rep == 0 and os.path.exists(restored) else ""
            i = image_once(b, glance, "qcow2", check)
            res.update(image_s=i["run"].wall, image_upload_s=i["upload_s"], image_cpu_s=i["run"].cpu,
                       image_glance_cpu_s=i["glance_cpu_s"],
                       image_bytes=i["size"], image_rss_mib=i["run"].maxrss_mib, verified=bool(check))
    raw = image_once(b, glance, "raw")
    res.update(image_raw_s=raw["run"].wall, image_raw_bytes=raw["size"])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0, help="virtual size of W (default 1: 384 MiB of data)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-verify", action="store_true", help="skip comparing the first image with the restore")
    ap.add_argument("--out", help="JSON output (default bench/out/glance-restore-<time>.json)")
    a = ap.parse_args(argv)
    size = int(a.size_gib * units.GiB)
    layout = workload.Layout(size)
    work = tempfile.mkdtemp(prefix="ekko-bench-glance-", dir="/tmp")
    runs: List[Dict] = []
    try:
        base = os.path.join(work, "w.qcow2")
        workload.build_image(base, layout, work)
        b = backup_w(work, base)
        os.unlink(base)
        image = stream_bytes(b)
        with GlanceServer(os.path.join(work, "glance")) as glance:
            for rep in range(a.repeat):
                runs.append(one_round(work, b, glance, rep, not a.no_verify, image))
                r = runs[-1]
                log(f"round {rep + 1}: ekko restore {r['restore_s']:.2f} s, image (qcow2) {r['image_s']:.2f} s "
                    f"(upload {r['image_upload_s']:.2f} s), Glance floor {r['floor_s']:.2f} s, "
                    f"image (raw) {r['image_raw_s']:.2f} s")
        del image
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(float(r[k]) for r in runs) for k in runs[0]}
    data = 3 * layout.region
    report = {"size": size, "data_bytes": data, "stored_bytes": b["stored_bytes"], "runs": runs, "median": med,
              "ratio_image_over_restore": med["restore_s"] / med["image_s"],
              "ratio_floor_over_upload": med["floor_s"] / med["image_upload_s"], "load_avg": os.getloadavg()}
    out = a.out or os.path.join(HERE, "out", time.strftime("glance-restore-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"| W {units.human(size)} ({units.human(data)} of data), medians of {a.repeat} | s | MiB/s of W's data "
          f"| CPU s | bytes written |")
    print("|---|---|---|---|---|")
    print(f"| ekko restore --to r.qcow2 (local) | {med['restore_s']:.2f} | {data / MiB / med['restore_s']:.0f} | "
          f"{med['restore_cpu_s']:.1f} | {units.human(int(med['restore_file_bytes']))} allocated |")
    print(f"| restore as image, qcow2 (Glance, file store) | {med['image_s']:.2f} | "
          f"{data / MiB / med['image_s']:.0f} | {med['image_cpu_s']:.1f} ekko + "
          f"{med['image_glance_cpu_s']:.1f} Glance | "
          f"{units.human(int(med['image_bytes']))} sent |")
    print(f"| (of which the upload call, imports excluded) | {med['image_upload_s']:.2f} | "
          f"{data / MiB / med['image_upload_s']:.0f} | | |")
    print(f"| Glance's floor: the same qcow2 from memory | {med['floor_s']:.2f} | {data / MiB / med['floor_s']:.0f} "
          f"| {med['floor_glance_cpu_s']:.1f} Glance | {units.human(int(med['image_bytes']))} sent |")
    print(f"| restore as image, raw | {med['image_raw_s']:.2f} | {data / MiB / med['image_raw_s']:.0f} | | "
          f"{units.human(int(med['image_raw_bytes']))} sent |")
    print(f"\nimage / restore throughput = {report['ratio_image_over_restore']:.2f}x (target >= 0.7); "
          f"image upload / Glance's floor = {report['ratio_floor_over_upload']:.2f}x; "
          f"load {report['load_avg'][0]:.1f}; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""`make bench`: ekko against its peers and the physical limits on workload W (issue 6).

    .venv/bin/python bench/run.py                 # W = 8 GiB, medians of 2, every installed peer
    .venv/bin/python bench/run.py --quick         # smoke run of everything on a small W (< 2 min)
    .venv/bin/python bench/run.py --install-peers # apt-get install virtnbdbackup restic borgbackup first
    .venv/bin/python bench/run.py --peers none --ekko segment_size=4MiB --ekko workers=2
    .venv/bin/python bench/run.py --sweep 256KiB,1MiB,2MiB,4MiB   # store/objects/manifest per segment size
    .venv/bin/python bench/run.py --profile py-spy --peers none   # collapsed stacks in bench/out/
                                                  # (py-spy: `.venv/bin/pip install py-spy`, bench only)
    .venv/bin/python bench/run.py --store-scale [--sizes 1M,4M --swift-sizes 1M --damage 100]
                                                  # verify/gc/list/prune at millions of segments
                                                  # (bench/store_scale.py, issue 21; its own options)

virtnbdbackup needs libvirtd: the bench starts one (tests/harness/libvirtd.py) around those runs
only; if another one runs, set EKKO_TEST_REUSE_LIBVIRTD=1 to use it (it is never stopped).

Prints the issue's table with ekko's row and the ratios against the targets, and writes everything
measured to bench/out/bench-<UTC time>.json. Big files live in /tmp/ekko-bench-*, removed at the end.
Timings are wall seconds of whole commands (ekko: the CLI process, imports included); CPU is the
command's rusage (children included) plus the QEMU process's utime+stime delta; RSS is the peak
resident size of the command's largest process (GNU time's %M, i.e. ru_maxrss of a clean fork).
Nothing here is part of `make test`.
"""

import argparse
import datetime
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import floors  # noqa: E402
import procs  # noqa: E402  (puts the repository root on sys.path)
import workload  # noqa: E402

from ekko_libvirt import units  # noqa: E402

ALL_PEERS = ["nbdcopy", "nbdcopy-flush", "virtnbdbackup", "virtnbdbackup-z", "restic", "borg"]
# Not backup tools: the limits ekko's rows are compared with (no store size, no incrementals).
REFERENCES = ("nbdcopy", "nbdcopy-flush", "floor-full", "convert", "convert-durable", "floor-restore")
PEER_TOOL = {"nbdcopy": "nbdcopy", "nbdcopy-flush": "nbdcopy", "virtnbdbackup": "virtnbdbackup",
             "virtnbdbackup-z": "virtnbdbackup",
             "restic": "restic", "borg": "borg"}

# The issue's figures (2 cores, Debian 12): used for a ratio only when a peer is not installed.
ISSUE = {
    "virtnbdbackup": {"full_s": 14.5, "inc_d1_s": 1.42, "inc_none_s": 1.25, "restore_s": 11.9,
                      "store_d1_mib": 3154, "cpu_total_s": 12.9, "rss_mib": 121},
    "restic": {"store_d1_mib": 1247},
    "nbdcopy": {"full_s": 4.5},
    "convert": {"restore_s": 4.0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=8.0, help="virtual size of W (default 8)")
    p.add_argument("--quick", action="store_true", help="small smoke run of the whole suite (< 2 min)")
    p.add_argument("--repeat", type=int, default=None, help="runs per tool; medians are reported (default 2)")
    p.add_argument("--peers", default="all", help=f"comma list of {','.join(ALL_PEERS)}, 'all' or 'none'")
    p.add_argument("--install-peers", action="store_true", help="apt-get install the missing peer packages")
    p.add_argument("--ekko", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for ekko (YAML value, dotted key), e.g. workers=2, read.in_flight=8")
    p.add_argument("--sweep", default="", help="extra ekko-only runs per segment size, e.g. 256KiB,1MiB,4MiB")
    p.add_argument("--sparse-tib", type=float, default=1.0, help="size of the sparse disk (default 1 TiB)")
    p.add_argument("--extents", type=int, default=1000, help="dirty extents on the sparse disk (default 1000)")
    p.add_argument("--manifest-tib", type=float, default=16.0, help="disk size for the manifest test (16 TiB)")
    p.add_argument("--no-scaling", action="store_true", help="skip the sparse-disk and manifest figures")
    p.add_argument("--profile", choices=["py-spy"], help="profile ekko's commands (first repetition)")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the restored image with the disk")
    p.add_argument("--no-encryption", action="store_true", help="skip the full backup with encryption on")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--w-cache", metavar="PATH", help="reuse W from PATH (built there if missing; not removed)")
    p.add_argument("--fs", choices=["tmp", "ext4"], default="tmp",
                   help="where every tool writes: /tmp, or a fresh journaled ext4 made for the run (loop device); "
                        "see procs.work_directory")
    p.add_argument("--out", help="JSON output path (default bench/out/bench-<time>.json)")
    a = p.parse_args(argv)
    if a.quick:
        a.size_gib = min(a.size_gib, 0.5)
        a.sparse_tib = min(a.sparse_tib, 1 / 16)
        a.extents = min(a.extents, 200)
        a.manifest_tib = min(a.manifest_tib, 1.0)
        a.repeat = a.repeat or 1
    a.repeat = a.repeat or 2
    peers = ALL_PEERS if a.peers == "all" else [] if a.peers == "none" else a.peers.split(",")
    unknown = set(peers) - set(ALL_PEERS)
    if unknown:
        p.error(f"unknown peer(s): {', '.join(sorted(unknown))}")
    a.peer_list = peers
    a.overrides = {}
    import yaml
    for kv in a.ekko:
        k, _, v = kv.partition("=")
        a.overrides[k] = yaml.safe_load(v)
    return a


def machine() -> Dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    def ver(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
        except (OSError, IndexError):
            return ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(os.sysconf("SC_PHYS_PAGES") *
                                                                     os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "kernel": platform.release(), "os": _os_release(), "python": platform.python_version(),
            "qemu": ver(["qemu-system-x86_64", "--version"]), "kvm": os.path.exists("/dev/kvm"),
            "loadavg_start": os.getloadavg()}


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            return dict(l.rstrip().split("=", 1) for l in f if "=" in l).get("PRETTY_NAME", "").strip('"')
    except OSError:
        return ""


def d1_files(workdir: str, size: int):
    """D1 as files QEMU can read (0644 in a 0755 directory): (path, offset, length)."""
    d = os.path.join(workdir, "d1")
    os.makedirs(d, mode=0o755)
    out = []
    for k, (off, data) in enumerate(workload.d1_writes(size)):
        path = os.path.join(d, f"{k:03d}.bin")
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        out.append((path, off, len(data)))
    return out


def sub(workdir: str, name: str) -> str:
    d = os.path.join(workdir, name)
    os.makedirs(d, mode=0o755)
    return d


# -- the runs -------------------------------------------------------------------------------------
def run_all(a, workdir: str, report: Dict) -> None:
    import ekko_side
    import peers as peer_mod
    size = int(a.size_gib * units.GiB)
    workload.check_size(size)
    layout = workload.Layout(size)
    base = a.w_cache or os.path.join(workdir, "w.qcow2")
    t0 = time.monotonic()
    if not (a.w_cache and os.path.exists(base)):
        workload.build_image(base, layout, workdir)
    d1 = d1_files(workdir, size)
    report["workload"] = {"size": size, "regions": layout.regions(), "d1_writes": len(d1),
                          "build_s": time.monotonic() - t0, "text_zstd1_ratio": text_ratio()}
    log(f"built W ({units.human(size)}, D1 = {len(d1)} x 1 MiB) in {report['workload']['build_s']:.1f} s")

    if a.install_peers:
        peer_mod.install_peers([PEER_TOOL[p] for p in a.peer_list])
    available = [p for p in a.peer_list if peer_mod.installed(PEER_TOOL[p])]
    missing = [p for p in a.peer_list if p not in available]
    report["peers_missing"] = missing
    if missing:
        pkgs = sorted({peer_mod.PEER_PACKAGES.get(PEER_TOOL[p], PEER_TOOL[p]) for p in missing})
        log(f"not installed, skipped: {', '.join(missing)} (bench/run.py --install-peers, or "
            f"apt-get install {' '.join(pkgs)})")

    runs: Dict[str, List[Dict]] = {}
    log_dir = sub(workdir, "libvirt-logs")
    for rep in range(a.repeat):
        def one(name, fn):
            w = sub(workdir, f"{name}-{rep}")
            log(f"[{rep + 1}/{a.repeat}] {name} ...")
            os.sync()
            try:
                r = fn(w)
            except Exception as e:   # noqa: BLE001 - one failed peer must not lose the others
                traceback.print_exc()
                r = {"tool": name, "error": f"{type(e).__name__}: {e}"}
            shutil.rmtree(w, ignore_errors=True)
            runs.setdefault(name, []).append(r)
            log(f"    {brief(r)}")
            return r
        r = one("ekko", lambda w: ekko_side.run(w, base, d1, a.overrides, verify=not a.no_verify,
                                                profile=a.profile if rep == 0 else None))
        for ref in ("convert", "convert-durable", "floor-restore"):
            if ref in r:
                runs.setdefault(ref, []).append(r.pop(ref))
        if encryption_supported() and not a.no_encryption:
            one("ekko-encrypted", lambda w: ekko_side.run_full(w, base, a.overrides, encrypted=True))
        if "nbdcopy" in available:
            one("nbdcopy", lambda w: peer_mod.run_nbdcopy(w, _copy(base, w)))
        if "nbdcopy-flush" in available:
            one("nbdcopy-flush", lambda w: peer_mod.run_nbdcopy(w, _copy(base, w), flush=True))
        if "nbdcopy" in available and "error" not in r:
            one("floor-full", lambda w: floors.full_floor(w, _copy(base, w), r["segment_size"]))
        vnb = [p for p in ("virtnbdbackup", "virtnbdbackup-z") if p in available]
        if vnb:
            # libvirtd runs only while virtnbdbackup does: other users of the test harness
            # find no daemon of ours in their way the rest of the time.
            try:
                libvirt = peer_mod.LibvirtSide(log_dir).__enter__()
            except Exception as e:   # noqa: BLE001 - e.g. another libvirtd runs: say so, go on
                log(f"libvirtd: {e}")
                for p in vnb:
                    runs.setdefault(p, []).append({"tool": p, "error": f"libvirtd: {e}"})
                vnb = []
            try:
                for p in vnb:
                    one(p, lambda w: libvirt.run_virtnbdbackup(w, _copy(base, w), d1, p.endswith("-z")))
            finally:
                if vnb:
                    libvirt.__exit__(None, None, None)
        if "restic" in available:
            one("restic", lambda w: peer_mod.run_restic(w, _copy(base, w), d1))
        if "borg" in available:
            one("borg", lambda w: peer_mod.run_borg(w, _copy(base, w), d1))
    report["runs"] = runs
    report["medians"] = {k: medians(v) for k, v in runs.items()}

    for seg in filter(None, a.sweep.split(",")):
        o = dict(a.overrides, segment_size=seg)
        w = sub(workdir, f"sweep-{seg}")
        log(f"sweep: segment_size {seg} ...")
        r = ekko_side.run(w, base, d1, o, convert=False, verify=False)
        shutil.rmtree(w, ignore_errors=True)
        r["manifest_16tib"] = None
        report.setdefault("sweep", []).append(r)
        log(f"    {brief(r)}; {r['segment_objects_after_d1']} objects")
    if not a.w_cache:
        os.unlink(base)

    if not a.no_scaling:
        scaling(a, workdir, report)


def _copy(base: str, w: str) -> str:
    dst = os.path.join(w, "disk.qcow2")
    procs.copy_image(base, dst)
    return dst


def scaling(a, workdir: str, report: Dict) -> None:
    import micro
    from ekko_libvirt import config
    seg = config.build({}).segment_size if "segment_size" not in a.overrides else \
        units.parse_size(a.overrides["segment_size"])
    sparse_size = int(a.sparse_tib * units.TiB)
    w = sub(workdir, "sparse")
    img = os.path.join(w, "sparse.qcow2")
    log(f"sparse disk: {units.human(sparse_size)}, {a.extents} dirty extents ...")
    micro.build_sparse(img, sparse_size, a.extents)
    sc = {"disk_size": sparse_size, "extents": a.extents, "segment_size": seg}
    sc["discovery"] = micro.discovery(w, img, seg)
    log(f"    discovery: {sc['discovery']['incremental']['seconds']:.2f} s incremental, "
        f"{sc['discovery']['full']['seconds']:.2f} s full walk")
    sc["backups"] = micro.sparse_backups(w, img, a.overrides, a.extents)
    log(f"    ekko full {sc['backups']['full']['seconds']:.1f} s RSS {sc['backups']['full']['rss_mib']:.0f} MiB, "
        f"incremental {sc['backups']['incremental']['seconds']:.1f} s "
        f"RSS {sc['backups']['incremental']['rss_mib']:.0f} MiB")
    shutil.rmtree(w, ignore_errors=True)
    report["sparse"] = sc
    w = sub(workdir, "manifest")
    sizes = sorted({seg} | {units.parse_size(s) for s in filter(None, a.sweep.split(","))})
    report["manifest"] = [micro.manifest_roundtrip(w, int(a.manifest_tib * units.TiB), s) for s in sizes]
    for m in report["manifest"]:
        log(f"    manifest {m['disk_tib']:g} TiB @ {units.human(m['segment_size'])}: {units.human(m['bytes'])}, "
            f"write {m['write_s']:.2f} s, load {m['load_s']:.2f} s")
    shutil.rmtree(w, ignore_errors=True)


def encryption_supported() -> bool:
    import dataclasses
    from ekko_libvirt import config
    return "encryption" in {f.name for f in dataclasses.fields(config.Config)}


def encryption_result(report: Dict) -> Dict:
    med = report.get("medians", {})
    on, off = med.get("ekko-encrypted"), med.get("ekko")
    if not encryption_supported():
        return {"measured": False, "note": "the config has no `encryption:` support: skipped"}
    if not on or not off or "error" in on or "error" in off:
        return {"measured": False, "note": "not measured (--no-encryption, or a run failed)"}
    return {"measured": True, "full_s_off": off["full_s"], "full_s_on": on["full_s"],
            "cpu_s_off": off["cpu_full_tool_s"], "cpu_s_on": on["cpu_full_tool_s"],
            "store_full_mib_off": off["store_full_mib"], "store_full_mib_on": on["store_full_mib"],
            "note": f"full backup of W, encryption on vs off: {on['full_s']:.2f} s vs {off['full_s']:.2f} s "
                    f"({on['full_s'] / off['full_s']:.2f}x), ekko CPU {on['cpu_full_tool_s']:.1f} s vs "
                    f"{off['cpu_full_tool_s']:.1f} s, store {on['store_full_mib']:.0f} MiB vs "
                    f"{off['store_full_mib']:.0f} MiB"}


def text_ratio() -> float:
    import zstandard
    src = workload.TextSource()
    data = src.chunk(workload.BLOCK)
    c = zstandard.ZstdCompressor(level=1)
    return len(data) / sum(len(c.compress(data[i:i + units.MiB])) for i in range(0, len(data), units.MiB))


# -- summarizing ------------------------------------------------------------------------------------
NUMERIC = ["full_s", "inc_d1_s", "inc_none_s", "restore_s", "store_full_mib", "store_d1_mib", "cpu_full_tool_s",
           "cpu_full_qemu_s", "rss_mib", "read_back_full_s"]


def medians(rs: List[Dict]) -> Dict:
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return {"tool": rs[0].get("tool"), "error": rs[0].get("error")}
    m = {"tool": ok[-1]["tool"], "n": len(ok)}
    for k in NUMERIC:
        vals = [r.get(k) for r in ok if r.get(k) is not None]
        m[k] = procs.median(vals) if vals else None
    if "restore_identical" in ok[0]:
        m["restore_identical"] = all(r.get("restore_identical") for r in ok)
    return m


def brief(r: Dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error'].splitlines()[0]}"
    parts = []
    for k, label in (("full_s", "full"), ("inc_d1_s", "D1"), ("inc_none_s", "none"), ("restore_s", "restore")):
        if r.get(k) is not None:
            parts.append(f"{label} {r[k]:.2f} s")
    if r.get("store_d1_mib") is not None:
        parts.append(f"store {r['store_d1_mib']:.0f} MiB")
    if r.get("cpu_full_tool_s") is not None:
        parts.append(f"CPU {r['cpu_full_tool_s']:.1f}+{r['cpu_full_qemu_s'] or 0:.1f} s")
    if r.get("rss_mib") is not None:
        parts.append(f"RSS {r['rss_mib']:.0f} MiB")
    return ", ".join(parts)


def fmt(v, spec=".2f", unit="") -> str:
    return "" if v is None else f"{v:{spec}}{unit}"


def table(report: Dict) -> str:
    med = report.get("medians", {})
    lines = ["| tool | full s | incremental (D1) s | incremental, no change s | restore s | store after full + D1 "
             "| CPU s (full, tool + QEMU) | RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    order = ["ekko", "ekko-encrypted", "virtnbdbackup", "virtnbdbackup-z", "restic", "borg", *REFERENCES]
    for name in order:
        m = med.get(name)
        if not m:
            continue
        if "error" in m:
            lines.append(f"| {m['tool']} | failed: {m['error'].splitlines()[0][:80]} |||||||")
            continue
        cpu = f"{m['cpu_full_tool_s']:.1f} + {m['cpu_full_qemu_s']:.1f}" if m.get("cpu_full_qemu_s") else \
            fmt(m.get("cpu_full_tool_s"), ".1f")
        tool = m["tool"] + (f" (segments {units.human(report['runs']['ekko'][0]['segment_size'])})"
                            if name == "ekko" and "segment_size" in report["runs"]["ekko"][0] else "")
        lines.append(f"| {tool} | {fmt(m['full_s'])} | {fmt(m['inc_d1_s'])} | {fmt(m['inc_none_s'])} "
                     f"| {fmt(m['restore_s'])} | {fmt(m['store_d1_mib'], '.0f', ' MiB')} | {cpu} "
                     f"| {fmt(m['rss_mib'], '.0f')} |")
    return "\n".join(lines)


def targets(report: Dict) -> List[Dict]:
    med = report.get("medians", {})
    e = med.get("ekko") or {}
    out = []

    issue_w = (report.get("workload") or {}).get("size") == 8 * units.GiB   # the issue's figures are for 8 GiB

    def peer(name, key):
        m = med.get(name)
        if m and "error" not in m and m.get(key) is not None:
            return m[key], "measured"
        v = ISSUE.get(name, {}).get(key) if issue_w else None
        return v, "issue figure" if v is not None else "n/a"

    def ratio(figure, target, mine, ref, limit):
        theirs, src = ref
        if mine is None or theirs in (None, 0):
            out.append({"figure": figure, "target": target, "ratio": None, "ok": None, "source": src})
            return
        r = mine / theirs
        out.append({"figure": figure, "target": target, "ekko": mine, "reference": theirs, "ratio": r,
                    "ok": r <= limit if limit else None, "source": src, "context": not limit})

    if e and "error" not in e:
        vnb_cpu = None
        v = med.get("virtnbdbackup")
        if v and "error" not in v:
            vnb_cpu = (v["cpu_full_tool_s"] + v["cpu_full_qemu_s"], "measured")
        else:
            vnb_cpu = (ISSUE["virtnbdbackup"]["cpu_total_s"] if issue_w else None,
                       "issue figure" if issue_w else "n/a")
        ratio("full backup of W", "<= 0.5x virtnbdbackup full", e["full_s"], peer("virtnbdbackup", "full_s"), 0.5)
        ratio("full backup of W", "<= 1.5x nbdcopy -> file", e["full_s"], peer("nbdcopy", "full_s"), 1.5)
        if med.get("nbdcopy-flush") and "error" not in med["nbdcopy-flush"]:
            ratio("(context) full backup of W", "vs nbdcopy --flush (durable, as a backup is)", e["full_s"],
                  peer("nbdcopy-flush", "full_s"), None)
        if med.get("floor-full") and "error" not in med["floor-full"]:
            ratio("(context) full backup of W", "vs this machine's floor for it (bench/floors.py)", e["full_s"],
                  peer("floor-full", "full_s"), None)
        ratio("incremental after D1", "<= 0.7x virtnbdbackup", e["inc_d1_s"], peer("virtnbdbackup", "inc_d1_s"), 0.7)
        ratio("incremental, no change", "<= 0.5x virtnbdbackup", e["inc_none_s"],
              peer("virtnbdbackup", "inc_none_s"), 0.5)
        ratio("restore of D1 to qcow2", "<= 0.5x virtnbdrestore", e["restore_s"],
              peer("virtnbdbackup", "restore_s"), 0.5)
        ratio("restore of D1 to qcow2", "<= 1.5x qemu-img convert", e["restore_s"], peer("convert", "restore_s"), 1.5)
        if med.get("convert-durable") and "error" not in med["convert-durable"]:
            ratio("(context) restore of D1 to qcow2", "vs qemu-img convert -t none (durable, as ekko's is)",
                  e["restore_s"], peer("convert-durable", "restore_s"), None)
        if med.get("floor-restore") and "error" not in med["floor-restore"]:
            ratio("(context) restore of D1 to qcow2", "vs the device floor: its reads + writes, no computation",
                  e["restore_s"], peer("floor-restore", "restore_s"), None)
        smallest = [(m["store_d1_mib"], m["tool"]) for k, m in med.items()
                    if k not in ("ekko", "ekko-encrypted", *REFERENCES) and "error" not in m and m.get("store_d1_mib")]
        ref = (min(smallest)[0], "measured: " + min(smallest)[1]) if smallest else \
            (ISSUE["restic"]["store_d1_mib"], "issue figure (restic)") if issue_w else (None, "n/a")
        ratio("store after full + D1", "<= smallest peer", e["store_d1_mib"], ref, 1.0)
        ratio("CPU s of the full (ekko + QEMU)", "<= virtnbdbackup uncompressed",
              e["cpu_full_tool_s"] + e["cpu_full_qemu_s"], vnb_cpu, 1.0)
        out.append({"figure": "peak RSS of ekko backup (W)", "target": "< 200 MiB", "ekko": e["rss_mib"],
                    "ok": e["rss_mib"] < 200})
        rb = e.get("read_back_full_s")
        if rb is not None:
            out.append({"figure": "read-back check in the full (share of the full's wall time)",
                        "target": "<= 3% of the full", "ekko": f"{rb:.3f} s = {rb / e['full_s']:.1%}",
                        "ok": rb <= 0.03 * e["full_s"]})
    sp = report.get("sparse")
    if sp:
        b = sp["backups"]
        worst = max(b["full"]["rss_mib"], b["incremental"]["rss_mib"])
        out.append({"figure": f"peak RSS, {units.human(sp['disk_size'])} sparse disk (full / incremental)",
                    "target": "< 200 MiB, same as on W (within 20 MiB)",
                    "ekko": f"{b['full']['rss_mib']:.0f} / {b['incremental']['rss_mib']:.0f}",
                    "ok": worst < 200 and (not e or "error" in e or abs(worst - e["rss_mib"]) <= 20)})
        out.append({"figure": f"extent discovery, {units.human(sp['disk_size'])} sparse, {sp['extents']} dirty extents",
                    "target": "< 2 s", "ekko": sp["discovery"]["incremental"]["seconds"],
                    "ok": sp["discovery"]["incremental"]["seconds"] < 2})
    seg = (report.get("runs", {}).get("ekko") or [{}])[0].get("segment_size")
    for m in report.get("manifest", []):
        if seg and m["segment_size"] != seg:
            continue
        out.append({"figure": f"manifest write + load, {m['disk_tib']:g} TiB, every segment distinct "
                              f"({units.human(m['bytes'])})", "target": "< 2 s each",
                    "ekko": f"{m['write_s']:.2f} / {m['load_s']:.2f}",
                    "ok": m["write_s"] < 2 and m["load_s"] < 2 and m["roundtrip_ok"]})
    return out


def targets_table(ts: List[Dict]) -> str:
    lines = ["| figure | target | ekko | reference | ratio | met |", "|---|---|---|---|---|---|"]
    for t in ts:
        ek = t.get("ekko")
        ek = f"{ek:.2f}" if isinstance(ek, float) else str(ek if ek is not None else "")
        ref = t.get("reference")
        ref = f"{ref:.2f} ({t['source']})" if isinstance(ref, (int, float)) else t.get("source", "")
        ratio = f"{t['ratio']:.2f}x" if t.get("ratio") is not None else ""
        met = "" if t.get("context") else {True: "yes", False: "NO", None: "n/a"}[t.get("ok")]
        lines.append(f"| {t['figure']} | {t['target']} | {ek} | {ref} | {ratio} | {met} |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--store-scale" in argv:          # another benchmark, with options of its own
        import store_scale
        return store_scale.main([x for x in argv if x != "--store-scale"])
    a = parse_args(argv)
    started = time.monotonic()
    report = {"machine": machine(), "args": {k: v for k, v in vars(a).items() if k != "ekko"}}
    rc = 0
    if a.keep and a.fs != "tmp":
        raise SystemExit("bench: --keep keeps a directory under /tmp: use it with --fs tmp (the ext4 is removed)")
    with contextlib.ExitStack() as stack:
        if a.keep:
            workdir = tempfile.mkdtemp(prefix="ekko-bench-", dir="/tmp")
        else:
            workdir = stack.enter_context(procs.work_directory("ekko-bench-", a.fs))
        os.chmod(workdir, 0o755)    # QEMU run by libvirt (libvirt-qemu) must reach the images
        log(f"work directory {workdir}" + (f" (a fresh {a.fs})" if a.fs != "tmp" else ""))
        os.environ["EKKO_BENCH_PYCACHE"] = os.path.join(workdir, "pycache")
        try:
            run_all(a, workdir, report)
        except KeyboardInterrupt:
            log("interrupted")
            rc = 130
        except Exception:   # noqa: BLE001 - still write what was measured
            traceback.print_exc()
            rc = 1
        if a.keep:
            log(f"kept {workdir}")
    report["encryption"] = encryption_result(report)
    report["targets"] = targets(report)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = time.monotonic() - started
    out = a.out or os.path.join(HERE, "out", "bench-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True, default=str)
    mc = report["machine"]
    print(f"\nW = {units.human(report.get('workload', {}).get('size', 0))} "
          f"({mc['cpus']} CPUs, {mc['cpu_model']}, {mc['os']}, {mc['date']}; medians of {a.repeat})\n")
    print(table(report))
    print()
    print(targets_table(report["targets"]))
    for s in report.get("sweep", []):
        print(f"sweep: segments {units.human(s['segment_size'])}: store after full {s['store_full_mib']:.0f} MiB, "
              f"after D1 {s['store_d1_mib']:.0f} MiB, {s['segment_objects_after_d1']} objects, manifests "
              f"{s['manifest_bytes']} bytes; full {s['full_s']:.2f} s, D1 {s['inc_d1_s']:.2f} s, "
              f"restore {s['restore_s']:.2f} s")
    if report.get("encryption"):
        print(f"encryption: {report['encryption']['note']}")
    print(f"\nJSON: {out}  ({report['seconds']:.0f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

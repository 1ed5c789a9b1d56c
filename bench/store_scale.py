#!/usr/bin/env python3
"""Store operations at scale (issue 21): verify, gc, list and prune on a store of millions of segments.

    .venv/bin/python bench/store_scale.py                       # local 1M and 4M, Swift 1M
    .venv/bin/python bench/store_scale.py --sizes 1M --swift-sizes none
    .venv/bin/python bench/store_scale.py --damage 100          # also: 100 deleted + 100 flipped found?
    make bench BENCH_ARGS="--store-scale --sizes 1M,4M"         # the same, through bench/run.py

The store is synthetic but in the real format, written with ekko's own encoder
(format/segment.py, format/manifest.py): N segment objects of a few dozen bytes each (8-byte
counters, so every one is distinct), of which 1/8 are garbage no manifest names, and three
manifests of 3/4 x 7/8 N entries each, overlapping (a chain: each shares most of its
neighbour's segments), so that together they name the other 7/8 N. Objects are written with
plain writes, without the local store's fsyncs (the bench measures reading the store, not
building it); their mtimes are left as written and gc runs with --grace-hours 0.

Each command is the real `ekko` CLI in a child process; its wall time and peak RSS (ru_maxrss
from wait4 of that child) are reported, with segments/s and the growth per million segments
between the two sizes. The results are checked, not only timed: verify must pass and check
7/8 N segments, gc must find exactly the 1/8 N garbage and delete it.

Swift: the harness's all-in-one Swift (tests/harness/swift.py). A million PUTs take this
2-core machine most of an hour, so the segment objects' listing rows are written straight into
the container database (SwiftServer.seed_listing: the rows, not the objects), and only the
manifests and the garbage (GARBAGE_REAL objects there, not 1/8: gc stats each candidate with a
HEAD, ~100/s on this machine) are uploaded for real. Existence verify reads nothing but the
listing, so its figure is what it would be with the objects there.

Nothing here is part of `make test`. Output: a table on stdout, JSON in bench/out/.
"""

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import yaml  # noqa: E402

from ekko_libvirt.format import manifest as mf  # noqa: E402
from ekko_libvirt.format import segment  # noqa: E402
from ekko_libvirt.store import catalog  # noqa: E402

MANIFESTS = 3
SEG = 64 << 10                  # the manifests' segment size (their disks are N * 3/4 x 64 KiB)
GARBAGE_REAL = 2000             # garbage objects uploaded for real on Swift (the rest are listing rows)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1000, "M": 1000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * mult)


# -- the synthetic store ------------------------------------------------------------------------
@dataclass
class Layout:
    segments: int               # objects in segments/
    referenced: int             # named by some manifest
    garbage: int                # named by none
    per_manifest: int           # table entries of each manifest


def layout(n: int, garbage: Optional[int] = None) -> Layout:
    """1/8 of the segments garbage unless told (Swift: GARBAGE_REAL, each costs gc a HEAD)."""
    garbage = n // 8 if garbage is None else garbage
    referenced = n - garbage
    return Layout(n, referenced, garbage, referenced * 3 // 4)


def raw_of(i: int) -> bytes:
    return i.to_bytes(8, "little") * 4


def digests(n: int):
    """(digest, object bytes) of segment i, for i in range(n): the project's own encoder."""
    for i in range(n):
        enc = segment.encode(raw_of(i))
        yield enc.digest, enc.blob


def manifest_ranges(lay: Layout) -> List[Tuple[int, int]]:
    """[start, end) of the referenced segments each manifest names: overlapping windows whose
    union is [0, referenced)."""
    step = (lay.referenced - lay.per_manifest) // max(1, MANIFESTS - 1)
    return [(k * step, k * step + lay.per_manifest) if k < MANIFESTS - 1 else
            (lay.referenced - lay.per_manifest, lay.referenced) for k in range(MANIFESTS)]


def build_manifests(lay: Layout, all_digests: bytearray) -> List[mf.Manifest]:
    out = []
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    for k, (start, end) in enumerate(manifest_ranges(lay)):
        n = end - start
        t = mf.SegmentTable(n, bytearray(b"\x01" * n), bytearray(all_digests[start * 16:end * 16]))
        bid = catalog.new_backup_id(base + datetime.timedelta(days=k))
        out.append(mf.Manifest(bid, "vm.vda", n * SEG, SEG, t, kind="full" if k == 0 else "incremental",
                               reason="bench/store_scale.py"))
    return out


def generate_local(root: str, lay: Layout) -> bytearray:
    """Segment files in the local store's layout (0700 directories, 0600 files) and the manifests
    through LocalStore; returns the packed digests in segment order (referenced first)."""
    from ekko_libvirt.store.local import LocalStore
    store = LocalStore(root)
    seg_dir = os.path.join(root, "segments")
    os.makedirs(seg_dir, mode=0o700, exist_ok=True)
    made = set()
    packed = bytearray()
    started = time.monotonic()
    for i, (d, blob) in enumerate(digests(lay.segments)):
        h = d.hex()
        sub = os.path.join(seg_dir, h[:3])
        if h[:3] not in made:
            os.makedirs(sub, mode=0o700, exist_ok=True)
            made.add(h[:3])
        fd = os.open(os.path.join(sub, h), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, blob)
        os.close(fd)
        packed += d
        if i and i % 500_000 == 0:
            log(f"  {i:,} segments written ({i / (time.monotonic() - started):,.0f}/s)")
    for m in build_manifests(lay, packed):
        catalog.commit(store, m)
    os.sync()
    return packed


def generate_swift(server, container: str, lay: Layout, missing: Set[int] = frozenset()) -> bytearray:
    """Listing rows for every segment (seed_listing) but the referenced ones in `missing` (the
    damage existence verify must find), the garbage's first GARBAGE_REAL objects uploaded for
    real, the manifests put through SwiftStore."""
    from ekko_libvirt.store.swift import SwiftConfig, SwiftStore
    user, key = server.credentials("test")
    store = SwiftStore(SwiftConfig(auth_url=server.auth_url, user=user, key=key, container=container))
    store.put("bench/created", b"")                        # the container, before its database is seeded
    packed = bytearray()
    names: List[str] = []
    real: List[Tuple[str, bytes]] = []
    for i, (d, blob) in enumerate(digests(lay.segments)):
        packed += d
        if i >= lay.referenced:                         # garbage: uploaded for real, gc deletes it
            real.append((segment.segment_key(d), blob))
        elif i not in missing:
            names.append(segment.segment_key(d))
        if len(names) == 200_000:
            server.seed_listing(container, names)
            names = []
            log(f"  {i + 1:,} listing rows seeded")
    if names:
        server.seed_listing(container, names)
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.put(*kv), real))
    for m in build_manifests(lay, packed):
        catalog.commit(store, m)
    store.delete("bench/created")
    store.close()
    return packed


# -- running ekko -------------------------------------------------------------------------------
@dataclass
class Run:
    command: str
    seconds: float
    rss_mib: float
    exit_code: int
    data: Optional[Dict]


def ekko(cfg_path: str, *args: str) -> Run:
    """One `ekko` CLI command in a child process, timed by GNU time: wall seconds and peak RSS
    (%M) of a process that starts clean (wait4's ru_maxrss of a child forked from this bench
    would include the bench's own pages, counted before the exec)."""
    cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", cfg_path, *args, "--json"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    with tempfile.NamedTemporaryFile("r") as timing:
        p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", timing.name, *cmd], capture_output=True,
                           text=True, env=env)
        seconds, rss_kib = timing.read().split()[-2:]
    try:
        data = json.loads(p.stdout) if p.stdout.strip() else None
    except ValueError:
        data = None
    if p.returncode not in (0, 3):
        raise RuntimeError(f"ekko {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return Run(" ".join(args), float(seconds), round(int(rss_kib) / 1024, 1), p.returncode, data)


def bare_listing(server, container: str) -> Run:
    """The same run's reference for Swift: swiftclient alone lists segments/ page after page on one
    connection, as fast as this Swift answers (no ekko code, nothing parsed or merged)."""
    from swiftclient import client as sc
    user, key = server.credentials("test")
    conn = sc.Connection(authurl=server.auth_url, user=user, key=key)
    started, marker, count = time.monotonic(), "", 0
    while True:
        _, page = conn.get_container(container, marker=marker or None, prefix="segments/")
        if not page:
            break
        count += len(page)
        marker = page[-1]["name"]
    conn.close()
    return Run("bare listing", round(time.monotonic() - started, 2), 0.0, 0, {"names": count})


def write_config(work: str, store_section: Dict) -> str:
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "ekko.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"store": store_section, "state_dir": os.path.join(work, "state"),
                        "run_dir": os.path.join(work, "run"), "workers": 2, "targets": {}}, f)
    return path


def measure(cfg: str, lay: Layout, missing: Set[str] = frozenset()) -> Dict[str, Run]:
    """list, existence verify, prune (dry run), gc (dry run), gc; each result checked (verify must
    name exactly the `missing` segment keys as damaged, with the backups that use them)."""
    runs: Dict[str, Run] = {}
    runs["list"] = ekko(cfg, "list")
    runs["verify"] = v = ekko(cfg, "verify")
    assert v.data and v.data["segments_checked"] == lay.referenced, v.data
    found = {d["key"] for d in v.data["damaged_segments"]}
    assert found == set(missing) and v.data["ok"] == (not missing), (len(found), len(missing))
    assert all(d.get("used_by") for d in v.data["damaged_segments"]), "a damaged segment without its backups"
    if missing:
        log(f"  verify named exactly the {len(missing)} segments missing from the listing, each with its backups")
    runs["prune"] = p = ekko(cfg, "prune", "--keep-last", str(MANIFESTS), "--dry-run")
    assert p.data and p.data["kept"] == MANIFESTS, p.data
    runs["gc_dry"] = g = ekko(cfg, "gc", "--dry-run", "--grace-hours", "0")
    assert g.data and g.data["stores"][0]["unreferenced"] == lay.garbage, g.data
    runs["gc"] = g = ekko(cfg, "gc", "--grace-hours", "0")
    s = g.data["stores"][0] if g.data else {}
    assert s.get("unreferenced") == lay.garbage and s.get("referenced") == lay.referenced, s
    for name, r in runs.items():
        log(f"  {name:8} {r.seconds:8.2f} s  {r.rss_mib:7.1f} MiB")
    return runs


def damage(cfg: str, root: str, packed: bytearray, lay: Layout, count: int) -> Dict:
    """Delete `count` referenced segments and flip a byte in `count` others; existence verify
    must name exactly the deleted ones, deep verify (on the same store) both sets."""
    rng = random.Random(21)
    picks = rng.sample(range(lay.referenced), 2 * count)
    gone = {segment.segment_key(bytes(packed[i * 16:i * 16 + 16])) for i in picks[:count]}
    flipped = {segment.segment_key(bytes(packed[i * 16:i * 16 + 16])) for i in picks[count:]}
    for key in gone:
        os.unlink(os.path.join(root, *key.split("/")))
    for key in flipped:
        path = os.path.join(root, *key.split("/"))
        with open(path, "r+b") as f:
            b = bytearray(f.read())
            b[-1] ^= 0x01
            f.seek(0)
            f.write(b)
    ex = ekko(cfg, "verify")
    found_ex = {d["key"] for d in ex.data["damaged_segments"]} if ex.data else set()
    deep = ekko(cfg, "verify", "--deep")
    found_deep = {d["key"] for d in deep.data["damaged_segments"]} if deep.data else set()
    result = {"existence_found_all_deleted": found_ex == gone, "deep_found_all": found_deep == gone | flipped,
              "existence_s": ex.seconds, "existence_rss_mib": ex.rss_mib, "deep_s": deep.seconds,
              "deep_rss_mib": deep.rss_mib}
    log(f"  damage {count}+{count}: {result}")
    assert result["existence_found_all_deleted"] and result["deep_found_all"], result
    return result


# -- report -------------------------------------------------------------------------------------
def table(results: Dict[str, Dict[int, Dict[str, Run]]]) -> str:
    lines = ["| store | segments | command | s | segments/s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for where, by_size in results.items():
        for n, runs in sorted(by_size.items()):
            for name, r in runs.items():
                rate = f"{n / r.seconds:,.0f}" if name in ("verify", "gc_dry", "gc") else ""
                lines.append(f"| {where} | {n / 1e6:g}M | {name} | {r.seconds:.2f} | {rate} | {r.rss_mib:.0f} |")
        sizes = sorted(by_size)
        if len(sizes) >= 2:
            lo, hi = sizes[0], sizes[-1]
            per = (hi - lo) / 1e6
            for name in by_size[lo]:
                a, b = by_size[lo][name], by_size[hi][name]
                lines.append(f"| {where} | growth per million | {name} | {(b.seconds - a.seconds) / per:+.2f} | "
                             f"| {(b.rss_mib - a.rss_mib) / per:+.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1M,4M", help="local store sizes in segments (default 1M,4M)")
    p.add_argument("--swift-sizes", default="1M", help="Swift sizes, or 'none' (default 1M)")
    p.add_argument("--damage", type=int, default=0,
                   help="also delete and flip this many segments (local, smallest size; Swift: the listing "
                        "rows of this many left out) and check verify finds them")
    p.add_argument("--dir", default="/tmp", help="where the stores are built (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--out", help="JSON output (default bench/out/store-scale-<time>.json)")
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="ekko-bench-scale-", dir=a.dir)
    results: Dict[str, Dict[int, Dict[str, Run]]] = {}
    extra: Dict = {}
    try:
        for n in [parse_size(s) for s in a.sizes.split(",") if s and s != "none"]:
            lay = layout(n)
            root = os.path.join(work, f"local-{n}", "store")
            log(f"local store, {n:,} segments: building")
            packed = generate_local(root, lay)
            cfg = write_config(os.path.dirname(root), {"type": "local", "path": root})
            log(f"local store, {n:,} segments: measuring")
            results.setdefault("local", {})[n] = measure(cfg, lay)
            if a.damage and n == min(parse_size(s) for s in a.sizes.split(",")):
                extra["damage_local"] = damage(cfg, root, packed, lay, a.damage)
            if not a.keep:
                shutil.rmtree(os.path.dirname(root), ignore_errors=True)
        swift_sizes = [parse_size(s) for s in a.swift_sizes.split(",") if s and s != "none"]
        if swift_sizes:
            from tests.harness.swift import SwiftServer
            with SwiftServer(os.path.join(work, "swift")) as server:
                for n in swift_sizes:
                    lay = layout(n, GARBAGE_REAL)
                    prefix = f"scale{n}"
                    log(f"swift, {n:,} segments: building")
                    gone = set(random.Random(n).sample(range(lay.referenced), a.damage)) if a.damage else set()
                    packed = generate_swift(server, prefix, lay, gone)
                    missing = {segment.segment_key(bytes(packed[i * 16:i * 16 + 16])) for i in gone}
                    user, key = server.credentials("test")
                    cfg = write_config(os.path.join(work, f"swift-{n}"),
                                       {"type": "swift", "auth_url": server.auth_url, "auth_version": "1",
                                        "user": user, "key": key, "container_prefix": prefix})
                    log(f"swift, {n:,} segments: measuring")
                    results.setdefault("swift", {})[n] = runs = measure(cfg, lay, missing)
                    bare = bare_listing(server, prefix)
                    extra.setdefault("swift_bare_listing", {})[n] = asdict(bare)
                    log(f"  bare listing of segments/ (swiftclient, one connection, no ekko): {bare.seconds:.2f} s; "
                        f"verify took {runs['verify'].seconds / bare.seconds:.2f}x that")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    out = a.out or os.path.join(HERE, "out", f"store-scale-{datetime.datetime.utcnow():%Y%m%dT%H%M%SZ}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"results": {w: {str(n): {k: asdict(r) for k, r in runs.items()} for n, runs in by.items()}
                               for w, by in results.items()}, **extra}, f, indent=2, default=str)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

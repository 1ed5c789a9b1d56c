#!/usr/bin/env python3
"""Upload throughput: ekko's SwiftStore vs the `swift upload` CLI, same data, same threads.

    .venv/bin/python bench/swift_upload.py                      # 2 GiB = 512 x 4 MiB, 8 threads
    .venv/bin/python bench/swift_upload.py --size-mib 64        # smoke run

What it does, in one run:
1. starts its own Swift all-in-one (tests/harness/swift.py) under a temp dir;
2. writes SIZE of segment-like objects (OBJECT-MiB each, bytes from random.Random(seed, i), one
   object in memory at a time) into a directory, recording each MD5 (not timed);
3. uploads that directory with ekko: a ThreadPoolExecutor of T threads, each reading one file and
   calling SwiftStore.put (MD5 computed, sent as ETag, checked) -- like the backup engine does;
4. uploads it with python-swiftclient's CLI: `swift upload --object-threads T` (its defaults:
   MD5 checked, one HEAD per object before the PUT; --cli-extra adds options);
5. checks both containers list every object with the right MD5, prints MiB/s and the ratio
   ekko / swift-cli, writes a JSON result.
Both sides read the files from the page cache; the data generation is not timed. --rounds N
alternates the order (cli first on even rounds) and reports the median. The machine is shared
by Swift and both clients (2 cores here: CPU-bound), so each run also records the client's own
CPU seconds per GiB and the load average before it: other load skews MiB/s, not CPU s/GiB.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekko_libvirt.store.swift import SwiftConfig, SwiftStore  # noqa: E402
from tests.harness.swift import SwiftServer  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_objects(directory: Path, count: int, size: int, seed: int) -> dict:
    """seg/NNNNNN files of deterministic random bytes; returns name -> md5."""
    (directory / "seg").mkdir(parents=True, exist_ok=True)
    md5s = {}
    for i in range(count):
        data = random.Random(seed * 1_000_003 + i).randbytes(size)
        name = f"seg/{i:06d}"
        (directory / name).write_bytes(data)
        md5s[name] = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return md5s


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def upload_ekko(store: SwiftStore, directory: Path, names: list, threads: int) -> float:
    def put(name: str) -> None:
        store.put(name, (directory / name).read_bytes())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for _ in ex.map(put, names):
            pass
    return time.perf_counter() - t0


def upload_cli(swift_bin: str, server: SwiftServer, container: str, directory: Path,
               threads: int, extra: list) -> float:
    env = dict(os.environ, **server.env("test"))  # credentials via env, not argv
    cmd = [swift_bin, "upload", "--object-threads", str(threads), *extra, container, "seg"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=directory, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"swift upload failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return elapsed


def check_container(store: SwiftStore, md5s: dict) -> None:
    _, listing = store._conn().get_container(store.container, full_listing=True)
    got = {o["name"]: o["hash"] for o in listing}
    if got != md5s:
        missing = sorted(set(md5s) - set(got))[:3]
        wrong = sorted(n for n in md5s if n in got and got[n] != md5s[n])[:3]
        raise SystemExit(f"container {store.container}: missing {missing} wrong md5 {wrong}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="total data (default 2048)")
    ap.add_argument("--object-mib", type=int, default=4, help="object size (default 4)")
    ap.add_argument("--threads", type=int, default=8, help="upload threads, both sides (default 8)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--rounds", type=int, default=1, help="upload rounds per side (median)")
    ap.add_argument("--cli-extra", default="", help="extra `swift upload` options, e.g. --leave-segments")
    ap.add_argument("--swift-bin", default=str(ROOT / ".venv" / "bin" / "swift"))
    ap.add_argument("--base-dir", help="work dir (default: a new temp dir, removed at the end)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ekko-bench-swift_upload.json"))
    args = ap.parse_args()

    count = max(1, args.size_mib // args.object_mib)
    size = args.object_mib * MiB
    base = Path(args.base_dir) if args.base_dir else Path(tempfile.mkdtemp(prefix="ekko-bench-swift-"))
    base.mkdir(parents=True, exist_ok=True)
    data_dir = base / "data"
    # SIGTERM (e.g. `timeout`) -> SystemExit, so the context manager stops Swift
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results = {"ekko": [], "swift_cli": []}
    try:
        log(f"generating {count} x {args.object_mib} MiB in {data_dir} (seed {args.seed})")
        t0 = time.perf_counter()
        md5s = make_objects(data_dir, count, size, args.seed)
        names = sorted(md5s)
        log(f"  {time.perf_counter() - t0:.1f} s")
        with SwiftServer(base / "swift") as server:
            log(f"swift up at {server.auth_url}")
            cfg = SwiftConfig(auth_url=server.auth_url, user=server.user, key=server.key,
                              container="unused", threads=args.threads)
            for rnd in range(args.rounds):
                order = ["swift_cli", "ekko"] if rnd % 2 == 0 else ["ekko", "swift_cli"]
                for side in order:
                    container = f"bench-{side.replace('_', '-')}-{rnd}"
                    store = SwiftStore(cfg.with_container(container))
                    # client CPU: ours (RUSAGE_SELF) or the reaped CLI's (RUSAGE_CHILDREN; the
                    # Swift servers are children too but are not reaped before the end)
                    who = resource.RUSAGE_SELF if side == "ekko" else resource.RUSAGE_CHILDREN
                    load0, cpu0 = os.getloadavg()[0], cpu_seconds(who)
                    if side == "ekko":
                        secs = upload_ekko(store, data_dir, names, args.threads)
                    else:
                        secs = upload_cli(args.swift_bin, server, container, data_dir,
                                          args.threads, shlex.split(args.cli_extra))
                    cpu = cpu_seconds(who) - cpu0
                    check_container(store, md5s)
                    store.close()
                    mib_s = count * args.object_mib / secs
                    results[side].append({
                        "seconds": round(secs, 3), "mib_per_s": round(mib_s, 1),
                        "client_cpu_s_per_gib": round(cpu / (count * args.object_mib / 1024), 2),
                        "loadavg_1m_before": round(load0, 2),
                    })
                    log(f"round {rnd}: {side:9s} {secs:7.2f} s  {mib_s:7.1f} MiB/s  "
                        f"client CPU {results[side][-1]['client_cpu_s_per_gib']:.2f} s/GiB  "
                        f"(load {load0:.1f})")
    finally:
        if not args.base_dir:
            shutil.rmtree(base, ignore_errors=True)

    ekko = statistics.median(r["mib_per_s"] for r in results["ekko"])
    cli = statistics.median(r["mib_per_s"] for r in results["swift_cli"])
    out = {
        "benchmark": "swift_upload",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "size_mib": count * args.object_mib,
        "object_mib": args.object_mib,
        "objects": count,
        "threads": args.threads,
        "seed": args.seed,
        "rounds": args.rounds,
        "cli_extra": args.cli_extra,
        "ekko_mib_per_s": ekko,
        "swift_cli_mib_per_s": cli,
        "ratio_ekko_over_cli": round(ekko / cli, 3),
        "ekko_client_cpu_s_per_gib": statistics.median(r["client_cpu_s_per_gib"] for r in results["ekko"]),
        "swift_cli_client_cpu_s_per_gib": statistics.median(
            r["client_cpu_s_per_gib"] for r in results["swift_cli"]),
        "runs": results,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "kernel": platform.release()},
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"ekko SwiftStore : {ekko:7.1f} MiB/s")
    print(f"swift upload CLI: {cli:7.1f} MiB/s")
    print(f"ratio ekko/cli  : {ekko / cli:.2f}   ({count} x {args.object_mib} MiB, {args.threads} threads)")
    print(f"result: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

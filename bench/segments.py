#!/usr/bin/env python3
"""Scaling of the per-segment work with threads (issue 15): what one backup worker does with a
segment it has read (backup/copy.py: zero test, name, encode = sample + zstd + verify-before-store;
with --encrypted also the seal of the store wrapper and its open-and-compare), done by 1 and by N
threads over the same segments, pure-Python path vs native (format/_segcore.c).

    .venv/bin/python bench/segments.py                      # 1 MiB segments, 1 and 2 threads
    .venv/bin/python bench/segments.py --threads 1,2,4 --segments 512 --encrypted

Prints MiB/s per kind of data (random, mixed, text) and the ratio N threads / 1 thread. Not part of
`make test`; the figures depend on the machine and on what else runs on it.
"""

import argparse
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xxhash  # noqa: E402

from ekko_libvirt.format import segment as S  # noqa: E402
from ekko_libvirt.format.codec import PLAIN  # noqa: E402
from ekko_libvirt.format.crypto import SealedCodec  # noqa: E402

MiB = 1 << 20


def make(kind: str, count: int, size: int, seed: int):
    """`count` distinct segments of one kind: random (incompressible), text (log lines, zstd -1
    about 9x, like W's text), mixed (per 64 KiB: random or text, half each)."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        if kind == "random":
            out.append(rnd.randbytes(size))
            continue
        text = b"".join(b"2026-12-05T04:%02d:%02d.%03d host ekko[%d]: segment %d of disk vda stored\n"
                        % (j % 60, (i + j) % 60, j % 1000, rnd.randrange(1 << 16), i * 1000 + j)
                        for j in range(size // 60 + 1))[:size]
        if kind == "text":
            out.append(text)
            continue
        seg = bytearray(text)
        for at in range(0, size, 64 << 10):
            if rnd.random() < 0.5:
                seg[at:at + (64 << 10)] = rnd.randbytes(len(seg[at:at + (64 << 10)]))
        out.append(bytes(seg))
    return out


def per_segment(path: str, codec):
    """What copy.py's worker does with one segment, on one path."""
    if path == "native":
        is_zero, name, encode = S._segcore.is_zero, S._segcore.xxh3_128, S._native_encode
    else:
        is_zero, name, encode = S._py_is_zero, xxhash.xxh3_128_digest, S._py_encode
    if codec is not PLAIN:
        name = codec.name

    def one(data: bytes) -> int:
        if is_zero(data):
            return 0
        d = name(data)
        enc = encode(data, 1, True, d, codec=codec)
        if codec is not PLAIN:          # store/sealed.py: seal, then open and compare before the put
            key = enc.key
            sealed = codec.seal(key, enc.blob)
            if codec.open(key, sealed) != enc.blob:
                raise AssertionError("sealed object does not open to its plaintext")
            return len(sealed)
        return len(enc.blob)
    return one


def run(segments, threads: int, one) -> float:
    """Seconds for `threads` threads to process every segment once (each takes the next one)."""
    it = iter(range(len(segments)))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            one(segments[i])

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--segments", type=int, default=256, help="segments per kind (default 256)")
    p.add_argument("--size", type=int, default=MiB, help="segment size in bytes (default 1 MiB)")
    p.add_argument("--threads", default="1,2", help="thread counts, the first is the base (default 1,2)")
    p.add_argument("--kinds", default="random,mixed,text")
    p.add_argument("--paths", default="python,native")
    p.add_argument("--encrypted", action="store_true", help="seal every object too (crypto.SealedCodec)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept (default 3)")
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    codec = SealedCodec(os.urandom(32)) if a.encrypted else PLAIN
    print(f"per-segment work, {a.size // 1024} KiB segments x {a.segments}, {os.cpu_count()} CPUs, "
          f"{'encrypted' if a.encrypted else 'plain'}; zstd {S._segcore.ZSTD_VERSION if S.BUILT else '?'}; "
          f"best of {a.repeat}")
    print(f"| path | data | " + " | ".join(f"{t} thr MiB/s" for t in threads)
          + " | " + " | ".join(f"{t}/{threads[0]}" for t in threads[1:]) + " |")
    print("|---" * (2 + 2 * len(threads) - 1) + "|")
    for kind in a.kinds.split(","):
        segs = make(kind, a.segments, a.size, seed=15)
        mib = len(segs) * a.size / MiB
        for path in a.paths.split(","):
            if path == "native" and not S.BUILT:
                print(f"| native | {kind} | not built |")
                continue
            one = per_segment(path, codec)
            one(segs[0])                                   # warm up: contexts, caches
            rates = [mib / min(run(segs, t, one) for _ in range(a.repeat)) for t in threads]
            print(f"| {path} | {kind} | " + " | ".join(f"{r:.0f}" for r in rates) + " | "
                  + " | ".join(f"{r / rates[0]:.2f}x" for r in rates[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()

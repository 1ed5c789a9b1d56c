"""Workload W and delta D1 of issue 6, built deterministically (fixed seeds).

W, a qcow2 with 64 KiB clusters, for a virtual size S (8 GiB in the issue), in eighths:

    [0, S/8)       random bytes                         (incompressible, unique)
    [S/8, 2S/8)    log-like text; zstd -1 shrinks it ~9x (unique records, 128 bytes each)
    [2S/8, 3S/8)   one random 4 MiB block, repeated     (deduplicates, does not compress)
    [3S/8, S)      never written                        (sparse: NBD reports it as zero)

D1: 1% of S as 1 MiB writes of random bytes at distinct 1 MiB-aligned offsets (82 for 8 GiB).

The data is written through qemu-nbd with libnbd (much faster than guest writes); D1 is not
written here but handed to whoever writes it into the running disk.
"""

import os
import random
import subprocess
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import nbd

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4 * MiB
SEED_RANDOM, SEED_TEXT, SEED_REPEAT, SEED_D1, SEED_TEMPLATES = 6001, 6002, 6003, 6004, 6005

RECORD = 128                       # bytes per log record
_DIGITS = bytes(0x30 + b % 10 for b in range(256))
_PREFIX = b"2024-05-01T"


@dataclass(frozen=True)
class Layout:
    size: int

    @property
    def region(self) -> int:
        return self.size // 8

    def regions(self) -> List[Tuple[str, int, int]]:
        r = self.region
        return [("random", 0, r), ("text", r, r), ("repeated", 2 * r, r), ("never written", 3 * r, self.size - 3 * r)]


def check_size(size: int) -> None:
    if size % (8 * BLOCK) or size <= 0:
        raise ValueError(f"disk size must be a positive multiple of {8 * BLOCK // MiB} MiB, not {size}")


def _templates(width: int) -> List[bytes]:
    """256 message bodies (host, service, words), padded to `width`."""
    rnd = random.Random(SEED_TEMPLATES)
    hosts = [f"cmp-{rnd.randrange(1000):03d}" for _ in range(16)]
    services = ["nova-compute", "libvirtd", "sshd", "kernel", "systemd", "ovs-vswitchd", "neutron-agent", "cron"]
    words = ("instance spawned volume attached request completed GET POST /v2.1/servers /healthz user admin "
             "port sync heartbeat lease renewed image cached status ACTIVE ERROR resize confirm").split()
    out = []
    for _ in range(256):
        s = f"{rnd.choice(hosts)} {rnd.choice(services)}: " + " ".join(
            rnd.choice(words) for _ in range(rnd.randrange(3, 9)))
        out.append(s[:width].ljust(width).encode())
    return out


class TextSource:
    """Fixed-width log records built column by column (bytes.translate + strided slice
    assignment), ~100x faster than formatting lines one by one. Per record: a timestamp with
    3 random digits, one of 256 message bodies, 2 random digits."""

    TS_DIGITS, TAIL_DIGITS = 3, 2

    def __init__(self, seed: int = SEED_TEXT):
        self.rnd = random.Random(seed)
        self.body = RECORD - len(_PREFIX) - self.TS_DIGITS - 2 - 1 - self.TAIL_DIGITS - 1
        tpl = _templates(self.body)
        self.columns = [bytes(t[c] for t in tpl) for c in range(self.body)]

    def chunk(self, n: int) -> bytes:
        if n % RECORD:
            raise ValueError(f"text chunks are whole records of {RECORD} bytes")
        recs = n // RECORD
        buf = bytearray(b" " * n)
        pos = 0
        for c in _PREFIX:
            buf[pos::RECORD] = bytes([c]) * recs
            pos += 1
        digits = self.rnd.randbytes(recs * (self.TS_DIGITS + self.TAIL_DIGITS)).translate(_DIGITS)
        k = 0
        for _ in range(self.TS_DIGITS):
            buf[pos::RECORD] = digits[k * recs:(k + 1) * recs]
            k, pos = k + 1, pos + 1
        buf[pos::RECORD] = b"Z" * recs
        pos += 2
        idx = self.rnd.randbytes(recs)
        for col in self.columns:
            buf[pos::RECORD] = idx.translate(col)
            pos += 1
        pos += 1
        for _ in range(self.TAIL_DIGITS):
            buf[pos::RECORD] = digits[k * recs:(k + 1) * recs]
            k, pos = k + 1, pos + 1
        buf[pos::RECORD] = b"\n" * recs
        return bytes(buf)


def chunks(layout: Layout) -> Iterator[Tuple[int, bytes]]:
    """(offset, data) of everything W holds, in 4 MiB blocks, in disk order."""
    r = layout.region
    rnd = random.Random(SEED_RANDOM)
    for off in range(0, r, BLOCK):
        yield off, rnd.randbytes(BLOCK)
    text = TextSource()
    for off in range(r, 2 * r, BLOCK):
        yield off, text.chunk(BLOCK)
    block = random.Random(SEED_REPEAT).randbytes(BLOCK)
    for off in range(2 * r, 3 * r, BLOCK):
        yield off, block


def d1_writes(size: int) -> List[Tuple[int, bytes]]:
    """(offset, 1 MiB of random bytes) x round(1% of the disk in MiB), distinct aligned offsets."""
    rnd = random.Random(SEED_D1)
    count = max(1, round(size / MiB * 0.01))
    offsets = sorted(rnd.sample(range(size // MiB), count))
    return [(o * MiB, rnd.randbytes(MiB)) for o in offsets]


def build_image(path: str, layout: Layout, sock_dir: str) -> None:
    """Create the qcow2 and write W into it through our own qemu-nbd."""
    check_size(layout.size)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path,
                    str(layout.size)], check=True)
    with qemu_nbd(path, os.path.join(sock_dir, "build.nbd"), writable=True) as uri:
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            for off, data in chunks(layout):
                h.pwrite(data, off)
            h.flush()
        finally:
            h.shutdown()


class qemu_nbd:
    """`with qemu_nbd(image, sock) as uri`: our own qemu-nbd on a unix socket, stopped by PID."""

    def __init__(self, image: str, sock: str, writable: bool = False, fmt: str = "qcow2", bitmap: str = ""):
        self.image, self.sock, self.writable, self.fmt, self.bitmap = image, sock, writable, fmt, bitmap
        self.proc = None

    def __enter__(self) -> str:
        from procs import wait_for_socket
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        cmd = ["qemu-nbd", "-f", self.fmt, "-k", self.sock, "-t", "-e", "8", "--cache=writeback"]
        if not self.writable:
            cmd.append("-r")
        if self.bitmap:
            cmd += ["-B", self.bitmap]
        self.proc = subprocess.Popen(cmd + [self.image], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_socket(self.sock, self.proc)
        return f"nbd+unix:///?socket={self.sock}"

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

"""The machine's floor under what ekko must do, measured in the same run as ekko (issue 6: "against
the peers and the physical limit"). nbdcopy and `qemu-img convert` are the issue's references;
these say how close to them any tool can get here that does what the format requires.

full:    a full backup reads W's data from QEMU's export and, for every segment, computes its
         xxh3-128; for every distinct one it tries, compresses and verifies it before storing
         (segment.encode). Reading is measured as `nbdcopy URI null:` (its CPU and QEMU's); the
         work per byte as CPU seconds of ekko's own functions on W's data in memory (no threads,
         no I/O). On N cores nothing that does both ends before their CPU seconds / N, nor before
         the read alone ends.
restore: a restore reads the distinct segment objects of its manifest from the store's disk and
         writes the image to disk, durable. Measured with no computation at all: one thread
         reads those objects (O_DIRECT, as ekko does), another writes as many bytes as ekko's
         restored image holds (O_DIRECT, 4 MiB writes), then fsync.
"""

import mmap
import os
import subprocess
import threading
import time
from typing import Dict

import peers

from ekko_libvirt.store import catalog
from ekko_libvirt.format import segment
from ekko_libvirt.directio import read_direct
from ekko_libvirt.store.local import LocalStore

WRITE_BLOCK = 4 << 20


def full_floor(workdir: str, image: str, segment_size: int) -> Dict:
    read = _read_to_null(workdir, image)
    compute = _compute_seconds(workdir, image, segment_size)
    cores = os.cpu_count() or 1
    cpu = read["read_tool_cpu_s"] + read["read_qemu_cpu_s"] + compute
    return dict(read, tool=f"floor: read W (nbdcopy -> null:) + ekko's per-byte work, {cores} cores",
                compute_cpu_s=compute, cores=cores, full_s=max(read["read_s"], cpu / cores),
                cpu_full_tool_s=read["read_tool_cpu_s"] + compute, cpu_full_qemu_s=read["read_qemu_cpu_s"])


def _read_to_null(workdir: str, image: str) -> Dict:
    r = peers.run_nbdcopy(workdir, image, to_null=True)
    return {"read_s": r["full_s"], "read_tool_cpu_s": r["cpu_full_tool_s"], "read_qemu_cpu_s": r["cpu_full_qemu_s"]}


def _compute_seconds(workdir: str, image: str, segment_size: int) -> float:
    """CPU seconds of ekko's per-segment work on the image's data: the name of every data
    segment, the encoding (sample, zstd, verify) of each distinct one, as a full does it."""
    raw = os.path.join(workdir, "floor.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, raw], check=True)
    seen = set()
    spent = 0.0
    try:
        with open(raw, "rb", buffering=0) as f:
            for data in _data_segments(f, segment_size):
                t = time.thread_time()
                d = segment.digest(data)
                if d not in seen:
                    seen.add(d)
                    segment.encode(data, 1, True, d)
                spent += time.thread_time() - t
    finally:
        os.unlink(raw)
    return spent


def _data_segments(f, seg: int):
    """The segments of a sparse raw file that hold data (holes skipped as a full's plan does)."""
    size = os.fstat(f.fileno()).st_size
    pos = 0
    while pos < size:
        try:
            pos = os.lseek(f.fileno(), pos, os.SEEK_DATA) // seg * seg
        except OSError:     # ENXIO: no data after pos
            return
        f.seek(pos)
        data = f.read(min(seg, size - pos))
        if not segment.is_zero(data):
            yield data
        pos += seg


def restore_floor(store_dir: str, target: str, backup_id: str, image_bytes: int, workdir: str) -> Dict:
    store = LocalStore(store_dir)
    m = catalog.load(store, catalog.manifest_key(target, backup_id))
    paths = [store._path(segment.segment_key(d)) for d in m.table.unique_digests()]
    out = os.path.join(workdir, "floor-restore.img")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    buf = mmap.mmap(-1, WRITE_BLOCK)
    buf.write(os.urandom(WRITE_BLOCK))
    read_bytes = [0]

    def read_all():
        for p in paths:
            read_bytes[0] += len(read_direct(p, os.stat(p).st_size))

    try:
        os.sync()
        t0 = time.monotonic()
        reader = threading.Thread(target=read_all)
        reader.start()
        written = 0
        while written < image_bytes:
            written += os.pwrite(fd, buf, written)
        os.fsync(fd)
        reader.join()
        wall = time.monotonic() - t0
    finally:
        os.close(fd)
        os.unlink(out)
        buf.close()
    return {"tool": "floor: read the backup's objects + write the image, O_DIRECT, no computation",
            "restore_s": wall, "full_s": None, "read_bytes": read_bytes[0], "written_bytes": written}

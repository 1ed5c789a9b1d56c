"""Restore one backup (one manifest) to a raw file, a qcow2 image or a block device.

A qcow2 is written by ekko itself (qcow2.py): laid out from the manifest in advance, each data
segment written straight to its place by any thread, the metadata at the end. A segment size
that is not a whole number of 64 KiB clusters (only a hand-made manifest has one) goes through
a private qemu-nbd instead.

Every segment is fetched, decoded and re-hashed before a byte of it is written. The output is as
sparse as the disk: zero segments are never written, and inside a data segment only the 4 KiB
blocks that hold data are (`data_runs`); a qcow2 maps only the clusters written. That is right
because every file target is new (created and truncated here): what is not written reads as
zeros. A device holds old content: there the zero blocks are unmapped or written (blockdev.py,
_DeviceWriter). A segment that repeats (the same digest at several
offsets) is fetched and verified once while it stays among the last few decoded. Output goes to
'<path>.ekko-partial' and is renamed into place only when complete; a failed restore leaves
nothing behind. With allow_damaged, a segment that is missing or does not match its digest
becomes a hole (zeros) and is reported. A block device is written in place (blockdev.py).
"""

import collections
import concurrent.futures as cf
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import nbd

from ..store.base import Store
from . import blockdev, qcow2
from .. import heap
from ..format import segment
from ..directio import pwrite_all, pwrite_direct
from ..errors import EkkoError, IntegrityError, RestoreTargetError, StoreError, UsageError
from ..faults import pause_point
from ..format.manifest import Manifest
from ..nbd.reader import close_handle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hole:
    index: int
    offset: int
    length: int
    key: str
    problem: str


@dataclass
class RestoreResult:
    path: str
    format: str
    written_bytes: int = 0
    segments: int = 0
    holes: List[Hole] = field(default_factory=list)


def output_format(path: str, fmt: Optional[str]) -> str:
    if fmt:
        if fmt not in ("raw", "qcow2"):
            raise UsageError(f"--format must be raw or qcow2, not {fmt!r}")
        return fmt
    return "qcow2" if path.endswith(".qcow2") else "raw"


def restore(store: Store, m: Manifest, path: str, fmt: Optional[str] = None, workers: int = 4,
            allow_damaged: bool = False, overwrite: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> RestoreResult:
    fmt = output_format(path, fmt)
    heap.keep_buffers_on_heap()     # segment-sized buffers: no mmap + page faults each time
    kind = _target_kind(path)
    if kind == "device":
        return _restore_to_device(store, m, path, fmt, workers, allow_damaged, overwrite, progress)
    if kind == "file" and not overwrite:
        raise UsageError(f"{path} exists: refusing to overwrite it (choose another path or remove it)")
    _check_directory(path)
    partial = path + ".ekko-partial"
    result = RestoreResult(path, fmt)
    try:
        with _open_target(partial, fmt, m, workers) as writer_factory:
            _copy(store, m, writer_factory, workers, allow_damaged, result, progress)
        if result.holes and not allow_damaged:
            raise _damage_error(m, result.holes)
        os.replace(partial, path)
    except BaseException as e:
        outcome = _remove_partial(partial)
        # The store's own errors are StoreErrors: these come from the image being written.
        if isinstance(e, (OSError, nbd.Error)):
            raise RestoreTargetError(path, e, outcome) from e
        raise
    return result


def _remove_partial(partial: str) -> str:
    """Remove what a failed restore left; -> what happened, for the error message. Never raises:
    the restore's own error is the one to report (unlink on a read-only file system fails even
    where there is nothing to remove)."""
    if not os.path.lexists(partial):
        return "nothing restored: no image was created"
    try:
        os.unlink(partial)
    except FileNotFoundError:
        return "nothing restored: no image was created"
    except OSError as e:
        outcome = f"nothing restored; the partial image {partial} could not be removed: {e.strerror}"
        log.warning("%s", outcome)
        return outcome
    return "nothing restored: the partial image was removed"


def _check_directory(path: str) -> None:
    """The directory a new image goes into exists (a mistyped --to is a bad argument, exit 2)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(directory).st_mode
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"{directory}: no such directory, so nothing was restored to {path} "
                         "(create the directory first, or choose another --to)") from e
    except OSError as e:
        raise RestoreTargetError(path, e, "nothing restored: no image was created") from e
    if not stat.S_ISDIR(mode):
        raise UsageError(f"{directory} is not a directory, so nothing was restored to {path} "
                         "(choose another --to)")


def _target_kind(path: str) -> str:
    """"new", "file" or "device" (one stat). A file is restored to '<path>.ekko-partial' and renamed
    over PATH at the end, a block device written in place; nothing else is restored to."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):      # (the directory is checked next)
        return "new"
    except OSError as e:
        raise RestoreTargetError(path, e) from e
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "device"
    kind = ("a character device" if stat.S_ISCHR(mode) else "a directory" if stat.S_ISDIR(mode)
            else "not a regular file")
    raise UsageError(f"{path} is {kind}: ekko restores to image files (raw or qcow2) and block devices only")


def _damage_error(m: Manifest, holes: List[Hole], outcome: str = "nothing restored") -> IntegrityError:
    lines = [f"  segment {h.index} at offset {h.offset} ({h.key}): {h.problem}" for h in holes[:20]]
    more = f"\n  ... and {len(holes) - 20} more" if len(holes) > 20 else ""
    return IntegrityError(f"backup {m.backup_id}: {len(holes)} damaged or missing segment(s); {outcome}:\n"
                          + "\n".join(lines) + more + "\n(--allow-damaged restores the rest and reports the holes)")


# -- onto a block device ------------------------------------------------------------------------
DEVICE_PARTIAL = "the device holds a partial restore: its earlier content is partly overwritten"


def _restore_to_device(store: Store, m: Manifest, path: str, fmt: str, workers: int, allow_damaged: bool,
                       overwrite: bool, progress) -> RestoreResult:
    """In place (a device cannot be renamed into place): the checks of blockdev.open_for_restore
    come first, then the zero runs are zeroed, then the data segments written, each verified
    before it is; holes (--allow-damaged) are zeroed too. A restore that fails half-way leaves
    the device partly overwritten, and says so: `ekko verify --deep BACKUP` first proves every
    segment is there and intact."""
    if fmt != "raw":
        raise UsageError(f"{path} is a block device: it gets the disk as raw data, not {fmt} (--format raw)")
    if not overwrite:
        raise UsageError(f"{path} is a block device: --force replaces everything on it with the backup")
    result = RestoreResult(path, "raw")
    try:
        dev = blockdev.open_for_restore(path, m.virtual_size)
    except OSError as e:
        raise RestoreTargetError(path, e, "nothing was written") from e
    try:
        for first, count in m.table.zero_runs():
            offset = first * m.segment_size
            dev.zero(offset, min(count * m.segment_size, m.virtual_size - offset))
        _copy(store, m, lambda: _DeviceWriter(dev), workers, allow_damaged, result, progress)
        if allow_damaged:
            for h in result.holes:
                dev.zero(h.offset, h.length)
        dev.sync()
    except OSError as e:
        raise RestoreTargetError(path, e, DEVICE_PARTIAL) from e
    except BaseException:       # interrupted, or the store failed: the error says why, this what
        log.warning("%s: %s", path, DEVICE_PARTIAL)
        raise
    finally:
        dev.close()
    if result.holes and not allow_damaged:
        raise _damage_error(m, result.holes, DEVICE_PARTIAL)
    return result


def _copy(store: Store, m: Manifest, writer_factory, workers, allow_damaged, result: RestoreResult, progress) -> None:
    entries = list(m.table.data_entries()) if m.table.count <= (1 << 22) else m.table.data_entries()
    total = m.table.data_count() * m.segment_size
    lock = threading.Lock()
    local = threading.local()
    stop = threading.Event()
    recent = RecentSegments(workers * 4)

    def one(item):
        rank, (index, d) = item     # rank: the how-manieth data segment (where qcow2 puts it)
        if stop.is_set():
            return
        offset = index * m.segment_size
        length = min(m.segment_size, m.virtual_size - offset)
        key = segment.segment_key(d)
        try:
            raw = recent.get(d)
            if raw is None:
                raw = recent.put(d, segment.decode(store.get(key), d, codec=store.codec))
            if len(raw) != length:
                raise IntegrityError(f"segment {key}: {len(raw)} bytes where the disk needs {length}")
        except (IntegrityError, StoreError) as e:
            with lock:
                result.holes.append(Hole(index, offset, length, key, str(e)))
            if not allow_damaged:
                stop.set()
            return
        w = getattr(local, "w", None)
        if w is None:
            w = local.w = writer_factory()
        pause_point("restore-write")        # tests: a restore caught in the middle
        w.write(raw, offset, rank)
        with lock:
            result.written_bytes += len(raw)
            result.segments += 1
            if progress:
                progress(result.segments * m.segment_size, total)

    with cf.ThreadPoolExecutor(workers, thread_name_prefix="ekko-restore") as pool:
        for f in _bounded_map(pool, one, enumerate(entries), workers * 2):
            f.result()
    result.holes.sort(key=lambda h: h.index)


class RecentSegments:
    """The last `capacity` decoded (verified) segments by digest, shared by the restore threads:
    a disk image repeats blocks (the benchmark's W: 1 GiB of four distinct segments), and each
    repeat costs a fetch, a decompression and a hash otherwise. Memory: capacity segments."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.items: "collections.OrderedDict[bytes, bytes]" = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, d: bytes) -> Optional[bytes]:
        with self.lock:
            raw = self.items.get(d)
            if raw is not None:
                self.items.move_to_end(d)
            return raw

    def put(self, d: bytes, raw: bytes) -> bytes:
        with self.lock:
            self.items[d] = raw
            self.items.move_to_end(d)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return raw


def _bounded_map(pool, fn, items, depth):
    pending = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            done, rest = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            pending = list(rest)
            yield from done
    yield from pending


# -- zero blocks inside data segments -------------------------------------------------------------
GRAIN = 4096                # a file system's block: the unit that is a hole or not
DEVICE_MIN_UNMAP = 64 << 10  # on a device, shorter zero runs inside a segment are written (see _DeviceWriter)
_ZEROS = bytes(GRAIN)


def data_runs(raw: bytes, grain: int = GRAIN) -> List[Tuple[int, int]]:
    """The [start, end) runs of `raw` (bytes or bytearray) that hold data, in blocks of `grain`
    bytes from its start (the last block may be shorter); everything between is zeros. Pure.

    Each block is compared in place with startswith (a memcmp, no copy): a block of data fails at
    its first bytes, so a segment of random data costs one cache line per block. Measured
    (1 GiB, segments not in the CPU cache): 37 ms of CPU for random data, 46 ms for zeros with a
    little data; a `find` of the first zero block first cost 130 ms (it reads every byte)."""
    zeros = _ZEROS if grain == GRAIN else bytes(grain)
    n = len(raw)
    full = n - n % grain            # the whole blocks; [full, n) is the short last one
    runs: List[Tuple[int, int]] = []
    start = -1                      # of the run being built
    for o in range(0, full, grain):
        if raw.startswith(zeros, o, o + grain):
            if start >= 0:
                runs.append((start, o))
                start = -1
        elif start < 0:
            start = o
    if full < n and raw.count(0, full) != n - full:      # the short last block holds data
        runs.append((full if start < 0 else start, n))
    elif start >= 0:
        runs.append((start, full))
    return runs


class _FileWriter:
    """A new raw file, already of the disk's length: only the data runs are written, the rest
    stays a hole."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: bytes, offset: int, rank: int) -> None:
        view = memoryview(data)
        for s, e in data_runs(data):
            pwrite_all(self.fd, view[s:e], offset + s)


class _DeviceWriter:
    """A device holds old content, so every byte of a data segment is written or zeroed: zero
    runs of DEVICE_MIN_UNMAP or more are unmapped while the device promises zeros after an unmap
    (a thin LV stays thin; shorter ones would free nothing of a thin pool's 64 KiB+ chunks and
    cost a call each), the rest is written with the data. A device that cannot unmap gets the
    whole segment in one write."""

    def __init__(self, dev: "blockdev.Device"):
        self.dev = dev

    def write(self, data: bytes, offset: int, rank: int) -> None:
        if not self.dev.punch:
            self.dev.write(data, offset)
            return
        view = memoryview(data)
        for kind, s, e in device_plan(data_runs(data), len(data), DEVICE_MIN_UNMAP):
            if kind == "zero":
                self.dev.zero(offset + s, e - s)
            else:
                self.dev.write(view[s:e], offset + s)


def device_plan(runs: List[Tuple[int, int]], length: int, min_zero: int) -> List[Tuple[str, int, int]]:
    """("write" | "zero", start, end) covering [0, length) exactly once, in order: the zero gaps
    between `runs` (data_runs of a segment of `length` bytes) of at least `min_zero` bytes are
    "zero", everything else (data and shorter gaps) "write". Pure."""
    plan: List[Tuple[str, int, int]] = []
    pos = 0
    for s, e in runs + [(length, length)]:
        if s - pos >= min_zero:
            plan.append(("zero", pos, s))
        elif plan and plan[-1][0] == "write":
            s = plan.pop()[1]               # the short gap goes with the data before it
        elif pos < s:
            s = pos                         # a short gap at the start goes with the data after it
        if s < e:
            plan.append(("write", s, e))
        pos = e
    return plan


class _NBDWriter:
    """A new qcow2 through qemu-nbd: unwritten blocks read as zeros, a cluster never written
    stays unallocated."""

    def __init__(self, sock: str, registry: list):
        self.h = nbd.NBD()
        self.h.connect_unix(sock)
        registry.append(self.h)

    def write(self, data: bytes, offset: int, rank: int) -> None:
        for s, e in data_runs(data):
            self.h.pwrite(data[s:e], offset + s)


class _Qcow2Writer:
    """Data segments straight to their place in a qcow2 laid out in advance (qcow2.py), around
    the page cache where the file system allows it: only the data runs, and only the clusters
    they touch are mapped at the end (`allocation`)."""

    def __init__(self, fd: int, layout: qcow2.Layout, direct: bool, allocation: qcow2.Allocation):
        self.fd, self.layout, self.direct, self.allocation = fd, layout, direct, allocation

    def write(self, data: bytes, offset: int, rank: int) -> None:
        host = self.layout.host_offset(rank)
        view = memoryview(data)
        runs = data_runs(data)
        for s, e in runs:       # s is a multiple of GRAIN: aligned for O_DIRECT
            (pwrite_direct if self.direct else pwrite_all)(self.fd, view[s:e], host + s)
        self.allocation.mark(rank, runs)


@contextlib.contextmanager
def _open_target(path: str, fmt: str, m: Manifest, workers: int):
    size = m.virtual_size
    if fmt == "qcow2" and qcow2.can_write(m.segment_size):
        with _qcow2_target(path, m) as factory:
            yield factory
        return
    if fmt == "raw":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            yield lambda: _FileWriter(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    with _qemu_nbd_qcow2(path, size, workers) as sock:
        handles: list = []
        try:
            yield lambda: _NBDWriter(sock, handles)
            for h in handles[:1]:
                h.flush()
        finally:
            for h in handles:
                close_handle(h)


@contextlib.contextmanager
def _qcow2_target(path: str, m: Manifest):
    layout = qcow2.plan(m.virtual_size, m.segment_size, (i for i, _ in m.table.data_entries()))
    allocation = qcow2.Allocation(layout)
    fd, direct = _open_new(path)
    try:
        yield lambda: _Qcow2Writer(fd, layout, direct, allocation)
        if direct:      # the metadata is small and not block-aligned
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        qcow2.finish(fd, layout, (i for i, _ in m.table.data_entries()), allocation)
    finally:
        os.close(fd)


def _open_new(path: str):
    """(fd, direct): the new file, opened O_DIRECT where the file system has it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o600), False


# QEMU's NBD server mallocs a bounce buffer per request; at >= 1 MiB glibc serves each from a
# fresh mmap, and every page of it faults (262,144 minor faults per GiB). Our own qemu-nbd can
# be told to keep such buffers on the heap: measured 0.85 -> 0.51 CPU s per GiB written.
QEMU_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=1073741824"


@contextlib.contextmanager
def _qemu_nbd_qcow2(path: str, size: int, workers: int):
    """A fresh qcow2 served writable by our own qemu-nbd on a private socket."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, str(size)],
                   check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="ekko-restore-") as d:
        sock = os.path.join(d, "nbd.sock")
        proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, "-e", str(workers + 1), "-t",
                                 f"--cache={_cache_mode(path)}", "--discard=unmap", path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=dict(os.environ, GLIBC_TUNABLES=QEMU_MALLOC_TUNABLES))
        try:
            _wait_socket(sock, proc)
            yield sock
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode not in (0, -15):
            raise EkkoError(f"qemu-nbd exited with {proc.returncode}: {_stderr(proc)}")


def _cache_mode(path: str) -> str:
    """O_DIRECT where the file system has it: writing a restore through the page cache cost
    qemu-nbd 4-7 s of system time for 3 GiB here, direct writes 1 s, and the final flush has
    nothing left to do (bench/). tmpfs and some FUSE file systems refuse O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return "writeback"
    os.close(fd)
    return "none" if hasattr(os, "O_DIRECT") else "writeback"


def _stderr(proc: "subprocess.Popen[bytes]") -> str:
    """What qemu-nbd wrote to its stderr (started with stderr=PIPE)."""
    assert proc.stderr is not None
    return proc.stderr.read().decode(errors="replace")


def _wait_socket(path: str, proc: "subprocess.Popen[bytes]", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EkkoError(f"qemu-nbd failed: {_stderr(proc).strip()}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.02)
    raise EkkoError(f"qemu-nbd did not listen on {path} within {timeout:.0f} s")

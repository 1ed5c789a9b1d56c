"""Writing and reading files around the page cache (O_DIRECT), writing whole buffers, and
making a file or a directory entry durable.

Used by the local store for segment objects, by the restore for its output, and for key files. O_DIRECT wants
the buffer, the file offset and the length aligned to the device's block: data goes through one
page-aligned CHUNK-sized bounce buffer per thread (an anonymous mmap), the last block padded.

Two implementations of the same files: _directio.c (the GIL released for the copy and the
system calls: profiled, the Python path held the GIL for a third of a full backup's Python time
copying objects into the bounce buffer) when it is built and EKKO_NATIVE is not "0", and the
functions named _py_* below, the reference (tests/unit/test_directio_native.py). The native
write_new_file writes a direct file's tail (< ALIGN) through the page cache instead of padding
it and cutting the file back: the same bytes, no ftruncate.
"""

import errno
import mmap
import os
import threading

ALIGN = 4096
CHUNK = 2 << 20             # bytes per O_DIRECT call through the bounce buffer (any object size: in pieces)
_PAD = bytes(ALIGN)


class _AlignedBuffer(threading.local):
    def __init__(self):
        self.buf = None

    def get(self) -> mmap.mmap:
        if self.buf is None:
            self.buf = mmap.mmap(-1, CHUNK)
        return self.buf


_aligned = _AlignedBuffer()


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _py_write_new_file(path: str, data, direct: bool = False, sync: bool = True) -> None:
    """Create `path` (0600, never over an existing file: FileExistsError) holding `data`, with
    O_DIRECT if `direct` (the file is cut back to the data's length after the padded last
    block), fsynced if `sync`. On any failure the file is removed: nothing half-written stays."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if direct:
            _py_pwrite_direct(fd, data, 0)
            n = memoryview(data).nbytes
            if n % ALIGN:
                os.ftruncate(fd, n)
        else:
            pwrite_all(fd, data, 0)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def fsync_path(path: str) -> None:
    """fsync a file or a directory by name (a new directory entry is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _py_pwrite_direct(fd: int, data, offset: int) -> None:
    """Write `data` at `offset` (a multiple of ALIGN) of an O_DIRECT file: CHUNK at a time through
    the aligned buffer, the last chunk padded to ALIGN with zeros (the caller cuts the file back
    if the padding must not stay)."""
    buf = _aligned.get()
    view = memoryview(data).cast("B")
    for off in range(0, len(view), CHUNK):
        part = view[off:off + CHUNK]
        n = len(part)
        buf[:n] = part
        padded = -(-n // ALIGN) * ALIGN
        buf[n:padded] = _PAD[:padded - n]
        with memoryview(buf) as whole:
            pwrite_all(fd, whole[:padded], offset + off)


def _py_read_direct(path: str, size: int) -> bytes:
    """The `size` bytes of the file at `path`, read with O_DIRECT, CHUNK at a time."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = _aligned.get()
        parts = []
        pos = 0
        with memoryview(buf) as view:
            while pos < size:
                # the last read asks for whole aligned blocks and gets the file's tail
                want = min(CHUNK, -(-(size - pos) // ALIGN) * ALIGN)
                n = min(os.preadv(fd, [view[:want]], pos), size - pos)
                if n <= 0:
                    raise OSError(errno.EIO, f"{path}: short read ({pos} of {size} bytes)")
                parts.append(bytes(view[:n]))
                pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


try:
    from . import _directio
    BUILT = True
except ImportError:          # not built (a checkout without `make`): the Python path
    BUILT = False

if BUILT and os.environ.get("EKKO_NATIVE", "1") != "0":
    def write_new_file(path: str, data, direct: bool = False, sync: bool = True) -> None:
        """Create `path` (0600, never over an existing file: FileExistsError) holding `data`, with
        O_DIRECT if `direct`, fsynced if `sync`. On any failure the file is removed."""
        _directio.write_new(path, data, direct, sync)

    def pwrite_direct(fd: int, data, offset: int) -> None:
        """Write `data` at `offset` (a multiple of ALIGN) of an O_DIRECT file, the last block padded
        with zeros (the caller cuts the file back if the padding must not stay)."""
        _directio.pwrite_direct(fd, data, offset)

    def read_direct(path: str, size: int) -> bytes:
        """The `size` bytes of the file at `path`, read with O_DIRECT."""
        return _directio.read_direct(path, size)
else:
    write_new_file, pwrite_direct, read_direct = _py_write_new_file, _py_pwrite_direct, _py_read_direct

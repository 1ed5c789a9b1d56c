"""A block device as a restore target (an LVM volume, a mapped RBD image, a loop device).

A restore into a file writes '<path>.ekko-partial' and renames it; a device can only be
written in place, so everything that can refuse is checked before the first byte:
    - opened O_EXCL: the kernel refuses (EBUSY) a device that is mounted, or held by
      device-mapper, md or another exclusive opener
    - a write lock over all of it (an open file description lock, as QEMU takes them): refused
      when QEMU has it open (an LV a running or paused domain uses: two writers would corrupt
      it), and, held until the restore ends, it makes a QEMU that tries to open it meanwhile
      fail instead of starting a domain on a half-restored disk
    - at least as large as the backed-up disk (a larger device keeps its tail)
Zero segments are zeroed on the device: what the device held before must not show through where
the disk held zeros. First with fallocate(PUNCH_HOLE), which the kernel turns into a write-zeroes
that may unmap (a thin LV or a sparse loop file stays thin; the kernel guarantees zeros read
back, and refuses when the device cannot promise that), else with BLKZEROOUT (write-zeroes
without unmapping, or zeros written by the kernel). Inside a data segment, zero runs of 64 KiB
or more are zeroed the same way while the device unmaps, the rest is written with the data
(restore._DeviceWriter): a thin LV stays as thin as the disk was.
"""

import ctypes
import errno
import fcntl
import os
import struct
from ..directio import ALIGN, pwrite_all, pwrite_direct
from ..errors import UsageError

BLKZEROOUT = 0x127F                 # _IO(0x12, 127): zero a byte range, 512-aligned
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
ZERO_STEP = 1 << 30                 # one ioctl per GiB: an interrupt is seen between them
# struct flock on Linux x86_64/arm64: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid
_FLOCK = struct.Struct("hh4xqqi4x")
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


class Device:
    """An open block device: direct writes of whole blocks, buffered for a short tail."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1
        self.buffered_fd = -1
        self.punch = True           # until the device refuses fallocate(PUNCH_HOLE)

    def open(self) -> "Device":
        self.fd = os.open(self.path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT)
        # whole device, until close: F_OFD_SETLK, F_WRLCK, from 0 to the end
        fcntl.fcntl(self.fd, F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        # a disk whose size is not a multiple of the block ends in a short write, which O_DIRECT
        # refuses: it goes through the same device opened without it
        self.buffered_fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        return self

    def write(self, data, offset: int) -> None:
        if offset % ALIGN == 0 and len(data) % ALIGN == 0:
            pwrite_direct(self.fd, data, offset)
        else:
            pwrite_all(self.buffered_fd, data, offset)

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(ZERO_STEP, end - offset)
            if not (self.punch and self._punch(offset, n)):
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, n))
            offset += n

    def _punch(self, offset: int, n: int) -> bool:
        """Zero by unmapping where the device promises zeros after it; False where it cannot."""
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           ctypes.c_int64(offset), ctypes.c_int64(n)) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
            self.punch = False          # this device: BLKZEROOUT from now on
            return False
        raise OSError(err, os.strerror(err))

    def sync(self) -> None:
        os.fsync(self.buffered_fd)
        os.fsync(self.fd)

    def close(self) -> None:
        for fd in (self.buffered_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.buffered_fd = -1


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def open_for_restore(path: str, needed: int) -> Device:
    """The device at `path`, checked, opened and locked for a restore of a `needed`-byte disk.
    Refusals are UsageError (exit 2, nothing written); other OSErrors are left to the caller."""
    if needed % 512:
        raise UsageError(f"{path}: the backed-up disk is {needed} bytes, not a whole number of 512-byte "
                         "sectors: restore it to a file")
    dev = Device(path)
    try:
        dev.open()
    except OSError as e:
        dev.close()
        if e.errno == errno.EBUSY:          # from O_EXCL
            raise UsageError(f"{path} is in use (mounted, or held by device-mapper or another exclusive "
                             "user): nothing was written") from e
        if e.errno in (errno.EAGAIN, errno.EACCES):     # from the lock
            raise UsageError(f"{path} is in use: another process holds a lock on it (QEMU locks the disks of "
                             "a running or paused domain); stop whatever uses it, then restore. Nothing was "
                             "written") from e
        raise
    size = os.lseek(dev.fd, 0, os.SEEK_END)
    if size < needed:
        dev.close()
        raise UsageError(f"{path} is {size} bytes, the backed-up disk {needed}: the device is too small")
    return dev

"""Keep segment-sized allocations on the heap instead of fresh mmaps (glibc malloc tuning).

Every segment passes through a few buffers of about its size that Python and zstd allocate and
free again (the compressed payload, the object, the decompressed copy that verifies it). glibc
serves an allocation of 128 KiB or more (its threshold moves, up to 32 MiB) from a fresh
mmap() and returns it with munmap(); every page of such a buffer then faults on first touch. A
full backup of the 8 GiB benchmark disk took 300,000 minor faults, ~1 s of system time
(bench/). With the threshold above the largest segment, freed buffers are reused instead.

This is the same setting as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...; it is applied
through mallopt(3) because by the time Python code runs, the environment has been read. Freed
memory is kept for reuse rather than returned (the trim threshold), so the resident size stays
at the data path's peak, which its buffer pool bounds. No effect (and no error) off glibc.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20      # above the largest segment (32 MiB) plus its header
TRIM_THRESHOLD = 256 << 20

_done = False


def keep_buffers_on_heap() -> bool:
    """Apply once per process; True if glibc accepted it."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))
    except (OSError, AttributeError) as e:
        log.debug("mallopt is not available: %s", e)
        return False
    _done = ok
    return ok

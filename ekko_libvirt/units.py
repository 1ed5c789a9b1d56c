"""Sizes and the defaults that depend on them."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_SUFFIXES = {"": 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": TiB, "tib": TiB}


def parse_size(text: "str | int") -> int:
    """'4MiB', '64k', '1G' or a plain integer -> bytes. Raises ValueError with the bad text."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    suffix = s[len(num):]
    if not num or suffix not in _SUFFIXES:
        raise ValueError(f"not a size: {text!r} (use e.g. 4MiB, 64KiB, 1GiB)")
    try:
        return int(num) * _SUFFIXES[suffix]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4MiB, 64KiB, 1GiB)") from None


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# 1 MiB: the smallest store after scattered writes and the fastest full in bench/ (README "Benchmark",
# docs/format.md "Trade-offs of the segment size").
DEFAULT_SEGMENT_SIZE = 1 * MiB


def default_workers() -> int:
    """Segment workers when the config does not say: one per core this process may run on
    (taskset and cgroup cpusets count), at least 4 (a worker also waits for its store writes),
    at most 64. The per-segment work runs without the GIL (format/_segcore.c), so more cores are
    more throughput."""
    import os
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(4, min(64, cores))


DEFAULT_WORKERS = default_workers()
DEFAULT_REQUEST_SIZE = 512 * KiB      # >= 1 MiB makes QEMU's NBD server page-fault on every read
DEFAULT_IN_FLIGHT = 4
DEFAULT_GRANULARITY = 64 * KiB
DEFAULT_STATE_DIR = "/var/lib/ekko"
DEFAULT_BITMAP_PREFIX = "ekko-"     # generations are <prefix><backup id>
DEFAULT_COMPRESSION_LEVEL = 1       # zstd
DEFAULT_READ_BACK = 8             # segments re-read from the export before a commit (backup.copy._read_back)
READ_BACK_ALL = -1
DEFAULT_SCRATCH_RESERVE = 1 * GiB  # free room copy-before-write keeps (backup/scratch.py)
MIN_SEGMENT_SIZE = 64 * KiB
MAX_SEGMENT_SIZE = 32 * MiB   # QEMU's NBD server refuses requests above 32 MiB
# `serve: {cache: ...}` / `ekko serve --cache`: decoded segments a server keeps in memory (serve/disk.py)
DEFAULT_SERVE_CACHE = 64 * MiB
MIN_SERVE_CACHE = 1 * MiB
MAX_SERVE_CACHE = 64 * GiB

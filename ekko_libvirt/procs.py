"""Processes by PID and start time: a PID alone may name another process by the time we look
(the kernel reuses them), so every record of "who holds this" keeps the start time too."""

from typing import List, Optional


def _proc_stat(pid: int) -> Optional[List[bytes]]:
    """The fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read(4096).rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def process_start_ticks(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except ValueError:
        return None


def process_running(pid: int, start_ticks: int) -> bool:
    """`pid` is the process that started at `start_ticks` and has not ended (a zombie has)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != b"Z" and fields[19] == str(start_ticks).encode()


def process_alive(pid: int, start_ticks: Optional[int]) -> bool:
    ticks = process_start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)

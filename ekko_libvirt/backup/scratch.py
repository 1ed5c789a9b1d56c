"""Room for copy-before-write: a backup must never make the guest's writes fail.

While a backup reads its point-in-time view, QEMU's copy-before-write filter saves the old
content of every block the guest overwrites into a scratch file (the fleece file of the QMP
engine, libvirt's scratch qcow2). On QEMU 7.2 the backup job's filter cannot be told what to do
when that save fails (`on-cbw-error` exists only on a hand-built filter, which cannot be put
under a running device there): it fails the guest's write. Measured with a scratch file system
of 8 MiB and 24 MiB of guest overwrites during a backup: the guest's write failed with "No
space left on device" (a virtio-blk guest pauses on that error, its default werror=enospc), and
the backup itself succeeded.

So the backup gives way first. It does not start with less than `scratch_reserve` free on the
scratch file system, and while the view is open (segments read, then the commit-time check,
which on Swift is a HEAD per segment of a full) it watches the free space: below half the
reserve it removes the filter (the export is closed, the backup job ended; the guest's writes
go straight to its disk again) and fails with ScratchSpaceLow. Nothing of it is committed, its
bitmap generation is merged back: the next backup, with room, has every block. The reserve is
the guest write burst the watch (every WATCH_INTERVAL) must absorb; 0 turns the guard off.
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

from .. import units
from ..errors import ScratchSpaceLow

WATCH_INTERVAL = 0.2        # seconds between two looks at the free space while a backup reads


def verdict(free: int, reserve: int, running: bool) -> Optional[str]:
    """Why the backup must not start (running=False) or must give way (running=True) with
    `free` bytes left on the scratch file system; None when there is room. Pure."""
    if reserve <= 0:
        return None
    if not running and free < reserve:
        return f"{units.human(free)} free, the backup needs scratch_reserve = {units.human(reserve)} to start"
    if running and free < reserve // 2:
        return (f"{units.human(free)} free, below half of scratch_reserve = {units.human(reserve)}, while the "
                "guest was writing: the backup gave way so that no guest write fails")
    return None


@dataclass(frozen=True)
class ScratchGuard:
    path: str               # the scratch directory (created if missing)
    reserve: int

    def free(self) -> int:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def check_start(self) -> None:
        self._raise_if(verdict(self.free(), self.reserve, running=False))

    def watcher(self, give_way: Callable[[], None]) -> Callable[[], None]:
        """A check to call every WATCH_INTERVAL while the backup reads: when space runs low it
        calls `give_way` (removes the copy-before-write filter) and raises ScratchSpaceLow."""
        def watch() -> None:
            reason = verdict(self.free(), self.reserve, running=True)
            if reason:
                give_way()
                self._raise_if(reason)
        return watch

    def _raise_if(self, reason: Optional[str]) -> None:
        if reason:
            raise ScratchSpaceLow(self.path, reason)


def guard_for(scratch_dir: Optional[str], reserve: int) -> Optional[ScratchGuard]:
    return ScratchGuard(scratch_dir, reserve) if scratch_dir and reserve > 0 else None

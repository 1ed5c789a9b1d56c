"""The backup's reaper: a killed ekko must not leave copy-before-write running.

While a backup of a QMP target runs, QEMU holds an NBD export, a snapshot node and a backup job
whose copy-before-write filter saves every block the guest overwrites into the fleece file. The
run undoes them on any failure it lives through, SIGTERM included. SIGKILL (the OOM killer, a
`kill -9`) it does not live through, and the next run's recovery may be a day away: meanwhile
the fleece file grows with every guest overwrite, unwatched (backup/scratch.py), until its file system
is full and QEMU fails the guest's writes.

So a backup starts a reaper: a small process in its own session, reading a pipe from the
backup. The backup says "done" when its session is settled (committed or undone); when the pipe
closes without it, the backup died, and the reaper ends the view:
    qmp      what the journal names: export, snapshot node, job (the filter goes with it), NBD
             server, fleece file (QMPEngine.release_view)
    libvirt  the domain's pull-backup job (abortJob: libvirt removes export and scratch files)
    thaw     the guest frozen for the transaction (engine/freeze.py): guest-fsfreeze-thaw through
             the same agent, retried until the guest says thawed (or 10 min). The backup also hands
             a thaw that failed or timed out to it (abandon(): the pipe closes without "done")
    process  a helper the backup started, by PID and start time: an offline backup's
             qemu-storage-daemon, which holds the shut-off domain's images and their write locks
             (a domain whose images it holds cannot start). SIGTERM: it closes the images
             cleanly, persistent bitmaps included; SIGKILL if it has not ended within 60 s.
             Then the files it leaves behind are removed (the fleece files)
It leaves the bitmap generations, checkpoints, journal and job record alone: which generation to
keep needs the store, and the next run's recovery decides it as before.
"""

import json
import subprocess
import sys
from typing import Optional

DONE = b"done\n"


class Reaper:
    """The backup's side: start() before anything is changed in QEMU, done() once it is settled."""

    def __init__(self, what: dict, log_path: str):
        self.fields = what              # {"kind": "qmp", "target": {...}} or {"kind": "libvirt", ...}
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "Reaper":
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.engine.reaper_main", self.log_path],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            assert self.proc.stdin is not None      # stdin=PIPE
            self.proc.stdin.write(json.dumps(self.fields).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:        # no reaper is no reason to fail a backup: the next run recovers
            _log_warning(f"cannot start the backup's reaper ({e}); a killed run is undone by the next one")
            self.proc = None
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def done(self) -> None:
        if self.proc is None:
            return
        try:
            assert self.proc.stdin is not None      # stdin=PIPE (start)
            self.proc.stdin.write(DONE)
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.proc = None


    def abandon(self) -> None:
        """Leave the work to the reaper now, as a death would: close the pipe without "done"."""
        if self.proc is None:
            return
        try:
            assert self.proc.stdin is not None      # stdin=PIPE (start)
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc = None


def _log_warning(msg: str) -> None:
    import logging
    logging.getLogger(__name__).warning(msg)

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
    process  a helper the backup started, by PID and start time: an offline backup's
             qemu-storage-daemon, which holds the shut-off domain's images and their write locks
             (a domain whose images it holds cannot start). SIGTERM: it closes the images
             cleanly, persistent bitmaps included; SIGKILL if it has not ended within 60 s.
             Then the files it leaves behind are removed (the fleece files)
It leaves the bitmap generations, checkpoints, journal and job record alone: which generation to
keep needs the store, and the next run's recovery decides it as before.
"""

import json
import os
import signal
import subprocess
import sys
import time

DONE = b"done\n"


class Reaper:
    """The backup's side: start() before anything is changed in QEMU, done() once it is settled."""

    def __init__(self, what: dict, log_path: str):
        self.fields = what              # {"kind": "qmp", "target": {...}} or {"kind": "libvirt", ...}
        self.log_path = log_path
        self.proc = None

    def start(self) -> "Reaper":
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.engine.reaper", self.log_path],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            self.proc.stdin.write(json.dumps(self.fields).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:        # no reaper is no reason to fail a backup: the next run recovers
            _log_warning(f"cannot start the backup's reaper ({e}); a killed run is undone by the next one")
            self.proc = None
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def done(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(DONE)
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.proc = None


def _log_warning(msg: str) -> None:
    import logging
    logging.getLogger(__name__).warning(msg)


def main(argv) -> int:
    log_path = argv[1]
    fields = json.loads(sys.stdin.buffer.readline())     # what to end, should the backup die
    rest = sys.stdin.buffer.read()          # until the backup closes the pipe, or dies
    if rest == DONE:
        return 0
    with open(log_path, "a") as log:
        log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} backup of {fields['name']} ended without settling its "
                  "session: ending its point-in-time view\n")
        try:
            _ENDS[fields["kind"]](fields)
            log.write("  done; generations and checkpoints are left to the next run's recovery\n")
        except Exception as e:  # noqa: BLE001 - nothing else to tell it to; the next run recovers
            log.write(f"  failed: {e}; the next run recovers\n")
            return 1
    return 0


def _tear_down(fields: dict) -> None:
    from ..errors import QMPUnavailable
    from .qmp import QMPEngine, QMPTarget
    targets = [QMPTarget(**t) for t in fields["targets"]]
    deadline = time.monotonic() + 60
    while True:     # QEMU's monitor takes one client: the dead run's connection may still be closing
        try:
            engine = QMPEngine(targets, reaper=False)
            break
        except QMPUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        engine.release_view()
    finally:
        engine.close()


def _end_libvirt_job(fields: dict) -> None:
    import libvirt
    conn = libvirt.open(fields["uri"])
    try:
        dom = conn.lookupByUUIDString(fields["uuid"])
        deadline = time.monotonic() + 60
        while _libvirt_job_active(dom):
            try:
                dom.abortJob()
            except libvirt.libvirtError:
                pass                # ended meanwhile, or busy: looked at again below
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backup job of {fields['name']} is still active 60 s after abortJob")
            time.sleep(0.1)
    finally:
        conn.close()


def _stop_process(fields: dict) -> None:
    from ..agent.state import process_running
    pid, start = fields["pid"], fields["pid_start"]
    if process_running(pid, start):     # else ended already (its PID may be another's by now)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while process_running(pid, start):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)     # the kernel closes its files
                break
            time.sleep(0.05)
    for path in fields.get("remove", ()):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _libvirt_job_active(dom) -> bool:
    import libvirt
    try:
        dom.backupGetXMLDesc(0)
        return True
    except libvirt.libvirtError:
        return False


_ENDS = {"qmp": _tear_down, "libvirt": _end_libvirt_job, "process": _stop_process}

if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The reaper process (engine/reaper.py starts it as `python -m ekko_libvirt.engine.reaper_main LOG`):
it reads what to end from its stdin, then waits; when the pipe closes without "done", the backup
died, and it ends the view (what each kind means: engine/reaper.py)."""

import json
import os
import signal
import sys
import time

from ..procs import process_running
from .reaper import DONE


def main(argv) -> int:
    log_path = argv[1]
    fields = json.loads(sys.stdin.buffer.readline())     # what to end, should the backup die
    rest = sys.stdin.buffer.read()          # until the backup closes the pipe, or dies
    if rest == DONE:
        return 0
    with open(log_path, "a") as log:
        what = "thawing its guest" if fields["kind"] == "thaw" else "ending its point-in-time view"
        log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} backup of {fields['name']} ended without settling its "
                  f"session: {what}\n")
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

    from .libvirt import job_active
    conn = libvirt.open(fields["uri"])
    try:
        dom = conn.lookupByUUIDString(fields["uuid"])
        deadline = time.monotonic() + 60
        while job_active(dom):
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


def _thaw(fields: dict) -> None:
    """Thaw the guest a backup froze: retried (a dead run's connection to the agent socket may
    still be closing, a hung agent may come back) until the guest says thawed, for up to 10
    minutes: a guest left frozen stops its applications, a reaper that waits costs nothing."""
    from ..errors import GuestAgentError
    from .guest_agent import agent_from_fields
    deadline = time.monotonic() + 600
    while True:
        try:
            agent = agent_from_fields(fields["agent"])
            try:
                agent.thaw()
                if agent.is_frozen() is not True:
                    return
            finally:
                agent.close()
        except GuestAgentError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


_ENDS = {"qmp": _tear_down, "libvirt": _end_libvirt_job, "process": _stop_process, "thaw": _thaw}

if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The reaper's "process" kind (an offline backup's qemu-storage-daemon): stopped when the backup
dies, left alone when the backup settles, and never a process that merely reuses the PID."""

import os
import subprocess
import time

from ekko_libvirt.procs import process_running, process_start_ticks
from ekko_libvirt.engine.reaper import Reaper


def _helper():
    """A stand-in for the daemon: exits 0 on SIGTERM (a clean shutdown), as qemu-storage-daemon does."""
    p = subprocess.Popen(["bash", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"],
                         start_new_session=True)
    deadline = time.monotonic() + 5
    while process_start_ticks(p.pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return p


def _reaper(tmp_path, p, start=None):
    leftover = tmp_path / "helper.fleece"
    leftover.write_bytes(b"x")
    return Reaper({"kind": "process", "name": "helper", "pid": p.pid,
                   "pid_start": process_start_ticks(p.pid) if start is None else start,
                   "remove": [str(leftover)]}, str(tmp_path / "reaper.log")).start()


def _stop(p):
    if p.poll() is None:
        p.kill()
    p.wait()


def test_the_helper_is_terminated_when_the_backup_dies(tmp_path):
    p = _helper()
    try:
        r = _reaper(tmp_path, p)
        r.proc.stdin.close()            # the backup's end of the pipe closes without "done": it died
        assert p.wait(timeout=10) == 0  # SIGTERM: the clean shutdown, not SIGKILL
        r.proc.wait(timeout=10)
        assert not (tmp_path / "helper.fleece").exists()
        log = (tmp_path / "reaper.log").read_text()
        assert "ended without settling" in log and "done" in log
    finally:
        _stop(p)


def test_a_settled_backup_leaves_the_helper_alone(tmp_path):
    p = _helper()
    try:
        r = _reaper(tmp_path, p)
        proc = r.proc
        r.done()
        # The reaper has exited. Had it taken the "died" path, it would have logged, signalled the
        # helper and waited for it to end before exiting: so the helper runs now or never will be hit.
        assert proc.wait(timeout=10) == 0
        assert p.poll() is None
        assert not (tmp_path / "reaper.log").exists() and (tmp_path / "helper.fleece").exists()
    finally:
        _stop(p)


def test_a_reused_pid_is_not_signalled(tmp_path):
    p = _helper()
    try:
        r = _reaper(tmp_path, p, start=process_start_ticks(p.pid) - 1)   # "another process" had the PID
        proc = r.proc
        proc.stdin.close()
        proc.wait(timeout=10)
        assert p.poll() is None
    finally:
        _stop(p)


def test_a_zombie_counts_as_ended():
    p = subprocess.Popen(["true"])
    start = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        start = start or process_start_ticks(p.pid)
        with open(f"/proc/{p.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        time.sleep(0.01)
    try:
        assert start is not None and process_start_ticks(p.pid) == start   # still listed...
        assert not process_running(p.pid, start)                            # ...but ended
    finally:
        p.wait()
    assert not process_running(p.pid, start) and not os.path.exists(f"/proc/{p.pid}")

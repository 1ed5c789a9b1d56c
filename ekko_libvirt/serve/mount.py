"""`ekko mount BACKUP DIR`: the backup's raw disk as the read-only file DIR/disk.raw, through
nbdfuse (libnbd-bin, FUSE) reading from `ekko serve`'s nbdkit (server.py). No kernel NBD, no
filesystem of the guest parsed by the host: what is mounted is one file, the disk image.

    mount_foreground(...)  start the server, then nbdfuse on DIR; record the mount in
                           run_dir/mounts/; on_ready(); then wait until DIR is unmounted
                           (`ekko umount DIR`, fusermount3 -u) or a signal, and undo it all
    umount(cfg, DIR)       fusermount3 -u DIR, then wait for the ekko that held it to finish

The mount is gone cleanly when ekko is stopped: SIGTERM / Ctrl-C unmount it the same way, and
nbdfuse runs under `setpriv --pdeathsig TERM`, so it unmounts and exits even when the ekko that
started it is killed outright (its nbdkit dies then too: server.py's lifeline).
"""

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .. import procs
from ..errors import EkkoError, UsageError
from . import server

FILE_NAME = "disk.raw"
READY_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 30.0


class MountError(EkkoError):
    """nbdfuse could not mount, or the mount could not be undone."""


@dataclass
class MountRecord:
    dir: str
    pid: int                 # the ekko process that holds the mount
    start_ticks: Optional[int]
    nbdkit_pid: int
    nbdkit_ticks: Optional[int]
    nbdfuse_pid: int
    backup_id: str
    target: str
    uri: str

    @property
    def file(self) -> str:
        return os.path.join(self.dir, FILE_NAME)


def record_path(cfg, directory: str) -> str:
    h = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return os.path.join(cfg.run_dir, "mounts", f"{h}.json")


def read_record(cfg, directory: str) -> Optional[MountRecord]:
    try:
        with open(record_path(cfg, directory)) as f:
            return MountRecord(**json.load(f))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def is_mounted(directory: str) -> bool:
    target = os.path.realpath(directory)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def check_dir(directory: str) -> str:
    d = os.path.realpath(directory)
    if not os.path.isdir(d):
        raise UsageError(f"{directory}: no such directory to mount on (create it first)")
    if is_mounted(d):
        raise UsageError(f"{directory} is a mount point already (ekko umount {directory}, if it is ekko's)")
    if os.listdir(d):
        raise UsageError(f"{directory} is not empty: mount on an empty directory")
    return d


def mount_foreground(cfg, namespace: Optional[str], key: str, directory: str,
                     on_ready: Callable[[MountRecord], None], verbose: int = 0) -> str:
    """Serve, mount, on_ready(record), wait; -> why it ended. Everything undone on the way out."""
    d = check_dir(directory)
    for tool in ("nbdfuse", "fusermount3"):
        if shutil.which(tool) is None:
            raise MountError(f"{tool} is not installed: ekko mount needs nbdfuse (Debian: libnbd-bin) "
                             "and fusermount3 (Debian: fuse3)")
    rec_path = record_path(cfg, d)
    with server.serving(cfg, namespace, key, verbose=verbose) as srv:
        assert srv.socket is not None           # serving() on a unix socket by default
        pidfile = os.path.join(cfg.run_dir, f"nbdfuse-{os.getpid()}.pid")
        _unlink(pidfile)
        setpriv = shutil.which("setpriv")
        cmd = ["nbdfuse", "-r", "-P", pidfile, os.path.join(d, FILE_NAME), "--unix", srv.socket]
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        fuse = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_mounted(fuse, pidfile, d)
            rec = MountRecord(d, os.getpid(), procs.process_start_ticks(os.getpid()), srv.pid, srv.start_ticks,
                              fuse.pid, srv.manifest.backup_id, srv.manifest.target, srv.uri)
            os.makedirs(os.path.dirname(rec_path), mode=0o700, exist_ok=True)
            with open(rec_path, "w") as f:
                json.dump(rec.__dict__, f)
            on_ready(rec)
            fuse.wait()
            return "unmounted"
        finally:
            if fuse.poll() is None:
                _fusermount_u(d, lazy=False, check=False)
                try:
                    fuse.wait(UMOUNT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _fusermount_u(d, lazy=True, check=False)
                    fuse.kill()
                    fuse.wait()
            _unlink(pidfile)
            _unlink(rec_path)


def _wait_mounted(fuse: subprocess.Popen, pidfile: str, d: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not (os.path.exists(pidfile) and is_mounted(d)):
        if fuse.poll() is not None:
            err = fuse.stderr.read().decode("utf-8", "replace").strip() if fuse.stderr else ""
            raise MountError(f"nbdfuse exited with status {fuse.returncode} before mounting {d}: {err}")
        if time.monotonic() > deadline:
            raise MountError(f"nbdfuse did not mount {d} within {READY_TIMEOUT:.0f} s")
        time.sleep(0.01)


def _fusermount_u(d: str, lazy: bool, check: bool = True) -> None:
    p = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), d], capture_output=True, text=True)
    if check and p.returncode != 0:
        msg = " ".join(p.stderr.split()) or f"fusermount3 exited with status {p.returncode}"
        if "busy" in msg:
            raise MountError(f"{d} is busy: a process still uses {os.path.join(d, FILE_NAME)} "
                             f"(close it, then ekko umount again): {msg}")
        raise MountError(f"cannot unmount {d}: {msg}")


def umount(cfg, directory: str) -> MountRecord:
    """Unmount an ekko mount, then wait for the ekko that held it to stop its server and exit
    (stopping that server by PID itself when that ekko is gone)."""
    d = os.path.realpath(directory)
    rec = read_record(cfg, d)
    if rec is None:
        raise UsageError(f"{directory} is not mounted by ekko (no record of it under {cfg.run_dir}/mounts)")
    if is_mounted(d):
        _fusermount_u(d, lazy=False)
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while rec.start_ticks is not None and procs.process_running(rec.pid, rec.start_ticks):
        if time.monotonic() > deadline:
            raise MountError(f"{d} is unmounted, but ekko (pid {rec.pid}) that held it did not exit "
                             f"within {UMOUNT_TIMEOUT:.0f} s")
        time.sleep(0.02)
    server.stop_pid(rec.nbdkit_pid, rec.nbdkit_ticks)      # a no-op unless its ekko was killed
    _unlink(record_path(cfg, d))
    return rec


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

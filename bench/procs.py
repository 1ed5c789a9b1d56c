"""Processes the bench starts and measures: a timed command with its rusage, and a QEMU VM.

Every process here is started by the bench and stopped by its PID; nothing is looked up by name.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ekko_libvirt.engine.qmp_client import QMPConnection  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
NODE = "disk0"
DEVICE = "vblk0"
QOM_BACKEND = f"/machine/peripheral/{DEVICE}/virtio-backend"


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until a unix socket accepts a connection (the real readiness signal), or RuntimeError."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {err.strip()}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not listen on {path} within {timeout:.0f} s")
        time.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_idle(pid: int, idle: float = 0.05, timeout: float = 15.0) -> None:
    """Wait until a fresh VM's firmware has given up looking for a boot device (its QEMU under
    `idle` CPU s per s): those first seconds burn a core, which would land on whichever tool
    runs first. A VM being backed up in the field booted long ago."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < idle * 0.5:
            return


@dataclass
class Run:
    cmd: str
    rc: int
    wall: float
    cpu: float              # user + sys of the command and every descendant it waited for
    maxrss_mib: float       # ru_maxrss: the largest single process among them
    qemu_cpu: float = 0.0   # CPU the VM's QEMU spent meanwhile
    stdout: str = ""
    stderr: str = ""

    @property
    def total_cpu(self) -> float:
        return self.cpu + self.qemu_cpu

    def summary(self) -> Dict:
        d = asdict(self)
        d["stdout"], d["stderr"] = d["stdout"][-2000:], d["stderr"][-2000:]
        return d


GNU_TIME = "/usr/bin/time"


def run(cmd: Sequence[str], qemu_pid: Optional[int] = None, env: Optional[Dict] = None, cwd: Optional[str] = None,
        check: bool = True, shell: bool = False, stdin=None, timeout: float = 3600) -> Run:
    """Run one command, measure wall time, CPU (os.wait4 of that child: it and every descendant it
    waited for) and peak RSS. A child forked from this (big) Python process inherits its RSS high
    water mark across exec, so ru_maxrss is taken from GNU time's report on its own small child
    when /usr/bin/time exists, else from wait4 (then it is at least this process's RSS)."""
    import tempfile
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(mode="r") as rss:
        argv = list(cmd) if not shell else ["bash", "-o", "pipefail", "-c", cmd]
        timed = os.path.exists(GNU_TIME)
        if timed:
            argv = [GNU_TIME, "-f", "%M", "-o", rss.name, "--"] + argv
        q0 = cpu_seconds(qemu_pid) if qemu_pid else 0.0
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=out, stderr=err,
                             stdin=stdin if stdin is not None else subprocess.DEVNULL,
                             env=env, cwd=cwd, start_new_session=True)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(p.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.002)
        wall = time.monotonic() - t0
        q1 = cpu_seconds(qemu_pid) if qemu_pid else 0.0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        maxrss = ru.ru_maxrss
        if timed:
            lines = rss.read().split()
            maxrss = int(lines[-1]) if lines and lines[-1].isdigit() else maxrss
        r = Run(" ".join(cmd) if not shell else cmd, p.returncode, wall, ru.ru_utime + ru.ru_stime,
                maxrss / 1024, q1 - q0, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"))
    if check and r.rc != 0:
        raise RuntimeError(f"`{r.cmd}` exited {r.rc}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
    return r


class Vm:
    """A PC with no guest OS whose virtio-blk disk is `image` (like tests/harness/qemu.py), with a
    QMP socket for the tool under test and one for the bench (HMP qemu-io guest writes)."""

    def __init__(self, workdir: str, image: str, fmt: str = "qcow2"):
        self.workdir, self.image, self.fmt = workdir, image, fmt
        self.qmp_socket = os.path.join(workdir, "vm.qmp")
        self.admin_socket = os.path.join(workdir, "vm.admin.qmp")
        self.log = os.path.join(workdir, "qemu.log")
        self.proc: Optional[subprocess.Popen] = None
        self.admin: Optional[QMPConnection] = None

    def start(self) -> "Vm":
        for s in (self.qmp_socket, self.admin_socket):
            if os.path.exists(s):
                os.unlink(s)
        accel = ["-accel", "kvm", "-accel", "tcg"] if os.path.exists("/dev/kvm") else ["-accel", "tcg"]
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "pc", *accel, "-m", "64", "-nodefaults", "-display", "none",
             "-no-user-config", "-serial", "none",
             "-blockdev", f"driver=file,node-name=file0,filename={self.image}",
             "-blockdev", f"driver={self.fmt},node-name={NODE},file=file0",
             "-device", f"virtio-blk-pci,drive={NODE},id={DEVICE}",
             "-chardev", f"socket,id=m0,path={self.qmp_socket},server=on,wait=off", "-mon", "chardev=m0,mode=control",
             "-chardev", f"socket,id=m1,path={self.admin_socket},server=on,wait=off", "-mon", "chardev=m1,mode=control"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_socket(self.admin_socket, self.proc)
            self.admin = QMPConnection(self.admin_socket).connect(timeout=10)
            wait_idle(self.proc.pid)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def hmp(self, command: str) -> str:
        out = self.admin.execute("human-monitor-command", {"command-line": command})
        if out and ("error" in out.lower() or "failed" in out.lower()):
            raise RuntimeError(f"HMP {command!r}: {out}")
        return out

    def guest_write(self, path: str, offset: int, length: int) -> None:
        """Write `length` bytes of file `path` at `offset` through the virtio-blk device (the
        guest's path: dirty bitmaps and copy-before-write see it). qemu-io reports on QEMU's
        stdout (our log), so success is read from there."""
        before = os.path.getsize(self.log)
        self.hmp(f'qemu-io -d {QOM_BACKEND} "write -s {path} {offset} {length}"')
        with open(self.log, "rb") as f:
            f.seek(before)
            out = f.read().decode(errors="replace")
        if f"wrote {length}/{length}" not in out:
            raise RuntimeError(f"guest write of {length} bytes at {offset} failed: {out.strip()!r}")

    def flush(self) -> None:
        self.hmp(f'qemu-io -d {QOM_BACKEND} "flush"')

    def export(self, sock: str, name: str = "w") -> str:
        """A read-only NBD export of the disk (what nbdcopy/restic/borg read). -> NBD URI."""
        self.admin.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        self.admin.execute("block-export-add", {"type": "nbd", "id": "bench", "node-name": NODE, "name": name,
                                                "writable": False})
        return f"nbd+unix:///{name}?socket={sock}"

    def unexport(self) -> None:
        self.admin.execute("block-export-del", {"id": "bench"})
        deadline = time.monotonic() + 30
        while any(e.get("id") == "bench" for e in self.admin.execute("query-block-exports")):
            if time.monotonic() > deadline:
                raise RuntimeError("NBD export 'bench' was not deleted within 30 s")
            time.sleep(0.01)
        self.admin.execute("nbd-server-stop")

    def stop(self) -> None:
        """Clean shutdown (persistent bitmaps are written to the qcow2)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.admin.execute("quit")
            except Exception:   # noqa: BLE001 - fall back to SIGTERM
                self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.admin is not None:
            try:
                self.admin.close()
            except Exception:   # noqa: BLE001 - closing after quit may raise EOF
                pass
            self.admin = None
        self.proc = None


def tree_bytes(path: str) -> int:
    """Apparent size (sum of st_size) of every file under `path`."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def tree_files(path: str) -> int:
    return sum(len(files) for _d, _s, files in os.walk(path))


def copy_image(src: str, dst: str) -> None:
    """A fresh copy of W for one tool; synced, so its writeback does not run into the timing."""
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    os.sync()


def median(values: List[float]) -> float:
    v = sorted(x for x in values if x is not None)
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


@contextlib.contextmanager
def work_directory(prefix: str, fs: str = "tmp") -> Iterator[str]:
    """A fresh work directory for a bench run: under /tmp (fs="tmp"), or on a file system made for
    the run (fs="ext4": a journaled ext4 on a sparse file behind a loop device with direct I/O,
    mounted under /tmp and removed afterwards). Why the choice: on the machine these benchmarks
    were written on, /tmp's ext4 (no journal, a long-lived disk) spends ~0.45 ms of kernel CPU
    creating an inode (ext4's recently_deleted scan, perf), 18x a fresh ext4; a store of objects
    creates thousands, a file-copying peer one. Everything of the run (copies of W, stores,
    peers' outputs) lives in the directory, so every tool gets the same file system."""
    if fs == "tmp":
        d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    if fs != "ext4":
        raise ValueError(f"unknown work file system {fs!r} (tmp or ext4)")
    base = tempfile.mkdtemp(prefix=prefix + "fs-", dir="/tmp")
    os.chmod(base, 0o755)       # QEMU run by libvirt (libvirt-qemu) must reach the images below
    image, mnt = os.path.join(base, "fs.img"), os.path.join(base, "mnt")
    os.mkdir(mnt, 0o755)
    loop = None
    try:
        with open(image, "wb") as f:
            f.truncate(96 << 30)        # sparse: what the run writes is what the disk holds
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
        loop = subprocess.run(["losetup", "--direct-io=on", "--find", "--show", image], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", loop, mnt], check=True)
        os.chmod(mnt, 0o755)
        try:
            d = tempfile.mkdtemp(prefix=prefix, dir=mnt)
            yield d
        finally:
            subprocess.run(["umount", mnt], check=True)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(base, ignore_errors=True)

"""A throwaway QEMU that owns one qcow2 (or raw) disk, plus a model of what the guest wrote.

QEMU runs a small PC with no guest OS (SeaBIOS idles; the block layer is fully live), the disk
on a virtio-blk device, and two QMP sockets: one for ekko, one for the harness. The harness
writes through HMP `qemu-io -d <device>`, i.e. through the device's own BlockBackend, exactly
where guest writes enter the block layer: a filter that a backup inserts above the disk node
(copy-before-write) sees them, as it would see the guest's. Every write also goes into
`model`, a bytearray of the disk's expected content, so tests can snapshot the expected image
at any instant without reading the disk.
"""

import os
import signal
import subprocess
import tempfile
import time
from typing import Optional

from ekko_libvirt.engine.qmp_client import QMPConnection

NODE = "disk0"
DEVICE = "vblk0"
QOM_BACKEND = f"/machine/peripheral/{DEVICE}/virtio-backend"


class QemuDisk:
    def __init__(self, workdir: str, size: int, fmt: str = "qcow2", name: str = "disk", model: bool = True):
        if size % 512:
            # qemu-img would round the image up silently, and the model would be wrong.
            raise ValueError(f"disk size {size} is not a multiple of 512 bytes")
        self.workdir = workdir
        self.size = size
        self.fmt = fmt
        self.image = os.path.join(workdir, f"{name}.{fmt}")
        self.qmp_socket = os.path.join(workdir, f"{name}.qmp")
        self.admin_socket = os.path.join(workdir, f"{name}.admin.qmp")
        self.model = bytearray(size) if model else None     # off for huge sparse disks
        self.proc: Optional[subprocess.Popen] = None
        self.admin: Optional[QMPConnection] = None
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, self.image, str(size)], check=True)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "QemuDisk":
        for s in (self.qmp_socket, self.admin_socket):
            if os.path.exists(s):
                os.unlink(s)
        fmt_node = f"driver={self.fmt},node-name={NODE},file=file0"
        self.log = os.path.join(self.workdir, "qemu.log")
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "pc", "-accel", "kvm", "-accel", "tcg", "-m", "64",
             "-nodefaults", "-display", "none", "-no-user-config", "-serial", "none",
             "-blockdev", f"driver=file,node-name=file0,filename={self.image}",
             "-blockdev", fmt_node, "-device", f"virtio-blk-pci,drive={NODE},id={DEVICE}",
             "-chardev", f"socket,id=m0,path={self.qmp_socket},server=on,wait=off", "-mon", "chardev=m0,mode=control",
             "-chardev", f"socket,id=m1,path={self.admin_socket},server=on,wait=off", "-mon", "chardev=m1,mode=control"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}; see {self.workdir}/qemu.log")
            if os.path.exists(self.admin_socket):
                try:
                    self.admin = QMPConnection(self.admin_socket).connect(timeout=5)
                    return self
                except Exception:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.02)

    def stop(self) -> None:
        """Clean shutdown: persistent bitmaps are written to the qcow2."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.admin.execute("quit")
            except Exception:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_admin()
        self.proc = None

    def kill9(self) -> None:
        """What a host crash looks like to the image: bitmaps stay flagged in-use. The guest's
        writes were flushed first (as a guest's fsync would), so the model stays the truth."""
        self.hmp(f'qemu-io -d {QOM_BACKEND} "flush"')
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._close_admin()
        self.proc = None

    def _close_admin(self) -> None:
        if self.admin is not None:
            try:
                self.admin.close()
            except Exception:
                pass
            self.admin = None

    def remove(self) -> None:
        self.stop()
        if os.path.exists(self.image):
            os.unlink(self.image)

    def resize(self, size: int) -> None:
        """Grow the live disk (block_resize, as Nova's resize does); the model grows with zeros."""
        if size % 512 or size < self.size:
            raise ValueError(f"cannot resize {self.size} -> {size}: grow to a multiple of 512 bytes")
        self.admin.execute("block_resize", {"node-name": NODE, "size": size})
        if self.model is not None:
            self.model.extend(bytes(size - self.size))
        self.size = size

    # -- guest writes -----------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset` through QEMU's block layer, and into the model."""
        with tempfile.NamedTemporaryFile(dir=self.workdir, suffix=".pat") as f:
            f.write(data)
            f.flush()
            self.qemu_io(f"write -s {f.name} {offset} {len(data)}")
        if self.model is not None:
            self.model[offset:offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self.qemu_io(f"write -z {offset} {length}")
        if self.model is not None:
            self.model[offset:offset + length] = bytes(length)

    def qemu_io(self, command: str) -> None:
        """qemu-io prints to QEMU's stdout (our log), not to the monitor: check the log grew
        with a success line, so a refused write can never pass silently."""
        before = os.path.getsize(self.log)
        self.hmp(f'qemu-io -d {QOM_BACKEND} "{command}"')
        with open(self.log, "rb") as f:
            f.seek(before)
            out = f.read().decode(errors="replace")
        if "wrote" not in out or "rror" in out or "failed" in out:
            raise RuntimeError(f"qemu-io {command!r} did not succeed: {out.strip()!r}")

    def hmp(self, command: str) -> str:
        out = self.admin.execute("human-monitor-command", {"command-line": command})
        if out and ("error" in out.lower() or "failed" in out.lower()):
            raise RuntimeError(f"HMP {command!r}: {out}")
        return out

    def bitmaps(self):
        for n in self.admin.execute("query-named-block-nodes", {"flat": True}):
            if n.get("node-name") == NODE:
                return n.get("dirty-bitmaps", [])
        return []

    def snapshot(self) -> bytes:
        """The expected content of the disk at this instant."""
        return bytes(self.model)

"""A real Linux guest for the tests: Debian's kernel, an initramfs of busybox + Debian's qemu-ga
(scripts/build-test-guest.sh, cached under /var/cache/ekko-test-guest), file systems on virtio disks
that the guest mounts and writes to, continuously, with a journal of checksums (guest_init.sh).

    Guest(workdir, disks).start()   QEMU (q35) with the disks on virtio-blk (discard passed down, so
                                    a guest fstrim unmaps qcow2 clusters), the guest agent's channel
                                    org.qemu.guest_agent.0 on a unix socket (agent=False: none), a
                                    QMP socket for ekko (`qmp_socket`) and one for the harness
    guest.console                   the serial console: EKKO-* lines (guest_init.sh's header)
    guest.exec("fstrim /mnt/vda")   a command in the guest through the agent's guest-exec
    check_disks(workdir, images)    boots the guest on restored images, read-only: each file system
                                    must mount without journal replay, and its journal's files must
                                    all have their checksums (EKKO-CHECK lines)

Boot takes 2-4 s under TCG. KVM is used when /dev/kvm works for this guest: a probe boot, once
per guest kernel and host kernel, remembered in the cache directory (nested KVM here accepts the guest and then never
runs it: that probe times out and the answer is TCG).
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import time
from typing import List, Optional, Sequence, Tuple, Union

from ekko_libvirt.engine.qmp_client import QMPConnection

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("EKKO_GUEST_CACHE", "/var/cache/ekko-test-guest")
BUILD = os.path.join(ROOT, "scripts", "build-test-guest.sh")


class GuestUnavailable(RuntimeError):
    """The guest cannot be built here (no kernel, busybox-static or qemu-guest-agent)."""


def build() -> Tuple[str, str]:
    """(kernel, initrd): built once per change of the build script, init or kernel (cached)."""
    p = subprocess.run(["bash", BUILD, CACHE], capture_output=True, text=True)
    if p.returncode != 0:
        raise GuestUnavailable(p.stderr.strip() or f"{BUILD} failed with {p.returncode}")
    d = p.stdout.strip().splitlines()[-1]
    return os.path.join(d, "vmlinuz"), os.path.join(d, "initrd.gz")


def make_fs_disk(path: str, fs: str, size: int) -> str:
    """A qcow2 holding one file system (ext4 or xfs) on the whole disk, made on the host."""
    raw = path + ".mkfs.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    try:
        cmd = {"ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard", raw],
               "xfs": ["mkfs.xfs", "-q", "-f", "-K", raw]}[fs]
        subprocess.run(cmd, check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    finally:
        os.unlink(raw)
    return path


class Console:
    """The guest's serial console, a file QEMU appends to; read as lines."""

    def __init__(self, path: str):
        self.path = path

    def lines(self) -> List[str]:
        try:
            with open(self.path, "rb") as f:
                return f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def mark(self) -> int:
        return len(self.lines())

    def wait_for(self, pattern: str, timeout: float, since: int = 0, proc: Optional[subprocess.Popen] = None
                 ) -> re.Match:
        """The first line from `since` on matching `pattern`; a deadline, never a sleep-and-hope."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines()[since:]:
                m = rx.search(line)
                if m:
                    return m
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"QEMU exited ({proc.returncode}) before {pattern!r}; console: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} on the guest console within {timeout:g} s; console: {self.tail()}")
            time.sleep(0.05)

    def progress(self, mount: str, since: int = 0) -> List[Tuple[int, int]]:
        """(seq, guest seconds) of every workload step on `mount` from line `since` on."""
        rx = re.compile(rf"^EKKO-W {re.escape(mount)} (\d+) (\d+)$")
        return [(int(m.group(1)), int(m.group(2))) for m in map(rx.match, self.lines()[since:]) if m]

    def tail(self, n: int = 15) -> str:
        return " | ".join(self.lines()[-n:])


def _kvm_usable(kernel: str, initrd: str, workdir: str) -> bool:
    """Whether this guest runs under KVM here: a probe boot, remembered per kernel."""
    if os.environ.get("EKKO_GUEST_ACCEL") in ("kvm", "tcg"):
        return os.environ["EKKO_GUEST_ACCEL"] == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    memo = os.path.join(CACHE, f"kvm-probe-{os.path.getsize(kernel)}-{os.uname().release}")
    if os.path.exists(memo):
        with open(memo) as f:
            return f.read().strip() == "kvm"
    probe = Guest(workdir, [], agent=False, name="kvmprobe", accel="kvm", kernel=(kernel, initrd))
    try:
        probe.start(timeout=20)
        ok = True
    except (RuntimeError, TimeoutError):
        ok = False
    finally:
        probe.stop()
    with open(memo, "w") as f:
        f.write("kvm" if ok else "tcg")
    return ok


class Guest:
    def __init__(self, workdir: str, disks: List[str], agent: bool = True, name: str = "guest",
                 accel: Optional[str] = None, read_only: Union[bool, Sequence[bool]] = False, check: bool = False,
                 kernel: Optional[Tuple[str, str]] = None, memory: int = 256):
        self.workdir = workdir
        self.disks = list(disks)
        self.agent = agent
        self.name = name
        self.read_only = read_only
        self.check = check
        self.kernel, self.initrd = kernel or build()
        self.accel = accel or ("kvm" if _kvm_usable(self.kernel, self.initrd, workdir) else "tcg")
        self.memory = memory
        self.qmp_socket = os.path.join(workdir, f"{name}.qmp")
        self.admin_socket = os.path.join(workdir, f"{name}.adm")
        self.agent_socket = os.path.join(workdir, f"{name}.qga") if agent else ""
        self.console = Console(os.path.join(workdir, f"{name}.console"))
        self.log = os.path.join(workdir, f"{name}.qemu.log")
        self.proc: Optional[subprocess.Popen] = None
        self.admin: Optional[QMPConnection] = None

    def node(self, i: int) -> str:
        """The format node name of disk i (the QMP engine's `node`)."""
        return f"d{i}"

    def argv(self) -> List[str]:
        append = "console=ttyS0 quiet panic=-1" + (" ekko.check=1" if self.check else "")
        args = ["qemu-system-x86_64", "-machine", "q35", "-accel", self.accel, "-m", str(self.memory),
                "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
                "-kernel", self.kernel, "-initrd", self.initrd, "-append", append,
                "-chardev", f"file,id=ser,path={self.console.path}", "-serial", "chardev:ser",
                "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
                "-qmp", f"unix:{self.admin_socket},server=on,wait=off"]
        for i, img in enumerate(self.disks):
            fmt = "qcow2" if img.endswith(".qcow2") else "raw"
            flag = self.read_only[i] if isinstance(self.read_only, (list, tuple)) else self.read_only
            ro = ",read-only=on" if flag else ""
            args += ["-blockdev", f"driver=file,node-name=f{i},filename={img},discard=unmap{ro}",
                     "-blockdev", f"driver={fmt},node-name={self.node(i)},file=f{i},discard=unmap{ro}",
                     "-device", f"virtio-blk-pci,drive={self.node(i)},id=vd{i}"]
        if self.agent:
            args += ["-device", "virtio-serial-pci",
                     "-chardev", f"socket,id=qga,path={self.agent_socket},server=on,wait=off",
                     "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0"]
        return args

    def start(self, timeout: float = 120) -> "Guest":
        for p in (self.qmp_socket, self.admin_socket, self.agent_socket, self.console.path):
            if p and os.path.exists(p):
                os.unlink(p)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pattern = r"^EKKO-DONE" if self.check else r"^EKKO-READY"
        self.ready = self.console.wait_for(pattern, timeout, proc=None if self.check else self.proc)
        if not self.check:
            self.admin = QMPConnection(self.admin_socket).connect(timeout=10)
        return self

    def stop(self) -> None:
        """Stop QEMU by its PID: QMP quit (images closed cleanly), SIGKILL after 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.admin is not None:
            try:
                self.admin.execute("quit")
            except Exception:  # noqa: BLE001 - it may be gone already; the wait below decides
                pass
        elif self.proc.poll() is None and not self.check:
            os.kill(self.proc.pid, signal.SIGKILL)      # never came up (a failed start): nothing to keep
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.admin is not None:
            try:
                self.admin.close()
            except Exception:  # noqa: BLE001
                pass
            self.admin = None
        self.proc = None

    def mounts(self) -> List[str]:
        m = re.search(r"mounts=(.*)$", self.ready.group(0) if self.ready else "")
        return (m.group(1).split() if m else []) or self.console.wait_for(r"^EKKO-READY .*mounts=(.*)$", 1
                                                                          ).group(1).split()

    def wait_progress(self, steps: int, timeout: float = 120) -> None:
        """Until every mount's workload did `steps` more steps (the workload is running)."""
        start = {m: max((s for s, _ in self.console.progress(m)), default=0) for m in self.mounts()}
        deadline = time.monotonic() + timeout
        while not all(max((s for s, _ in self.console.progress(m)), default=0) >= start[m] + steps for m in start):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guest workload did not do {steps} steps in {timeout:g} s: "
                                   f"{self.console.tail()}")
            time.sleep(0.1)

    # -- the guest agent, from the harness (one client at a time: never while ekko uses it) --
    def agent_call(self, command: str, arguments: Optional[dict] = None, timeout: float = 30) -> object:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(self.agent_socket)
        try:
            sync = int.from_bytes(os.urandom(3), "little")
            s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync}}).encode()
                      + b"\n" + json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})}
                                          ).encode() + b"\n")
            buf = b""
            replies: List[dict] = []
            while len(replies) < 2:
                buf += s.recv(65536) or b""
                if b"\xff" in buf and not replies:
                    buf = buf[buf.rindex(b"\xff") + 1:]
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    line = line.strip().lstrip(b"\xff")
                    if line:
                        r = json.loads(line)
                        if replies or r.get("return") == sync:
                            replies.append(r)
            if "error" in replies[1]:
                raise RuntimeError(f"guest agent {command}: {replies[1]['error']}")
            return replies[1].get("return")
        finally:
            s.close()

    def exec(self, command: str, timeout: float = 60) -> str:
        """`sh -c command` in the guest (guest-exec); its stdout, or RuntimeError with its stderr."""
        pid = self.agent_call("guest-exec", {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True})
        assert isinstance(pid, dict)
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent_call("guest-exec-status", {"pid": pid["pid"]})
            assert isinstance(st, dict)
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                if st.get("exitcode") != 0:
                    err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                    raise RuntimeError(f"guest: {command!r} exited {st.get('exitcode')}: {err.strip()} {out.strip()}")
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest: {command!r} still running after {timeout:g} s")
            time.sleep(0.1)


def check_disks(workdir: str, images: List[str], read_only: Union[bool, Sequence[bool]] = True,
                timeout: float = 180) -> List[str]:
    """Boot the guest once on `images` (restored disks): "ok files=N torn=M" | "BAD ..." for each, in
    the order given. read_only (one for all, or one per image): the disk is read-only, so a file
    system that needs journal replay does not mount ("BAD cannot mount"); else a throwaway overlay
    lets it replay. An image may be given twice (once each way)."""
    name = f"check{os.getpid()}{int(time.monotonic() * 1000) % 100000}"
    flags = list(read_only) if isinstance(read_only, (list, tuple)) else [read_only] * len(images)
    disks, overlays = [], []
    for i, (img, ro) in enumerate(zip(images, flags, strict=True)):
        if ro:
            disks.append(img)
            continue
        ov = os.path.join(workdir, f"{name}.{i}.overlay.qcow2")
        fmt = "qcow2" if img.endswith(".qcow2") else "raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", img, "-F", fmt, ov], check=True)
        overlays.append(ov)
        disks.append(ov)
    if len(disks) > 26:
        raise ValueError("the check guest names its disks vda..vdz: 26 at most")
    g = Guest(workdir, disks, agent=False, name=name, read_only=flags, check=True)
    try:
        g.start(timeout=timeout)
        found = {}
        for line in g.console.lines():
            m = re.match(r"^EKKO-CHECK (vd[a-z]) (.*)$", line)
            if m:
                found[m.group(1)] = m.group(2)
        return [found.get("vd" + chr(ord("a") + i), "BAD not checked") for i in range(len(disks))]
    finally:
        g.stop()
        for ov in overlays:
            os.unlink(ov)

"""A real libvirtd (QEMU driver) for the tests, plus throwaway domains in it.

    with Libvirtd(log_dir) as lv:              # virtlogd + libvirtd, stopped again by PID
        conn = lv.connect()
        doms = TestDomains(conn, lv.dom_type)
        dom = doms.define("ekko-test-a", [(image, "qcow2", "vda")])
        dom.create(); guest_write(dom, 0, 1 << 20, 65536, 0x5a)
        doms.cleanup()                         # destroys/undefines only what it defined

Facts it relies on (measured on Debian 12, libvirt 9.0, see shared notes/libvirt.md):
- No systemd: `virtlogd -d` must run before `libvirtd -d` (domain starts fail without it); their
  pid files are /run/virtlogd.pid and /run/libvirtd.pid. libvirtd answers on qemu:///system
  0.1-4 s after start; SIGTERM takes ~3.5 s and leaves running domains running.
- /dev/kvm is root:root 0600 without udev; QEMU runs as libvirt-qemu (group kvm), so the harness
  makes it root:kvm 0660 and probes KVM with a bare QEMU: domains get type 'kvm' or 'qemu' (TCG).
- QEMU (as libvirt-qemu) must traverse the directories of the images: `make_workdir` gives 0755.
- Only one libvirtd can run. If one runs that this harness did not start, start() refuses
  (AlreadyRunning) unless EKKO_TEST_REUSE_LIBVIRTD=1: then it is used and never stopped.
- The daemons log to `log_dir` (LIBVIRT_LOG_OUTPUTS); libvirtd also logs util.hook at debug
  level, which is how `reload_hooks` knows that a SIGHUP has re-read /etc/libvirt/hooks.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union
from xml.sax.saxutils import escape, quoteattr

URI = "qemu:///system"
LIBVIRTD_PIDFILE = "/run/libvirtd.pid"
VIRTLOGD_PIDFILE = "/run/virtlogd.pid"
REUSE_ENV = "EKKO_TEST_REUSE_LIBVIRTD"
# virHookInitialize checks the drivers in order daemon, qemu, lxc, network, libxl, bhyve and logs one
# "No/Found/Non-executable hook script .../bhyve" line last: once it is there, the qemu hooks are known.
HOOK_LOG_MARK = b"hook script /etc/libvirt/hooks/bhyve"
TEST_DOMAIN_PREFIX = "ekko-test-"


class LibvirtdError(RuntimeError):
    def __init__(self, message: str, log: Optional[str] = None):
        self.log = log
        super().__init__(message + (f"\n--- last lines of {log} ---\n{_tail(log)}" if log else ""))


class AlreadyRunning(LibvirtdError):
    def __init__(self, pid: int):
        self.pid = pid
        super().__init__(f"a libvirtd (pid {pid}) runs that this test run did not start; refusing to use or "
                         f"stop it. Stop it, or set {REUSE_ENV}=1 to run the tests against it.")


# --- processes -------------------------------------------------------------------------------------

def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError as e:
        return f"({e})"


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (daemons are reparented; nothing may reap them here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def read_pidfile(path: str, comm: str) -> Optional[int]:
    """The live pid in `path` if that process is `comm`, else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and pid_alive(pid) and _comm(pid) == comm else None


def find_process(comm: str) -> Optional[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _comm(int(entry)) == comm and pid_alive(int(entry)):
            return int(entry)
    return None


def terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM, wait until gone (or a zombie), SIGKILL after `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def probe_kvm() -> str:
    """Make /dev/kvm usable by QEMU (root:kvm 0660) and return 'kvm' if KVM works, else 'qemu'."""
    if not os.path.exists("/dev/kvm"):
        return "qemu"
    try:
        shutil.chown("/dev/kvm", group="kvm")
        os.chmod("/dev/kvm", 0o660)
    except (OSError, LookupError):
        pass
    qmp = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    try:
        p = subprocess.run(["qemu-system-x86_64", "-accel", "kvm", "-machine", "none", "-nodefaults",
                            "-display", "none", "-qmp", "stdio"], input=qmp, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "qemu"
    return "kvm" if p.returncode == 0 else "qemu"


@contextmanager
def quiet_libvirt_errors() -> Iterator[None]:
    """Keep libvirt's default handler from printing errors the caller expects and handles."""
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        yield
    finally:
        libvirt.registerErrorHandler(None, None)


# --- the daemons -----------------------------------------------------------------------------------

class Libvirtd:
    def __init__(self, log_dir: str, uri: str = URI, timeout: float = 60.0, reuse: Optional[bool] = None):
        self.log_dir = log_dir
        self.uri = uri
        self.timeout = timeout
        self.reuse = os.environ.get(REUSE_ENV, "") in ("1", "true", "yes") if reuse is None else reuse
        self.dom_type = "qemu"
        self.libvirtd_pid: Optional[int] = None    # set only for daemons this object started
        self.virtlogd_pid: Optional[int] = None
        self.reused_pid: Optional[int] = None
        self.libvirtd_log = os.path.join(log_dir, "libvirtd.log")
        self.virtlogd_log = os.path.join(log_dir, "virtlogd.log")

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "Libvirtd":
        if shutil.which("libvirtd") is None or shutil.which("virtlogd") is None:
            raise LibvirtdError("libvirtd/virtlogd are not installed (apt: libvirt-daemon-system)")
        os.makedirs(self.log_dir, exist_ok=True)
        self.dom_type = probe_kvm()
        running = read_pidfile(LIBVIRTD_PIDFILE, "libvirtd") or find_process("libvirtd")
        if running:
            if not self.reuse:
                raise AlreadyRunning(running)
            self.reused_pid = running
            self.wait_ready()
            return self
        if not (read_pidfile(VIRTLOGD_PIDFILE, "virtlogd") or find_process("virtlogd")):
            self.virtlogd_pid = self._spawn("virtlogd", VIRTLOGD_PIDFILE, self.virtlogd_log)
        try:
            self._start_libvirtd()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_libvirtd(self) -> None:
        self.libvirtd_pid = self._spawn("libvirtd", LIBVIRTD_PIDFILE, self.libvirtd_log,
                                        filters="1:util.hook")
        self.wait_ready()

    def _spawn(self, prog: str, pidfile: str, log: str, filters: str = "") -> int:
        env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"1:file:{log}")
        if filters:
            env["LIBVIRT_LOG_FILTERS"] = filters
        with open(log + ".stdio", "ab") as out:
            p = subprocess.run([prog, "-d"], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               timeout=60)
        if p.returncode != 0:
            raise LibvirtdError(f"`{prog} -d` exited {p.returncode}", log + ".stdio")
        deadline = time.monotonic() + 10
        while True:
            pid = read_pidfile(pidfile, prog)
            if pid:
                return pid
            if time.monotonic() > deadline:
                raise LibvirtdError(f"{prog} started but {pidfile} names no live {prog}", log)
            time.sleep(0.02)

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Until qemu:///system answers (a real connection + call), or LibvirtdError."""
        import libvirt
        deadline = time.monotonic() + (timeout or self.timeout)
        last = None
        with quiet_libvirt_errors():
            while time.monotonic() < deadline:
                if self.libvirtd_pid and not pid_alive(self.libvirtd_pid):
                    raise LibvirtdError(f"libvirtd (pid {self.libvirtd_pid}) died while starting", self.libvirtd_log)
                try:
                    conn = libvirt.open(self.uri)
                    try:
                        conn.getLibVersion()
                        return
                    finally:
                        conn.close()
                except libvirt.libvirtError as e:
                    last = e
                time.sleep(0.05)
        raise LibvirtdError(f"{self.uri} did not answer within {timeout or self.timeout:.0f} s: {last}",
                            self.libvirtd_log)

    def connect(self):
        import libvirt
        return libvirt.open(self.uri)

    @property
    def pid(self) -> Optional[int]:
        return self.libvirtd_pid or self.reused_pid

    def restart(self) -> None:
        """Stop libvirtd (SIGTERM: running domains keep running) and start it again."""
        if self.libvirtd_pid is None:
            raise LibvirtdError("restart() of a libvirtd this harness did not start")
        terminate(self.libvirtd_pid)
        self.libvirtd_pid = None
        self._start_libvirtd()

    def reload_hooks(self, timeout: float = 10.0) -> None:
        """SIGHUP libvirtd so that it looks for hook scripts again; wait until it has (from its
        util.hook debug log), or ~1 s for a reused libvirtd whose log is not ours."""
        pid = self.pid
        if pid is None:
            raise LibvirtdError("libvirtd is not running")
        before = self._count_hook_checks()
        os.kill(pid, signal.SIGHUP)
        if self.libvirtd_pid is None:
            time.sleep(1.0)
            return
        deadline = time.monotonic() + timeout
        while self._count_hook_checks() <= before:
            if time.monotonic() > deadline:
                raise LibvirtdError("libvirtd did not re-read its hooks after SIGHUP", self.libvirtd_log)
            time.sleep(0.02)
        time.sleep(0.05)

    def _count_hook_checks(self) -> int:
        try:
            with open(self.libvirtd_log, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0
        return data.count(HOOK_LOG_MARK)

    def stop(self) -> None:
        """Terminate exactly the daemons this object started: libvirtd first, then virtlogd."""
        if self.libvirtd_pid is not None:
            terminate(self.libvirtd_pid)
            self.libvirtd_pid = None
        if self.virtlogd_pid is not None:
            terminate(self.virtlogd_pid)
            self.virtlogd_pid = None

    def __enter__(self) -> "Libvirtd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- domains -------------------------------------------------------------------------------------

DiskSpec = Tuple[str, str, str]        # (image path, 'qcow2' | 'raw', target dev 'vda')


def make_workdir(prefix: str = "ekko-lv-") -> str:
    """A directory QEMU (user libvirt-qemu) can reach: pytest's tmp dirs are 0700 root."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


def make_image(path: str, fmt: str = "qcow2", size: int = 16 << 20) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)], check=True)
    return path


def domain_xml(name: str, disks: Sequence[DiskSpec], dom_type: str = "qemu", memory_mib: int = 64,
               uuid: Optional[str] = None) -> str:
    """A domain with no OS: SeaBIOS finds nothing to boot and idles. virtio-blk disks only; no
    network, graphics, USB or balloon."""
    if not 64 <= memory_mib <= 128:
        raise ValueError("test domains use 64-128 MiB")
    disk_xml = []
    for path, fmt, target in disks:
        if fmt not in ("qcow2", "raw"):
            raise ValueError(f"disk format {fmt!r}")
        disk_xml.append(
            f"    <disk type='file' device='disk'>\n"
            f"      <driver name='qemu' type='{fmt}'/>\n"
            f"      <source file={quoteattr(path)}/>\n"
            f"      <target dev={quoteattr(target)} bus='virtio'/>\n"
            f"    </disk>\n")
    return (f"<domain type='{dom_type}'>\n"
            f"  <name>{escape(name)}</name>\n"
            + (f"  <uuid>{uuid}</uuid>\n" if uuid else "")
            + f"  <memory unit='MiB'>{memory_mib}</memory>\n"
            f"  <vcpu>1</vcpu>\n"
            f"  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n"
            f"  <on_poweroff>destroy</on_poweroff>\n"
            f"  <on_reboot>restart</on_reboot>\n"
            f"  <on_crash>destroy</on_crash>\n"
            f"  <devices>\n"
            + "".join(disk_xml)
            + "    <controller type='usb' model='none'/>\n"
            "    <memballoon model='none'/>\n"
            "  </devices>\n"
            "</domain>\n")


def define_test_domain(conn, name: str, disks: Sequence[DiskSpec], dom_type: str = "qemu",
                       memory_mib: int = 64):
    """Define (not start) a test domain. -> virDomain."""
    return conn.defineXML(domain_xml(name, disks, dom_type, memory_mib))


def disk_alias(dom, disk: Union[int, str]) -> str:
    """QEMU device id of a disk: 'virtio-disk<N>' for an index, or looked up by target ('vdb')."""
    if isinstance(disk, int):
        return f"virtio-disk{disk}"
    root = ET.fromstring(dom.XMLDesc(0))
    for d in root.findall("./devices/disk"):
        t, a = d.find("target"), d.find("alias")
        if t is not None and t.get("dev") == disk and a is not None:
            return a.get("name")
    raise KeyError(f"no disk {disk!r} with an alias in the live XML of {dom.name()}")


def monitor(dom, command: str) -> str:
    """HMP passthrough (taints the domain 'custom-monitor': fine for tests)."""
    import libvirt_qemu
    return libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def guest_write(dom, disk_alias_index: Union[int, str], offset: int, length: int, pattern_byte: int,
                timeout: float = 10.0) -> str:
    """Write `length` bytes of `pattern_byte` at `offset` into a disk of a running domain, through
    the virtio-blk device's BlockBackend -- the path a guest write takes (dirty bitmaps see it).

    HMP `qemu-io` prints its result on QEMU's stdout, not on the monitor: the monitor only says
    "Error: ..." for a bad device. So the result is read from the domain log (virtlogd copies
    QEMU's stdout there): "wrote N/N bytes at offset O", or "write failed: ..." -> RuntimeError."""
    if not 0 <= pattern_byte <= 0xFF:
        raise ValueError(f"pattern byte {pattern_byte}")
    dev = f"/machine/peripheral/{disk_alias(dom, disk_alias_index)}/virtio-backend"
    log = domain_log(dom.name())
    start = os.path.getsize(log) if os.path.exists(log) else 0
    out = monitor(dom, f'qemu-io -d {dev} "write -P 0x{pattern_byte:02x} {offset} {length}"')
    if out.strip():
        raise RuntimeError(f"qemu-io write into {dev} failed: {out.strip()}")
    ok = f"wrote {length}/{length} bytes at offset {offset}".encode()
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read()
        if ok in text:
            return ok.decode()
        if b"write failed" in text:
            line = text[text.index(b"write failed"):].split(b"\n")[0].decode(errors="replace")
            raise RuntimeError(f"qemu-io write into {dev} at {offset}+{length} failed: {line}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"qemu-io write into {dev}: no result in {log} after {timeout:.0f} s")
        time.sleep(0.01)


def domain_log(name: str) -> str:
    return f"/var/log/libvirt/qemu/{name}.log"


def qemu_pid(dom) -> int:
    """PID of the domain's QEMU (from libvirt's pid file), e.g. for kill -9 tests."""
    with open(f"/run/libvirt/qemu/{dom.name()}.pid") as f:
        return int(f.read().strip())


def find_domain(conn, name: str):
    """The domain called `name`, or None (without libvirt printing an error)."""
    return next((d for d in conn.listAllDomains() if d.name() == name), None)


def destroy_and_undefine(conn, name: str) -> None:
    """Stop (hard) and undefine one domain, checkpoint/snapshot metadata and managed save included."""
    import libvirt
    dom = find_domain(conn, name)
    if dom is None:
        return
    if dom.isActive():
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:   # already stopped
                raise
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


class TestDomains:
    """Defines test domains and cleans up exactly those (names must start with 'ekko-test-')."""

    __test__ = False      # not a pytest test class

    def __init__(self, conn, dom_type: str = "qemu"):
        self.conn = conn
        self.dom_type = dom_type
        self.names: List[str] = []

    def define(self, name: str, disks: Sequence[DiskSpec], memory_mib: int = 64):
        if not name.startswith(TEST_DOMAIN_PREFIX):
            raise ValueError(f"test domain names start with {TEST_DOMAIN_PREFIX!r}: {name!r}")
        if find_domain(self.conn, name) is not None:
            raise RuntimeError(f"domain {name} exists already; not touching a domain this test did not create")
        dom = define_test_domain(self.conn, name, disks, self.dom_type, memory_mib)
        self.names.append(name)
        return dom

    def cleanup(self, conn=None) -> List[str]:
        """Destroy + undefine every domain defined here. -> errors (as text), after trying all."""
        errors = []
        for name in reversed(self.names):
            try:
                destroy_and_undefine(conn or self.conn, name)
            except Exception as e:   # noqa: BLE001 -- clean up the others, report all
                errors.append(f"{name}: {e}")
                continue
            try:
                os.unlink(domain_log(name))
            except OSError:
                pass
        self.names.clear()
        return errors


def remove_tree(paths: Iterable[str]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)

"""Start and stop the NBD server of one backup's disk: nbdkit with ekko's plugin (plugin.py).

The API for everything that needs a backup's bytes without restoring it (`ekko serve`,
`ekko mount`, file listing through libguestfs, instant restore):

    with serving(cfg, ns, key) as srv:         # or: srv = start(cfg, ns, key) ... srv.stop()
        srv.uri      # 'nbd+unix:///?socket=/run/ekko/serve-1234-1.sock' or 'nbd://127.0.0.1:10809/'
        srv.socket   # the unix socket (None with tcp=)
        srv.pid, srv.start_ticks               # the nbdkit process: stop_pid(pid, ticks) stops it
                                               # from anywhere, e.g. after a restart of the owner

`ns` is the project namespace (None: the default one) and `key` the manifest key
(cli/lookup.locate finds both from a backup id, prefix, target or domain name). The manifest is
loaded and checked here first, so an unknown, damaged or locked backup fails before nbdkit starts.

nbdkit is a child of the caller and dies with it, however the caller ends (SIGKILL included):
the plugin holds the read end of a pipe whose write end only the caller holds, and exits the
moment it reads EOF (plugin.py, _watch_parent). Not nbdkit's --exit-with-parent: nbdkit 1.32 sets
PR_SET_PDEATHSIG to SIGTERM even without it (so the kernel still sends SIGTERM when the thread that
started it ends), and on SIGTERM it waits for every connected client to go first. stop():
the pipe closed and SIGTERM, SIGKILL after two seconds if need be (clients lose their connection;
nothing is written anywhere, so nothing is lost). exit_with_parent=False drops the pipe, but does
NOT make a server outlive the thread that started it: the kernel still sends nbdkit SIGTERM then,
which it obeys once no client is connected. A server that must survive a restart of its owner
(instant restore's: restore/instant.py) is started with detached=True: nbdkit daemonized, without
-f (its first process sets that signal and exits; the forked daemon has none), in a session of
its own, its log appended to `logfile` (nbdkit points a daemon's stderr at /dev/null: the plugin
re-points it in after_fork). Such a server runs until stop_pid, which stops a server by PID and
start time.
The server listens read-only on a unix socket (connecting needs
write access to it: nbdkit creates it 0755 whatever the umask, so only its owner can, and it is
made 0600 once ready; by default under run_dir, 0700) or on TCP (127.0.0.1 unless told
otherwise). start() returns once nbdkit has written its pid file, which it does after it
listens: a client can connect at once.

nbdkit's stderr (its messages and the plugin's log: which segment failed a read) goes to `log`
(a text file object; default sys.stderr), line by line through a thread; the last lines are kept
for the error message when nbdkit fails to start or dies.

The plugin runs in nbdkit's embedded Python (the system's python3.11), which finds ekko_libvirt
through PYTHONPATH: the directory holding this package, then this interpreter's own
site-packages when it is the same Python version (a venv: the same modules as the caller),
then Debian's dist-packages (python3-xxhash, -zstandard, -yaml, -cryptography, -swiftclient).
"""

import collections
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Deque, Iterator, List, Optional, TextIO, Tuple

from .. import procs
from ..errors import EkkoError, UsageError
from ..format.manifest import Manifest
from ..store import catalog
from ..store.factory import open_store

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NBDKIT_PYTHON = (3, 11)         # the Python that Debian 12's nbdkit-plugin-python embeds
START_TIMEOUT = 60.0
STOP_TIMEOUT = 2.0        # then SIGKILL (on SIGTERM alone nbdkit waits for connected clients)
STOP_BYTE = b"s"           # written on the lifeline by stop() before it closes it (plugin.py)
_serial = itertools.count(1)


class ServeError(EkkoError):
    """nbdkit could not be started, or ended on its own with an error."""


@dataclass
class Server:
    uri: str
    socket: Optional[str]
    tcp: Optional[Tuple[str, int]]
    pid: int
    start_ticks: Optional[int]
    manifest: Manifest
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    tail: Deque[str] = field(default_factory=lambda: collections.deque(maxlen=30), repr=False)
    _relay: Optional[threading.Thread] = field(default=None, repr=False)
    lifeline: Optional[int] = field(default=None, repr=False)     # its closing ends nbdkit

    def wait(self, timeout: Optional[float] = None) -> int:
        """Until nbdkit ends (idle timeout, a signal); its exit status."""
        assert self.proc is not None            # a Server from start() has its process
        rc = self.proc.wait(timeout)
        if self._relay is not None:
            self._relay.join(5)
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after `timeout`; the socket file removed. Idempotent."""
        if self.lifeline is not None:
            try:
                os.write(self.lifeline, STOP_BYTE)      # "stopped": EOF without it means ekko died
            except OSError:
                pass
            os.close(self.lifeline)
            self.lifeline = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self._relay is not None:
                self._relay.join(5)
        else:
            stop_pid(self.pid, self.start_ticks, timeout)
        if self.socket:
            _unlink(self.socket)

    def describe(self) -> dict:
        m = self.manifest
        return {"uri": self.uri, "socket": self.socket, "tcp": f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp else None,
                "pid": self.pid, "backup_id": m.backup_id, "target": m.target, "virtual_size": m.virtual_size,
                "segment_size": m.segment_size}


def stop_pid(pid: int, start_ticks: Optional[int], timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the nbdkit that started at start_ticks (not whatever has its PID now); -> whether it
    was running. For a server this process did not start (or no longer holds a Popen of)."""
    if start_ticks is None or not procs.process_running(pid, start_ticks):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while procs.process_running(pid, start_ticks) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not procs.process_running(pid, start_ticks):
            return True
    return True


def python_path(same_modules: bool = True) -> List[str]:
    """PYTHONPATH for the plugin: the package's directory, then (same_modules, and this is the
    Python nbdkit embeds) this interpreter's site-packages, so the plugin imports the modules
    the caller does; Debian's dist-packages come after, from the embedded interpreter itself."""
    paths = [PACKAGE_ROOT]
    if same_modules and sys.version_info[:2] == NBDKIT_PYTHON:
        for name in ("purelib", "platlib"):
            p = sysconfig.get_paths().get(name)
            if p and os.path.isdir(p) and p not in paths:
                paths.append(p)
    return paths


def default_socket(cfg) -> str:
    return os.path.join(cfg.run_dir, f"serve-{os.getpid()}-{next(_serial)}.sock")


def start(cfg, namespace: Optional[str], key: str, *, socket_path: Optional[str] = None,
          tcp: Optional[Tuple[str, int]] = None, idle_timeout: Optional[float] = None,
          cache_bytes: Optional[int] = None, readahead: Optional[int] = None, verbose: int = 0,
          log: Optional[TextIO] = None, exit_with_parent: bool = True,
          pythonpath: Optional[List[str]] = None, nbdkit: str = "nbdkit", detached: bool = False,
          logfile: Optional[str] = None, zeros_as_holes: bool = False,
          manifest: Optional[Manifest] = None) -> Server:
    """Serve the backup whose manifest is `key` in namespace `namespace` of cfg's store; returns
    once a client can connect. UsageError: a bad socket or address; ServeError: nbdkit missing
    or failing; the errors of catalog.load for the manifest. detached: a daemon that outlives
    this process (no lifeline; srv.proc is None), its log appended to `logfile`. zeros_as_holes:
    block status marks zero segments HOLE only (plugin.extents: what block-stream must skip).
    manifest: the manifest of `key`, loaded and checked by the caller already (not loaded again)."""
    if detached:
        exit_with_parent = False
        if logfile is None:
            raise ValueError("a detached server needs a logfile (its stderr is gone)")
    m = manifest if manifest is not None else _load(cfg, namespace, key)
    if not cfg.source:
        raise UsageError("ekko serve needs a config file (the server reads it again)")
    if tcp is None:
        socket_path = os.path.abspath(socket_path or default_socket(cfg))
        if len(socket_path.encode()) > 107:
            raise UsageError(f"socket path {socket_path} is too long for a unix socket (at most 107 bytes)")
        _check_socket_free(socket_path)
        if socket_path.startswith(os.path.abspath(cfg.run_dir) + os.sep):
            os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
        if not os.path.isdir(os.path.dirname(socket_path)):
            raise UsageError(f"{os.path.dirname(socket_path)}: no such directory for the socket")
        where = ["-U", socket_path]
        uri = f"nbd+unix:///?socket={socket_path}"
    else:
        host, port = tcp
        where = ["-i", host, "-p", str(port)]
        uri = f"nbd://{host if ':' not in host else '[' + host + ']'}:{port}/"
    run = os.path.join(cfg.run_dir, f"nbdkit-{os.getpid()}-{next(_serial)}.pid")
    os.makedirs(cfg.run_dir, mode=0o700, exist_ok=True)
    _unlink(run)
    params = [f"config={os.path.abspath(cfg.source)}", f"manifest={key}", f"verbose={verbose}",
              f"workers={max(2, min(cfg.workers, 8))}"]
    if namespace:
        params.append(f"namespace={namespace}")
    # the config's serve.cache unless the caller (ekko serve --cache) says otherwise
    params.append(f"cache={cfg.serve.cache if cache_bytes is None else cache_bytes}")
    if readahead is not None:
        params.append(f"readahead={readahead}")
    if idle_timeout:
        params.append(f"idle_timeout={idle_timeout}")
    exe = shutil.which(nbdkit)
    if exe is None:
        raise ServeError(f"{nbdkit} is not installed: ekko serve needs nbdkit and its Python plugin "
                         "(Debian: apt install nbdkit nbdkit-plugin-python)")
    if socket_path:
        params.append(f"unlink={socket_path}")
    if logfile:
        params.append(f"logfile={os.path.abspath(logfile)}")
    if zeros_as_holes:
        params.append("zeros=hole")
    lifeline = os.pipe() if exit_with_parent else None      # both ends close-on-exec
    if lifeline:
        params.append(f"parent_fd={lifeline[0]}")
    cmd = [exe, *(["--log=stderr"] if detached else ["-f"]), "-r", "-P", run, *where, "python", PLUGIN, *params]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath if pythonpath is not None else python_path()))
    env.pop("PYTHONHOME", None)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, close_fds=True, pass_fds=(lifeline[0],) if lifeline else ())
    finally:
        if lifeline:
            os.close(lifeline[0])
    srv = Server(uri, socket_path if tcp is None else None, tcp, proc.pid, None, m, proc,
                 lifeline=lifeline[1] if lifeline else None)
    srv._relay = threading.Thread(target=_relay, args=(proc, srv.tail, log), name="ekko-serve-log", daemon=True)
    srv._relay.start()
    try:
        if detached:
            srv.pid, srv.start_ticks = _wait_daemon(proc, run, srv)
            srv.proc = None         # the daemon is not our child: stop() goes by PID and start time
        else:
            _wait_ready(proc, run, srv)
            srv.start_ticks = procs.process_start_ticks(proc.pid)
    except BaseException:
        srv.stop()
        _unlink(run)
        raise
    _unlink(run)
    if srv.socket:
        os.chmod(srv.socket, 0o600)     # nbdkit makes it 0755 whatever the umask: no one else can connect
    return srv


def _load(cfg, namespace: Optional[str], key: str) -> Manifest:
    store = open_store(cfg, namespace)
    try:
        return catalog.load(store, key)
    finally:
        store.close()


@contextmanager
def serving(cfg, namespace: Optional[str], key: str, **kw) -> Iterator[Server]:
    """start(), and stop() whatever happens in the block."""
    srv = start(cfg, namespace, key, **kw)
    try:
        yield srv
    finally:
        srv.stop()


def _relay(proc: subprocess.Popen, tail: Deque[str], out: Optional[TextIO]) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode("utf-8", "replace")
        tail.append(line.rstrip("\n"))
        sink = out if out is not None else sys.stderr
        try:
            sink.write(line)
            sink.flush()
        except (OSError, ValueError):        # the caller's stream is gone: keep draining the pipe
            pass


def _wait_ready(proc: subprocess.Popen, pidfile: str, srv: Server) -> None:
    """nbdkit writes its pid file once it listens; it exits when it cannot."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            if srv._relay is not None:
                srv._relay.join(5)
            raise ServeError(_start_failure(proc.returncode, list(srv.tail)))
        try:
            with open(pidfile) as f:
                if f.read().strip() == str(proc.pid):
                    return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"nbdkit did not become ready within {START_TIMEOUT:.0f} s: "
                             + " / ".join(list(srv.tail)[-5:]))
        time.sleep(0.01)


def _wait_daemon(proc: subprocess.Popen, pidfile: str, srv: Server) -> Tuple[int, Optional[int]]:
    """nbdkit without -f: its first process exits 0 once it has bound the socket and forked (non-zero
    when it could not); the daemon then writes the pid file. -> the daemon's (pid, start ticks)."""
    try:
        rc = proc.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ServeError(f"nbdkit did not become ready within {START_TIMEOUT:.0f} s: "
                         + " / ".join(list(srv.tail)[-5:])) from None
    if srv._relay is not None:
        srv._relay.join(5)
    if rc != 0:
        raise ServeError(_start_failure(rc, list(srv.tail)))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with open(pidfile) as f:
                text = f.read()
            if text.endswith("\n"):             # written whole (nbdkit writes it in place)
                pid = int(text)
                ticks = procs.process_start_ticks(pid)
                if ticks is None:
                    raise ServeError(f"nbdkit's daemon (pid {pid}) ended at once; its log: {srv.tail and srv.tail[-1]}")
                return pid, ticks
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"nbdkit's daemon wrote no pid file within {START_TIMEOUT:.0f} s")
        time.sleep(0.01)


def _start_failure(rc: int, tail: List[str]) -> str:
    text = "\n".join(tail)
    hint = ""
    if "cannot open plugin" in text or "python" in text and "No such file" in text:
        hint = " (is nbdkit-plugin-python installed? Debian: apt install nbdkit-plugin-python)"
    elif "Address already in use" in text:
        hint = " (the address is in use: choose another --tcp port or --socket)"
    elif "ModuleNotFoundError" in text:
        hint = (" (nbdkit's Python cannot import what ekko needs: Debian: apt install python3-xxhash "
                "python3-zstandard python3-yaml python3-cryptography python3-swiftclient)")
    lines = [t for t in tail if t.strip()][-8:]
    return f"nbdkit exited with status {rc} before serving{hint}:\n  " + "\n  ".join(lines)


def _check_socket_free(path: str) -> None:
    """A socket file someone listens on is in use (UsageError); one nobody listens on is a leftover
    of a killed server and is removed; anything else at that path is refused."""
    if not os.path.lexists(path):
        return
    import stat
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise UsageError(f"{path} exists and is not a socket: choose another --socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        _unlink(path)
        return
    finally:
        s.close()
    raise UsageError(f"socket {path} is in use: another server listens on it (choose another --socket)")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

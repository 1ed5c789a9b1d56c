"""A throwaway OpenStack Swift all-in-one for tests and benchmarks.

    with SwiftServer(tmp_path / "swift") as swift:
        store = SwiftStore(SwiftConfig(auth_url=swift.auth_url, user=swift.user, key=swift.key, ...))

What it runs (Debian's packages: swift-{proxy,account,container,object}-server, memcached):
memcached plus the four servers, one replica, one device directory under `base_dir`, all bound
to 127.0.0.1 on ports picked free at start() so that two runs never collide. tempauth accounts:
`test:tester/testing` and `test2:tester2/testing2`, each `.admin` of its own account only.

Facts it relies on (measured, see shared notes/swift.md):
- Debian has no swift-init: the servers are started directly, each in its own session (process
  group = server + its forked workers). stop() signals only the groups it started, by PID.
- The servers read hash prefix/suffix, storage policies and constraints from
  /etc/swift/swift.conf (Debian's; `swift_dir` only moves the rings), so this harness writes
  rings and server confs only. The listing page limit therefore stays Swift's default 10,000.
- No /dev/log here: servers run with `-v` and log to base_dir/log/<name>.log.
- `error_suppression_interval` is 1 s (default 60): after a killed object server the proxy would
  otherwise refuse the only replica for a minute.
- Servers are exec'd through `setpriv --pdeathsig TERM` from one long-lived spawner thread, so
  they go away even when the test process is SIGKILLed (no orphaned Swift holding ports).
- ext4 gives ~4 KiB of xattrs per file: fine for objects with small metadata. start() checks
  that the device directory takes user xattrs at all.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HOST = "127.0.0.1"
SERVERS = ("account", "container", "object", "proxy")
ALL = ("memcached",) + SERVERS
# name -> (account, user, key); the user is "<account>:<name>" as tempauth expects
ACCOUNTS = {
    "test": ("test:tester", "testing"),
    "test2": ("test2:tester2", "testing2"),
}

_RING_SCRIPT = r"""
import sys
from swift.common.ring import RingBuilder
etc, part_power = sys.argv[1], int(sys.argv[2])
for name, port in zip(("object", "container", "account"), map(int, sys.argv[3:6])):
    b = RingBuilder(part_power, 1, 1)
    b.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": port,
               "replication_ip": "127.0.0.1", "replication_port": port,
               "device": "d1", "weight": 100.0, "meta": ""})
    b.rebalance()
    b.save(f"{etc}/{name}.builder")
    b.get_ring().save(f"{etc}/{name}.ring.gz")
"""


# Adds object rows straight into a container's database, the way replication merges them: a
# listing of 10,000+ names in a second instead of minutes of PUTs (~180 small PUTs/s here).
_SEED_SCRIPT = r"""
import json, os, sys
from swift.common.ring import Ring
from swift.common.utils import Timestamp, hash_path, storage_directory, MD5_OF_EMPTY_STRING
from swift.container.backend import ContainerBroker, DATADIR
etc, devices, account, container = sys.argv[1:5]
names = json.load(sys.stdin)
part, nodes = Ring(etc, ring_name="container").get_nodes(account, container)
h = hash_path(account, container)
db = os.path.join(devices, nodes[0]["device"], storage_directory(DATADIR, part, h), h + ".db")
if not os.path.exists(db):
    sys.exit("no container database %s: create the container first" % db)
broker = ContainerBroker(db, account=account, container=container)
now = Timestamp.now().internal
broker.merge_items([{"name": n, "created_at": now, "size": 0, "etag": MD5_OF_EMPTY_STRING,
                     "content_type": "application/octet-stream", "deleted": 0,
                     "storage_policy_index": 0} for n in names])
"""


class SwiftHarnessError(RuntimeError):
    pass


def _canon(name: str) -> str:
    n = name[: -len("-server")] if name.endswith("-server") else name
    if n not in ALL:
        raise ValueError(f"unknown swift process {name!r}; one of {', '.join(ALL)}")
    return n


def _free_ports(count: int) -> List[int]:
    """Ports the kernel hands out for bind(0), all held open at once so they are distinct."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _group_members(pgid: int) -> List[int]:
    """Live (non-zombie) PIDs whose process group is pgid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def missing_prerequisites(bin_dir: str = "/usr/bin", python: str = "/usr/bin/python3") -> List[str]:
    """What this machine lacks to run SwiftServer; empty when all is there."""
    missing = [
        p for p in [f"{bin_dir}/swift-{s}-server" for s in SERVERS] + ["/usr/bin/memcached", python]
        if not os.access(p, os.X_OK)
    ]
    if not os.path.isfile("/etc/swift/swift.conf"):
        missing.append("/etc/swift/swift.conf")
    return missing


class SwiftServer:
    def __init__(
        self,
        base_dir,
        *,
        bin_dir: str = "/usr/bin",
        python: str = "/usr/bin/python3",
        workers: int = 1,
        part_power: int = 6,
        error_suppression_interval: float = 1.0,
        start_timeout: float = 30.0,
        die_with_parent: bool = True,
    ):
        self.base_dir = Path(base_dir).resolve()
        self.bin_dir = bin_dir
        self.python = python
        self.workers = workers
        self.part_power = part_power
        self.error_suppression_interval = error_suppression_interval
        self.start_timeout = start_timeout
        self.etc = self.base_dir / "etc"
        self.log_dir = self.base_dir / "log"
        self.devices = self.base_dir / "srv" / "node"
        self.ports: Dict[str, int] = {}
        self._procs: Dict[str, subprocess.Popen] = {}
        self._all_pids: List[int] = []  # every PID ever started, for the caller's checks
        self._spawner: Optional[ThreadPoolExecutor] = None
        self._setpriv = shutil.which("setpriv") if die_with_parent else None
        self._atexit = False

    # ---- public facts -------------------------------------------------------------------
    @property
    def auth_url(self) -> str:
        return f"http://{HOST}:{self.ports['proxy']}/auth/v1.0"

    @property
    def user(self) -> str:
        return ACCOUNTS["test"][0]

    @property
    def key(self) -> str:
        return ACCOUNTS["test"][1]

    @property
    def user2(self) -> str:
        return ACCOUNTS["test2"][0]

    @property
    def key2(self) -> str:
        return ACCOUNTS["test2"][1]

    def credentials(self, account: str = "test") -> Tuple[str, str]:
        return ACCOUNTS[account]

    def storage_url(self, account: str = "test") -> str:
        return f"http://{HOST}:{self.ports['proxy']}/v1/AUTH_{account}"

    def env(self, account: str = "test") -> Dict[str, str]:
        user, key = ACCOUNTS[account]
        return {"ST_AUTH": self.auth_url, "ST_USER": user, "ST_KEY": key}

    def pids(self) -> Dict[str, int]:
        """PIDs (= process group ids) of the processes currently started by this harness."""
        return {n: p.pid for n, p in self._procs.items()}

    @property
    def all_pids(self) -> List[int]:
        return list(self._all_pids)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{_canon(name)}.log"

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "SwiftServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SwiftServer":
        missing = missing_prerequisites(self.bin_dir, self.python)
        if missing:
            raise SwiftHarnessError("cannot run Swift, missing: " + ", ".join(missing))
        if self._procs:
            raise SwiftHarnessError("already started")
        for d in (self.etc, self.log_dir, self.devices / "d1"):
            d.mkdir(parents=True, exist_ok=True)
        self._check_xattrs()
        self.ports = dict(zip(ALL, _free_ports(len(ALL))))
        self._write_confs()
        self._build_rings()
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        try:
            for name in ALL:
                self._spawn(name)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process group this harness started, SIGKILL what is left after timeout."""
        if self._spawner is not None:  # let a spawn in flight (another thread) finish first
            self._spawner.shutdown(wait=True)
            self._spawner = None
        procs = list(self._procs.items())
        self._procs.clear()
        for _, proc in reversed(procs):
            self._signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in procs:
            self._reap(proc, deadline)
        if self._atexit:
            atexit.unregister(self.stop)
            self._atexit = False

    def kill_server(self, name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal one server's process group (default SIGKILL: a crash) and wait until it is gone."""
        name = _canon(name)
        proc = self._procs.pop(name, None)
        if proc is None:
            raise SwiftHarnessError(f"{name} is not running under this harness")
        self._signal_group(proc, sig)
        self._reap(proc, time.monotonic() + timeout)

    def start_server(self, name: str, wait: bool = True) -> None:
        """(Re)start one process on its original port; by default wait until it answers."""
        name = _canon(name)
        if name in self._procs and self._procs[name].poll() is None:
            raise SwiftHarnessError(f"{name} is already running (pid {self._procs[name].pid})")
        self._spawn(name)
        if wait:
            deadline = time.monotonic() + self.start_timeout
            self._wait_until(deadline, lambda: self._answers(name), f"{name} to answer")
            if name == "proxy":
                self.wait_ready()

    def stop_proxy(self) -> None:
        self.kill_server("proxy", signal.SIGTERM)

    def start_proxy(self) -> None:
        self.start_server("proxy")

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Every process answers, and both accounts can authenticate and HEAD their account."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)

        def ready() -> bool:
            if not all(self._answers(n) for n in ALL):
                return False
            return all(self._auth_head(a) for a in ACCOUNTS)

        self._wait_until(deadline, ready, "Swift to become ready")

    def seed_listing(self, container: str, names: List[str], account: str = "test") -> None:
        """Make `names` appear in the container's listing without uploading them (test-only:
        the rows exist, the objects do not). The container must exist already."""
        args = [self.python, "-I", "-c", _SEED_SCRIPT, str(self.etc), str(self.devices),
                f"AUTH_{account}", container]
        r = subprocess.run(args, cwd=self.base_dir, input=json.dumps(list(names)),
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SwiftHarnessError(f"seeding {container} failed: {r.stderr.strip()[-2000:]}")

    # ---- internals ----------------------------------------------------------------------
    def _check_xattrs(self) -> None:
        probe = self.devices / "d1" / f".xattr-probe-{os.getpid()}"
        probe.write_bytes(b"")
        try:
            os.setxattr(probe, "user.ekko.probe", b"x" * 1024)
        except OSError as e:
            raise SwiftHarnessError(
                f"{probe.parent} does not take user xattrs ({e.strerror}); "
                "Swift's object server needs them: use an ext4/XFS/tmpfs(>=6.6) directory"
            ) from e
        finally:
            probe.unlink()

    def _common(self, name: str) -> str:
        return (
            "[DEFAULT]\n"
            f"bind_ip = {HOST}\n"
            f"bind_port = {self.ports[name]}\n"
            f"workers = {self.workers}\n"
            f"user = {self._run_user()}\n"  # root here: servers drop privileges to this user
            f"swift_dir = {self.etc}\n"
            f"log_name = {name}-server\n"
            # no /dev/log: swift would fall back to UDP syslog; -v sends everything to stdout
            "log_address = /nonexistent\n"
        )

    @staticmethod
    def _run_user() -> str:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name

    def _write_confs(self) -> None:
        for name in ("account", "container", "object"):
            text = self._common(name) + (
                f"devices = {self.devices}\n"
                "mount_check = false\n"
                "disable_fallocate = true\n"
                "fallocate_reserve = 0\n"
                "[pipeline:main]\n"
                f"pipeline = healthcheck {name}-server\n"
                f"[app:{name}-server]\n"
                f"use = egg:swift#{name}\n"
                "[filter:healthcheck]\n"
                "use = egg:swift#healthcheck\n"
            )
            (self.etc / f"{name}-server.conf").write_text(text)
        users = "".join(
            f"user_{u.split(':')[0]}_{u.split(':')[1]} = {k} .admin\n" for u, k in ACCOUNTS.values()
        )
        proxy = self._common("proxy") + (
            "[pipeline:main]\n"
            "pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats"
            " bulk tempauth copy slo dlo versioned_writes proxy-logging proxy-server\n"
            "[app:proxy-server]\n"
            "use = egg:swift#proxy\n"
            "allow_account_management = true\n"
            "account_autocreate = true\n"
            f"error_suppression_interval = {self.error_suppression_interval}\n"
            "[filter:tempauth]\n"
            "use = egg:swift#tempauth\n" + users +
            "[filter:cache]\n"
            "use = egg:swift#memcache\n"
            f"memcache_servers = {HOST}:{self.ports['memcached']}\n"
        )
        for f in ("catch_errors", "gatekeeper", "healthcheck", "listing_formats", "bulk", "copy", "slo", "dlo",
                  "versioned_writes"):
            proxy += f"[filter:{f}]\nuse = egg:swift#{f}\n"
        proxy += "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n"
        (self.etc / "proxy-server.conf").write_text(proxy)

    def _build_rings(self) -> None:
        # -I: no cwd/script dir on sys.path (a tests/harness dir there would shadow `swift`)
        args = [self.python, "-I", "-c", _RING_SCRIPT, str(self.etc), str(self.part_power)]
        args += [str(self.ports[n]) for n in ("object", "container", "account")]
        r = subprocess.run(args, cwd=self.base_dir, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SwiftHarnessError(f"ring build failed ({self.python}): {r.stderr.strip()[-2000:]}")

    def _command(self, name: str) -> List[str]:
        if name == "memcached":
            return ["/usr/bin/memcached", "-l", HOST, "-p", str(self.ports[name]), "-U", "0",
                    "-m", "64", "-t", "2", "-u", self._run_user()]
        return [f"{self.bin_dir}/swift-{name}-server", str(self.etc / f"{name}-server.conf"), "-v"]

    def _spawn(self, name: str) -> None:
        # Forked from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that forked
        # the child exits, so a short-lived caller thread (a restart timer) must not fork.
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swift-spawner")
        self._spawner.submit(self._spawn_now, name).result()

    def _spawn_now(self, name: str) -> None:
        cmd = self._command(name)
        if self._setpriv:  # servers die with us even if we are SIGKILLed (no orphaned Swift)
            cmd = [self._setpriv, "--pdeathsig", "TERM", "--"] + cmd
        with open(self.log_path(name), "ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} starting {name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.base_dir, start_new_session=True, close_fds=True,
            )
        self._procs[name] = proc
        self._all_pids.append(proc.pid)

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        # proc.pid leads its own group (start_new_session). While the Popen is not reaped the PID
        # cannot have been reused; after that, only signal if the group still has members.
        if proc.poll() is None or _group_members(proc.pid):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    @staticmethod
    def _reap(proc: subprocess.Popen, deadline: float) -> None:
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_members(proc.pid):
                return
            time.sleep(0.05)
        SwiftServer._signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + 5
        while _group_members(proc.pid) and time.monotonic() < end:
            time.sleep(0.05)

    def _answers(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is None:
            return False
        if proc.poll() is not None:
            raise SwiftHarnessError(
                f"{name} exited with status {proc.returncode}; log tail:\n{self.log_tail(name)}"
            )
        port = self.ports[name]
        if name == "memcached":
            try:
                with socket.create_connection((HOST, port), timeout=1) as s:
                    s.sendall(b"version\r\n")
                    return s.recv(64).startswith(b"VERSION")
            except OSError:
                return False
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthcheck", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _auth_head(self, account: str) -> bool:
        user, key = ACCOUNTS[account]
        try:
            req = urllib.request.Request(self.auth_url, headers={"X-Auth-User": user, "X-Auth-Key": key})
            with urllib.request.urlopen(req, timeout=2) as r:
                url, token = r.headers["X-Storage-Url"], r.headers["X-Auth-Token"]
            req = urllib.request.Request(url, headers={"X-Auth-Token": token}, method="HEAD")
            with urllib.request.urlopen(req, timeout=2) as r:
                return 200 <= r.status < 300
        except (OSError, urllib.error.URLError, KeyError):
            return False

    def _wait_until(self, deadline: float, check, what: str) -> None:
        while True:
            if check():
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"== {n}.log\n{self.log_tail(n, 8)}" for n in ALL)
                raise SwiftHarnessError(f"timed out waiting for {what}; log tails:\n{tails}")
            time.sleep(0.05)


if __name__ == "__main__":  # manual use: python -m tests.harness.swift [BASE_DIR]
    import tempfile

    base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ekko-swift-")
    with SwiftServer(base) as s:
        print(f"export ST_AUTH={s.auth_url} ST_USER={s.user} ST_KEY={s.key}  # pids {s.pids()}")
        print("Ctrl-C to stop", file=sys.stderr)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass

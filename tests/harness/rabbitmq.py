"""A real RabbitMQ (Debian's rabbitmq-server) for the tests: its own node name, its own epmd, ports
on 127.0.0.1 only, its own data, log and config directory; stopped by PID.

How Debian starts it, and what this copies: /usr/lib/rabbitmq/bin/rabbitmq-server reads
rabbitmq-env (the RABBITMQ_* variables below pick the node name, the directories, the config file
and the Erlang distribution port) and execs `erl`. With RABBITMQ_ALLOW_INPUT set it execs in place,
so the PID we start is the node's beam.smp itself (without it a wrapper shell would stay in
between); `-noinput` is then passed by hand. An Erlang node needs epmd (the port mapper): the node
would start a daemonized one that outlives it and belongs to nobody, so we start epmd ourselves,
in the foreground on a port of our own (ERL_EPMD_PORT), and stop it by its PID after the node.

    RABBITMQ_NODENAME          ekko-test-<pid>-<n>@localhost: never a system node's name
    RABBITMQ_NODE_IP_ADDRESS/  AMQP on 127.0.0.1:<free port> (also in the config file)
    RABBITMQ_NODE_PORT
    RABBITMQ_DIST_PORT         the node's distribution port; bound to 127.0.0.1 by
                               `-kernel inet_dist_use_interface`
    ERL_EPMD_PORT/_ADDRESS     our epmd
    RABBITMQ_MNESIA_BASE, RABBITMQ_LOG_BASE, RABBITMQ_CONFIG_FILE, RABBITMQ_ENABLED_PLUGINS_FILE,
    RABBITMQ_CONF_ENV_FILE, HOME (the Erlang cookie)   all in the server's own directory

A restart (stop + start) keeps the directory and the ports: the same broker comes back, empty of
the non-durable queues, as after a real restart.

Both run under `setpriv --pdeathsig TERM` (which execs, so the PIDs stay theirs): a test run that
is killed before its teardown does not leave a node behind. start() and restart() are called from
the test's own (main) thread, which lives as long as the run.
"""

import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

HOST = "127.0.0.1"
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT_S = 120          # a cold boot takes 5-15 s here; much more under the shared machine's load
_seq = itertools.count()


class RabbitHarnessError(Exception):
    pass


def _die_with_us(cmd: List[str]) -> List[str]:
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


def missing_prerequisites() -> List[str]:
    """What this machine lacks to run RabbitServer; empty when all is there."""
    return [p for p in (SERVER, shutil.which("epmd") or "epmd") if not os.access(p, os.X_OK)]


def _free_ports(count: int) -> List[int]:
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


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


class RabbitServer:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.amqp_port, self.dist_port, self.epmd_port = _free_ports(3)
        self.node = f"ekko-test-{os.getpid()}-{next(_seq)}@localhost"
        self.user = "ekko"
        self.password = "pw-" + secrets.token_hex(12)     # tests check it never shows in a log
        self.vhost = "/"
        self.epmd: Optional[subprocess.Popen] = None
        self.proc: Optional[subprocess.Popen] = None
        self.all_pids: List[int] = []

    @property
    def transport_url(self) -> str:
        return f"rabbit://{self.user}:{self.password}@{HOST}:{self.amqp_port}/"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.out"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _env(self) -> dict:
        d = self.dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(d),
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": HOST, "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": HOST,
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "RABBITMQ_ALLOW_INPUT": "1",          # exec in place: our PID is the node's
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def _write_confs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {HOST}:{self.amqp_port}\n"
            f"default_user = {self.user}\ndefault_pass = {self.password}\n"
            "log.console = false\nlog.file.level = info\n"
            "disk_free_limit.absolute = 10MB\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "advanced.config").write_text("[].\n")

    def start(self) -> "RabbitServer":
        if self.proc is not None and self.proc.poll() is None:
            raise RabbitHarnessError(f"RabbitMQ already runs (pid {self.proc.pid})")
        self._write_confs()
        env = self._env()
        out = open(self.log_path, "ab")
        try:
            if self.epmd is None or self.epmd.poll() is not None:
                epmd = [shutil.which("epmd") or "epmd", "-port", str(self.epmd_port), "-address", HOST]
                self.epmd = subprocess.Popen(_die_with_us(epmd), env=env, stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=out, start_new_session=True)
                self.all_pids.append(self.epmd.pid)
                self._wait(lambda: _accepts(self.epmd_port), 20, "epmd")
            self.proc = subprocess.Popen(_die_with_us([SERVER]), env=env, cwd=str(self.dir), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, start_new_session=True)
            self.all_pids.append(self.proc.pid)
        finally:
            out.close()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """The AMQP listener opens last in the boot: accepting connections means ready."""
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RabbitHarnessError(f"rabbitmq-server exited ({self.proc and self.proc.returncode}):\n"
                                         f"{self.log_tail()}")
            return _accepts(self.amqp_port)
        self._wait(ready, timeout, "RabbitMQ's AMQP listener")

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise RabbitHarnessError(f"{what} not up within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop_server(self, timeout: float = 60.0) -> None:
        """The node only (epmd stays, as a restart needs it)."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)       # Erlang >= 19: SIGTERM is a clean init:stop()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def restart(self) -> None:
        self.stop_server()
        self.start()

    def stop(self) -> None:
        self.stop_server()
        e, self.epmd = self.epmd, None
        if e is not None and e.poll() is None:
            e.terminate()
            try:
                e.wait(10)
            except subprocess.TimeoutExpired:
                e.kill()
                e.wait(10)

    def __enter__(self) -> "RabbitServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

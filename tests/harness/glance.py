"""A throwaway OpenStack Glance (image service) for tests and benchmarks.

    with GlanceServer(tmp_dir) as glance:
        session = glance.session()          # keystoneauth1 Session (NoAuth) on glance.url

What it runs: Glance from PyPI (GLANCE_PIN) in its own venv, made once under VENV_DIR (a cache
directory, like the test guest's; `python -m tests.harness.glance install` makes it, ~1 min),
served by gunicorn (Glance 33 refuses its old standalone eventlet `glance-api`: "Deploy Glance
under a WSGI server using glance.wsgi.api:application"), one worker, on 127.0.0.1 and a port
picked free at start(). SQLite database (`glance-manage db_sync`), the file store under
base_dir/images.

No Keystone: the paste flavor is empty, so Glance's pipeline ends in `unauthenticated-context`
(every request is an admin of no project). ekko's code talks to it through a keystoneauth1
session all the same (keystoneauth1.noauth.NoAuth); against a real Keystone only the session's
auth plugin changes.

Facts it relies on (measured here): gunicorn's sync worker takes a chunked request body
(Transfer-Encoding: chunked), which is what a streamed upload sends; Glance reads the config
directory from OS_GLANCE_CONFIG_DIR (glance-api.conf in it). gunicorn runs in a session of its
own; stop() signals that process group (gunicorn's master and its worker), by the PID started.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional

HOST = "127.0.0.1"
GLANCE_PIN = ["glance==33.0.0", "gunicorn==27.0.1"]
VENV_DIR = os.environ.get("EKKO_TEST_GLANCE_VENV", "/var/cache/ekko-test-glance/venv")


def venv_python() -> str:
    return os.path.join(VENV_DIR, "bin", "python")


def missing_prerequisites() -> List[str]:
    """What this machine lacks to run GlanceServer (after install())."""
    missing = [p for p in ("glance-manage", "gunicorn") if not os.access(os.path.join(VENV_DIR, "bin", p), os.X_OK)]
    return [f"{VENV_DIR}/bin/{p}" for p in missing]


def install() -> None:
    """Make the venv (Python 3.11, as ekko's) and put Glance + gunicorn into it; idempotent."""
    if not os.path.exists(venv_python()):
        subprocess.run(["/usr/bin/python3.11", "-m", "venv", VENV_DIR], check=True)
    if missing_prerequisites():
        subprocess.run([venv_python(), "-m", "pip", "install", "-q", "--disable-pip-version-check", *GLANCE_PIN],
                       check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class GlanceServer:
    def __init__(self, base_dir: str):
        self.base_dir = os.path.abspath(base_dir)
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def images_dir(self) -> str:
        return os.path.join(self.base_dir, "images")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "gunicorn.log")

    def _write_config(self) -> str:
        etc = os.path.join(self.base_dir, "etc")
        for d in (etc, self.images_dir, os.path.join(self.base_dir, "staging"), os.path.join(self.base_dir, "tasks")):
            os.makedirs(d, exist_ok=True)
        paste = os.path.join(VENV_DIR, "etc", "glance", "glance-api-paste.ini")
        b = self.base_dir
        with open(os.path.join(etc, "glance-api.conf"), "w") as f:
            f.write(f"""[DEFAULT]
enabled_backends = fs:file
log_file = {b}/glance-api.log
[database]
connection = sqlite:///{b}/glance.sqlite
[paste_deploy]
flavor =
config_file = {paste}
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {self.images_dir}
[os_glance_staging_store]
filesystem_store_datadir = {b}/staging
[os_glance_tasks_store]
filesystem_store_datadir = {b}/tasks
[oslo_policy]
# Without Keystone every request is an admin of no project; Glance 33's new policy defaults
# want a project scope and refuse it (403 on GET /v2/images).
enforce_new_defaults = false
enforce_scope = false
""")
        return etc

    def start(self, timeout: float = 90.0) -> "GlanceServer":
        etc = self._write_config()
        env = dict(os.environ, OS_GLANCE_CONFIG_DIR=etc)
        bin_dir = os.path.join(VENV_DIR, "bin")
        subprocess.run([os.path.join(bin_dir, "glance-manage"), "--config-file", os.path.join(etc, "glance-api.conf"),
                        "db_sync"], check=True, capture_output=True, env=env, cwd=self.base_dir, timeout=120)
        self.port = _free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(bin_dir, "gunicorn"), "-b", f"{HOST}:{self.port}", "-w", "1", "--timeout", "3600",
                 "--control-socket", os.path.join(self.base_dir, "gunicorn.ctl"),     # not ~/.gunicorn: one per server
                 "glance.wsgi.api:application"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base_dir,
                start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until GET /v2/images answers 200 (Glance loaded, its database reachable)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glance (gunicorn) exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/images", timeout=30) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:     # Glance answered, and refused: a wrong config
                raise RuntimeError(f"glance answered GET /v2/images with {e.code}: {e.read()[:300]!r}") from e
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"glance did not answer on {self.url} within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the process group started (gunicorn master + worker), SIGKILL after 20 s;
        returns when no process of the group is left alive (also after a test killed the master
        itself: its worker is then killed here)."""
        if self.proc is None:
            return
        pgid = self.proc.pid            # start_new_session: the group is the master's PID
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(10)
        try:                            # a worker that outlived its master
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while self.running_pids() and time.monotonic() < deadline:
            time.sleep(0.05)            # a killed worker is gone once signalled; only its reaping is left

    def running_pids(self) -> List[int]:
        """The processes of the group started that still run (zombies waiting to be reaped by
        init are not running: for teardown checks)."""
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid, stat in (line.split() for line in out.splitlines() if line.strip())
                if not stat.startswith("Z")]

    def session(self):
        """A keystoneauth1 Session whose every request goes to this Glance (no token)."""
        from keystoneauth1 import noauth, session
        return session.Session(auth=noauth.NoAuth(endpoint=self.url))

    def image_files(self) -> List[str]:
        return sorted(os.listdir(self.images_dir)) if os.path.isdir(self.images_dir) else []

    def __enter__(self) -> "GlanceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        install()
        print(f"glance venv: {VENV_DIR}")
    else:
        sys.exit("usage: python -m tests.harness.glance install")

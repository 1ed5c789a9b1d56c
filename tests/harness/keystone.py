"""A throwaway OpenStack Keystone (identity) for tests and benchmarks.

    with KeystoneServer(tmp_dir) as ks:
        sess = ks.session(ks.users["p1-reader"])       # keystoneauth1 Session scoped to project p1

What it runs: Keystone from PyPI (KEYSTONE_PIN) in its own venv, made once under VENV_DIR (a cache
directory, like Glance's; `python -m tests.harness.keystone install` makes it), served by
gunicorn (keystone.wsgi.api:application), one worker, on 127.0.0.1 and a port picked free at
start(). SQLite database, fernet and credential keys under base_dir; `keystone-manage db_sync`,
`fernet_setup`, `credential_setup`, `bootstrap` (admin project, user `admin` with role admin, the
roles reader < member < admin, the identity service with admin and *public* endpoints:
keystonemiddleware's auth_token looks the public one up).

Then, through Keystone's own API as that admin (keystoneauth1 + keystoneclient): two projects
(p1, p2), in each a user with `reader` and a user with `member`; the passwords are generated per
start and never printed. `register_service()` adds a service and its public endpoint to the
catalog (the ekko API, for the OpenStack CLI plugin).

gunicorn runs in a session of its own; stop() signals that process group (master and worker),
by the PID started. Keystone's own log goes to base_dir/keystone.log (it never logs passwords or
whole tokens).
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Optional

HOST = "127.0.0.1"
KEYSTONE_PIN = ["keystone==30.0.0", "gunicorn==27.0.1"]
VENV_DIR = os.environ.get("EKKO_TEST_KEYSTONE_VENV", "/var/cache/ekko-test-keystone/venv")
DOMAIN = "default"
PROJECTS = ("p1", "p2")
PROJECT_ROLES = ("reader", "member")


def venv_python() -> str:
    return os.path.join(VENV_DIR, "bin", "python")


def missing_prerequisites() -> List[str]:
    """What this machine lacks to run KeystoneServer (after install())."""
    missing = [p for p in ("keystone-manage", "gunicorn") if not os.access(os.path.join(VENV_DIR, "bin", p), os.X_OK)]
    return [f"{VENV_DIR}/bin/{p}" for p in missing]


def install() -> None:
    """Make the venv (Python 3.11, as ekko's) and put Keystone + gunicorn into it; idempotent."""
    if not os.path.exists(venv_python()):
        subprocess.run(["/usr/bin/python3.11", "-m", "venv", VENV_DIR], check=True)
    if missing_prerequisites():
        subprocess.run([venv_python(), "-m", "pip", "install", "-q", "--disable-pip-version-check", *KEYSTONE_PIN],
                       check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class User:
    """A user of the test cloud, scoped to one project (admin: the admin project)."""
    name: str
    password: str
    project_name: str
    role: str
    user_id: str = ""
    project_id: str = ""

    def __repr__(self) -> str:         # the password stays out of test output and tracebacks
        return f"User({self.name!r}, project={self.project_name!r}, role={self.role!r})"


class KeystoneServer:
    def __init__(self, base_dir: str):
        self.base_dir = os.path.abspath(base_dir)
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.users: Dict[str, User] = {}           # "admin", "p1-reader", "p1-member", "p2-reader", ...
        self.project_ids: Dict[str, str] = {}      # "p1" -> Keystone's project id

    @property
    def url(self) -> str:
        """The identity endpoint (auth_url) with its version: http://127.0.0.1:PORT/v3."""
        return f"http://{HOST}:{self.port}/v3"

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "gunicorn.log")

    @property
    def conf_path(self) -> str:
        return os.path.join(self.base_dir, "etc", "keystone.conf")

    def _write_config(self) -> None:
        b = self.base_dir
        for d in ("etc", "fernet-keys", "credential-keys"):
            os.makedirs(os.path.join(b, d), mode=0o700, exist_ok=True)
        with open(self.conf_path, "w") as f:
            f.write(f"""[DEFAULT]
log_file = {b}/keystone.log
[database]
connection = sqlite:///{b}/keystone.sqlite
[identity]
# bcrypt's cheapest cost: every token issued checks a password (the default, 12, costs ~0.3 s)
password_hash_rounds = 4
[token]
provider = fernet
expiration = 3600
[fernet_tokens]
key_repository = {b}/fernet-keys
[credential]
key_repository = {b}/credential-keys
""")

    def _manage(self, *args: str) -> None:
        env = dict(os.environ, OS_KEYSTONE_CONFIG_FILES=self.conf_path)
        r = subprocess.run([os.path.join(VENV_DIR, "bin", "keystone-manage"), "--config-file", self.conf_path, *args],
                           capture_output=True, text=True, env=env, cwd=self.base_dir, timeout=180)
        if r.returncode != 0:
            # args[0] only: bootstrap's arguments carry the admin password
            raise RuntimeError(f"keystone-manage {args[0]} exited {r.returncode}: {r.stderr[-2000:]}")

    def start(self, timeout: float = 90.0) -> "KeystoneServer":
        self._write_config()
        self.port = _free_port()
        admin_password = secrets.token_urlsafe(18)
        self._manage("db_sync")
        self._manage("fernet_setup", "--keystone-user", str(os.getuid()), "--keystone-group", str(os.getgid()))
        self._manage("credential_setup", "--keystone-user", str(os.getuid()), "--keystone-group", str(os.getgid()))
        self._manage("bootstrap", f"--bootstrap-password={admin_password}",
                     "--bootstrap-admin-url", self.url, "--bootstrap-public-url", self.url,
                     "--bootstrap-region-id", "RegionOne")
        self.users["admin"] = User("admin", admin_password, "admin", "admin")
        self._spawn()
        try:
            self._wait_ready(timeout)
            self._populate()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        # Keystone's WSGI module parses sys.argv with oslo.config and refuses gunicorn's own
        # arguments: gunicorn takes them from ./gunicorn.conf.py (read from its cwd) instead.
        with open(os.path.join(self.base_dir, "gunicorn.conf.py"), "w") as f:
            f.write(f"bind = {HOST + ':' + str(self.port)!r}\nworkers = 1\n"
                    f"control_socket = {os.path.join(self.base_dir, 'gunicorn.ctl')!r}\n"   # not ~/.gunicorn
                    "wsgi_app = 'keystone.wsgi.api:application'\n")
        env = dict(os.environ, OS_KEYSTONE_CONFIG_FILES=self.conf_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(VENV_DIR, "bin", "gunicorn")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base_dir,
                start_new_session=True)

    def _wait_ready(self, timeout: float) -> None:
        """Until GET /v3 answers 200 (Keystone loaded its config and routes)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keystone (gunicorn) exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=30) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"keystone answered GET /v3 with {e.code}: {e.read()[:300]!r}") from e
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"keystone did not answer on {self.url} within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def admin_client(self):
        from keystoneclient.v3 import client
        return client.Client(session=self.session(self.users["admin"]), interface="public")

    def _populate(self) -> None:
        """p1, p2; a reader and a member in each (Keystone's default roles, made by bootstrap)."""
        ks = self.admin_client()
        admin = self.users["admin"]
        admin_project = ks.projects.find(name="admin", domain_id=DOMAIN)
        self.users["admin"] = User(admin.name, admin.password, "admin", "admin",
                                   ks.users.find(name="admin", domain_id=DOMAIN).id, admin_project.id)
        roles = {r.name: r for r in ks.roles.list()}
        for pname in PROJECTS:
            project = ks.projects.create(pname, DOMAIN, description="ekko test project")
            self.project_ids[pname] = project.id
            for role in PROJECT_ROLES:
                name, password = f"{pname}-{role}", secrets.token_urlsafe(18)
                user = ks.users.create(name, domain=DOMAIN, password=password, default_project=project.id)
                ks.roles.grant(roles[role].id, user=user.id, project=project.id)
                self.users[name] = User(name, password, pname, role, user.id, project.id)

    def register_service(self, service_type: str, name: str, url: str, region: str = "RegionOne") -> str:
        """A service and its public endpoint in the catalog, in `region` (made when it is not
        RegionOne: modules sharing this Keystone keep their endpoints apart by region); its id."""
        ks = self.admin_client()
        if region != "RegionOne" and region not in {r.id for r in ks.regions.list()}:
            ks.regions.create(id=region, description="ekko test region")
        service = ks.services.create(name, service_type, description=f"{name} (test)")
        ks.endpoints.create(service.id, url, interface="public", region=region)
        return service.id

    def unregister_service(self, service_id: str) -> None:
        """The service and its endpoints out of the catalog (what register_service added)."""
        ks = self.admin_client()
        for e in ks.endpoints.list(service=service_id):
            ks.endpoints.delete(e.id)
        ks.services.delete(service_id)

    def auth(self, user: User):
        from keystoneauth1.identity import v3
        return v3.Password(auth_url=self.url, username=user.name, password=user.password,
                           user_domain_id=DOMAIN, project_name=user.project_name, project_domain_id=DOMAIN)

    def session(self, user: User):
        """A keystoneauth1 Session as this user, scoped to their project."""
        from keystoneauth1 import session
        return session.Session(auth=self.auth(user))

    def token(self, user: User) -> str:
        """A fresh project-scoped token of this user (a secret: never print it)."""
        return str(self.session(user).get_token())

    def openrc(self, user: User) -> Dict[str, str]:
        """The OS_* environment variables the `openstack` CLI reads, for this user."""
        return {"OS_AUTH_URL": self.url, "OS_AUTH_TYPE": "password", "OS_USERNAME": user.name,
                "OS_PASSWORD": user.password, "OS_PROJECT_NAME": user.project_name,
                "OS_USER_DOMAIN_ID": DOMAIN, "OS_PROJECT_DOMAIN_ID": DOMAIN, "OS_IDENTITY_API_VERSION": "3",
                "OS_INTERFACE": "public", "OS_REGION_NAME": "RegionOne"}

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the process group started (gunicorn master + worker), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid            # start_new_session: the group is the master's PID
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

    def restart(self, timeout: float = 90.0) -> None:
        """Serve again on the same port, same database and keys (after stop())."""
        self.stop()
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def running_pids(self) -> List[int]:
        """The processes of the group started that still run (for teardown checks)."""
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "-g", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def __enter__(self) -> "KeystoneServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        install()
        print(f"keystone venv: {VENV_DIR}")
    else:
        sys.exit("usage: python -m tests.harness.keystone install")

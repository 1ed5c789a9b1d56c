"""ekko-api served for real (`ekko-api --config-file F serve`: gunicorn, keystonemiddleware's
auth_token pointing at a real Keystone) over a local store holding two Keystone projects' backups,
with tokens the real Keystone issued (keystoneauth1), and the real `openstack` CLI with the ekko
plugin against both.

One Keystone (tests/keystone_fixtures.py) and one ekko-api for the module; the store is built
once (instances' uuids from a printed seed) and the tests that change it (protect, delete) touch
only the backups they own. The Keystone-down test stops Keystone and starts it again on the same
port and keys (its tokens stay valid).
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
import yaml

from tests.harness.keystone import KeystoneServer
from tests.keystone_fixtures import keystone_server  # noqa: F401  (session fixture)
from tests.unit.api_world import backup_id, commit

HOST = "127.0.0.1"
SERVICE_TYPE = "ekko-backup"
VENV_BIN = os.path.dirname(sys.executable)
SEED = int(os.environ.get("EKKO_TEST_SEED", str(random.randrange(1 << 32))))
FERNET = re.compile(r"gAAAAA[A-Za-z0-9_=-]{60,}")          # what Keystone's fernet tokens look like


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Cloud:
    """What the module's tests share: Keystone, the served API, the store's contents."""
    ks: KeystoneServer
    url: str                                   # ekko-api's base URL (no /v1)
    log_path: str
    instances: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)   # project name -> uuid -> ids
    names: Dict[str, str] = field(default_factory=dict)                          # "a" -> instance uuid
    tokens: List[str] = field(default_factory=list, repr=False)                  # every token used (secrets)
    _by_user: Dict[str, str] = field(default_factory=dict, repr=False)

    def token(self, user: str) -> str:
        """One token per user for the module (each issue and first validation costs Keystone ~1 s here)."""
        if user not in self._by_user:
            self._by_user[user] = self.ks.token(self.ks.users[user])
            self.tokens.append(self._by_user[user])
        return self._by_user[user]

    def call(self, method: str, path: str, user: Optional[str] = None, token: Optional[str] = None,
             body: Optional[bytes] = None, json_body=None, timeout: float = 60):
        """(status, parsed JSON or raw bytes) of one request to the served API."""
        headers = {}
        if user is not None:
            token = self.token(user)
        if token is not None:
            headers["X-Auth-Token"] = token
        if json_body is not None:
            body = json.dumps(json_body).encode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def _build_store(root: str, ks: KeystoneServer, rng: random.Random):
    """p1: instance a (vda+vdb, 3 backups), b (vda, 4), d (vda, 3: the CLI tests'); p2: c (vda, 2); in the
    namespaces of the Keystone projects' ids, as the agents put a Nova instance's backups (labels project_id=...)."""
    from ekko_libvirt import config as ekko_config
    cfg = ekko_config.build({"store": {"type": "local", "path": root}})
    instances: Dict[str, Dict[str, List[str]]] = {"p1": {}, "p2": {}}
    names: Dict[str, str] = {}
    n = 0
    for pname, name, disks, count in (("p1", "a", ("vda", "vdb"), 3), ("p1", "b", ("vda",), 4),
                                      ("p2", "c", ("vda",), 2), ("p1", "d", ("vda",), 3)):
        inst = str(uuid.UUID(int=rng.getrandbits(128)))
        names[name], instances[pname][inst] = inst, []
        for i in range(count):
            n += 1
            bid = backup_id(n)
            for d in disks:
                commit(cfg, ks.project_ids[pname], inst, name, d, bid, kind="full" if i == 0 else "incremental")
            instances[pname][inst].append(bid)
    return instances, names


def _write_conf(d: str, ks: KeystoneServer, port: int, store_root: str) -> str:
    ekko_yaml = os.path.join(d, "ekko.yaml")
    with open(ekko_yaml, "w") as f:
        yaml.safe_dump({"store": {"type": "local", "path": store_root}, "state_dir": os.path.join(d, "api-state"),
                        "run_dir": os.path.join(d, "api-run")}, f)      # never the host's /var/lib/ekko
    admin = ks.users["admin"]
    path = os.path.join(d, "ekko-api.conf")
    with open(path, "w") as f:
        os.fchmod(f.fileno(), 0o600)          # the service user's password
        f.write(f"""[api]
ekko_config = {ekko_yaml}
index_path = {d}/index.sqlite
index_max_age = 0
bind = {HOST}:{port}
workers = 1
threads = 4
[keystone_authtoken]
www_authenticate_uri = {ks.url}
auth_url = {ks.url}
auth_type = password
username = {admin.name}
password = {admin.password}
project_name = admin
user_domain_id = default
project_domain_id = default
interface = public
http_request_max_retries = 1
""")
    return path


class ApiProcess:
    """`ekko-api --config-file F serve` in a session of its own; stopped by its process group."""

    def __init__(self, conf_path: str, log_path: str, url: str):
        self.conf_path, self.log_path, self.url = conf_path, log_path, url
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> None:
        # PYTHONFAULTHANDLER: a process that does not stop gets SIGSEGV before SIGKILL (stop()), and
        # its log then holds every thread's stack: what kept it (gunicorn's workers catch SIGABRT)
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([os.path.join(VENV_BIN, "ekko-api"), "--config-file", self.conf_path,
                                          "serve"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while True:            # up: it answers (401: auth_token is in front, no token given)
            if self.proc.poll() is not None:
                raise RuntimeError(f"ekko-api exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.url + "/v1/instances", timeout=10)
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ekko-api did not answer on {self.url} within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self, grace: float = 20.0) -> bool:
        """SIGTERM to the group; what is left after `grace` s gets SIGSEGV (a stack dump in the
        log: faulthandler), then SIGKILL. True when the group ended on SIGTERM alone (or was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        pgid = self.proc.pid
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running_pids() and time.monotonic() < deadline:
            self.proc.poll()                 # reap the master when it is done
            time.sleep(0.1)
        if not self.running_pids():
            self.proc.wait(10)
            return True
        for sig in (signal.SIGSEGV, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            time.sleep(1)
        self.proc.wait(10)
        return False

    def running_pids(self) -> List[int]:
        """The group's processes that still run (a zombie init has yet to reap is not one)."""
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid, stat in (line.split() for line in out.splitlines() if line.strip())
                if not stat.startswith("Z")]


@pytest.fixture(scope="module")
def cloud(keystone_server, tmp_path_factory):  # noqa: F811  (the fixture imported above)
    print(f"EKKO_TEST_SEED={SEED} (the instances' uuids)")
    d = str(tmp_path_factory.mktemp("ekko-api"))
    instances, names = _build_store(os.path.join(d, "store"), keystone_server, random.Random(SEED))
    port = _free_port()
    url = f"http://{HOST}:{port}"
    api = ApiProcess(_write_conf(d, keystone_server, port, os.path.join(d, "store")), os.path.join(d, "api.log"),
                     url)
    api.start()
    keystone_server.register_service(SERVICE_TYPE, "ekko", url)
    try:
        yield Cloud(keystone_server, url, api.log_path, instances, names)
    finally:
        api.stop()
        left = api.running_pids()
        assert not left, f"ekko-api processes still running after stop(): {left}"


def _ids(items) -> List[str]:
    return [i["id"] for i in items]


# -- the API over real tokens --------------------------------------------------------------------------
@pytest.mark.parametrize("user", ["p1-reader", "p1-member"])
def test_reader_and_member_list_and_read_their_project(cloud, user):
    a, b = cloud.names["a"], cloud.names["b"]
    status, body = cloud.call("GET", "/v1/instances", user)
    assert status == 200, body
    got = {i["id"]: i for i in body["instances"]}
    assert set(got) == {a, b, cloud.names["d"]}                        # never p2's c
    assert got[a]["name"] == "a" and got[a]["backups"] == 3
    assert got[a]["project_id"] == cloud.ks.project_ids["p1"]
    status, body = cloud.call("GET", f"/v1/instances/{a}/backups", user)
    assert status == 200 and _ids(body["backups"]) == cloud.instances["p1"][a][::-1]
    newest = cloud.instances["p1"][a][-1]
    status, body = cloud.call("GET", f"/v1/backups/{newest}", user)
    assert status == 200 and [d["disk"] for d in body["backup"]["disks"]] == ["vda", "vdb"]


def test_reader_cannot_delete_or_protect_403(cloud):
    a = cloud.names["a"]
    old = cloud.instances["p1"][a][0]
    for method, path, body in (("DELETE", f"/v1/backups/{old}", None),
                               ("PUT", f"/v1/backups/{old}/protection", {"protected": True})):
        status, answer = cloud.call(method, path, "p1-reader", json_body=body)
        assert status == 403, answer
        assert "policy does not allow" in answer["error"]["message"]
    status, answer = cloud.call("GET", f"/v1/backups/{old}", "p1-reader")
    assert status == 200 and answer["backup"]["protected"] is False          # nothing happened


def test_member_protects_and_deletes_never_the_newest_nor_a_protected_one(cloud):
    b = cloud.names["b"]
    ids = cloud.instances["p1"][b]                     # b: 4 backups, this test's own
    first, second, newest = ids[0], ids[1], ids[-1]
    status, _ = cloud.call("PUT", f"/v1/backups/{first}/protection", "p1-member", json_body={"protected": True})
    assert status == 200
    status, answer = cloud.call("DELETE", f"/v1/backups/{first}", "p1-member")
    assert status == 409 and "protected" in answer["error"]["message"]
    status, answer = cloud.call("DELETE", f"/v1/backups/{newest}", "p1-member")
    assert status == 409 and "newest" in answer["error"]["message"]
    status, _ = cloud.call("DELETE", f"/v1/backups/{second}", "p1-member")
    assert status == 204
    status, answer = cloud.call("GET", f"/v1/instances/{b}/backups", "p1-reader")
    assert status == 200 and _ids(answer["backups"]) == [ids[3], ids[2], first]
    assert [x["protected"] for x in answer["backups"]] == [False, False, True]
    status, _ = cloud.call("PUT", f"/v1/backups/{first}/protection", "p1-member", json_body={"protected": False})
    assert status == 200
    status, _ = cloud.call("DELETE", f"/v1/backups/{first}", "p1-member")
    assert status == 204
    cloud.instances["p1"][b] = [ids[2], ids[3]]


@pytest.mark.parametrize("user", ["p2-reader", "p2-member"])
def test_other_projects_ids_answer_404(cloud, user):
    a = cloud.names["a"]
    old, newest = cloud.instances["p1"][a][0], cloud.instances["p1"][a][-1]
    # (method, path, body, needs member): policy answers before the lookup, so a reader gets 403 there
    for method, path, body, member in (
            ("GET", f"/v1/instances/{a}/backups", None, False), ("GET", f"/v1/backups/{newest}", None, False),
            ("GET", f"/v1/backups/{newest}/files?disk=vda&path=/", None, True),
            ("POST", f"/v1/backups/{newest}/restore", {"image_name": "x", "disk": "vda"}, True)):
        status, answer = cloud.call(method, path, user, json_body=body)
        want = 403 if member and user == "p2-reader" else 404
        assert status == want, (method, path, answer)
    if user == "p2-member":
        for method, path, body in (("DELETE", f"/v1/backups/{old}", None),
                                   ("PUT", f"/v1/backups/{old}/protection", {"protected": True})):
            status, answer = cloud.call(method, path, user, json_body=body)
            assert status == 404, (method, path, answer)
    status, answer = cloud.call("GET", "/v1/instances", user)
    assert status == 200 and _ids(answer["instances"]) == [cloud.names["c"]]
    status, answer = cloud.call("GET", f"/v1/backups/{old}", "p1-reader")
    assert status == 200 and answer["backup"]["protected"] is False      # p2 changed nothing of p1's


@pytest.mark.parametrize("token", [None, "", "not-a-token", "gAAAAABfake" + "x" * 170])
def test_no_token_or_a_bad_one_is_401(cloud, token):
    status, _ = cloud.call("GET", "/v1/instances", token=token)
    assert status == 401


def test_admin_all_projects_sees_both_projects_others_403(cloud):
    """?all_projects: admin sees both projects; a member of p1 is refused (403), not widened."""
    status, answer = cloud.call("GET", "/v1/instances?all_projects=1", "admin")
    assert status == 200, answer
    projects = {i["project_id"] for i in answer["instances"]}
    assert projects == {cloud.ks.project_ids["p1"], cloud.ks.project_ids["p2"]}
    assert cloud.names["c"] in _ids(answer["instances"]) and cloud.names["a"] in _ids(answer["instances"])
    for user in ("p1-reader", "p1-member"):
        status, answer = cloud.call("GET", "/v1/instances?all_projects=1", user)
        assert status == 403 and "all_projects" in answer["error"]["message"]


@pytest.mark.parametrize("body,code,message", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"protected": true, "evil": 1}', 400, "unknown field"),
    (b'{"protected": "yes"}', 400, "must be a bool"),
    (b"[true]", 400, "JSON object"),
    (b"{}", 400, "missing field"),
    (b'{"protected": true, "pad": "' + b"A" * (70 * 1024) + b'"}', 413, ""),
], ids=["malformed", "unknown-field", "wrong-type", "not-an-object", "missing", "huge"])
def test_hostile_input_is_4xx_with_a_message(cloud, body, code, message):
    old = cloud.instances["p1"][cloud.names["a"]][0]
    status, answer = cloud.call("PUT", f"/v1/backups/{old}/protection", "p1-member", body=body)
    assert status == code, answer
    assert answer["error"]["code"] == code and message in answer["error"]["message"]
    status, answer = cloud.call("GET", f"/v1/backups/{old}", "p1-reader")
    assert answer["backup"]["protected"] is False


def test_hostile_paths_and_queries_are_4xx(cloud):
    for path, code in (("/v1/backups/..%2F..%2Fetc", 404), ("/v1/instances/not-a-uuid/backups", 404),
                       ("/v1/instances?limit=0", 400), ("/v1/instances?limit=99999999", 400),
                       ("/v1/instances?evil=1", 400), ("/v1/backups/" + "a" * 300, 404)):
        status, answer = cloud.call("GET", path, "p1-reader")
        assert status == code, (path, answer)
        assert answer["error"]["message"], path
    status, answer = cloud.call("GET", "/v1/backups/" + "a" * 5000, "p1-reader")     # gunicorn's limit: 4094
    assert status == 414 and b"Request Line is too large" in answer


def test_keystone_down_is_503_with_a_message_and_no_stack_trace(cloud):
    """A token the API has not seen yet (auth_token caches the ones it validated) while Keystone
    is stopped: 503, a message, no traceback; Keystone back: the same token works."""
    fresh = cloud.ks.token(cloud.ks.users["p1-reader"])
    cloud.tokens.append(fresh)
    cloud.ks.stop()
    try:
        status, answer = cloud.call("GET", "/v1/instances", token=fresh)
    finally:
        cloud.ks.restart()
    assert status == 503, answer
    print("503 answer:", answer)
    from ekko_libvirt.api.app import KEYSTONE_DOWN
    assert answer == {"error": {"code": 503, "message": KEYSTONE_DOWN}}, answer     # the API's JSON error
    text = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    assert b"Traceback" not in text and b'File "' not in text
    assert text.strip(), "a 503 without a message"
    status, answer = cloud.call("GET", "/v1/instances", token=fresh)
    assert status == 200, answer


def test_usage_of_each_project(cloud):
    status, u1 = cloud.call("GET", "/v1/usage", "p1-reader")
    status2, u2 = cloud.call("GET", "/v1/usage", "p2-reader")
    assert status == status2 == 200
    assert u2["usage"]["logical_bytes"] == 2 * (4 << 20)               # c: 2 backups of a 4 MiB disk
    assert u1["usage"]["logical_bytes"] > u2["usage"]["logical_bytes"]


# -- the real `openstack` CLI with the ekko plugin ---------------------------------------------------------
def osc(cloud: Cloud, user: str, *args: str, ok: bool = True, **env_over: str) -> subprocess.CompletedProcess:
    """`openstack ARGS` as `user` (OS_* from Keystone, nothing else of this process's OS_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update(cloud.ks.openrc(cloud.ks.users[user]), **env_over)
    r = subprocess.run([os.path.join(VENV_BIN, "openstack"), *args], capture_output=True, text=True, env=env,
                       timeout=120)
    leak = FERNET.search(r.stdout + r.stderr) is not None        # a bool: the failure must not print it
    assert not leak, f"a token in the output of openstack {' '.join(args[:3])}"
    if ok:
        assert r.returncode == 0, (args, r.returncode, r.stderr[-2000:])
    else:
        assert r.returncode != 0, (args, r.stdout[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r


def test_cli_instance_and_backup_lists_equal_the_api(cloud):
    """The endpoint from the token's catalog (service type ekko-backup): no URL given."""
    got = json.loads(osc(cloud, "p1-reader", "ekko", "instance", "list", "-f", "json").stdout)
    _, api = cloud.call("GET", "/v1/instances", "p1-reader")
    assert sorted((i["ID"], i["Name"], i["Backups"], i["Last Backup"]) for i in got) == sorted(
        (i["id"], i["name"], i["backups"], i["last_backup"]["id"]) for i in api["instances"])
    a = cloud.names["a"]
    got = json.loads(osc(cloud, "p1-reader", "ekko", "backup", "list", a, "-f", "json").stdout)
    _, api = cloud.call("GET", f"/v1/instances/{a}/backups", "p1-reader")
    assert [(b["ID"], b["Created"], b["Kind"], b["Result"], b["Consistency"], b["Protected"]) for b in got] == [
        (b["id"], b["created"], b["kind"], b["result"], b["consistency"]["level"], b["protected"])
        for b in api["backups"]]
    assert len(got) == 3
    got = json.loads(osc(cloud, "admin", "ekko", "instance", "list", "--all-projects", "-f", "json").stdout)
    assert {i["Project"] for i in got} == {cloud.ks.project_ids["p1"], cloud.ks.project_ids["p2"]}
    r = osc(cloud, "p1-member", "ekko", "instance", "list", "--all-projects", ok=False)
    assert "403" in r.stderr and "all_projects" in r.stderr


def test_cli_backup_show_and_errors_are_clear_messages(cloud):
    a = cloud.names["a"]
    newest = cloud.instances["p1"][a][-1]
    shown = json.loads(osc(cloud, "p1-reader", "ekko", "backup", "show", newest, "-f", "json").stdout)
    assert shown["ID"] == newest and shown["Instance ID"] == a and shown["Instance Name"] == "a"
    assert [d["disk"] for d in shown["Disks"]] == ["vda", "vdb"]
    assert shown["Consistency"]["level"] == "crash"
    r = osc(cloud, "p2-reader", "ekko", "backup", "show", newest, ok=False)        # p1's id, seen from p2
    assert f"ekko-api answered 404 to GET /backups/{newest}: no backup '{newest}'" in r.stderr
    r = osc(cloud, "p1-reader", "ekko", "backup", "delete", newest, ok=False)
    assert "403" in r.stderr and "policy does not allow ekko:backup:delete" in r.stderr
    r = osc(cloud, "p1-reader", "ekko", "backup", "list", "not-a-uuid", ok=False)
    assert "404" in r.stderr and "no instance" in r.stderr
    # the commands that need member, as a reader (403 before anything starts), and as the other project's member
    r = osc(cloud, "p1-reader", "ekko", "backup", "restore", newest, "--image-name", "r", "--disk", "vda", ok=False)
    assert "ekko-api answered 403" in r.stderr and "ekko:backup:restore" in r.stderr
    r = osc(cloud, "p2-member", "ekko", "file", "list", newest, "--disk", "vda", ok=False)
    assert f"ekko-api answered 404 to GET /backups/{newest}/files: no backup" in r.stderr


def test_cli_url_option_overrides_the_catalog(cloud):
    got = json.loads(osc(cloud, "p2-reader", "--os-ekko-url", cloud.url + "/v1", "ekko", "usage", "show",
                         "-f", "json").stdout)
    _, api = cloud.call("GET", "/v1/usage", "p2-reader")
    assert got == {"Logical Bytes": api["usage"]["logical_bytes"], "Stored Bytes": api["usage"]["stored_bytes"],
                   "Objects": api["usage"]["objects"]}
    r = osc(cloud, "p2-reader", "ekko", "usage", "show", ok=False, OS_EKKO_URL=f"http://{HOST}:{_free_port()}")
    assert "cannot reach" in r.stderr


def test_cli_protect_delete_and_usage_changes(cloud):
    d = cloud.names["d"]
    first, second, newest = cloud.instances["p1"][d]
    before = json.loads(osc(cloud, "p1-member", "ekko", "usage", "show", "-f", "json").stdout)
    osc(cloud, "p1-member", "ekko", "backup", "protect", first)
    assert json.loads(osc(cloud, "p1-member", "ekko", "backup", "show", first, "-f", "json").stdout)["Protected"]
    r = osc(cloud, "p1-member", "ekko", "backup", "delete", first, ok=False)
    assert "409" in r.stderr and "is protected" in r.stderr and "1 of 1 backups not deleted" in r.stderr
    r = osc(cloud, "p1-member", "ekko", "backup", "delete", newest, ok=False)
    assert "409" in r.stderr and "newest" in r.stderr
    osc(cloud, "p1-member", "ekko", "backup", "delete", second)
    after = json.loads(osc(cloud, "p1-member", "ekko", "usage", "show", "-f", "json").stdout)
    assert after["Logical Bytes"] == before["Logical Bytes"] - (4 << 20)          # one 4 MiB disk's backup
    assert after["Stored Bytes"] < before["Stored Bytes"]
    osc(cloud, "p1-member", "ekko", "backup", "unprotect", first)
    listed = json.loads(osc(cloud, "p1-member", "ekko", "backup", "list", d, "-f", "json").stdout)
    assert [(b["ID"], b["Protected"]) for b in listed] == [(newest, False), (first, False)]
    cloud.instances["p1"][d] = [first, newest]


def test_zz_no_token_nor_password_in_the_api_log(cloud):
    """Last (zz, and last in the file): every token the module used, and every password, are absent;
    nor is anything shaped like a Fernet token (the CLI's own tokens, which this process never sees)."""
    text = cloud.log_text()
    assert "GET /v1/instances" in text                                 # the log is the one written
    assert cloud.tokens
    # Booleans and names only: a failure must not print the secret it found
    leaked = [n for n, tok in enumerate(cloud.tokens) if tok in text or tok[:40] in text]
    assert not leaked, f"token(s) number {leaked} of this module are in ekko-api's log"
    passwords = [u.name for u in cloud.ks.users.values() if u.password in text]
    assert not passwords, f"the password(s) of {passwords} are in ekko-api's log"
    assert all(FERNET.fullmatch(t) for t in cloud.tokens)             # the pattern finds real tokens
    found = FERNET.search(text)
    assert found is None, f"a Fernet-shaped token in ekko-api's log at offset {found and found.start()}"

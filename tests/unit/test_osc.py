"""The OpenStack CLI plugin (ekko_libvirt/osc) over a fake HTTP layer: argument handling, the
requests each command sends, pagination, waiting for jobs, and how the API's errors reach the
user (a message, a non-zero exit: osc_lib's CommandError). The real `openstack` command against
a real Keystone and ekko-api: tests/integration/test_api_keystone.py."""

import argparse
import io
import json
import os
import random
import socket
import struct
import threading
import urllib.parse
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from osc_lib import exceptions

from ekko_libvirt.osc import plugin
from ekko_libvirt.osc.client import ApiError, Client
from ekko_libvirt.osc.v1 import backup, common, file, instance, job, usage

BASE = "http://ekko.example:8799"
SEED = int(os.environ.get("EKKO_TEST_SEED", str(random.randrange(1 << 32))))


class FakeResponse:
    def __init__(self, status: int, body: Any = None, text: Optional[str] = None, chunks: Optional[List] = None):
        self.status_code = status
        self._body = body
        self.text = text if text is not None else (json.dumps(body) if body is not None else "")
        self.content = self.text.encode()
        self.reason = "Reason"
        self._chunks = chunks
        self.closed = False

    def json(self):
        return json.loads(self.text)

    def iter_content(self, size):
        for c in self._chunks or []:
            if isinstance(c, Exception):
                raise c
            yield c

    def close(self):
        self.closed = True


class FakeSession:
    """keystoneauth1 Session's request(url, method, ...): answers from `route(method, path, query, body)`."""

    def __init__(self, route: Callable[..., Any]):
        self.route, self.calls = route, []
        self.retries: List[Tuple[str, int]] = []

    def request(self, url, method, raise_exc=True, headers=None, json=None, stream=False, connect_retries=0):
        assert raise_exc is False                    # the client reads every status itself
        self.retries.append((method, connect_retries))
        u = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(u.query))
        self.calls.append((method, u.path, query, json))
        answer = self.route(method, u.path, query, json)
        if isinstance(answer, Exception):
            raise answer
        return answer


def make(route, cls, argv: List[str]):
    """The command `cls` run with `argv` over a FakeSession; (result of take_action, session, app)."""
    session = FakeSession(route)
    app = SimpleNamespace(client_manager=SimpleNamespace(ekko=Client(session, BASE)), stderr=io.StringIO(),
                          stdout=io.StringIO())
    cmd = cls(app, None)
    args = cmd.get_parser("openstack ekko x").parse_args(argv)
    return cmd.take_action(args), session, app


def ok(body: Any = None, status: int = 200):
    return lambda *a: FakeResponse(status, body)


# -- the client ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint,base", [(BASE, BASE + "/v1"), (BASE + "/", BASE + "/v1"),
                                           (BASE + "/v1", BASE + "/v1"), (BASE + "/v1/", BASE + "/v1"),
                                           (BASE + "/ekko", BASE + "/ekko/v1")])
def test_base_url_with_or_without_the_version(endpoint, base):
    assert Client(None, endpoint).base == base


def test_no_endpoint_is_a_clear_error():
    with pytest.raises(ApiError, match="no endpoint: give --os-ekko-url"):
        Client(None, "")


@pytest.mark.parametrize("response,expected", [
    (FakeResponse(409, {"error": {"code": 409, "message": "backup x is protected: unprotect it first"}}),
     "ekko-api answered 409 to DELETE /backups/x: backup x is protected: unprotect it first"),
    (FakeResponse(503, text="503 Service Unavailable\n\nThe Keystone service is temporarily unavailable.  "),
     "ekko-api answered 503 to DELETE /backups/x: 503 Service Unavailable The Keystone service is temporarily "
     "unavailable."),
    (FakeResponse(500, {"error": {"message": 7}}), 'ekko-api answered 500 to DELETE /backups/x: {"error": '),
    (FakeResponse(502, text=""), "ekko-api answered 502 to DELETE /backups/x: Reason"),
    (FakeResponse(404, text="x" * 5000), "x" * 300),
])
def test_api_errors_become_command_errors_with_the_apis_message(response, expected):
    with pytest.raises(exceptions.CommandError) as e:
        make(lambda *a: response, backup.DeleteBackup, ["x"])
    assert isinstance(e.value.__cause__ or e.value, exceptions.CommandError)
    assert "1 of 1 backups not deleted: x" in str(e.value)
    c = Client(FakeSession(lambda *a: response), BASE)
    with pytest.raises(ApiError) as e2:
        c.delete_backup("x")
    assert expected in str(e2.value) and e2.value.code == response.status_code
    assert len(str(e2.value)) < 400


def test_a_connection_that_fails_is_a_message_not_a_traceback():
    from keystoneauth1 import exceptions as ks_exc
    c = Client(FakeSession(lambda *a: ks_exc.ConnectFailure("Unable to establish connection")), BASE)
    with pytest.raises(ApiError, match=r"ekko-api: GET /usage: cannot reach http://ekko.example:8799/v1: "
                                       r"ConnectFailure: Unable to establish connection") as e:
        c.usage()
    assert e.value.code is None


@pytest.mark.parametrize("body,message", [(None, "not JSON"), ([1, 2], "not a JSON object")])
def test_a_2xx_answer_that_is_not_a_json_object_is_refused(body, message):
    resp = FakeResponse(200, text="<html>proxy page</html>") if body is None else FakeResponse(200, body)
    with pytest.raises(ApiError, match=message):
        Client(FakeSession(lambda *a: resp), BASE).usage()


def test_ids_stay_one_path_segment_whatever_they_hold():
    """Random printable ids (seeded): the path the API sees has exactly one segment for the id."""
    rng = random.Random(SEED)
    print(f"EKKO_TEST_SEED={SEED}")
    alphabet = "ab/.%?#&=+ \\.-_~:;\u00e9\u4e2d"
    for _ in range(300):
        ident = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        s = FakeSession(ok({"backup": {"id": ident}}))
        Client(s, BASE).backup(ident)
        _method, path, query, _ = s.calls[0]
        parts = path.split("/")
        assert parts[:3] == ["", "v1", "backups"] and len(parts) == 4, (ident, path)
        assert urllib.parse.unquote(parts[3]) == ident and query == {}


# -- commands ---------------------------------------------------------------------------------------
def _instances(n: int):
    return [{"id": f"00000000-0000-0000-0000-{i:012d}", "name": f"vm{i}", "project_id": "p1", "backups": i,
             "protected": 0, "last_backup": {"id": f"b{i}", "created": "c", "result": "ok"}} for i in range(n)]


def paged(items: List[Dict[str, Any]], key: str):
    """A paginated list endpoint like ekko-api's: limit, marker = the last item's id."""
    def route(method, path, query, body):
        limit = int(query["limit"])
        start = 0
        if "marker" in query:
            start = [i["id"] for i in items].index(query["marker"]) + 1
        page = items[start:start + limit]
        nxt = page[-1]["id"] if len(page) == limit else None
        return FakeResponse(200, {key: page, "next": nxt})
    return route


def test_instance_list_follows_every_page(monkeypatch):
    monkeypatch.setattr("ekko_libvirt.osc.client.PAGE", 7)
    items = _instances(23)
    (cols, rows), s, _ = make(paged(items, "instances"), instance.ListInstance, [])
    assert [r[0] for r in rows] == [i["id"] for i in items]
    assert cols[:3] == ["ID", "Name", "Last Backup"] and "Project" not in cols
    assert len(s.calls) == 4 and all(c[2]["limit"] == "7" for c in s.calls)
    assert rows[5][2] == "b5" and rows[5][4] == "ok"


def test_instance_list_limit_and_all_projects(monkeypatch):
    monkeypatch.setattr("ekko_libvirt.osc.client.PAGE", 7)
    (cols, rows), s, _ = make(paged(_instances(23), "instances"), instance.ListInstance,
                              ["--limit", "9", "--all-projects"])
    assert len(rows) == 9 and cols[-1] == "Project" and rows[0][-1] == "p1"
    assert [c[2]["limit"] for c in s.calls] == ["7", "2"]
    assert all(c[2]["all_projects"] == "1" for c in s.calls)


def test_backup_list_and_show():
    b = {"id": "b1", "instance_id": "i", "instance_name": "vm", "project_id": "p", "created": "t", "kind": "full",
         "reason": "r", "result": "ok", "consistency": {"level": "crash", "reason": "off"}, "protected": True,
         "disks": [{"disk": "vda", "virtual_size": 4, "stored_bytes": 1, "segments": 4}]}
    (cols, rows), s, _ = make(ok({"backups": [b], "next": None}), backup.ListBackup, ["inst-1"])
    assert s.calls[0][:2] == ("GET", "/v1/instances/inst-1/backups")
    assert cols == ("ID", "Created", "Kind", "Result", "Consistency", "Protected")
    assert rows == [("b1", "t", "full", "ok", "crash", True)]
    (labels, values), s, _ = make(ok({"backup": dict(b)}), backup.ShowBackup, ["b1"])
    shown = dict(zip(labels, values, strict=True))
    assert shown["Disks"].machine_readable() == b["disks"]
    assert shown["Consistency"].machine_readable() == b["consistency"]
    assert "vda" in shown["Disks"].human_readable() and shown["Protected"] is True


def test_backup_create_sends_force_full_and_waits_for_the_job(monkeypatch):
    monkeypatch.setattr("ekko_libvirt.osc.v1.common.time.sleep", lambda s: None)
    states = iter(["running", "running", "done"])

    def route(method, path, query, body):
        if method == "POST":
            return FakeResponse(202, {"job": {"id": "j1", "state": "queued", "host": "cmp1"}})
        return FakeResponse(200, {"job": {"id": "j1", "kind": "backup", "state": next(states), "host": "cmp1",
                                          "result": {"backup_id": "b9"}, "error": None}})
    (labels, values), s, _ = make(route, backup.CreateBackup, ["inst-1", "--force-full", "--wait"])
    assert s.calls[0] == ("POST", "/v1/instances/inst-1/backups", {}, {"force_full": True})
    assert [c[1] for c in s.calls[1:]] == ["/v1/jobs/j1"] * 3
    assert dict(zip(labels, values, strict=True))["State"] == "done"
    (labels, values), s, _ = make(route, backup.CreateBackup, ["inst-1"])
    assert s.calls[0][3] == {"force_full": False} and len(s.calls) == 1
    assert dict(zip(labels, values, strict=True))["State"] == "queued"


def test_a_failed_job_or_a_wait_that_times_out_exits_non_zero(monkeypatch):
    monkeypatch.setattr("ekko_libvirt.osc.v1.common.time.sleep", lambda s: None)
    c = Client(FakeSession(ok({"job": {"id": "j1", "state": "failed", "error": "AgentGone: cmp1"}})), BASE)
    with pytest.raises(exceptions.CommandError, match="job j1 failed: AgentGone: cmp1"):
        common.wait_job(c, {"id": "j1", "state": "queued"}, 60)
    clock = iter(range(0, 10000, 50))
    monkeypatch.setattr("ekko_libvirt.osc.v1.common.time.monotonic", lambda: next(clock))
    c = Client(FakeSession(ok({"job": {"id": "j1", "state": "running"}})), BASE)
    with pytest.raises(exceptions.CommandError, match="still running after 120 s"):
        common.wait_job(c, {"id": "j1", "state": "queued"}, 120)


class ResetFirst:
    """An HTTP server on 127.0.0.1 that resets (RST) the first connection after reading its request,
    as gunicorn's keep-alive close racing a reused connection does, then answers 200 {"usage": {}}."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.requests: List[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    self.requests.append(conn.recv(65536).split(b"\r\n", 1)[0])
                    if len(self.requests) == 1:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        continue                      # closed with linger 0: a reset
                    body = b'{"usage": {"logical_bytes": 1}}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            return                                    # the socket closed: the test is over


def test_a_get_reset_by_the_api_asks_again_once_a_post_never():
    """With a real keystoneauth1 Session: a GET whose connection is reset is sent again (the
    keep-alive race of --wait's polling); a POST is not (the API may have acted on it)."""
    from keystoneauth1 import session
    srv = ResetFirst()
    try:
        c = Client(session.Session(), srv.url)
        assert c.usage() == {"logical_bytes": 1}
        assert srv.requests == [b"GET /v1/usage HTTP/1.1"] * 2
    finally:
        srv.sock.close()
    srv = ResetFirst()
    try:
        with pytest.raises(ApiError, match=r"POST /instances/i1/backups: cannot reach"):
            Client(session.Session(), srv.url).create_backup("i1")
        assert srv.requests == [b"POST /v1/instances/i1/backups HTTP/1.1"]
    finally:
        srv.sock.close()
    s = FakeSession(ok({"usage": {}}))
    Client(s, BASE).usage()
    assert s.retries == [("GET", 1)]


def test_delete_goes_on_after_a_refusal_and_exits_non_zero():
    def route(method, path, query, body):
        if path.endswith("/b2"):
            return FakeResponse(409, {"error": {"code": 409, "message": "backup b2 is the newest of disk vda"}})
        return FakeResponse(204)
    with pytest.raises(exceptions.CommandError, match=r"^1 of 3 backups not deleted: b2$"):
        make(route, backup.DeleteBackup, ["b1", "b2", "b3"])
    result, s, _ = make(ok(status=204), backup.DeleteBackup, ["b1", "b3"])
    assert result is None and [c[:2] for c in s.calls] == [("DELETE", "/v1/backups/b1"), ("DELETE", "/v1/backups/b3")]


@pytest.mark.parametrize("cls,value", [(backup.ProtectBackup, True), (backup.UnprotectBackup, False)])
def test_protect_and_unprotect(cls, value):
    _, s, _ = make(ok({"backup": {}}), cls, ["b1", "b2"])
    assert s.calls == [("PUT", "/v1/backups/b1/protection", {}, {"protected": value}),
                       ("PUT", "/v1/backups/b2/protection", {}, {"protected": value})]


def test_restore_arguments():
    route = ok({"job": {"id": "j2", "state": "running", "host": None}}, 202)
    (labels, values), s, _ = make(route, backup.RestoreBackup, ["b1", "--image-name", "img", "--disk", "vdb",
                                                                "--disk-format", "raw"])
    assert s.calls == [("POST", "/v1/backups/b1/restore", {}, {"image_name": "img", "disk": "vdb",
                                                                "disk_format": "raw"})]
    assert dict(zip(labels, values, strict=True))["ID"] == "j2"
    _, s, _ = make(route, backup.RestoreBackup, ["b1", "--image-name", "img"])
    assert s.calls[0][3] == {"image_name": "img"}                     # the API's defaults: one disk, qcow2
    for argv in (["b1"], ["b1", "--image-name", "i", "--disk-format", "vmdk"], []):
        with pytest.raises(SystemExit):
            make(route, backup.RestoreBackup, argv)


def test_file_list_default_path_and_refusals_on_stderr():
    entries = [{"name": "etc", "path": "/etc", "type": "directory", "size": 4096, "mode": 493}]
    (cols, rows), s, app = make(ok({"path": "/", "entries": entries, "refused": ["/lost+found: permission"]}),
                                file.ListFile, ["b1"])
    assert s.calls[0] == ("GET", "/v1/backups/b1/files", {"path": "/"}, None)
    assert rows == [("etc", "directory", 4096, 493, "/etc")]
    assert app.stderr.getvalue() == "refused: /lost+found: permission\n"
    _, s, _ = make(ok({"entries": []}), file.ListFile, ["b1", "--disk", "vdb", "--path", "/etc/../x y"])
    assert s.calls[0][2] == {"disk": "vdb", "path": "/etc/../x y"}     # the API judges paths, not the CLI


def test_file_get_writes_the_whole_file_or_nothing(tmp_path):
    out = tmp_path / "hostname"
    pieces = [b"vm-a", b"\n" * 3, b"x" * 100000]
    resp = FakeResponse(200, chunks=pieces)
    _, s, _ = make(lambda *a: resp, file.GetFile, ["b1", "--path", "/etc/hostname", "--file", str(out)])
    assert s.calls[0] == ("GET", "/v1/backups/b1/files/content", {"path": "/etc/hostname"}, None)
    assert out.read_bytes() == b"".join(pieces) and resp.closed
    broken = FakeResponse(200, chunks=[b"half", ConnectionError("reset by peer")])
    out2 = tmp_path / "broken"
    with pytest.raises(ApiError, match=r"ekko-api: GET /backups/b1/files/content: the download of /big broke "
                                       r"after 4 bytes: ConnectionError: reset by peer"):
        make(lambda *a: broken, file.GetFile, ["b1", "--path", "/big", "--file", str(out2)])
    with pytest.raises(exceptions.CommandError, match=r"cannot write .*/no/such/dir/f: No such file"):
        make(lambda *a: FakeResponse(200, chunks=[b"x"]), file.GetFile,
             ["b1", "--path", "/x", "--file", str(tmp_path / "no" / "such" / "dir" / "f")])
    assert sorted(os.listdir(tmp_path)) == ["hostname"]                 # no half file, no .part
    with pytest.raises(ApiError, match="404.*No such file"):
        make(ok({"error": {"code": 404, "message": "/nope: No such file or directory"}}, 404), file.GetFile,
             ["b1", "--path", "/nope", "--file", str(tmp_path / "nope")])
    assert sorted(os.listdir(tmp_path)) == ["hostname"]
    with pytest.raises(SystemExit):
        make(ok(), file.GetFile, ["b1", "--file", "x"])                  # --path is required


def test_usage_and_job_show():
    (labels, values), s, _ = make(ok({"usage": {"logical_bytes": 10, "stored_bytes": 3, "objects": 2}}),
                                  usage.ShowUsage, [])
    assert dict(zip(labels, values, strict=True)) == {"Logical Bytes": 10, "Stored Bytes": 3, "Objects": 2}
    (labels, values), s, _ = make(ok({"job": {"id": "j/1", "kind": "restore", "state": "done", "host": None,
                                              "result": {"image_id": "im"}, "error": None}}), job.ShowJob, ["j/1"])
    assert s.calls[0][1] == "/v1/jobs/j%2F1" and dict(zip(labels, values, strict=True))["Result"] == {"image_id": "im"}


# -- the plugin's hooks ---------------------------------------------------------------------------------
class FakeClientManager:
    def __init__(self, config: Dict[str, Any]):
        self.config, self.session, self.region_name, self.interface = config, object(), "RegionOne", "public"
        self.asked: List[Any] = []

    def get_configuration(self):
        return dict(self.config)

    def get_endpoint_for_service_type(self, service_type, region_name=None, interface="public"):
        self.asked.append((service_type, region_name, interface))
        return "http://catalog:8799/"


def test_make_client_url_option_or_the_catalog():
    cm = FakeClientManager({"ekko_url": "http://given:1/v1"})
    c = plugin.make_client(cm)
    assert c.base == "http://given:1/v1" and cm.asked == [] and c.session is cm.session
    cm = FakeClientManager({})
    assert plugin.make_client(cm).base == "http://catalog:8799/v1"
    assert cm.asked == [("ekko-backup", "RegionOne", "public")]


def test_build_option_parser_reads_the_environment(monkeypatch):
    monkeypatch.setenv("OS_EKKO_URL", "http://env:2")
    p = plugin.build_option_parser(argparse.ArgumentParser())
    assert p.parse_args([]).os_ekko_url == "http://env:2"
    assert p.parse_args(["--os-ekko-url", "http://cli:3"]).os_ekko_url == "http://cli:3"
    assert plugin.API_NAME == "ekko" and plugin.DEFAULT_API_VERSION in plugin.API_VERSIONS


def test_entry_points_name_every_command():
    """setup.py's openstack.ekko.v1 group: each name resolves to a cliff command of this package."""
    import ast
    import importlib
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    eps = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
               for k in node.keywords if k.arg == "entry_points")
    assert eps["openstack.cli.extension"] == ["ekko = ekko_libvirt.osc.plugin"]
    names = {}
    for line in eps["openstack.ekko.v1"]:
        name, target = (x.strip() for x in line.split("="))
        mod, cls = target.split(":")
        names[name] = getattr(importlib.import_module(mod), cls)
    assert set(names) == {"ekko_instance_list", "ekko_backup_list", "ekko_backup_show", "ekko_backup_create",
                          "ekko_backup_delete", "ekko_backup_protect", "ekko_backup_unprotect",
                          "ekko_backup_restore", "ekko_file_list", "ekko_file_get", "ekko_usage_show",
                          "ekko_job_show"}
    from cliff.command import Command
    assert all(issubclass(c, Command) and c.__doc__ for c in names.values())


# -- a hostile or broken API: random answers --------------------------------------------------------------
def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "str", "list", "dict"] if depth < 3 else ["null", "bool", "int", "str"]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 7, 2 ** 70])
    if kind == "str":
        return rng.choice(["", "x", "next", "\u202e\x1b[31m", "b1"])
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["instances", "backups", "backup", "job", "usage", "entries", "refused", "next", "id", "state",
            "last_backup", "consistency", "disks", "error", "message", "junk"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def _shaped(rng: random.Random) -> Any:
    """Mostly near-right answers (the right top key, a wrong shape below), some anything at all."""
    if rng.random() < 0.3:
        return _random_json(rng)
    top = rng.choice(["instances", "backups", "backup", "job", "usage", "entries"])
    inner = _random_json(rng, 1)
    if rng.random() < 0.5:
        inner = [x if rng.random() < 0.5 else {"id": "b1", "last_backup": _random_json(rng, 2),
                                                "consistency": _random_json(rng, 2), "disks": _random_json(rng, 2)}
                 for x in (inner if isinstance(inner, list) else [inner])]
    return {top: inner, "next": _random_json(rng, 2), "refused": _random_json(rng, 2)}


COMMANDS = [(instance.ListInstance, []), (instance.ListInstance, ["--all-projects", "--limit", "3"]),
            (backup.ListBackup, ["i"]), (backup.ShowBackup, ["b"]), (backup.CreateBackup, ["i", "--wait"]),
            (backup.DeleteBackup, ["b"]), (backup.ProtectBackup, ["b"]), (backup.RestoreBackup, ["b", "--image-name",
                                                                                               "x", "--wait"]),
            (file.ListFile, ["b"]), (usage.ShowUsage, []), (job.ShowJob, ["j"])]


class KeepsAsking(BaseException):
    pass


def test_random_answers_give_a_result_or_a_command_error_never_a_crash(monkeypatch):
    """Seeded (EKKO_TEST_SEED): every command over 2xx answers of random JSON: it returns, or it
    raises CommandError (exit 1 with a message); never KeyError/TypeError/AttributeError, never a loop."""
    monkeypatch.setattr("ekko_libvirt.osc.v1.common.time.sleep", lambda s: None)
    rng = random.Random(SEED)
    print(f"EKKO_TEST_SEED={SEED}")
    outcomes = {"ok": 0, "refused": 0}
    for n in range(1500):
        cls, argv = COMMANDS[n % len(COMMANDS)]
        calls = [0]

        def route(method, path, query, body, calls=calls, name=cls.__name__):
            calls[0] += 1
            if calls[0] >= 50:          # a BaseException: the client's own `except Exception` must not eat it
                raise KeepsAsking(f"{name} keeps asking ({path})")
            return FakeResponse(rng.choice([200, 202]), _shaped(rng))
        try:
            result, _, _ = make(route, cls, list(argv))
        except exceptions.CommandError as e:
            assert str(e) and "Traceback" not in str(e)
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        if result is not None:          # what cliff then formats: rows of the right width
            cols, data = result
            for row in (data if isinstance(data, list) else [data]):
                assert len(row) == len(cols)
    assert outcomes["ok"] > 100 and outcomes["refused"] > 100, outcomes


def test_pagination_stops_on_a_repeated_or_odd_marker():
    calls = []

    def same(method, path, query, body):
        calls.append(path)
        if len(calls) > 50:
            raise KeepsAsking("the client keeps following the same marker")
        return FakeResponse(200, {"instances": [{"id": "x"}], "next": "m"})
    c = Client(FakeSession(same), BASE)
    import ekko_libvirt.osc.client as client_mod
    old = client_mod.PAGE
    client_mod.PAGE = 1
    try:
        with pytest.raises(ApiError, match="not a new marker: 'm'"):
            c.instances()
        c = Client(FakeSession(lambda *a: FakeResponse(200, {"instances": [{"id": "x"}], "next": 5})), BASE)
        with pytest.raises(ApiError, match="not a new marker: '5'"):
            c.instances()
    finally:
        client_mod.PAGE = old

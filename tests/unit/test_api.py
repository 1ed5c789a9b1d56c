"""ekko-api behind keystonemiddleware's auth_token (AuthTokenFixture: real middleware, tokens
from the fixture instead of Keystone), over a real local store holding two projects' backups:
every endpoint x every role x own/other project; hostile input; no secret in answers or logs."""

import json
import logging
import os
import random
import sqlite3
import uuid

import pytest
from keystonemiddleware import fixture as ks_fixture

from ekko_libvirt.api.app import create_app
from ekko_libvirt.api.index import Index
from ekko_libvirt.store import markers
from ekko_libvirt.store.factory import open_store

from .api_world import FakeBus, FakeGlance, GuestOpener, api_conf_for, backup_id, commit, make_world

ROLES = ("reader", "member", "admin")
RANK = {"reader": 0, "member": 1, "admin": 2}


@pytest.fixture
def auth():
    f = ks_fixture.AuthTokenFixture()
    f.setUp()
    yield f
    f.cleanUp()


class Env:
    def __init__(self, tmp_path, auth, seed: int = 0):
        self.w = make_world(str(tmp_path / "store"), random.Random(seed))
        self.conf = api_conf_for(str(tmp_path / "index.sqlite"))
        inst = self.instances()
        self.bus = FakeBus([inst["a"], inst["c"]])
        self.glance = FakeGlance()
        self.guests = GuestOpener()
        self.app = create_app(self.conf, bus=self.bus, glance=self.glance, open_guest=self.guests, ekko=self.w.cfg)
        self.client = self.app.test_client()
        self.tokens = {}
        for project in (self.w.p1, self.w.p2):
            for role in ROLES:
                tok = uuid.uuid4().hex
                auth.add_token_data(token_id=tok, project_id=project, role_list=[role], user_id=uuid.uuid4().hex)
                self.tokens[(project, role)] = tok

    def instances(self):
        names = {}
        for inst, project in self.w.project_of.items():
            p1 = [i for i, p in self.w.project_of.items() if p == self.w.p1]
            names["c" if project == self.w.p2 else ("a" if inst == p1[0] else "b")] = inst
        return names

    def call(self, method, path, project=None, role=None, token=None, **kw):
        headers = kw.pop("headers", {})
        if token is None and project is not None:
            token = self.tokens[(project, role)]
        if token is not None:
            headers["X-Auth-Token"] = token
        return self.client.open(path, method=method, headers=headers, **kw)


@pytest.fixture
def env(tmp_path, auth):
    return Env(tmp_path, auth)


def _endpoints(e: Env):
    """(name, minimum role, method, path, json body, expected success code), each naming p1's things."""
    inst = e.instances()
    a = inst["a"]
    old, new = e.w.instances[a][0], e.w.instances[a][-1]
    return [
        ("list instances", "reader", "GET", "/v1/instances", None, 200),
        ("list backups", "reader", "GET", f"/v1/instances/{a}/backups", None, 200),
        ("show backup", "reader", "GET", f"/v1/backups/{new}", None, 200),
        ("backup now", "member", "POST", f"/v1/instances/{a}/backups", {"force_full": True}, 202),
        ("protect", "member", "PUT", f"/v1/backups/{old}/protection", {"protected": True}, 200),
        ("delete", "member", "DELETE", f"/v1/backups/{old}", None, 204),
        ("list files", "member", "GET", f"/v1/backups/{new}/files?disk=vda&path=/etc", None, 200),
        ("get file", "member", "GET", f"/v1/backups/{new}/files/content?disk=vda&path=/etc/hostname", None, 200),
        ("restore", "member", "POST", f"/v1/backups/{new}/restore", {"image_name": "r", "disk": "vdb"}, 202),
        ("usage", "reader", "GET", "/v1/usage", None, 200),
        ("admin hosts", "admin", "GET", "/v1/admin/hosts", None, 200),
    ]


ENDPOINT_NAMES = ["list instances", "list backups", "show backup", "backup now", "protect", "delete", "list files",
                  "get file", "restore", "usage", "admin hosts"]
HAS_ID = {"list backups", "show backup", "backup now", "protect", "delete", "list files", "get file", "restore"}


@pytest.mark.parametrize("name", ENDPOINT_NAMES)
@pytest.mark.parametrize("role", ROLES)
def test_role_matrix_own_project(tmp_path, auth, name, role):
    """Allowed: it works (and did what it says); forbidden: 403 and nothing happened."""
    e = Env(tmp_path, auth)
    _n, need, method, path, body, ok = next(x for x in _endpoints(e) if x[0] == name)
    r = e.call(method, path, e.w.p1, role, json=body)
    if RANK[role] < RANK[need]:
        assert r.status_code == 403, r.data
        assert "policy does not allow" in r.get_json()["error"]["message"]
        assert e.bus.calls == [] and e.glance.calls == [] and e.guests.opened == []
        return
    assert r.status_code == ok, r.data
    a = e.instances()["a"]
    if name == "list instances":
        got = {i["id"]: i for i in r.get_json()["instances"]}
        assert set(got) == {a, e.instances()["b"]}                  # p1's instances, never c
        assert got[a]["backups"] == 3 and got[a]["last_backup"]["id"] == e.w.instances[a][-1]
        assert got[a]["name"] == "a"
    elif name == "list backups":
        assert [b["id"] for b in r.get_json()["backups"]] == e.w.instances[a][::-1]
    elif name == "show backup":
        b = r.get_json()["backup"]
        assert b["instance_id"] == a and [d["disk"] for d in b["disks"]] == ["vda", "vdb"]
        assert b["disks"][0]["virtual_size"] == 4 << 20 and b["disks"][0]["segments"] == 4
    elif name == "backup now":
        assert r.get_json()["job"] == {"id": "job-1", "state": "queued", "host": "cmp1"}
        assert e.bus.calls == [("cmp1", a, True)]
        j = e.call("GET", "/v1/jobs/job-1", e.w.p1, role)
        assert j.status_code == 200 and j.get_json()["job"]["state"] == "done"
    elif name == "protect":
        assert r.get_json()["backup"]["protected"] is True
        store = open_store(e.w.cfg, e.w.p1)
        assert markers.is_protected(store, "instance-a.vda", e.w.instances[a][0])
        assert markers.is_protected(store, "instance-a.vdb", e.w.instances[a][0])
    elif name == "delete":
        store = open_store(e.w.cfg, e.w.p1)
        assert not store.exists(f"manifests/instance-a.vda/{e.w.instances[a][0]}")
        assert not store.exists(f"manifests/instance-a.vdb/{e.w.instances[a][0]}")
        assert store.exists(f"manifests/instance-a.vda/{e.w.instances[a][1]}")
        assert e.call("GET", f"/v1/backups/{e.w.instances[a][0]}", e.w.p1, role).status_code == 404
    elif name == "list files":
        assert [x["name"] for x in r.get_json()["entries"]] == ["hostname"]
        assert e.guests.opened == [(e.w.p1, f"manifests/instance-a.vda/{e.w.instances[a][-1]}")]
        assert e.guests.closed == 1
    elif name == "get file":
        assert r.data == b"vm-a\n"
        r.close()                                     # as a WSGI server does at the end of the body
        assert e.guests.closed == 1
    elif name == "restore":
        job = r.get_json()["job"]
        _wait_job(e, job["id"], e.w.p1, role)
        assert e.glance.calls == [("default", e.w.p1, f"manifests/instance-a.vdb/{e.w.instances[a][-1]}", "r",
                                   "qcow2")]
    elif name == "usage":
        u = r.get_json()["usage"]
        assert u["logical_bytes"] == (3 * 2 + 2) * (4 << 20)        # p1: 8 manifests of 4 MiB disks
        assert u["objects"] >= 8
    elif name == "admin hosts":
        assert r.get_json()["hosts"][0]["host"] == "cmp1"


def _wait_job(e, job_id, project, role):
    import time
    deadline = time.monotonic() + 30
    while True:
        j = e.call("GET", f"/v1/jobs/{job_id}", project, role).get_json()["job"]
        if j["state"] in ("done", "failed") or time.monotonic() > deadline:
            assert j["state"] == "done", j
            assert j["result"] == {"image_id": "image-1"}
            return
        time.sleep(0.01)


@pytest.mark.parametrize("name", sorted(HAS_ID))
@pytest.mark.parametrize("role", ROLES)
def test_other_projects_ids_answer_404(tmp_path, auth, name, role):
    """p2's caller names p1's instance/backup: 404 whatever the role (403 only where the role
    forbids the action itself), and nothing of p1 is touched."""
    e = Env(tmp_path, auth)
    _n, need, method, path, body, _ok = next(x for x in _endpoints(e) if x[0] == name)
    before = sorted(os.listdir(os.path.join(e.w.root, "projects", e.w.p1, "manifests", "instance-a.vda")))
    r = e.call(method, path, e.w.p2, role, json=body)
    assert r.status_code == (403 if RANK[role] < RANK[need] else 404), r.data
    assert e.bus.calls == [] and e.glance.calls == [] and e.guests.opened == []
    assert sorted(os.listdir(os.path.join(e.w.root, "projects", e.w.p1, "manifests", "instance-a.vda"))) == before
    assert not os.path.exists(os.path.join(e.w.root, "projects", e.w.p1, "protected"))


def test_other_projects_job_and_listing_are_invisible(env):
    a = env.instances()["a"]
    r = env.call("POST", f"/v1/instances/{a}/backups", env.w.p1, "member", json={})
    job = r.get_json()["job"]["id"]
    for role in ROLES:
        assert env.call("GET", f"/v1/jobs/{job}", env.w.p2, role).status_code == 404
    got = env.call("GET", "/v1/instances", env.w.p2, "reader").get_json()["instances"]
    assert [i["id"] for i in got] == [env.instances()["c"]]
    u2 = env.call("GET", "/v1/usage", env.w.p2, "reader").get_json()["usage"]
    assert u2["logical_bytes"] == 2 * (4 << 20)


@pytest.mark.parametrize("name", ENDPOINT_NAMES)
def test_no_token_or_a_bad_one_is_401(env, name):
    _n, _need, method, path, body, _ok = next(x for x in _endpoints(env) if x[0] == name)
    assert env.call(method, path, json=body).status_code == 401
    assert env.call(method, path, token="not-a-token", json=body).status_code == 401
    # a client cannot claim roles or a project by header: auth_token strips them
    forged = {"X-Roles": "admin", "X-Project-Id": env.w.p1, "X-Identity-Status": "Confirmed"}
    assert env.call(method, path, headers=forged, json=body).status_code == 401
    assert env.bus.calls == [] and env.glance.calls == []


def test_admin_all_projects_sees_every_project_others_403(env):
    inst = env.instances()
    r = env.call("GET", "/v1/instances?all_projects=1", env.w.p1, "admin")
    assert r.status_code == 200
    assert {i["id"] for i in r.get_json()["instances"]} == set(inst.values())
    c_new = env.w.instances[inst["c"]][-1]
    # the index of p2 is built once a request of p2 (or reindex) has read p2's store
    env.call("GET", "/v1/instances", env.w.p2, "reader")
    assert env.call("GET", f"/v1/backups/{c_new}?all_projects=1", env.w.p1, "admin").status_code == 200
    assert env.call("GET", f"/v1/backups/{c_new}", env.w.p1, "admin").status_code == 404
    for role in ("reader", "member"):
        r = env.call("GET", "/v1/instances?all_projects=1", env.w.p1, role)
        assert r.status_code == 403 and "all_projects" in r.get_json()["error"]["message"]


def test_delete_refuses_the_newest_and_a_protected_backup(env):
    a = env.instances()["a"]
    old, mid, new = env.w.instances[a]
    r = env.call("DELETE", f"/v1/backups/{new}", env.w.p1, "member")
    assert r.status_code == 409 and "newest" in r.get_json()["error"]["message"]
    assert env.call("PUT", f"/v1/backups/{mid}/protection", env.w.p1, "member",
                    json={"protected": True}).status_code == 200
    r = env.call("DELETE", f"/v1/backups/{mid}", env.w.p1, "member")
    assert r.status_code == 409 and "protected" in r.get_json()["error"]["message"]
    store = open_store(env.w.cfg, env.w.p1)
    assert store.exists(f"manifests/instance-a.vda/{new}") and store.exists(f"manifests/instance-a.vdb/{mid}")
    # protection taken away behind the API's back (ekko unprotect on a host): the store decides
    markers.unprotect(store, "instance-a.vda", mid)
    markers.unprotect(store, "instance-a.vdb", mid)
    assert env.call("DELETE", f"/v1/backups/{mid}", env.w.p1, "member").status_code == 204
    # a newer backup committed by an agent after the index was read: `new` may go now
    later = backup_id(500)
    commit(env.w.cfg, env.w.p1, a, "a", "vda", later, kind="incremental")
    commit(env.w.cfg, env.w.p1, a, "a", "vdb", later, kind="incremental")
    assert env.call("DELETE", f"/v1/backups/{new}", env.w.p1, "member").status_code == 204
    ids = [b["id"] for b in env.call("GET", f"/v1/instances/{a}/backups", env.w.p1, "reader").get_json()["backups"]]
    assert ids == [later, old]


def test_a_backup_made_while_the_api_was_down_shows_up_and_reindex_rebuilds(env, tmp_path):
    from ekko_libvirt.api.index import reindex
    a = env.instances()["a"]
    assert len(env.call("GET", f"/v1/instances/{a}/backups", env.w.p1, "reader").get_json()["backups"]) == 3
    later = backup_id(900)
    commit(env.w.cfg, env.w.p1, a, "a", "vda", later)
    got = env.call("GET", f"/v1/instances/{a}/backups", env.w.p1, "reader").get_json()["backups"]
    assert got[0]["id"] == later and len(got) == 4
    fresh = Index(str(tmp_path / "rebuilt.sqlite"))
    done = reindex(fresh, [(p, open_store(env.w.cfg, p)) for p in (env.w.p1, env.w.p2)])
    assert done == {env.w.p1: (9, 0), env.w.p2: (2, 0)}
    assert [r["backup_id"] for r in fresh.backups(env.w.p1, a, 10, None)] == [later] + env.w.instances[a][::-1]
    assert fresh.backups(env.w.p1, env.instances()["c"], 10, None) == []


def test_pagination_random_pages_cover_everything_once(tmp_path, auth):
    """Random instance counts and page sizes (seed printed): every instance and backup exactly once,
    in order, against the world as built."""
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    rng = random.Random(seed)
    e = Env(tmp_path, auth, seed)
    expect = {i: list(ids) for i, ids in e.w.instances.items() if e.w.project_of[i] == e.w.p1}
    for k in range(rng.randint(3, 25)):
        inst, n = str(uuid.UUID(int=rng.getrandbits(128))), rng.randint(1, 7)
        expect[inst] = []
        for j in range(n):
            bid = backup_id(1000 + k * 10 + j)
            commit(e.w.cfg, e.w.p1, inst, f"r{k}", "vda", bid)
            expect[inst].append(bid)
    limit, marker, seen = rng.randint(1, 6), None, []
    while True:
        q = f"/v1/instances?limit={limit}" + (f"&marker={marker}" if marker else "")
        body = e.call("GET", q, e.w.p1, "reader").get_json()
        seen += [i["id"] for i in body["instances"]]
        marker = body["next"]
        if marker is None:
            break
    assert seen == sorted(expect), seed
    inst = rng.choice(sorted(expect))
    limit, marker, ids = rng.randint(1, 3), None, []
    while True:
        q = f"/v1/instances/{inst}/backups?limit={limit}" + (f"&marker={marker}" if marker else "")
        body = e.call("GET", q, e.w.p1, "reader").get_json()
        ids += [b["id"] for b in body["backups"]]
        marker = body["next"]
        if marker is None:
            break
    assert ids == expect[inst][::-1], seed


HOSTILE = [
    ("POST", "/v1/instances/{a}/backups", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/instances/{a}/backups", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/instances/{a}/backups", b'{"force_full": "yes"}', 400, "must be a bool"),
    ("POST", "/v1/instances/{a}/backups", b'{"force_full": true, "host": "evil"}', 400, "unknown field"),
    ("PUT", "/v1/backups/{old}/protection", b"{}", 400, "missing field"),
    ("PUT", "/v1/backups/{old}/protection", b'{"protected": 1}', 400, "must be a bool"),
    ("POST", "/v1/backups/{new}/restore", b'{"image_name": "x", "disk": "vda", "disk_format": "vmdk"}', 400,
     "disk_format"),
    ("POST", "/v1/backups/{new}/restore", b'{"image_name": "", "disk": "vda"}', 400, "image_name"),
    ("POST", "/v1/backups/{new}/restore", b'{"image_name": "x"}', 400, "give disk"),
    ("POST", "/v1/backups/{new}/restore", b'{"image_name": "x", "disk": "../vda"}', 400, "device name"),
    ("POST", "/v1/backups/{new}/restore", b'{"image_name": "x", "disk": "vdz"}', 404, "no disk"),
    ("GET", "/v1/backups/{new}/files?disk=vda&path=/etc/../../root", None, 400, "'..' is not accepted"),
    ("GET", "/v1/backups/{new}/files?disk=vda&path=/etc/%00x", None, 400, "NUL"),
    ("GET", "/v1/backups/{new}/files/content?disk=vda&path=../../etc/shadow", None, 400, "'..' is not accepted"),
    ("GET", "/v1/backups/{new}/files/content?disk=vda&path=/etc", None, 400, "not a regular file"),
    ("GET", "/v1/backups/{new}/files/content?disk=vda&path=/nope", None, 404, "No such file"),
    ("GET", "/v1/backups/{new}/files?path=/", None, 400, "give disk"),
    ("GET", "/v1/instances?limit=0", None, 400, "limit"),
    ("GET", "/v1/instances?limit=100000", None, 400, "limit"),
    ("GET", "/v1/instances?limit=-1", None, 400, "limit"),
    ("GET", "/v1/instances?marker=' OR 1=1 --", None, 400, "marker"),
    ("GET", "/v1/instances?sort=name", None, 400, "unknown query parameter"),
    ("GET", "/v1/instances/not-a-uuid/backups", None, 404, "no instance"),
    ("GET", "/v1/backups/..%2F..%2Fetc", None, 404, "Not Found"),
    ("GET", "/v1/backups/x' OR '1'='1", None, 404, "no backup"),
    ("DELETE", "/v1/instances", None, 405, "not allowed"),
    ("GET", "/v2/instances", None, 404, "Not Found"),
]


@pytest.mark.parametrize("method,path,data,code,message", HOSTILE)
def test_hostile_input_4xx_with_a_message(env, method, path, data, code, message):
    a = env.instances()["a"]
    path = path.format(a=a, old=env.w.instances[a][0], new=env.w.instances[a][-1])
    r = env.call(method, path, env.w.p1, "admin", data=data, content_type="application/json")
    assert r.status_code == code, r.data
    err = r.get_json()["error"]
    assert err["code"] == code and message.lower() in err["message"].lower(), err
    assert env.bus.calls == [] and env.glance.calls == []
    assert not os.path.exists(os.path.join(env.w.root, "projects", env.w.p1, "protected"))


def test_huge_body_413_without_reading_it_all(env):
    a = env.instances()["a"]
    big = b'{"force_full": true, "x": "' + b"A" * (env.conf.api.max_body + 10) + b'"}'
    r = env.call("POST", f"/v1/instances/{a}/backups", env.w.p1, "member", data=big, content_type="application/json")
    assert r.status_code == 413 and r.get_json()["error"]["code"] == 413
    assert env.bus.calls == []


def test_a_big_file_streams_in_pieces_and_the_appliance_closes(env):
    new = env.w.instances[env.instances()["a"]][-1]
    r = env.call("GET", f"/v1/backups/{new}/files/content?disk=vda&path=/big", env.w.p1, "member", buffered=False)
    assert r.status_code == 200 and r.headers["Content-Length"] == str(5 * 1024 * 1024 + 7)
    assert env.guests.closed == 0                # open while the stream is
    data = b"".join(r.response)
    r.close()
    assert data == b"x" * (5 * 1024 * 1024 + 7) and env.guests.closed == 1


def test_bus_down_is_503_with_a_clear_state_and_no_secret(env, caplog):
    env.bus.fail = ConnectionRefusedError("amqp://ekko:S3cretRabbit@127.0.0.1:5672/ refused")
    a = env.instances()["a"]
    r = env.call("POST", f"/v1/instances/{a}/backups", env.w.p1, "member", json={})
    assert r.status_code == 503 and "message bus" in r.get_json()["error"]["message"]
    assert b"S3cret" not in r.data
    r = env.call("GET", "/v1/admin/hosts", env.w.p1, "admin")
    assert r.status_code == 503


def test_instance_on_no_live_host_is_409(env):
    b = env.instances()["b"]              # the fake bus's host does not run b
    r = env.call("POST", f"/v1/instances/{b}/backups", env.w.p1, "member", json={})
    assert r.status_code == 409 and "no host" in r.get_json()["error"]["message"]


def test_no_token_in_any_answer_or_log(env, caplog):
    caplog.set_level(logging.DEBUG)
    a = env.instances()["a"]
    bodies = []
    for name in ENDPOINT_NAMES:
        _n, _need, method, path, body, _ok = next(x for x in _endpoints(env) if x[0] == name)
        for role in ROLES:
            for project in (env.w.p1, env.w.p2):
                r = env.call(method, path, project, role, json=body)
                bodies.append(r.data + json.dumps(dict(r.headers)).encode())
    bodies.append(env.call("GET", f"/v1/instances/{a}/backups", token="forged-tok-123").data)
    text = b"".join(bodies).decode("utf-8", "replace") + caplog.text
    for tok in list(env.tokens.values()) + ["forged-tok-123"]:
        assert tok not in text


def test_index_is_confined_per_project_even_for_equal_backup_ids(tmp_path):
    """Two projects may hold the same backup id (ids are per store namespace): never mixed."""
    idx = Index(str(tmp_path / "i.sqlite"))
    from ekko_libvirt.api.index import BackupRow, DiskRow
    b = BackupRow("20261101T000000000Z-aaaaaa", "11111111-1111-1111-1111-111111111111", "n", "c", "full", "", None)
    idx.add_rows("p1", [(b, DiskRow("manifests/x.vda/" + b.backup_id, b.backup_id, "vda", "x.vda", 1, 1, 1))])
    assert idx.backup("p1", b.backup_id) is not None
    assert idx.backup("p2", b.backup_id) is None
    assert idx.instances("p2", 10, None) == []
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        idx.db.execute("INSERT INTO backups (project, backup_id, instance_id) VALUES (NULL, 'x', 'y')")

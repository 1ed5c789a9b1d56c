"""ekko-api over a real Swift store (issue 19: "Swift down (503)"): two Keystone projects' Nova
backups committed into a real Swift account (tests/harness/swift.py) the way the backup pipeline
commits them, served by the app behind the real auth_token (AuthTokenFixture for the tokens):
lists, the other project's ids 404, delete (the store decides: never the newest), usage; then the
proxy stopped: 503 with a message naming the store, no traceback, no Swift key in any answer or
log line; the proxy back: the same requests work and nothing was lost."""

import random
import uuid

import pytest
from keystonemiddleware import fixture as ks_fixture

from conftest import swift_section
from ekko_libvirt import config as ekko_config
from ekko_libvirt.api.app import create_app
from tests.swift_fixtures import swift_server  # noqa: F401
from tests.unit.api_world import FakeBus, FakeGlance, GuestOpener, api_conf_for, backup_id, commit

SEED = 1919


@pytest.fixture
def cloud(swift_server, tmp_path):  # noqa: F811
    section = dict(swift_section(swift_server, "test"), retries=1, timeout=5)
    cfg = ekko_config.build({"store": section})
    rnd = random.Random(SEED)
    p1, p2 = uuid.UUID(int=rnd.getrandbits(128)).hex, uuid.UUID(int=rnd.getrandbits(128)).hex
    a, c = str(uuid.UUID(int=rnd.getrandbits(128))), str(uuid.UUID(int=rnd.getrandbits(128)))
    mine = [backup_id(n) for n in (1, 2, 3)]
    for i, bid in enumerate(mine):
        commit(cfg, p1, a, "a", "vda", bid, kind="full" if i == 0 else "incremental")
    theirs = backup_id(7)
    commit(cfg, p2, c, "c", "vda", theirs)
    auth = ks_fixture.AuthTokenFixture()
    auth.setUp()
    tokens = {}
    for project in (p1, p2):
        tokens[project] = uuid.uuid4().hex
        auth.add_token_data(token_id=tokens[project], project_id=project, role_list=["member"],
                            user_id=uuid.uuid4().hex)
    app = create_app(api_conf_for(str(tmp_path / "index.sqlite")), bus=FakeBus([]), glance=FakeGlance(),
                     open_guest=GuestOpener(), ekko=cfg)
    client = app.test_client()

    def call(method, path, project, **kw):
        return client.open(path, method=method, headers={"X-Auth-Token": tokens[project]}, **kw)

    yield call, section, p1, p2, a, mine, theirs
    auth.cleanUp()


def test_api_over_swift_and_swift_down_is_503(cloud, swift_server, caplog):  # noqa: F811
    call, section, p1, p2, a, mine, theirs = cloud
    r = call("GET", "/v1/instances", p1)
    assert r.status_code == 200, r.data
    assert [i["id"] for i in r.get_json()["instances"]] == [a]
    ids = [b["id"] for b in call("GET", f"/v1/instances/{a}/backups", p1).get_json()["backups"]]
    assert ids == mine[::-1]
    assert call("GET", f"/v1/backups/{mine[0]}", p2).status_code == 404          # the other project's id
    assert call("GET", f"/v1/backups/{theirs}", p1).status_code == 404
    before = call("GET", "/v1/usage", p1).get_json()["usage"]
    r = call("DELETE", f"/v1/backups/{mine[-1]}", p1)
    assert r.status_code == 409 and "newest" in r.get_json()["error"]["message"]
    assert call("DELETE", f"/v1/backups/{mine[0]}", p1).status_code == 204
    after = call("GET", "/v1/usage", p1).get_json()["usage"]
    assert after["logical_bytes"] == before["logical_bytes"] - 4 * (1 << 20), (before, after)

    swift_server.stop_proxy()
    try:
        r = call("GET", f"/v1/instances/{a}/backups", p1)          # index_max_age 0: the store is asked
        assert r.status_code == 503, r.data
        message = r.get_json()["error"]["message"]
        assert "store" in message, message
        assert b"Traceback" not in r.data and b'File "' not in r.data
        r = call("DELETE", f"/v1/backups/{mine[1]}", p1)             # a change needs the store: refused
        assert r.status_code == 503, r.data
    finally:
        swift_server.start_proxy()
        swift_server.wait_ready()
    key = section["key"].encode()
    for rec in caplog.records:
        assert section["key"] not in rec.getMessage(), rec.getMessage()
    assert key not in r.data
    ids = [b["id"] for b in call("GET", f"/v1/instances/{a}/backups", p1).get_json()["backups"]]
    assert ids == [mine[2], mine[1]]                               # nothing lost while Swift was away
    assert [i["id"] for i in call("GET", "/v1/instances", p2).get_json()["instances"]] != []

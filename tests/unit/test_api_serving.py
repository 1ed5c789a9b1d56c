"""ekko-api as served: the host that takes a backup-now (app.host_of), what POST answers when the
bus has already failed the job, auth_token's 503 as the API's JSON, and gunicorn's hooks (cmd.py:
the bus joined at worker start only when transport_url is set; a worker that used the bus stops it
and leaves)."""

import random

from ekko_libvirt.api.app import host_of

U = "6a1f2f0e-0000-4000-8000-00000000abcd"


def h(name, when, domains, down=False):
    return {"host": name, "last_heartbeat": when, "domains": domains, "down": down}


def test_the_host_where_it_runs_wins_over_a_newer_one_that_only_holds_it():
    # live migration: the source still lists the domain (shut off there), the target runs it
    hosts = [h("src", "2026-12-05T10:00:09Z", [{"uuid": U, "running": False}]),
             h("dst", "2026-12-05T10:00:01Z", [{"uuid": U, "running": True}])]
    for seed in range(20):
        rnd = random.Random(seed)
        shuffled = hosts[:]
        rnd.shuffle(shuffled)
        assert host_of(shuffled, U) == "dst", seed


def test_a_down_host_is_never_chosen_and_the_newest_heartbeat_breaks_ties():
    assert host_of([h("a", "2026-12-05T10:00:09Z", [{"uuid": U, "running": True}], down=True)], U) is None
    hosts = [h("old", "2026-12-05T09:59:00Z", [{"uuid": U, "running": True}]),
             h("new", "2026-12-05T10:00:00Z", [{"uuid": U, "running": True}]),
             h("dead", "2026-12-05T10:00:30Z", [{"uuid": U, "running": True}], down=True)]
    assert host_of(hosts, U) == "new"
    assert host_of([h("off", "2026-12-05T10:00:00Z", [{"uuid": U, "running": False}])], U) == "off"
    assert host_of([h("plain", "2026-12-05T10:00:00Z", [U])], U) == "plain"       # bare UUIDs
    assert host_of(hosts, "00000000-0000-4000-8000-000000000000") is None


def test_backup_now_answers_failed_when_the_bus_already_failed_it(tmp_path):
    """The agent went silent between hosts() and the request: Bus.backup_now fails the job at once;
    POST says so (state failed, the bus's error) instead of 'queued'."""
    from keystonemiddleware import fixture as ks_fixture

    from ekko_libvirt.api.app import create_app

    from .api_world import FakeBus, FakeGlance, GuestOpener, api_conf_for, make_world

    class FailingBus(FakeBus):
        def job(self, job_id):
            return {"id": job_id, "state": "failed", "result": None, "error": "agent on cmp1 is not answering"}

    w = make_world(str(tmp_path / "store"), random.Random(3))
    inst, project = next(iter(w.project_of.items()))
    auth = ks_fixture.AuthTokenFixture()
    auth.setUp()
    try:
        auth.add_token_data(token_id="tok", project_id=project, role_list=["member"], user_id="u")
        app = create_app(api_conf_for(str(tmp_path / "index.sqlite")), bus=FailingBus([inst]), glance=FakeGlance(),
                         open_guest=GuestOpener(), ekko=w.cfg)
        r = app.test_client().post(f"/v1/instances/{inst}/backups", json={}, headers={"X-Auth-Token": "tok"})
    finally:
        auth.cleanUp()
    assert r.status_code == 202, r.get_json()
    job = r.get_json()["job"]
    assert (job["state"], job["host"], job["error"]) == ("failed", "cmp1", "agent on cmp1 is not answering")


def test_keystone_unreachable_is_the_apis_json_503(tmp_path, caplog):
    """Real auth_token, no fixture, Keystone on a port where nothing listens: the token cannot be
    checked -> 503 in the API's JSON error format (auth_token's own is a text/HTML page), no
    traceback, and the token in no log line."""
    import socket

    from ekko_libvirt.api.app import KEYSTONE_DOWN, create_app

    from ekko_libvirt.api import conf as api_conf

    from .api_world import FakeBus, FakeGlance, GuestOpener, make_world

    with socket.socket() as s:          # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = make_world(str(tmp_path / "store"), random.Random(5))
    ini = tmp_path / "ekko-api.conf"
    ini.write_text(f"""[keystone_authtoken]
auth_type = password
auth_url = http://127.0.0.1:{port}/v3
www_authenticate_uri = http://127.0.0.1:{port}/v3
username = ekko
password = not-a-real-password
project_name = service
user_domain_name = Default
project_domain_name = Default
http_connect_timeout = 2
http_request_max_retries = 0
""")
    conf = api_conf.load([], files=[str(ini)])
    conf.set_override("index_path", str(tmp_path / "index.sqlite"), group="api")
    app = create_app(conf, bus=FakeBus([]), glance=FakeGlance(), open_guest=GuestOpener(), ekko=w.cfg)
    token = "gAAAAAB" + "x" * 180
    r = app.test_client().get("/v1/instances", headers={"X-Auth-Token": token})
    assert r.status_code == 503, r.data
    assert r.headers["Content-Type"] == "application/json"
    assert r.get_json() == {"error": {"code": 503, "message": KEYSTONE_DOWN}}
    assert b"Traceback" not in r.data
    assert all(token not in rec.getMessage() and "not-a-real-password" not in rec.getMessage()
               for rec in caplog.records)
    r = app.test_client().get("/v1/instances")                        # no token: auth_token's own JSON 401
    assert r.status_code == 401 and r.get_json()["error"]["code"] == 401


def test_bus_is_joined_at_worker_start_only_when_transport_url_is_set(tmp_path):
    from ekko_libvirt.api import cmd
    from ekko_libvirt.api import conf as api_conf
    assert cmd.bus_configured(api_conf.load([], files=[])) is False        # oslo's default 'rabbit://'
    ini = tmp_path / "api.conf"
    ini.write_text("[DEFAULT]\ntransport_url = rabbit://ekko:secret@127.0.0.1:5672/\n")
    assert cmd.bus_configured(api_conf.load([], files=[str(ini)])) is True


def test_worker_exit_stops_the_bus_then_leaves_and_leaves_alone_a_worker_without_one(monkeypatch):
    from ekko_libvirt.api import cmd

    class App:
        def __init__(self, bus):
            self.extensions = {"ekko": type("Api", (), {"bus": bus})()}

    class Bus:
        stopped = 0

        def stop(self):
            Bus.stopped += 1

    exits = []
    monkeypatch.setattr(cmd.os, "_exit", exits.append)
    monkeypatch.setattr(cmd.logging, "shutdown", lambda: exits.append("logs flushed"))   # not pytest's handlers
    worker = type("W", (), {"pid": 1})()
    cmd.worker_exit_for(App(None))(None, worker)
    assert (Bus.stopped, exits) == (0, [])
    cmd.worker_exit_for(App(Bus()))(None, worker)
    assert (Bus.stopped, exits) == (1, ["logs flushed", 0])


def test_an_agent_that_cannot_queue_a_request_fails_the_job_itself():
    """The agent's submit raising (a bug, a full queue): the job fails saying the agent could not
    queue it, and the call answers not accepted, instead of the exception travelling back through
    oslo.messaging as if the bus had failed."""
    from ekko_libvirt.api.bus_agent import AgentEndpoint

    class Bus:
        agent_id = "a1"
        states = []

        def job_state(self, job_id, state, error=None, result=None):
            self.states.append((job_id, state, error))

    def submit(req):
        raise RuntimeError("queue closed")

    bus = Bus()
    out = AgentEndpoint(bus, submit).backup_now({}, job_id="j1", domain_uuid=U, force_full=False)
    why = "the agent could not queue the request: RuntimeError"
    assert out == {"accepted": False, "error": why, "agent_id": "a1"}
    assert bus.states == [("j1", "queued", None), ("j1", "failed", why)]

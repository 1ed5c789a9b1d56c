"""The API's Bus and the agent's AgentBus over a real RabbitMQ (tests/harness/rabbitmq.py): both
in this process, each with its own transport, the API's configured from an ekko-api.conf file as in
production ([DEFAULT] transport_url, [bus]).

    register + heartbeats        show in Bus.hosts()
    backup_now                   reaches the agent's endpoint; its job updates come back
    an agent gone silent         backup_now fails at once (no message); an agent that heartbeats
                                 but does not take calls fails it within call_timeout, and the
                                 request is not run when it comes back (expired on the broker)
    RabbitMQ restarted           a request while it is down fails at once; after it, heartbeats
                                 and requests work again on both sides
    no transport password        in any log record of any logger, at DEBUG
"""

import logging
import os
import threading
import time
import uuid

import pytest

from ekko_libvirt.agent.settings import BusSettings
from ekko_libvirt.api import busrules
from ekko_libvirt.api import conf as api_conf
from ekko_libvirt.api.bus import CALL_GRACE_S, Bus
from ekko_libvirt.api.bus_agent import AgentBus
from rabbit_fixtures import rabbit  # noqa: F401

U1 = "6f1c2d8e-1111-4222-8333-944455556666"
BEAT = 0.5           # the agents' heartbeat interval here: dead after busrules.MIN_DEAD_S (5 s)
CALL_TIMEOUT = 2.0


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


class Records(logging.Handler):
    """Every log record of every logger, formatted with its arguments, at DEBUG."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []          # appended under Handler.handle's own lock

    def emit(self, record):
        try:
            text = record.getMessage()
        except Exception:   # noqa: BLE001 -- a bad format string is still a line to check
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]!r}"
        self.lines.append(f"{record.name} {record.levelname} {text}")


@pytest.fixture(scope="module")
def all_logs():
    h = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(h)
    root.setLevel(logging.DEBUG)
    try:
        yield h
    finally:
        root.removeHandler(h)
        root.setLevel(level)


@pytest.fixture
def api_bus(rabbit, tmp_path, all_logs):
    """A Bus (the API's side) configured from a file, stopped at teardown."""
    made = []

    def make(call_timeout=CALL_TIMEOUT):
        path = tmp_path / f"ekko-api-{len(made)}.conf"
        path.write_text(f"[DEFAULT]\ntransport_url = {rabbit.transport_url}\n"
                        f"[bus]\nstate_path = {tmp_path}/bus.sqlite\ncall_timeout = {call_timeout}\n")
        bus = Bus(api_conf.load(files=[str(path)]))
        made.append(bus)
        assert bus.wait_listening(60), "the API's RPC server did not start"
        return bus
    yield make
    for b in made:
        b.stop()


class FakeHost:
    """What an agent reports and receives, without libvirt: an AgentBus wired to lists."""

    def __init__(self, url, host="cmp1"):
        self.requests = []
        self.domains = [{"uuid": U1, "name": "vm1", "running": True}]
        self.bus = AgentBus(BusSettings(url, host, BEAT), "9.9", self.report, self.requests.append)

    def report(self):
        return {"domains": self.domains, "failing": []}


@pytest.fixture
def agent_buses(rabbit):
    made = []

    def make(host="cmp1"):
        a = FakeHost(rabbit.transport_url, host)
        a.bus.start()
        made.append(a)
        return a
    yield make
    for a in made:
        a.bus.stop()


def beats_after(bus, host, t):
    row = bus.db.host(host)
    return row is not None and row["last_heartbeat"] > t and row


def test_register_heartbeat_request_and_job_updates(api_bus, agent_buses, all_logs):
    bus = api_bus()
    agent = agent_buses()
    first = wait_for(lambda: bus.db.host("cmp1"), 30, "registration")
    assert any("agent on cmp1 registered" in line for line in all_logs.lines)
    wait_for(lambda: beats_after(bus, "cmp1", first["last_heartbeat"]), 10, "a second heartbeat")
    (h,) = bus.hosts()
    assert (h["host"], h["version"], h["interval_s"], h["alive"], h["down"]) == ("cmp1", "9.9", BEAT, True, False)
    assert h["domains"] == agent.domains

    t = time.monotonic()
    job_id = bus.backup_now("cmp1", U1, force_full=True)
    assert time.monotonic() - t < CALL_TIMEOUT
    (req,) = agent.requests
    assert (req.job_id, req.domain_uuid, req.force_full) == (job_id, U1, True)
    j = bus.job(job_id)
    assert (j["state"], j["host"], j["agent_id"]) == ("queued", "cmp1", agent.bus.agent_id)

    agent.bus.job_state(job_id, "running")
    wait_for(lambda: bus.job(job_id)["state"] == "running", 10, "running")
    agent.bus.job_state(job_id, "done", {"backup_id": "20261205T080000Z-abc"})
    j = wait_for(lambda: (x := bus.job(job_id))["state"] == "done" and x, 10, "done")
    assert j["result"] == {"backup_id": "20261205T080000Z-abc"} and j["error"] is None

    # a request the agent refuses (hostile arguments never reach its loop)
    bad = bus.backup_now("cmp1", "not-a-uuid")
    j = bus.job(bad)
    assert j["state"] == "failed" and "refused the request: domain_uuid is not a UUID" in j["error"]
    assert len(agent.requests) == 1


def test_silent_agent_fails_at_once_and_a_deaf_one_within_call_timeout(api_bus, agent_buses, rabbit):
    bus = api_bus()
    agent = agent_buses("cmp2")
    wait_for(lambda: bus.db.host("cmp2"), 30, "registration")
    never = bus.backup_now("nohost", U1)
    assert "no heartbeat from it ever reached the API" in bus.job(never)["error"]

    # heartbeats go on, but the RPC server is gone: the call times out, the job fails with why
    agent.bus.server.stop()
    agent.bus.server.wait()
    t = time.monotonic()
    deaf = bus.backup_now("cmp2", U1)
    took = time.monotonic() - t
    assert CALL_TIMEOUT - 0.1 <= took < CALL_TIMEOUT + 3, took
    j = bus.job(deaf)
    assert j["state"] == "failed" and "did not take the request within 2 s" in j["error"], j
    assert "last heartbeat" in j["error"]
    # it comes back (a new process on the same host): the request expired on the broker, not run
    agent.bus.stop()
    back = agent_buses("cmp2")
    wait_for(lambda: bus.db.host("cmp2")["agent_id"] == back.bus.agent_id, 30, "the new agent's registration")
    ok = bus.backup_now("cmp2", U1)
    assert [r.job_id for r in back.requests] == [ok], back.requests       # `deaf` never arrived

    # now it falls silent: after MIN_DEAD_S without a heartbeat the next request fails at once
    back.bus.job_state(ok, "running")
    wait_for(lambda: bus.job(ok)["state"] == "running", 10, "running")
    back.bus.stop()
    last = bus.db.host("cmp2")["last_heartbeat"]
    j = wait_for(lambda: (x := bus.job(ok))["state"] == "failed" and x, 15, "the running job failed")
    assert "agent on cmp2 is not answering (last heartbeat" in j["error"]
    assert time.time() - last >= busrules.MIN_DEAD_S      # not before MIN_DEAD_S of silence
    t = time.monotonic()
    late = bus.backup_now("cmp2", U1)
    assert time.monotonic() - t < 0.5                      # no message sent, nothing waited for
    assert bus.job(late)["state"] == "failed" and "is not answering" in bus.job(late)["error"]
    assert [h["down"] for h in bus.hosts() if h["host"] == "cmp2"] == [True]


def test_rabbitmq_restart_both_sides_recover(api_bus, agent_buses, rabbit, all_logs):
    bus = api_bus()
    agent = agent_buses("cmp3")
    wait_for(lambda: bus.db.host("cmp3"), 30, "registration")
    first = bus.backup_now("cmp3", U1)
    assert bus.job(first)["state"] == "queued"

    rabbit.stop_server()
    t = time.monotonic()
    down = bus.backup_now("cmp3", U1)                # broker away: fails now (retry=0), no hang
    assert time.monotonic() - t < CALL_TIMEOUT + 1
    j = bus.job(down)
    assert j["state"] == "failed" and "the message bus did not carry the request" in j["error"], j
    agent.bus.job_state(first, "done", {"backup_id": "b-during-outage"})      # lost with the broker...
    time.sleep(1)
    rabbit.start()
    restarted = time.time()

    # ...and repaired by the job list of the next heartbeat that gets through
    wait_for(lambda: beats_after(bus, "cmp3", restarted), 60, "a heartbeat after the restart")
    j = wait_for(lambda: (x := bus.job(first))["state"] == "done" and x, 30, "the lost update repaired")
    assert j["result"] == {"backup_id": "b-during-outage"}

    # a request after the restart reaches the agent (its RPC server reconnected by itself)
    deadline = time.monotonic() + 60
    attempts = []
    while time.monotonic() < deadline:
        job_id = bus.backup_now("cmp3", U1)
        attempts.append(bus.job(job_id))
        if job_id in [r.job_id for r in agent.requests]:
            break
    else:
        raise AssertionError(f"no request reached the agent after the restart: {attempts}")
    assert attempts[-1]["state"] == "queued" and attempts[-1]["agent_id"] == agent.bus.agent_id
    assert all(a["state"] == "failed" and a["error"] for a in attempts[:-1])
    agent.bus.job_state(attempts[-1]["id"], "done", {"backup_id": "b-after"})
    wait_for(lambda: bus.job(attempts[-1]["id"])["state"] == "done", 10, "the update after the restart")


# -- the API end to end on the real bus --------------------------------------------------------------
class RunningAgent(FakeHost):
    """An agent without libvirt that does what `ekko agent` does with a request: reports it running,
    commits a backup of the instance to the real store, reports it done with the backup id."""

    def __init__(self, url, host, cfg, project):
        super().__init__(url, host)
        self.bus = AgentBus(BusSettings(url, host, BEAT), "9.9", self.report, self.run)
        self.cfg, self.project, self.n = cfg, project, 100

    def run(self, req):
        from tests.unit.api_world import backup_id, commit

        def work():
            self.bus.job_state(req.job_id, "running")
            self.n += 1
            bid = backup_id(self.n)
            commit(self.cfg, self.project, req.domain_uuid, "web-1", "vda", bid, kind="incremental")
            self.bus.job_state(req.job_id, "done", {"backup_id": bid})
        self.requests.append(req)
        threading.Thread(target=work, daemon=True).start()


def test_api_backup_now_and_job_on_the_real_bus(rabbit, tmp_path, all_logs):
    from keystonemiddleware import fixture as ks_fixture

    from ekko_libvirt import config as ekko_config
    from ekko_libvirt.api.app import create_app
    from tests.unit.api_world import backup_id, commit

    project, inst = "p-5678", U1
    cfg = ekko_config.build({"store": {"type": "local", "path": str(tmp_path / "store")}})
    commit(cfg, project, inst, "web-1", "vda", backup_id(1))             # the instance has a backup
    path = tmp_path / "ekko-api.conf"
    path.write_text(f"[DEFAULT]\ntransport_url = {rabbit.transport_url}\n"
                    f"[bus]\nstate_path = {tmp_path}/bus.sqlite\ncall_timeout = {CALL_TIMEOUT}\n"
                    f"[api]\nindex_path = {tmp_path}/index.sqlite\nindex_max_age = 0\n"
                    "[keystone_authtoken]\nwww_authenticate_uri = http://127.0.0.1:5000/v3\n")
    auth = ks_fixture.AuthTokenFixture()
    auth.setUp()
    bus = Bus(api_conf.load(files=[str(path)]))
    agent = RunningAgent(rabbit.transport_url, "cmp4", cfg, project)
    try:
        assert bus.wait_listening(60)
        client = create_app(bus.conf, bus=bus, ekko=cfg).test_client()
        token = uuid.uuid4().hex
        auth.add_token_data(token_id=token, project_id=project, role_list=["member"], user_id=uuid.uuid4().hex)
        hdr = {"X-Auth-Token": token}

        r = client.post(f"/v1/instances/{inst}/backups", json={}, headers=hdr)     # no agent ever heartbeated
        assert r.status_code == 409 and "runs on no host whose agent is up" in r.get_json()["error"]["message"]

        agent.bus.start()
        wait_for(lambda: bus.db.host("cmp4"), 30, "registration")
        r = client.post(f"/v1/instances/{inst}/backups", json={"force_full": True}, headers=hdr)
        assert r.status_code == 202, r.get_json()
        job = r.get_json()["job"]
        assert job["host"] == "cmp4" and job["state"] == "queued"
        j = wait_for(lambda: (x := client.get(f"/v1/jobs/{job['id']}", headers=hdr).get_json()["job"])["state"]
                     in busrules.FINAL and x, 30, "the job's end through the API")
        assert j["state"] == "done", j
        bid = j["result"]["backup_id"]
        assert [(q.domain_uuid, q.force_full) for q in agent.requests] == [(inst, True)]
        shown = client.get(f"/v1/backups/{bid}", headers=hdr)
        assert shown.status_code == 200 and shown.get_json()["backup"]["instance_id"] == inst

        # the agent stops: once it counts as down, a request is a clear 409 at once, not a hang
        agent.bus.stop()
        wait_for(lambda: not bus.hosts()[0]["alive"], 15, "the host counted down")
        t = time.monotonic()
        r = client.post(f"/v1/instances/{inst}/backups", json={}, headers=hdr)
        assert time.monotonic() - t < 1
        assert r.status_code == 409 and "runs on no host whose agent is up" in r.get_json()["error"]["message"]
        assert len(agent.requests) == 1
    finally:
        bus.stop()
        auth.cleanUp()
    assert not [line for line in all_logs.lines if token in line or rabbit.password in line]


def test_broker_unreachable_neither_side_blocks(tmp_path, all_logs):
    """A broker that is not there (a closed port): the agent's bus and the API's Bus start and stop
    at once (their RPC servers keep connecting in their own threads), a request fails at once."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                       # closed again: nothing listens there
    url = f"rabbit://ekko:unreachable-pw@127.0.0.1:{port}/"
    t = time.monotonic()
    agent = FakeHost(url, "cmp5")
    agent.bus.start()
    path = tmp_path / "ekko-api.conf"
    path.write_text(f"[DEFAULT]\ntransport_url = {url}\n[bus]\nstate_path = {tmp_path}/bus.sqlite\n"
                    "call_timeout = 1\n")
    bus = Bus(api_conf.load(files=[str(path)]))
    assert time.monotonic() - t < 3
    assert not bus.wait_listening(1)
    bus.db.save_host("cmp5", "a1", "9.9", BEAT, [], [], time.time())     # as if it had heartbeated
    t = time.monotonic()
    j = bus.job(bus.backup_now("cmp5", U1))
    assert time.monotonic() - t < 0.5                     # its own server never connected: no call at all
    assert j["state"] == "failed" and "the API has not reached the message bus yet" in j["error"], j
    # a process that only sends (no server): the call's reply queue waits on a connection that
    # retries for ever, whatever retry=0 says; the call is cut at call_timeout + CALL_GRACE_S
    sender = Bus(api_conf.load(files=[str(path)]), listen=False)
    t = time.monotonic()
    j = sender.job(sender.backup_now("cmp5", U1))
    assert time.monotonic() - t < 1 + CALL_GRACE_S + 1
    assert j["state"] == "failed" and "did not carry the request to the agent on cmp5: BusUnreachable" in j["error"]
    t = time.monotonic()
    agent.bus.stop(flush_s=1)
    bus.stop()
    sender.stop()
    assert time.monotonic() - t < 10
    assert any("never connected" in line for line in all_logs.lines)
    assert not [line for line in all_logs.lines if "unreachable-pw" in line]


def test_no_transport_password_in_any_log_line(rabbit, all_logs):
    """Runs last in this module: every record the tests above produced, at DEBUG, from every
    logger (ours, oslo.messaging, kombu, amqp)."""
    assert len(all_logs.lines) > 50, all_logs.lines          # the handler did see the traffic
    assert any("oslo.messaging" in line or "kombu" in line or "amqp" in line for line in all_logs.lines)
    leaks = [line for line in all_logs.lines if rabbit.password in line]
    assert not leaks, leaks[:5]
    logs = [str(rabbit.log_path)] + [os.path.join(d, n) for d, _, names in os.walk(rabbit.dir / "log") for n in names]
    assert len(logs) >= 2, logs
    for path in logs:                      # the broker's own logs (its config file holds the password)
        with open(path, errors="replace") as f:
            assert rabbit.password not in f.read(), path

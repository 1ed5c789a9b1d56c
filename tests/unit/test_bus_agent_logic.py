"""The agent's side of the bus without a broker: agent.bus settings (bad values refused naming the
key, the password never in the message), heartbeat_report / bus_outcome (pure), the request check
and URL redaction, BusLink between the endpoint and the loop, and the API's endpoint on hostile
casts (dropped, logged, nothing stored)."""

import logging
import threading

import pytest

from ekko_libvirt.agent.bus_link import BusLink, bus_outcome, heartbeat_report
from ekko_libvirt.agent.job_runner import Worker
from ekko_libvirt.agent.settings import AgentSettings, BusSettings
from ekko_libvirt.agent.state import ChainState, ChainStatus, DomainState, JobRecord, JobStatus
from ekko_libvirt.api.bus import ApiEndpoint
from ekko_libvirt.api.bus_agent import BusRequest, check_request, redact_url
from ekko_libvirt.api.busdb import BusDB
from ekko_libvirt.errors import ConfigError

URL = "rabbit://ekko:s3cr3t-pw@127.0.0.1:5672/"
U1, U2 = "6f1c2d8e-1111-4222-8333-944455556666", "7f1c2d8e-1111-4222-8333-944455556666"


# -- settings --------------------------------------------------------------------------------------
def bus_settings(bus):
    return AgentSettings.from_mapping({"agent": {"bus": bus}}).bus


def test_bus_settings_parsed():
    assert bus_settings(None) is None
    s = bus_settings({"transport_url": URL, "host": "cmp-1.example.org", "heartbeat_interval": 2})
    assert s == BusSettings(URL, "cmp-1.example.org", 2.0)
    assert "s3cr3t" not in repr(s)                       # repr=False on the URL
    assert bus_settings({"transport_url": URL}) == BusSettings(URL, "", 10.0)


@pytest.mark.parametrize("bus,key", [
    ("rabbit://x", "agent.bus"), ({"transport_url": URL, "hots": "x"}, "agent.bus.hots"),
    ({}, "agent.bus.transport_url"), ({"transport_url": "s3cr3t-pw"}, "agent.bus.transport_url"),
    ({"transport_url": 5}, "agent.bus.transport_url"), ({"transport_url": "rabbit://a:s3cr3t-pw@h/\n"},
                                                          "agent.bus.transport_url"),
    ({"transport_url": URL, "host": "a b"}, "agent.bus.host"), ({"transport_url": URL, "host": 7}, "agent.bus.host"),
    ({"transport_url": URL, "host": "-x"}, "agent.bus.host"), ({"transport_url": URL, "host": "x/y"}, "agent.bus.host"),
    ({"transport_url": URL, "heartbeat_interval": 0.1}, "agent.bus.heartbeat_interval"),
    ({"transport_url": URL, "heartbeat_interval": 3601}, "agent.bus.heartbeat_interval"),
    ({"transport_url": URL, "heartbeat_interval": True}, "agent.bus.heartbeat_interval"),
    ({"transport_url": URL, "heartbeat_interval": "10"}, "agent.bus.heartbeat_interval"),
    ({"transport_url": URL, "heartbeat_interval": float("nan")}, "agent.bus.heartbeat_interval"),
])
def test_bus_settings_refused_naming_the_key_never_the_password(bus, key):
    with pytest.raises(ConfigError) as e:
        bus_settings(bus)
    assert e.value.key == key, e.value
    assert "s3cr3t" not in str(e.value)


def test_redact_url():
    assert redact_url(URL) == "rabbit://ekko:***@127.0.0.1:5672/"
    assert redact_url("rabbit://u:p1@h1:5672,u:p2@h2:5672/vh") == "rabbit://u:***@h1:5672,u:***@h2:5672/vh"
    assert redact_url("rabbit://h1:5672/") == "rabbit://h1:5672/"
    assert redact_url("rabbit://u:p@ss@h:1/") == "rabbit://u:***@h:1/"       # '@' in the password
    assert "p1" not in redact_url("rabbit://u:p1@h1:5672/?ssl=1")


# -- the request check ----------------------------------------------------------------------------
def test_check_request():
    assert check_request("job-1", U1.upper(), True) == (BusRequest("job-1", U1, True), None)
    for args, word in [((None, U1, False), "job_id"), (("../x", U1, False), "job_id"),
                       (("j" * 129, U1, False), "job_id"),
                       (("j", "not-a-uuid", False), "domain_uuid"), (("j", 5, False), "domain_uuid"),
                       (("j", U1 + "0" * 100, False), "domain_uuid"), (("j", U1, "yes"), "force_full")]:
        req, why = check_request(*args)
        assert req is None and why.startswith(word), (args, why)


# -- heartbeat_report, bus_outcome ------------------------------------------------------------------
def rec(job_id, uuid, status, started, error=None):
    return JobRecord(job_id, uuid, "online", status, started, started + 1, 1, error=error)


def test_heartbeat_report_names_domains_and_the_failing_ones():
    doms = [DomainState(U1, "vm1", running=True, chain=ChainState(ChainStatus.OK, last_backup_id="b1")),
            DomainState(U2, "vm2", running=False)]
    jobs = [rec("a", U1, JobStatus.FAILED, 10, "old failure"), rec("b", U1, JobStatus.SUCCEEDED, 20),
            rec("c", U2, JobStatus.SUCCEEDED, 5), rec("d", U2, JobStatus.ABANDONED, 6)]
    out = heartbeat_report(doms, jobs)
    assert out["domains"] == [{"uuid": U1, "name": "vm1", "running": True, "chain": "ok", "last_backup_id": "b1"},
                              {"uuid": U2, "name": "vm2", "running": False, "chain": "none", "last_backup_id": None}]
    assert [(f["uuid"], f["job_id"], f["status"]) for f in out["failing"]] == [(U2, "d", "abandoned")]
    assert heartbeat_report(doms, list(reversed(jobs)))["failing"] == out["failing"]     # newest by start, not order


def test_bus_outcome():
    w = Worker(U1, "vm1", 60, outcome="ok", backup_id="b7")
    assert bus_outcome(w) == {"state": "done", "result": {"backup_id": "b7"}, "error": None}
    for outcome, error, want in [("failed", "store full", "store full"), ("busy", None, "backup ended: busy"),
                                 ("cancelled", "cancelled: the agent is stopping", "cancelled: the agent is stopping")]:
        w = Worker(U1, "vm1", 60, outcome=outcome, error=error)
        assert bus_outcome(w) == {"state": "failed", "result": None, "error": want}


# -- BusLink between the endpoint thread and the loop ------------------------------------------------
class FakeAgentBus:
    def __init__(self):
        self.states = []
        self.stopped = False

    def job_state(self, job_id, state, result=None, error=None):
        self.states.append((job_id, state, result, error))

    def stop(self):
        self.stopped = True


def test_bus_link_take_finished_and_stop():
    wake = threading.Event()
    link = BusLink(BusSettings(URL), sd=None, wakeup=wake)
    link.bus = FakeAgentBus()
    link._submit(BusRequest("j1", U1, False))
    link._submit(BusRequest("j2", U2, True))
    assert wake.is_set()
    started = []

    def start_now(uuid, full, job):
        started.append((uuid, full, job))
        return None if uuid == U1 else f"no domain {uuid} on this host"
    link.take(start_now)
    assert started == [(U1, False, "j1"), (U2, True, "j2")]
    assert link.bus.states == [("j1", "running", None, None), ("j2", "failed", None, f"no domain {U2} on this host")]
    link.finished(Worker(U1, "vm1", 60, outcome="ok", backup_id="b1", bus_job="j1"))
    link.finished(Worker(U1, "vm1", 60, outcome="ok", backup_id="b2"))          # a scheduled one: not a bus job
    assert link.bus.states[-1] == ("j1", "done", {"backup_id": "b1"}, None) and len(link.bus.states) == 3
    link._submit(BusRequest("j3", U1, False))           # taken off the bus, never started: fails at stop
    bus = link.bus
    link.stop()
    assert bus.states[-1] == ("j3", "failed", None, "the agent stopped before the backup started") and bus.stopped
    assert link.bus is None
    link.finished(Worker(U1, "vm1", 60, outcome="ok", bus_job="j4"))       # after stop: nothing, no error


# -- the API's endpoint on what comes off the bus ---------------------------------------------------
def test_api_endpoint_drops_hostile_casts(tmp_path, caplog):
    db = BusDB(str(tmp_path / "bus.sqlite"))
    ep = ApiEndpoint(db, clock=lambda: 1_800_000_000.0)
    db.add_job("j1", "cmp1", U1, "queued")
    db.accepted("j1", "a1")
    with caplog.at_level(logging.WARNING, "ekko.api.bus"):
        ep.heartbeat({}, report={"host": "cmp1; DROP TABLE hosts", "agent_id": "a1", "interval_s": 1})
        ep.heartbeat({}, report="garbage")
        ep.register({}, report=None)
        ep.job_update({}, host="cmp2", job_id="j1", state="done")          # another host's job: ignored
        ep.job_update({}, host="cmp1", job_id="j1", state="exploded")
    assert db.hosts() == [] and db.job("j1")["state"] == "queued"
    assert caplog.text.count("dropped") == 4, caplog.text
    ep.heartbeat({}, report={"host": "cmp1", "agent_id": "a2", "interval_s": 1, "jobs": {}})   # a2: a restart
    j = db.job("j1")
    assert j["state"] == "failed" and "restarted" in j["error"]
    assert [h["agent_id"] for h in db.hosts()] == ["a2"]

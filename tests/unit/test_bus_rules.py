"""The API side of the bus without a broker: busrules.py (pure: what a report, a silence or a
restart means for the jobs; hostile reports refused naming the field) and busdb.py (jobs only move
forward, a host's report never touches another host's jobs)."""

import math
import random

import pytest

from ekko_libvirt.api import busrules
from ekko_libvirt.api.busdb import BusDB
from ekko_libvirt.api.busrules import JobChange, ReportInvalid

T0 = 1_800_000_000.0


def report(**over):
    raw = {"host": "cmp1", "agent_id": "a1", "version": "0.1", "interval_s": 10, "domains": [{"uuid": "u"}],
           "failing": [], "jobs": {}}
    raw.update(over)
    return raw


def job(jid, state, agent_id="a1"):
    return {"id": jid, "state": state, "agent_id": agent_id}


# -- liveness --------------------------------------------------------------------------------------
def test_not_answering_after_three_intervals_or_at_least_min():
    row = {"last_heartbeat": T0, "interval_s": 10.0}
    assert busrules.not_answering("cmp1", row, T0 + 30) is None
    why = busrules.not_answering("cmp1", row, T0 + 30.5)
    assert why is not None and "agent on cmp1 is not answering" in why and "30 s ago" in why
    assert busrules.when(T0) in why
    fast = {"last_heartbeat": T0, "interval_s": 0.5}          # 3 x 0.5 s is below MIN_DEAD_S: 5 s count
    assert busrules.not_answering("cmp1", fast, T0 + busrules.MIN_DEAD_S) is None
    assert busrules.not_answering("cmp1", fast, T0 + busrules.MIN_DEAD_S + 0.1) is not None
    never = busrules.not_answering("cmp9", None, T0)
    assert never is not None and "no heartbeat from it ever reached the API" in never


# -- forward only ----------------------------------------------------------------------------------
@pytest.mark.parametrize("old,new,ok", [
    ("queued", "running", True), ("queued", "done", True), ("queued", "failed", True), ("running", "done", True),
    ("running", "failed", True), ("running", "queued", False), ("running", "running", False),
    ("done", "failed", False), ("failed", "done", False), ("failed", "running", False), ("queued", "bogus", False),
])
def test_advances(old, new, ok):
    assert busrules.advances(old, new) is ok


# -- reconcile ------------------------------------------------------------------------------------
def test_reconcile_takes_reported_states_forward_only():
    r = busrules.parse_report(report(jobs={"j1": {"state": "done", "result": {"backup_id": "b"}, "error": None},
                                           "j2": {"state": "queued"}, "j9": {"state": "failed", "error": "x"}}))
    out = busrules.reconcile(r, [job("j1", "running"), job("j2", "running"), job("j3", "queued")])
    # j1 done; j2's report is older than what we have (queued < running): kept; j3 not reported by the
    # same agent: left alone (its update may be on its way); j9 is not open here: nothing
    assert out == [JobChange("j1", "done", {"backup_id": "b"}, None)]


def test_reconcile_fails_jobs_of_a_restarted_agent_only():
    r = busrules.parse_report(report(agent_id="a2", jobs={"j4": {"state": "running"}}))
    out = busrules.reconcile(r, [job("j1", "running", "a1"), job("j2", "queued", None), job("j3", "queued", "a2"),
                                 job("j4", "queued", "a1")])
    assert [c.job_id for c in out] == ["j1", "j4"]
    lost = out[0]
    assert lost.state == "failed" and "agent on cmp1 restarted while the job was running" in lost.error
    assert out[1] == JobChange("j4", "running", None, None)     # reported by the new one: not lost


def test_silenced_fails_every_open_job():
    out = busrules.silenced([job("j1", "queued"), job("j2", "running")], "agent on cmp1 is not answering")
    assert out == [JobChange("j1", "failed", None, "agent on cmp1 is not answering"),
                   JobChange("j2", "failed", None, "agent on cmp1 is not answering")]


# -- hostile reports -------------------------------------------------------------------------------
@pytest.mark.parametrize("over,field", [
    ({"host": None}, "host"), ({"host": ""}, "host"), ({"host": "a b"}, "host"), ({"host": "x" * 300}, "host"),
    ({"host": "../etc"}, "host"), ({"agent_id": 5}, "agent_id"), ({"agent_id": "a/b"}, "agent_id"),
    ({"interval_s": "10"}, "interval_s"), ({"interval_s": True}, "interval_s"), ({"interval_s": 0}, "interval_s"),
    ({"interval_s": math.nan}, "interval_s"), ({"interval_s": math.inf}, "interval_s"),
    ({"interval_s": 1e9}, "interval_s"), ({"domains": "u"}, "domains"), ({"domains": [1]}, "domains"),
    ({"domains": [{}] * (busrules.MAX_DOMAINS + 1)}, "domains"), ({"failing": {"a": 1}}, "failing"),
    ({"jobs": []}, "jobs"), ({"jobs": {"j": {"state": "won"}}}, "jobs.j.state"),
    ({"jobs": {"j": "done"}}, "jobs.j"), ({"jobs": {"j": {"state": "done", "result": [1]}}}, "jobs.j.result"),
    ({"jobs": {"j": {"state": "failed", "error": 7}}}, "jobs.j.error"),
    ({"jobs": {"-x": {"state": "done"}}}, "jobs key"),
    ({"version": 3}, "version"),
])
def test_parse_report_refuses_naming_the_field(over, field):
    with pytest.raises(ReportInvalid) as e:
        busrules.parse_report(report(**over))
    assert e.value.field == field, e.value


def test_parse_report_refuses_non_mapping_and_cuts_long_text():
    with pytest.raises(ReportInvalid) as e:
        busrules.parse_report(["host", "cmp1"])
    assert e.value.field == "report"
    r = busrules.parse_report(report(version="v" * 500, jobs={"j": {"state": "failed", "error": "e" * 10_000}}))
    assert len(r.version) == 64 and len(r.jobs["j"].error) == busrules.MAX_TEXT
    assert r.interval_s == 10.0 and isinstance(r.interval_s, float)


def test_parse_report_fuzz_never_raises_anything_but_report_invalid():
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    junk = [None, True, 0, -1, 1e308, math.nan, "", "x", "cmp1", [], {}, [{}], {"state": "done"}, "a" * 5000,
            {"j": {"state": "running"}}, 0.5, "\x00", "é"]
    for _ in range(3000):
        raw = report(**{k: rnd.choice(junk) for k in rnd.sample(list(report()), rnd.randint(1, 4))})
        try:
            r = busrules.parse_report(raw)
        except ReportInvalid:
            continue
        assert isinstance(r.host, str) and 0.2 <= r.interval_s <= 3600, f"seed {seed}: {raw!r}"


def test_parse_job_update():
    assert busrules.parse_job_update("cmp1", "job-1", "done", {"backup_id": "b"}, None) == \
        JobChange("job-1", "done", {"backup_id": "b"}, None)
    for args, field in [(("cmp 1", "j", "done", None, None), "host"), (("cmp1", "", "done", None, None), "job_id"),
                        (("cmp1", "j", "gone", None, None), "job.state"),
                        (("cmp1", "j", "done", "b", None), "job.result")]:
        with pytest.raises(ReportInvalid) as e:
            busrules.parse_job_update(*args)
        assert e.value.field == field


# -- busdb ----------------------------------------------------------------------------------------
def test_busdb_jobs_move_forward_only_and_stay_with_their_host(tmp_path):
    db = BusDB(str(tmp_path / "sub" / "bus.sqlite"))
    db.add_job("j1", "cmp1", "u1", "queued", now=T0)
    assert db.job("j1")["agent_id"] is None
    db.accepted("j1", "a1")
    assert db.update_job("j1", "running", host="cmp2") is False          # another host's report
    assert db.update_job("j1", "running", host="cmp1", now=T0 + 1) is True
    assert db.update_job("j1", "queued", host="cmp1") is False           # backwards
    assert db.update_job("j1", "done", {"backup_id": "b1"}, now=T0 + 2) is True
    assert db.update_job("j1", "failed", None, "late") is False          # final stays final
    j = db.job("j1")
    assert (j["state"], j["result"], j["error"], j["agent_id"], j["updated"]) == ("done", {"backup_id": "b1"}, None,
                                                                                 "a1", T0 + 2)
    db.add_job("j2", "cmp1", "u1", "queued")
    db.add_job("j3", "cmp2", "u2", "queued")
    assert [j["id"] for j in db.open_jobs("cmp1")] == ["j2"]
    assert db.job("nope") is None
    db.save_host("cmp1", "a1", "0.1", 10.0, [{"uuid": "u1"}], [], T0)
    db.save_host("cmp1", "a2", "0.2", 5.0, [], [{"uuid": "u1"}], T0 + 5)       # replaces
    assert db.hosts() == [{"host": "cmp1", "agent_id": "a2", "version": "0.2", "interval_s": 5.0,
                           "last_heartbeat": T0 + 5, "domains": [], "failing": [{"uuid": "u1"}]}]

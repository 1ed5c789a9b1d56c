import re
from datetime import datetime, timedelta, timezone

import pytest

from ekko_libvirt.agent.scheduler import (INHERIT, DomainStatus, Policy, PolicyOverride, TimeWindow, Why, decide, override_from_mapping, parse_interval, plan, policy_from_mapping)
from ekko_libvirt.errors import ConfigError

TZ = timezone(timedelta(hours=2))
DAY = 24 * 3600


def at(h, m=0, day=10):
    return datetime(2024, 6, day, h, m, tzinfo=TZ)


def dom(uuid, last=None, **kw):
    return DomainStatus(uuid, last, **kw)


# --- windows -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,inside,outside", [
    ("22:00-06:00", [at(22), at(23, 59), at(0), at(5, 59)], [at(6), at(12), at(21, 59)]),
    ("01:30-04:00", [at(1, 30), at(3, 59)], [at(1, 29), at(4), at(23)]),
    ("00:00-24:00", [at(0), at(12), at(23, 59)], []),
])
def test_window_contains(text, inside, outside):
    w = TimeWindow.parse(text)
    assert str(w) == text
    assert all(w.contains(t) for t in inside) and not any(w.contains(t) for t in outside)


def test_window_next_open():
    w = TimeWindow.parse("22:00-06:00")
    assert w.next_open(at(12)) == at(22)
    assert w.next_open(at(23)) == at(23)
    assert TimeWindow.parse("01:00-02:00").next_open(at(3)) == at(1, day=11)


@pytest.mark.parametrize("bad", ["22-06", "25:00-01:00", "10:60-11:00", "10:00-10:00", "24:00-01:00",
                                 "00:00-24:30", "", "x"])
def test_window_parse_rejects(bad):
    with pytest.raises(ValueError, match=rf"time window: {re.escape(repr(bad))} \("):
        TimeWindow.parse(bad)


# --- decisions -----------------------------------------------------------------------------------

def test_never_backed_up_is_due():
    d = decide(at(12), dom("a"), Policy())
    assert d.due and d.why is Why.NEVER_BACKED_UP


def test_interval():
    p = Policy(interval_s=DAY)
    assert decide(at(12), dom("a", at(12, day=9)), p).why is Why.INTERVAL_ELAPSED
    d = decide(at(12), dom("a", at(13, day=9)), p)
    assert d.why is Why.NOT_DUE and d.next_due == at(13)


def test_interval_with_last_backup_in_other_timezone():
    last = datetime(2024, 6, 9, 10, 0, tzinfo=timezone.utc)          # = 12:00 +02:00
    assert decide(at(12), dom("a", last), Policy(interval_s=DAY)).due
    assert not decide(at(11, 59), dom("a", last), Policy(interval_s=DAY)).due


def test_window_closed_and_next_due_respects_window():
    p = Policy(interval_s=DAY, window=TimeWindow.parse("22:00-06:00"))
    d = decide(at(12), dom("a"), p)
    assert d.why is Why.OUTSIDE_WINDOW and d.next_due == at(22)
    assert decide(at(23), dom("a"), p).due
    d = decide(at(23), dom("a", at(5, day=10)), p)                    # due at 05:00 on the 11th: inside
    assert d.why is Why.NOT_DUE and d.next_due == at(5, day=11)
    d = decide(at(23), dom("a", at(8, day=10)), p)                    # due at 08:00: waits for 22:00
    assert d.next_due == at(22, day=11)


def test_disabled_job_running_stopped():
    assert decide(at(12), dom("a"), Policy(enabled=False)).why is Why.DISABLED
    assert decide(at(12), dom("a", job_running=True), Policy()).why is Why.JOB_RUNNING
    assert decide(at(12), dom("a", active=False), Policy()).why is Why.STOPPED
    assert decide(at(12), dom("a", active=False), Policy(backup_stopped=True)).due


def test_naive_datetimes_refused():
    with pytest.raises(ValueError, match="^now must be timezone-aware"):
        decide(datetime(2024, 6, 10, 12), dom("a"), Policy())
    with pytest.raises(ValueError, match="^last_backup of a must be timezone-aware"):
        decide(at(12), dom("a", datetime(2024, 6, 9)), Policy())


# --- plan ----------------------------------------------------------------------------------------

def test_plan_orders_by_overdue_and_applies_host_limit():
    doms = [dom("c", at(9, day=9)), dom("b", at(8, day=9)), dom("new"), dom("d", at(11, day=10)),
            dom("e", at(1, day=9))]
    p = plan(at(12), doms, Policy(interval_s=DAY), max_concurrent=2)
    assert [d.uuid for d in p.start] == ["new", "e"]
    waiting = {d.uuid: d.why for d in p.waiting}
    assert waiting == {"d": Why.NOT_DUE, "b": Why.HOST_LIMIT, "c": Why.HOST_LIMIT}
    assert p.next_wakeup == at(11, day=11)


def test_plan_counts_running_jobs_against_the_limit():
    doms = [dom("a", job_running=True), dom("b"), dom("c")]
    p = plan(at(12), doms, max_concurrent=2)
    assert [d.uuid for d in p.start] == ["b"]
    assert {d.uuid: d.why for d in p.waiting} == {"a": Why.JOB_RUNNING, "c": Why.HOST_LIMIT}
    assert plan(at(12), [dom("a", job_running=True), dom("b")], max_concurrent=1).start == ()


def test_plan_per_domain_override_merged_over_default():
    default = Policy(interval_s=DAY, window=TimeWindow.parse("22:00-06:00"), disks=("vda",))
    overrides = {"b": PolicyOverride(window=None, interval_s=3600), "c": PolicyOverride(enabled=False)}
    p = plan(at(12), [dom("a"), dom("b", at(10, day=10)), dom("c")], default, overrides, max_concurrent=5)
    assert [d.uuid for d in p.start] == ["b"]
    assert p.start[0].policy == Policy(interval_s=3600, window=None, disks=("vda",))
    assert {d.uuid: d.why for d in p.waiting} == {"a": Why.OUTSIDE_WINDOW, "c": Why.DISABLED}
    assert p.next_wakeup == at(22)


def test_plan_nothing_due():
    p = plan(at(12), [], max_concurrent=1)
    assert p == plan(at(12), [], max_concurrent=3) and p.start == () and p.next_wakeup is None
    with pytest.raises(ValueError, match="max_concurrent must be at least 1, got 0"):
        plan(at(12), [], max_concurrent=0)


def test_merge_inherit():
    base = Policy(interval_s=60, disks=("vda",))
    assert base.merged(None) is base and base.merged(PolicyOverride()) == base
    assert base.merged(PolicyOverride(disks=None)).disks is None
    assert repr(INHERIT) == "INHERIT"


# --- config mappings -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("24h", DAY), ("30m", 1800), ("1d", DAY), ("2w", 14 * DAY), ("90", 90),
                                          (3600, 3600), (" 12 H ", 12 * 3600)])
def test_parse_interval(text, seconds):
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("bad", ["0h", "-1h", "1y", "h", True, 0, ""])
def test_parse_interval_rejects(bad):
    why = "interval must be positive" if bad in ("0h", 0) else "not an interval"
    with pytest.raises(ValueError, match=f"^{why}: {re.escape(repr(bad))}"):
        parse_interval(bad)


def test_policy_and_override_from_mapping():
    p = policy_from_mapping({"interval": "12h", "window": "22:00-06:00", "disks": ["vda", "vdb"]})
    assert p == Policy(interval_s=12 * 3600, window=TimeWindow(22 * 60, 6 * 60), disks=("vda", "vdb"))
    assert policy_from_mapping(None) == Policy()
    o = override_from_mapping({"window": None, "enabled": False}, "domains.vm1")
    assert o == PolicyOverride(window=None, enabled=False)
    assert p.merged(o) == Policy(interval_s=12 * 3600, window=None, disks=("vda", "vdb"), enabled=False)
    assert policy_from_mapping({"disks": "all"}).disks is None


@pytest.mark.parametrize("raw,key", [
    ({"interval": "soon"}, "schedule.interval"), ({"window": "late"}, "schedule.window"),
    ({"disks": []}, "schedule.disks"), ({"enabled": "yes"}, "schedule.enabled"),
    ({"colour": "red"}, "schedule.colour"), ([], "schedule"),
])
def test_mapping_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        policy_from_mapping(raw)
    assert e.value.key == key

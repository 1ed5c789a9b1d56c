import pytest

from ekko_libvirt.agent.events import (Action, DomainContext, EventKind, HookEvent, MalformedEvent, classify, decide, parse_event)

UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"


def raw(**kw):
    d = {"v": 1, "wall_ns": 1_700_000_000_000_000_000, "mono_ns": 5_000_000, "boot_id": None, "pid": 42,
         "domain": "instance-0000000a", "op": "started", "subop": "begin", "extra": "-", "known": True,
         "uuid": UUID, "xml_name": "instance-0000000a", "xml": "ok", "nova": None, "vetoed": False}
    d.update(kw)
    return d


def ev(op="started", subop="begin", **kw):
    return parse_event(raw(op=op, subop=subop, **kw))


def actions(reactions):
    return [r.action for r in reactions]


@pytest.mark.parametrize("op,subop,kind", [
    ("prepare", "begin", EventKind.PREPARE), ("start", "begin", EventKind.START),
    ("started", "begin", EventKind.STARTED), ("stopped", "end", EventKind.STOPPED),
    ("release", "end", EventKind.RELEASED), ("migrate", "begin", EventKind.MIGRATE),
    ("restore", "begin", EventKind.RESTORE), ("reconnect", "begin", EventKind.RECONNECT),
    ("attach", "begin", EventKind.ATTACH), ("frobnicate", "begin", EventKind.UNKNOWN), ("", "-", EventKind.UNKNOWN),
])
def test_classify(op, subop, kind):
    assert classify(op, subop) is kind


def test_parse_event_fields():
    e = parse_event(raw(uuid=UUID.upper(), nova={"name": "web-01", "project_uuid": UUID, "flavor": "m1.small"}))
    assert isinstance(e, HookEvent)
    assert e.uuid == UUID and e.kind is EventKind.STARTED and e.nova.name == "web-01" and e.nova.user_uuid is None


@pytest.mark.parametrize("bad", [
    [], "x", {"v": 2}, raw(v=None), raw(v=True), raw(op=None), raw(op=""), raw(op="x" * 17), raw(op="Started"),
    raw(domain="a\nb"), raw(domain="a/b"), raw(domain=""), raw(domain=".."), raw(subop=None), raw(wall_ns=-1),
    raw(wall_ns="1"), raw(wall_ns=1.0), raw(pid=True), raw(mono_ns=None),
])
def test_parse_event_rejects(bad):
    with pytest.raises(MalformedEvent):
        parse_event(bad, "f.json")


@pytest.mark.parametrize("field,value,kept", [
    ("extra", "", None), ("extra", "x y", None), ("extra", 5, None), ("uuid", "not-a-uuid", None),
    ("uuid", "6f1c2e4a-1b2c-4d5e-8f90-123456789abz", None), ("vetoed", "yes", False), ("nova", [], None),
    ("nova", {"project_uuid": "x"}, None), ("xml", None, "unknown"), ("xml", "weird", "unknown"),
    ("boot_id", "b", None),
])
def test_unusable_informational_fields_are_kept_as_unknown(field, value, kept):
    """The field's 34 events lost to an empty `extra`: an informational field never costs the event."""
    e = parse_event(raw(**{field: value}), "f.json")
    attr = {"xml": "xml_status"}.get(field, field)
    assert getattr(e, attr) == kept and e.kind is EventKind.STARTED and e.domain == "instance-0000000a"
    assert bool(e.notes) == (value not in ("", None))


def test_malformed_event_keeps_source():
    with pytest.raises(MalformedEvent) as e:
        parse_event(raw(domain="a/b"), "0001.json")
    assert e.value.source == "0001.json" and "domain" in e.value.reason


# --- the reaction table ------------------------------------------------------------------------

def test_started_checks_chain():
    assert actions(decide(ev("started"))) == [Action.MARK_RUNNING, Action.CHECK_CHAIN]


@pytest.mark.parametrize("op,subop", [("stopped", "end"), ("release", "end")])
def test_stop_marks_clean_shutdown(op, subop):
    assert actions(decide(ev(op, subop))) == [Action.MARK_STOPPED]


def test_stop_under_online_job_fails_it_but_not_an_offline_one():
    assert actions(decide(ev("stopped", "end"), DomainContext(job_running=True))) == [Action.MARK_STOPPED,
                                                                                       Action.FAIL_JOB]
    offline = DomainContext(job_running=True, job_offline=True)
    assert actions(decide(ev("release", "end"), offline)) == [Action.MARK_STOPPED]


def test_reconnect_reconciles():
    assert actions(decide(ev("reconnect"))) == [Action.MARK_RUNNING, Action.RECONCILE]


def test_prepare_after_a_run_without_stop_requires_full():
    assert actions(decide(ev("prepare"))) == [Action.RECORD]
    r = decide(ev("prepare"), DomainContext(was_running=True))
    assert actions(r) == [Action.RECORD, Action.MARK_UNCLEAN, Action.REQUIRE_FULL]
    assert "crash" in r[1].reason


def test_migrate_restarts_chain_unless_shared_storage():
    assert actions(decide(ev("migrate"))) == [Action.RECORD, Action.REQUIRE_FULL]
    assert actions(decide(ev("migrate"), DomainContext(shared_storage=True))) == [Action.RECORD, Action.CHECK_CHAIN]


@pytest.mark.parametrize("op", ["start", "attach", "restore"])
def test_record_only(op):
    assert actions(decide(ev(op))) == [Action.RECORD]


def test_unknown_no_uuid_and_vetoed():
    assert actions(decide(ev("frobnicate"))) == [Action.IGNORE]
    assert actions(decide(ev("started", uuid=None, xml="oversize"))) == [Action.IGNORE]
    assert "oversize" in decide(ev("started", uuid=None, xml="oversize"))[0].reason
    assert actions(decide(ev("prepare", vetoed=True), DomainContext(was_running=True))) == [Action.RECORD]


def test_every_reaction_has_a_reason():
    for op in ("prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach", "x"):
        for ctx in (DomainContext(), DomainContext(True, True, False, True)):
            assert all(r.reason for r in decide(ev(op), ctx))

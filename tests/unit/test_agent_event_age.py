"""An event older than the state it would change does not override it (a spooled event replayed
after a backup, an event moved back from bad/), and `ekko status` shows intervals in units."""

import os
from datetime import datetime, timezone

from ekko_libvirt import config
from ekko_libvirt.agent.events import parse_event
from ekko_libvirt.agent.scheduler import decide, format_interval, parse_interval
from ekko_libvirt.agent.settings import AgentSettings
from ekko_libvirt.agent.spool import Spool
from ekko_libvirt.agent.state import ChainStatus, DomainState, StateDir, react, record_backup
from ekko_libvirt.agent.status import describe, describe_lifecycle, domain_status, lifecycle_info, row

UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"


BOOT = "11111111-2222-4333-8444-555555555555"


def ev(op, wall_ns, subop="begin", mono_ns=1, boot_id=None):
    return parse_event({"v": 1, "wall_ns": wall_ns, "mono_ns": mono_ns, "pid": 1, "domain": "vm1", "op": op,
                        "subop": subop, "uuid": UUID, "xml": "ok", "boot_id": boot_id})


def spool_event(root, op, wall_ns, subop="begin"):
    os.makedirs(root, exist_ok=True)
    import json
    with open(os.path.join(root, f"{wall_ns:020d}-{1:020d}-{1:010d}-{wall_ns:016x}.json"), "w") as f:
        json.dump({"v": 1, "wall_ns": wall_ns, "mono_ns": 1, "pid": 1, "domain": "vm1", "op": op, "subop": subop,
                   "uuid": UUID, "xml": "ok"}, f)


def test_a_replayed_older_start_does_not_undo_the_check_a_backup_made(tmp_path):
    """`started` at t=100 waits in the spool; a backup starting at t=200 validates the chain (and
    commits); the agent then drains the older event: the chain stays ok."""
    sd = StateDir(str(tmp_path / "state")).ensure()
    sp = Spool(str(tmp_path / "spool"))
    spool_event(sp.root, "started", 100)
    sd.update_domain(UUID, lambda s: record_backup(s, "b1", "cp1", 200))
    sp.drain(lambda e: sd.apply_event(e))
    st = sd.load_domain(UUID)
    assert st.chain.status is ChainStatus.OK and st.running
    r = row(UUID, "vm1", True, st, [], {}, None)
    assert r["chain"]["status"] == "ok"
    spool_event(sp.root, "started", 300)                 # a start after the backup: checked again
    sp.drain(lambda e: sd.apply_event(e))
    assert sd.load_domain(UUID).chain.status is ChainStatus.CHECK_REQUIRED


def test_an_older_event_that_breaks_the_chain_still_requires_a_full_unless_a_full_came_after(tmp_path):
    sd = StateDir(str(tmp_path / "state")).ensure()
    sd.update_domain(UUID, lambda s: record_backup(s, "b1", "cp1", 200))           # an incremental at 200
    sd.apply_event(ev("migrate", 100))                   # migrated (disks copied) before it: full due
    assert sd.load_domain(UUID).chain.status is ChainStatus.FULL_REQUIRED
    sd.update_domain(UUID, lambda s: record_backup(s, "b2", "cp2", 300, full=True))
    sd.apply_event(ev("migrate", 250))                   # before the full: the full covered it
    assert sd.load_domain(UUID).chain.status is ChainStatus.OK


def test_an_older_event_does_not_override_running_state():
    st = DomainState(UUID)
    for e in [ev("started", 300), ev("release", 200, "end"), ev("prepare", 100)]:
        st, _ = react(st, e)
    assert (st.running, st.clean_shutdown, st.last_event, st.last_event_ns) == (True, None, "started", 300)
    # what ran before the old prepare is not known: when in doubt the chain restarts with a full
    assert st.chain.status is ChainStatus.FULL_REQUIRED
    st = record_backup(st, "b1", "cp1", 400, full=True)
    st, _ = react(st, ev("prepare", 150))                   # older than that full: nothing to do
    assert st.chain.status is ChainStatus.OK


def test_a_wall_clock_stepped_back_does_not_make_events_stale(tmp_path):
    """NTP steps the clock back between two hook calls of one boot: the monotonic clock orders them."""
    sd = StateDir(str(tmp_path)).ensure()
    st = DomainState(UUID)
    st, _ = react(st, ev("started", 300, mono_ns=10, boot_id=BOOT))
    st, _ = react(st, ev("stopped", 200, "end", mono_ns=20, boot_id=BOOT))
    assert (st.running, st.clean_shutdown, st.last_event) == (False, True, "stopped")
    st = record_backup(st, "b1", "cp1", 500, full=True, clock=(BOOT, 30))
    st, _ = react(st, ev("started", 400, mono_ns=40, boot_id=BOOT))      # after the backup, by its clock
    assert st.chain.status is ChainStatus.CHECK_REQUIRED and st.running
    st = record_backup(st, "b2", "cp2", 600, clock=(BOOT, 50))
    st, _ = react(st, ev("migrate", 700, mono_ns=45, boot_id=BOOT))      # before it, whatever the wall says
    assert st.chain.status is ChainStatus.FULL_REQUIRED                  # ... but b2 was an incremental
    st = record_backup(st, "b3", "cp3", 800, full=True, clock=(BOOT, 60))
    st = sd.save_domain(st)
    assert sd.load_domain(UUID) == st                       # the clocks survive the state file
    st, _ = react(st, ev("migrate", 900, mono_ns=55, boot_id=BOOT))
    assert st.chain.status is ChainStatus.OK


def test_status_shows_intervals_as_configured():
    cfg = config.build({"schedule": {"interval": "6h"}, "agent": {"gc_interval": "1d", "verify": {"interval": "90m"}}})
    s = AgentSettings.from_config(cfg)
    now = datetime(2024, 6, 10, 12, 0, tzinfo=timezone.utc)
    dec = decide(now, domain_status(UUID, None, True, False), s.schedule)
    r = row(UUID, "vm1", True, None, [], {}, dec)
    assert r["next"]["interval"] == "6h" and r["next"]["interval_s"] == 21600
    assert "every 6h," in describe(r) and "21600" not in describe(r)
    text = describe_lifecycle(lifecycle_info({}, s.gc_interval_s, s.verify, now))
    assert "(every 1d)" in text and "(every 90m)" in text and " s)" not in text


def test_format_interval_round_trips():
    for seconds in (1, 59, 60, 90, 3600, 5400, 21600, 86400, 7 * 86400, 14 * 86400, 86401):
        assert parse_interval(format_interval(seconds)) == seconds
    assert [format_interval(s) for s in (21600, 86400, 90, 5400, 604800)] == ["6h", "1d", "90s", "90m", "1w"]


def test_a_full_required_by_an_event_during_a_backup_survives_its_commit(tmp_path):
    """QEMU dies (or the domain migrates in) while a backup runs: the backup commits afterwards,
    but it never saw that; the next backup is still a full."""
    sd = StateDir(str(tmp_path)).ensure()
    sd.update_domain(UUID, lambda s: record_backup(s, "b0", "cp0", 50, full=True, clock=(BOOT, 5)))
    # job starts at wall 100 / mono 10; during it a `migrate` of mono 20 is applied
    sd.apply_event(ev("migrate", 150, mono_ns=20, boot_id=BOOT))
    st = sd.update_domain(UUID, lambda s: record_backup(s, "b1", "cp1", 100, clock=(BOOT, 10)))
    assert st.chain.status is ChainStatus.FULL_REQUIRED and st.chain.last_backup_id == "b1"
    st = sd.update_domain(UUID, lambda s: record_backup(s, "b2", "cp2", 200, full=True, clock=(BOOT, 30)))
    assert st.chain.status is ChainStatus.OK            # a full that started after it settles it
    from ekko_libvirt.agent.events import lifecycle_reactions
    from ekko_libvirt.agent.state import apply_lifecycle, host_clock
    job_clock = host_clock()
    st = sd.update_domain(UUID, lambda s: apply_lifecycle(s, lifecycle_reactions(5, 5)))   # QEMU died, live
    st = sd.update_domain(UUID, lambda s: record_backup(s, "b3", "cp3", 300, clock=job_clock))
    assert st.chain.status is ChainStatus.FULL_REQUIRED and "QEMU ended unexpectedly" in st.chain.reason
    assert sd.load_domain(UUID) == st


def test_a_start_during_a_full_backup_still_needs_a_check_after_it():
    """full-required (migration), a full backup starts, the domain is started while it runs (the
    agent takes the `started` in before the commit): the full is settled, the check is not."""
    st = record_backup(DomainState(UUID), "b0", "cp0", 10, full=True, clock=(BOOT, 1))
    st, _ = react(st, ev("migrate", 20, mono_ns=2, boot_id=BOOT))
    assert st.chain.status is ChainStatus.FULL_REQUIRED
    st, _ = react(st, ev("started", 40, mono_ns=4, boot_id=BOOT))       # during the full started at mono 3
    st = record_backup(st, "b1", "cp1", 30, full=True, clock=(BOOT, 3))
    assert st.chain.status is ChainStatus.CHECK_REQUIRED and "while the last backup ran" in st.chain.reason
    st = record_backup(st, "b2", "cp2", 50, clock=(BOOT, 5))            # an incremental after it: checked
    assert st.chain.status is ChainStatus.OK

"""The spool stays bounded while the agent is down, and coalescing never changes what the agent
decides: hookformat.plan_coalesce checked against the agent's own reaction table (state.react),
from every state the agent may hold, with backups run at any point between the events."""

import fcntl
import functools
import importlib.machinery
import importlib.util
import os
import random

import pytest

from ekko_libvirt.agent import hookformat
from ekko_libvirt.agent.events import parse_event
from ekko_libvirt.agent.spool import Spool
from ekko_libvirt.agent.state import ChainStatus, DomainState, StateDir, react, record_backup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"
XML = f"<domain><name>vm1</name><uuid>{UUID}</uuid></domain>".encode()

# one representative hook call per letter (hookformat.kind_letter)
CALLS = {"P": ("prepare", "begin", False), "S": ("started", "begin", False), "C": ("reconnect", "begin", False),
         "X": ("release", "end", False), "M": ("migrate", "begin", False), "R": ("start", "begin", False),
         "V": ("prepare", "begin", True)}      # V: a vetoed prepare, letter R


@pytest.fixture(scope="module")
def hook():
    loader = importlib.machinery.SourceFileLoader("ekko_hook_script_coalesce", os.path.join(ROOT, "hooks", "qemu"))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(mod)
    mod.RULE = mod.load_rule(mod.rule_path())
    return mod


@pytest.fixture
def no_fsync(monkeypatch):
    """Durability is not what these tests look at; thousands of fsyncs would make them slow."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@functools.lru_cache(maxsize=None)
def event(letter, wall_ns):
    op, subop, vetoed = CALLS[letter]
    return parse_event({"v": 1, "wall_ns": wall_ns, "mono_ns": wall_ns, "pid": 1, "domain": "vm1", "op": op,
                        "subop": subop, "uuid": UUID, "xml": "ok", "vetoed": vetoed})


def initial_states():
    """Every state the agent may hold when it reads the first pending event."""
    for running, clean in ((False, None), (False, True), (False, False), (True, None)):
        for chain in ("none", "ok", "check", "full"):
            st = DomainState(UUID, running=running, clean_shutdown=clean, last_event_ns=0)
            if chain != "none":
                st = record_backup(st, "b0", "cp0", 0, full=True)
            if chain == "check":
                st, _ = react(st, event("S", 0))
                st = DomainState(UUID, running=running, clean_shutdown=clean, last_event_ns=0, chain=st.chain)
            if chain == "full":
                st, _ = react(st, event("M", 0))
            yield st


def replay(st, letters, walls, backups, shared):
    """Apply events in spool order; `backups`: {index: full?} -- a backup recorded right before the
    event at that index is read (it ran while the agent was down, after the events before it)."""
    for i, (x, w) in enumerate(zip(letters, walls)):
        if i in backups:
            st = record_backup(st, f"b{i}", f"cp{i}", w - 1, full=backups[i])
        st, _ = react(st, event(x, w), shared)
    return st


def decision(st):
    return (st.running, st.clean_shutdown, st.chain.status, st.last_event, st.last_event_ns)


def test_plan_keeps_every_decision_of_the_agent():
    """Random event sequences: the agent's final decision is the same with or without the events
    plan_coalesce removes, from every initial state, with backups at random points."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for case in range(250):
        n = rng.randint(1, 14)
        letters = [rng.choice("PSCXMRV" if rng.random() < 0.5 else "PSX") for _ in range(n)]
        walls = [1000 * (i + 1) for i in range(n)]
        names = [hookformat.event_name(w, w, 1, "%016x" % w, "R" if x == "V" else x, UUID)
                 for x, w in zip(letters, walls)]
        drop = set(hookformat.plan_coalesce(names))
        kept = [i for i in range(n) if names[i] not in drop]
        assert n - 1 in kept, (seed, case)
        backups = {i: rng.random() < 0.5 for i in range(n) if rng.random() < 0.2}
        for shared in (False, True):
            for st0 in initial_states():
                # a backup at a removed event's place runs before the next kept event
                kb = {}
                for i, full in backups.items():
                    j = next((k for k in kept if k >= i), None)
                    if j is not None:
                        kb[kept.index(j)] = kb.get(kept.index(j), False) or full
                want = replay(st0, letters, walls, backups, shared)
                got = replay(st0, [letters[k] for k in kept], [walls[k] for k in kept], kb, shared)
                assert decision(got) == decision(want), (
                    f"seed {seed} case {case}: {''.join(letters)} kept {kept} backups {backups} "
                    f"shared {shared} from {decision(st0)}")


def test_plan_reduces_a_start_stop_loop_to_a_few_events():
    letters = "PRSX" * 50 + "PRS"
    names = [hookformat.event_name(i, i, 1, "%016x" % i, x, UUID) for i, x in enumerate(letters)]
    kept = sorted(set(names) - set(hookformat.plan_coalesce(names)))
    assert len(kept) <= 4 and kept[-1] == names[-1]
    assert [hookformat.parse_name(n)[1] for n in kept][-1] == "S"


def test_plan_leaves_untagged_and_foreign_names_and_all_before_an_untagged_one():
    old = "%020d-%020d-%010d-%016x.json" % (50, 50, 1, 50)          # written by an older hook
    tagged = [hookformat.event_name(i, i, 1, "%016x" % i, "R", UUID) for i in (10, 20, 60, 70)]
    drop = hookformat.plan_coalesce(tagged + [old, "x.json", "bad"])
    assert drop == [tagged[2]]
    no_uuid = hookformat.event_name(80, 80, 1, "%016x" % 80, "I", None)
    assert hookformat.plan_coalesce([no_uuid]) == [no_uuid]            # the agent ignores it


def test_a_day_of_start_stop_loops_keeps_the_spool_bounded(hook, tmp_path, no_fsync):
    """One start/stop cycle every 5 minutes for a day while the agent is down (1440 hook calls),
    and the machine crashing once (a start without a stop before it): at most `bound` events plus
    the few essential ones wait, and the agent, back, decides what it would have decided from all."""
    spool, state, bound = str(tmp_path / "spool"), str(tmp_path / "state"), 50
    cycle = [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"), ("release", "end")]
    calls = [c for k in range(288) for c in (cycle if k != 100 else cycle[:3])]    # run 100 ends in a crash
    sizes, wall = [], 10**18
    reference = DomainState(UUID)
    for op, sub in calls:
        wall += 10**9
        code, path = hook.handle(hook.RULE, ["vm1", op, sub, "-"], XML, "ok", spool, state, bound, wall, wall, 7,
                                 None)
        assert code == 0 and path is not None
        sizes.append(len(os.listdir(spool)))
        reference, _ = react(reference, parse_event({"v": 1, "wall_ns": wall, "mono_ns": wall, "pid": 7,
                                                     "domain": "vm1", "op": op, "subop": sub, "uuid": UUID,
                                                     "xml": "ok"}))
    assert max(sizes) <= bound + 2, max(sizes)             # + the lock file, + the event just written
    sd = StateDir(state).ensure()
    res = Spool(spool).drain(lambda e: sd.apply_event(e))
    assert res.quarantined == () and res.error is None
    assert decision(sd.load_domain(UUID)) == decision(reference)
    assert reference.chain.status is ChainStatus.NONE or reference.clean_shutdown is True


def test_the_crash_in_the_loop_still_requires_a_full(hook, tmp_path, no_fsync):
    spool, state = str(tmp_path / "spool"), str(tmp_path / "state")
    sd = StateDir(state).ensure()
    sd.update_domain(UUID, lambda s: record_backup(s, "b0", "cp0", 1, full=True))
    seq = [("prepare", "begin"), ("started", "begin")] + [("prepare", "begin"), ("started", "begin")] + [
        ("stopped", "end"), ("release", "end"), ("prepare", "begin"), ("started", "begin"), ("stopped", "end"),
        ("release", "end")] * 30
    for i, (op, sub) in enumerate(seq):
        hook.handle(hook.RULE, ["vm1", op, sub, "-"], XML, "ok", spool, state, 10, 10**18 + i, i, 7, None)
    assert len(os.listdir(spool)) <= 12
    Spool(spool).drain(lambda e: sd.apply_event(e))
    st = sd.load_domain(UUID)
    assert st.chain.status is ChainStatus.FULL_REQUIRED and "uncleanly" in st.chain.reason
    assert (st.running, st.clean_shutdown) == (False, True)


def test_no_coalescing_while_the_agent_drains(hook, tmp_path, no_fsync):
    spool = str(tmp_path / "spool")
    os.makedirs(spool)
    fd = os.open(os.path.join(spool, hookformat.LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)                     # as Spool.drain holds it
    try:
        for i in range(30):
            hook.handle(hook.RULE, ["vm1", "start", "begin", "-"], XML, "ok", spool, spool, 10, 10**18 + i, i, 7,
                        None)
        assert len([n for n in os.listdir(spool) if n.endswith(".json")]) == 30     # waited for nothing, kept all
    finally:
        os.close(fd)
    hook.handle(hook.RULE, ["vm1", "start", "begin", "-"], XML, "ok", spool, spool, 10, 10**18 + 99, 99, 7, None)
    assert [n for n in os.listdir(spool) if n.endswith(".json")] == [
        n for n in os.listdir(spool) if n.endswith(".json") and int(n[:20]) == 10**18 + 99]


def test_with_more_essential_events_than_the_bound_the_hook_does_not_plan_every_call(hook, tmp_path, no_fsync,
                                                                                       monkeypatch):
    """Many domains, each with a `started` (essential: its newest event): the hook plans once, then
    waits for bound/4 more events; the agent's drain starts over."""
    spool, bound = str(tmp_path / "spool"), 40
    plans = []
    real = hook.RULE.plan_coalesce
    monkeypatch.setitem(hook.RULE.coalesce_spool.__globals__, "plan_coalesce",
                        lambda names: plans.append(sum(n.endswith(".json") for n in names)) or real(names))
    for i in range(60):
        uuid = "%08x-0000-4000-8000-000000000000" % i
        xml = f"<domain><name>vm1</name><uuid>{uuid}</uuid></domain>".encode()
        hook.handle(hook.RULE, ["vm1", "started", "begin", "-"], xml, "ok", spool, spool, bound, 10**18 + i, i, 7,
                    None)
    assert plans == [41, 52]                # past the bound (all 41 kept), then past 41 + bound/4
    Spool(spool).drain(lambda e: None)
    assert open(os.path.join(spool, hookformat.LOCK_NAME)).read() == ""

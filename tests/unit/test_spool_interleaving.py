"""Attack on the event path: hook calls (with coalescing at a small bound), agent restarts, partial
drains, an agent killed between applying an event and acking it, backups run while the agent is
down or behind, events an older agent had quarantined -- all interleaved at random over many
domains. At the end the agent's decision per domain must equal a simple reference model built
from the lifecycle events in the order they happened:

    running / clean shutdown / last event   the last lifecycle event of the domain
    full required                           a migrate, or a prepare while running (no stop
                                            since the start), after the last FULL backup
    check required                          a `started` after the last backup (and no full due)

The seed is printed (and in every assertion message); set EKKO_SEED to replay one, EKKO_STEPS
for a longer run."""

import importlib.machinery
import importlib.util
import json
import os
import random

import pytest

from ekko_libvirt import config
from ekko_libvirt.agent import hookformat
from ekko_libvirt.agent.events import classify
from ekko_libvirt.agent.settings import AgentSettings
from ekko_libvirt.agent.state import ChainStatus, StateDir, record_backup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ESSENTIAL_MAX = 8          # events of one domain coalescing may have to keep (hookformat docstring)
STATUS = {ChainStatus.NONE: "none", ChainStatus.OK: "ok", ChainStatus.CHECK_REQUIRED: "check",
          ChainStatus.FULL_REQUIRED: "full"}


@pytest.fixture(scope="module")
def hook():
    loader = importlib.machinery.SourceFileLoader("ekko_hook_script_interleave",
                                                  os.path.join(ROOT, "hooks", "qemu"))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(mod)
    mod.RULE = mod.load_rule(mod.rule_path())
    return mod


class Killed(Exception):
    pass


class Reference:
    """The model: one domain's lifecycle events and backups, in the order they happened."""

    def __init__(self):
        self.running, self.clean, self.status, self.last = False, None, "none", (None, None)

    def event(self, op, vetoed, wall):
        kind = classify(op)
        if op not in hookformat.KNOWN_OPS:
            return
        self.last = (kind.value, wall)
        if op == "prepare" and not vetoed and self.running:
            self.running, self.clean, self.status = False, False, "full"
        elif op in ("started", "reconnect"):
            self.running, self.clean = True, None
            if op == "started" and self.status == "ok":
                self.status = "check"
        elif op in ("stopped", "release"):
            self.running, self.clean = False, True
        elif op == "migrate":
            self.status = "full"

    def backup(self, full):
        self.status = "ok" if full or self.status != "full" else "full"

    def decision(self):
        return self.running, self.clean, self.status, self.last


class World:
    def __init__(self, hook, root, seed, n_domains):
        self.hook, self.rng, self.seed = hook, random.Random(seed), seed
        self.spool, self.state = os.path.join(root, "spool"), os.path.join(root, "state")
        self.bound = self.rng.randint(20, 60)
        self.uuids = ["%08x-0000-4000-8000-%012x" % (self.rng.getrandbits(32), i) for i in range(n_domains)]
        self.names = {u: f"vm{i}" for i, u in enumerate(self.uuids)}
        self.running = dict.fromkeys(self.uuids, False)        # what libvirt would say
        self.ref = {u: Reference() for u in self.uuids}
        self.clock = 10**18
        self.agent = None
        self.sd = StateDir(self.state).ensure()
        cfg = config.build({"state_dir": self.state, "agent": {"spool_dir": self.spool}})
        self.cfg, self.settings = cfg, AgentSettings.from_config(cfg)
        self.max_pending = 0
        self.max_essential = 0
        self.running_backups = {}                        # uuid -> (start wall ns, full)
        self.calls = 0

    def tick(self):
        self.clock += self.rng.randint(1, 10**6)
        return self.clock

    def where(self):
        return f"seed {self.seed} (EKKO_SEED={self.seed}), bound {self.bound}, call {self.calls}"

    # -- the hook ---------------------------------------------------------------------------------
    def call(self, uuid, op, subop, *, vetoed=False, xml=True, extra="-"):
        wall = self.tick()
        data = f"<domain><name>{self.names[uuid]}</name><uuid>{uuid}</uuid></domain>".encode() if xml else b""
        if vetoed:
            self.sd.mark_offline_backup(uuid, self.names[uuid])
        try:
            code, path = self.hook.handle(self.hook.RULE, [self.names[uuid], op, subop, extra], data,
                                          "ok" if data else "empty", self.spool, self.state, self.bound, wall,
                                          wall % 10**12, 4242, None)
        finally:
            if vetoed:
                self.sd.clear_offline_backup(uuid)
        self.calls += 1
        assert path is not None and code == (1 if vetoed else 0), self.where()
        if xml:
            self.ref[uuid].event(op, vetoed, wall)
        names = [n for n in os.listdir(self.spool) if n.endswith(".json")]
        self.max_pending = max(self.max_pending, len(names))
        if len(names) > self.bound:          # then the essential events alone exceed the bound
            with open(os.path.join(self.spool, hookformat.LOCK_NAME)) as f:
                last_kept = int(f.read() or 0)       # what the last coalescing kept (hookformat)
            assert len(names) <= last_kept + self.bound // 4 + 1, (len(names), last_kept, self.where())
            drop = set(hookformat.plan_coalesce(names))
            per_domain = {}
            for n in set(names) - drop:
                key = hookformat.parse_name(n)[2]
                per_domain[key] = per_domain.get(key, 0) + 1
            self.max_essential = max(self.max_essential, max(per_domain.values()))
            assert max(per_domain.values()) <= ESSENTIAL_MAX, (per_domain, self.where())

    def lifecycle_step(self):
        u = self.rng.choice(self.uuids)
        r = self.rng.random()
        extra = self.rng.choice(["-", "-", "", "x y", "/a/b"])
        if r < 0.30 and not self.running[u]:
            if self.rng.random() < 0.1:                 # refused: an offline backup holds the domain
                self.call(u, "prepare", "begin", vetoed=True)
                self.call(u, "stopped", "end")
                self.call(u, "release", "end")
                return
            if self.rng.random() < 0.15:
                self.call(u, "migrate", "begin", extra=extra)
            for op in ("prepare", "start", "started"):
                self.call(u, op, "begin", extra=extra)
            self.running[u] = True
        elif r < 0.55 and self.running[u]:
            self.call(u, "stopped", "end", extra=extra)
            self.call(u, "release", "end", extra=extra)
            self.running[u] = False
        elif r < 0.60 and self.running[u]:
            self.running[u] = False                      # the host died under it: no events at all
        elif r < 0.65 and self.running[u]:
            self.call(u, "reconnect", "begin")
        elif r < 0.72:                                   # odd calls: any operation, no XML, unknown ones
            op = self.rng.choice(sorted(hookformat.KNOWN_OPS) + ["frobnicate"])
            self.call(u, op, self.rng.choice(["begin", "end"]), xml=self.rng.random() < 0.7, extra=extra)
        elif r < 0.86:
            self.backup(u)
        elif r < 0.92 and self.running_backups:
            self.commit_backup(self.rng.choice(sorted(self.running_backups)))

    # -- backups (`ekko backup` or the agent's scheduler) ------------------------------------------
    def backup(self, uuid):
        """A backup starts now (full or not as the agent's state says now) and commits now or a few
        steps later; what the agent takes in meanwhile may be older or newer than its start."""
        if uuid in self.running_backups:
            return
        st = self.sd.load_domain(uuid)
        full = st is None or st.chain.status in (ChainStatus.NONE, ChainStatus.FULL_REQUIRED) or \
            self.rng.random() < 0.2
        start = self.tick()
        if self.rng.random() < 0.1:
            return                                       # failed: nothing committed, nothing changes
        self.ref[uuid].backup(full)
        self.running_backups[uuid] = (start, full)
        if self.rng.random() < 0.5:
            self.commit_backup(uuid)

    def commit_backup(self, uuid):
        start, full = self.running_backups.pop(uuid)
        self.sd.update_domain(uuid, lambda s: record_backup(s, f"b{start}", f"cp{start}", start, full))

    # -- the agent ----------------------------------------------------------------------------------
    def start_agent(self):
        from ekko_libvirt.agent.daemon import Agent
        a = Agent(self.cfg, self.settings, "test:///default")
        a.sd.ensure()
        a.spool.ensure()
        a.spool.cleanup_tmp()
        a.spool.requeue_bad()
        self.agent = a

    def agent_step(self):
        r = self.rng.random()
        if self.agent is None:
            if r < 0.25:                                 # down for a while: the spool fills, backups run
                self.start_agent()
            return
        if r < 0.15:
            self.agent = None                            # stopped (or killed between two events)
        elif r < 0.25:                                   # killed after applying an event, before its ack
            n, k = [0], self.rng.randint(0, 5)

            def handler(ev):
                self.agent.handle_event(ev)
                n[0] += 1
                if n[0] > k:
                    raise Killed("killed after applying, before the ack")   # drain keeps the file
            res = self.agent.spool.drain(handler)
            assert res.quarantined == (), (res.quarantined, self.where())
            self.agent = None
        else:
            limit = None if r < 0.7 else self.rng.randint(1, 10)
            res = self.agent.spool.drain(self.agent.handle_event, limit)
            assert res.quarantined == () and res.error is None, (res, self.where())

    def old_quarantine(self):
        """Events an older agent moved to bad/ (an empty `extra`), from before everything else."""
        bad = os.path.join(self.spool, "bad")
        os.makedirs(bad, exist_ok=True)
        for u in self.uuids:
            for _ in range(self.rng.randint(0, 2)):
                op, sub = self.rng.choice([("started", "begin"), ("release", "end"), ("migrate", "begin")])
                wall = self.tick()
                name = "%020d-%020d-%010d-%016x.json" % (wall, 1, 1, self.rng.getrandbits(64))
                with open(os.path.join(bad, name), "w") as f:
                    json.dump({"v": 1, "wall_ns": wall, "mono_ns": 1, "pid": 1, "domain": self.names[u], "op": op,
                               "subop": sub, "extra": "", "uuid": u, "xml": "ok"}, f)
                with open(os.path.join(bad, name + ".reason"), "w") as f:
                    f.write("extra: expected a printable string of at most 64 characters, got ''\n")
                self.ref[u].event(op, False, wall)
                if op in ("started", "release"):
                    self.running[u] = op == "started"

    def finish(self):
        for u in sorted(self.running_backups):
            self.commit_backup(u)
        self.start_agent()
        res = self.agent.spool.drain(self.agent.handle_event)
        assert res.quarantined == () and res.error is None and self.agent.spool.pending() == [], self.where()
        for u in self.uuids:
            st = self.sd.load_domain(u)
            got = (False, None, "none", (None, None)) if st is None else (
                st.running, st.clean_shutdown, STATUS[st.chain.status], (st.last_event, st.last_event_ns))
            assert got == self.ref[u].decision(), f"domain {self.names[u]}: agent {got}, model " \
                                                  f"{self.ref[u].decision()}: {self.where()}"


def run(hook, root, seed, steps, n_domains):
    w = World(hook, root, seed, n_domains)
    w.old_quarantine()
    for _ in range(steps):
        if w.rng.random() < 0.85:
            w.lifecycle_step()
        else:
            w.agent_step()
    w.finish()
    return w


def _seeds():
    """Seeds 2, 5 and 6 together catch each of these (checked by hand, 5 domains, 400 steps):
    CHECK_CHAIN or REQUIRE_FULL applied without looking at the last backup's time; an unclean
    prepare or a `started` dropped by the coalescer; a backup's commit clearing a full-required
    after an incremental, forgetting one set while it ran, or forgetting a check due from a start
    while it ran. The fourth seed is new every run."""
    env = os.environ.get("EKKO_SEED")
    return [int(env)] if env else [2, 5, 6, random.randrange(2**32)]


@pytest.mark.parametrize("seed", _seeds())
def test_agent_decisions_match_the_model_under_interleaving(hook, tmp_path, monkeypatch, seed):
    monkeypatch.setattr(os, "fsync", lambda fd: None)      # durability is not under test here: speed
    print(f"seed {seed} (replay with EKKO_SEED={seed})")
    w = run(hook, str(tmp_path), seed, int(os.environ.get("EKKO_STEPS", "400")), 5)
    print(f"{w.calls} hook calls, at most {w.max_pending} events waiting (bound {w.bound}), "
          f"at most {w.max_essential} essential ones of one domain")
    assert w.calls > 200 and w.max_pending > w.bound // 2, w.where()     # the bound was reached, coalescing ran

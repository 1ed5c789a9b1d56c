"""engine/freeze.py (the policy, the freeze window's order) and engine/guest_agent.py's socket client
against hostile fake agents: silence, stale replies, foreign ids, errors, garbage. The real qemu-ga
is in tests/integration/test_consistency.py."""

import json
import os
import random
import socket
import tempfile
import threading
import time

import pytest

from ekko_libvirt.engine import freeze
from ekko_libvirt.engine.freeze import AUTO, CRASH, FILESYSTEM, AgentAccess, Quiescer, decide
from ekko_libvirt.engine.guest_agent import SocketAgent, channel_state
from ekko_libvirt.errors import FreezeRequired, GuestAgentError


class FakeAgent:
    """Records calls in order; fails where told."""

    def __init__(self, fail=(), log=None):
        self.fail = set(fail)
        self.log = log if log is not None else []
        self.describe = "fake agent"

    def _do(self, what, value):
        self.log.append(what)
        if what in self.fail:
            raise GuestAgentError(f"{what} failed", timed_out=True)
        return value

    def filesystems(self):
        return self._do("fsinfo", ["/b", "/a"])

    def freeze(self):
        return self._do("freeze", 2)

    def thaw(self):
        return self._do("thaw", 2)

    def is_frozen(self):
        return None

    def reaper_fields(self):
        return {"kind": "socket", "path": "/nonexistent", "timeout": 1}

    def close(self):
        self.log.append("close")


# -- the policy (pure) -------------------------------------------------------------------------
@pytest.mark.parametrize("policy,access,probe,want", [
    (CRASH, AgentAccess(FakeAgent()), None, ("no", "crash", "consistency: crash (configured)")),
    (AUTO, AgentAccess(FakeAgent()), None, ("freeze", None, None)),
    (FILESYSTEM, AgentAccess(FakeAgent()), None, ("freeze", None, None)),
    (AUTO, AgentAccess(None, "no channel"), None, ("no", "crash", "no channel")),
    (FILESYSTEM, AgentAccess(None, "no channel"), None, ("error", None, "no channel")),
    (AUTO, AgentAccess(FakeAgent()), "silent", ("no", "crash", "silent")),
    (FILESYSTEM, AgentAccess(FakeAgent()), "silent", ("error", None, "silent")),
    (FILESYSTEM, AgentAccess(None, "shut off", guest_running=False), None, ("no", "crash", "shut off")),
    (CRASH, AgentAccess(None, "no channel"), None, ("no", "crash", "consistency: crash (configured)")),
])
def test_decide(policy, access, probe, want):
    d = decide(policy, access, probe)
    kind = "freeze" if d.freeze else ("error" if d.error else "no")
    assert kind == want[0]
    if kind == "no":
        assert d.outcome is not None and (d.outcome.level, d.outcome.reason) == want[1:]
    if kind == "error":
        assert d.error == want[2]


def test_decide_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="unknown consistency policy 'quiesce'"):
        decide("quiesce", AgentAccess(None))


# -- the window ------------------------------------------------------------------------------
def run_window(policy, agent, body=lambda: None):
    q = Quiescer(policy, AgentAccess(agent), "t1")       # no reaper_log: no reaper process
    q.prepare()
    with q.window():
        body()
    return q


def test_window_freezes_around_the_body_and_records_the_duration():
    log = []
    agent = FakeAgent(log=log)
    q = run_window(AUTO, agent, lambda: log.append("transaction"))
    assert log == ["fsinfo", "freeze", "transaction", "thaw"]
    assert q.result is not None and q.result.level == FILESYSTEM
    assert q.result.mountpoints == ("/b", "/a")
    assert q.result.as_dict() == {"level": "filesystem", "mountpoints": ["/b", "/a"], "freeze_ms": q.result.freeze_ms}
    assert isinstance(q.result.freeze_ms, int) and q.result.freeze_ms >= 0


def test_a_failed_transaction_thaws_before_the_error_leaves_the_window():
    log = []

    def body():
        log.append("transaction")
        raise RuntimeError("QMP said no")
    with pytest.raises(RuntimeError, match="QMP said no"):
        run_window(FILESYSTEM, FakeAgent(log=log), body)
    assert log == ["fsinfo", "freeze", "transaction", "thaw"]


def test_auto_goes_on_crash_consistent_when_the_freeze_fails_and_still_thaws():
    log = []
    q = run_window(AUTO, FakeAgent(fail={"freeze"}, log=log), lambda: log.append("transaction"))
    assert log == ["fsinfo", "freeze", "thaw", "transaction"]
    assert q.result is not None and q.result.as_dict() == {
        "level": "crash", "reason": "guest-fsfreeze-freeze failed: freeze failed"}


def test_filesystem_fails_when_the_freeze_fails_and_the_body_never_runs():
    log = []
    with pytest.raises(FreezeRequired, match=r"t1: consistency: filesystem, but the guest cannot be frozen "
                                             r"\(freeze failed\); nothing was committed"):
        run_window(FILESYSTEM, FakeAgent(fail={"freeze"}, log=log), lambda: log.append("transaction"))
    assert log == ["fsinfo", "freeze", "thaw"]


def test_a_probe_that_fails_decides_before_any_freeze():
    log = []
    q = run_window(AUTO, FakeAgent(fail={"fsinfo"}, log=log), lambda: log.append("transaction"))
    assert log == ["fsinfo", "transaction"]
    assert q.result is not None and q.result.as_dict() == {"level": "crash", "reason": "fsinfo failed"}
    with pytest.raises(FreezeRequired, match=r"\(fsinfo failed\)"):
        Quiescer(FILESYSTEM, AgentAccess(FakeAgent(fail={"fsinfo"})), "t1").prepare()


def test_a_thaw_that_fails_is_handed_to_the_reaper(monkeypatch):
    abandoned = []

    class FakeReaper:
        def __init__(self, fields, log_path):
            self.fields = fields

        def start(self):
            return self

        def done(self):
            raise AssertionError("a failed thaw must not tell the reaper it is done")

        def abandon(self):
            abandoned.append(self.fields)
    monkeypatch.setattr(freeze, "Reaper", FakeReaper)
    q = Quiescer(AUTO, AgentAccess(FakeAgent(fail={"thaw"})), "t1", reaper_log="/dev/null")
    q.prepare()
    with q.window() as w:
        pass
    assert abandoned == [{"kind": "thaw", "name": "t1", "agent": FakeAgent().reaper_fields()}]
    assert w.notes == ["thaw failed (thaw failed); handed to the thaw reaper"]
    assert q.result is not None and q.result.level == FILESYSTEM     # the view was taken frozen


# -- the socket client against fake agents ---------------------------------------------------
class FakeServer:
    """A unix socket server speaking to one client at a time with `behave(conn, line)` per line."""

    def __init__(self, behave):
        self.dir = tempfile.mkdtemp(prefix="ekga", dir="/tmp")
        self.path = os.path.join(self.dir, "qga.sock")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.behave = behave
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            buf = b""
            with conn:
                while True:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, _, buf = buf.partition(b"\n")
                        msg = json.loads(line.lstrip(b"\xff"))
                        self.behave(conn, msg)

    def close(self):
        self.stop = True
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


def honest(conn, msg, noise=b""):
    if msg["execute"] == "guest-sync-delimited":
        conn.sendall(noise + b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode() + b"\n")
    elif msg["execute"] == "guest-fsfreeze-freeze":
        conn.sendall(b'{"return": 2}\n')
    elif msg["execute"] == "guest-get-fsinfo":
        conn.sendall(json.dumps({"return": [{"mountpoint": "/x"}, {"mountpoint": "/a"}]}).encode() + b"\n")
    else:
        conn.sendall(b'{"error": {"class": "CommandNotFound", "desc": "no such command"}}\n')


def test_socket_agent_skips_stale_replies_and_foreign_ids():
    """Replies a killed client left in the channel, a reply to another sync id, garbage lines:
    all dropped; the real answers come through."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    junk = bytes(rnd.randrange(256) for _ in range(5)).replace(b"\xff", b"")
    noise = b"".join(rnd.choice([b'{"return": 1}\n', b'{"return": {"pid": 4}}\n', b"not json\n", b"\n",
                                 b'{"return": 77}\n', junk]) for _ in range(rnd.randrange(1, 20)))

    def behave(conn, msg):
        if msg["execute"] == "guest-sync-delimited":
            conn.sendall(b'{"return": 123}\n')      # a foreign id after the delimiter too
        honest(conn, msg, noise)
    srv = FakeServer(behave)
    try:
        a = SocketAgent(srv.path, timeout=5)
        assert a.filesystems() == ["/a", "/x"]
        assert a.freeze() == 2
        with pytest.raises(GuestAgentError, match="guest-fsfreeze-thaw refused: no such command"):
            a.thaw()
        a.close()
    finally:
        srv.close()


def test_socket_agent_that_never_answers_fails_within_its_timeout():
    srv = FakeServer(lambda conn, msg: None)
    try:
        a = SocketAgent(srv.path, timeout=0.5)
        t = time.monotonic()
        with pytest.raises(GuestAgentError, match=r"did not answer within 0.5 s") as e:
            a.freeze()
        assert e.value.timed_out
        assert time.monotonic() - t < 5, "the hard timeout did not hold"
    finally:
        srv.close()


def test_socket_agent_without_a_socket():
    with pytest.raises(GuestAgentError, match=r"guest agent socket /nonexistent/qga does not exist \(no guest agent "
                                              r"channel\)"):
        SocketAgent("/nonexistent/qga", timeout=1).freeze()


@pytest.mark.parametrize("xml,want", [
    ("<domain><devices/></domain>", (False, "the domain has no guest agent channel (org.qemu.guest_agent.0)")),
    ("<domain><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' "
     "state='connected'/></channel></devices></domain>", (True, "connected")),
    ("<domain><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' "
     "state='disconnected'/></channel></devices></domain>",
     (False, "the org.qemu.guest_agent.0 channel is disconnected (qemu-ga is not running in the guest)")),
    ("<domain><devices><channel type='unix'><target type='virtio' name='org.example.other'/></channel>"
     "</devices></domain>", (False, "the domain has no guest agent channel (org.qemu.guest_agent.0)")),
])
def test_channel_state(xml, want):
    assert channel_state(xml) == want


# -- where the policy comes from ---------------------------------------------------------------
NOVA_QUIESCE = ("<domain><name>vm1</name><uuid>{u}</uuid><metadata><ekko:os_require_quiesce "
                "xmlns:ekko='urn:x'>{v}</ekko:os_require_quiesce></metadata></domain>")


@pytest.mark.parametrize("value,want", [("yes", True), ("True", True), ("1", True), ("no", False), ("", False)])
def test_requires_quiesce(value, want):
    from ekko_libvirt.engine.domain_xml import requires_quiesce
    assert requires_quiesce(NOVA_QUIESCE.format(u="x", v=value)) is want
    assert requires_quiesce("<domain><name>vm1</name></domain>") is False


def test_domain_policy_order():
    from ekko_libvirt import config
    from ekko_libvirt.backup.domain import consistency_policy
    from ekko_libvirt.backup.options import options_from_config
    u = "6a1f2f0e-0000-4000-8000-00000000abcd"
    cfg = config.build({"consistency": "crash", "domains": {"vm1": {"consistency": "auto"},
                                                            u.upper(): {"consistency": "filesystem"}}})
    base = options_from_config(cfg, "vm1")
    plain = f"<domain><name>vm1</name><uuid>{u}</uuid></domain>"
    assert consistency_policy(base, "vm1", u, plain) == "filesystem"         # by UUID first
    assert consistency_policy(base, "vm1", "other-uuid", plain) == "auto"    # then by name
    assert consistency_policy(base, "vm2", "other-uuid", plain) == "crash"   # then the default
    assert consistency_policy(base, "vm2", "x", NOVA_QUIESCE.format(u=u, v="yes")) == "filesystem"


def test_project_policy_comes_after_the_domains_and_before_the_default():
    from ekko_libvirt import config
    from ekko_libvirt.backup.domain import consistency_policy
    from ekko_libvirt.backup.options import options_from_config
    u = "6a1f2f0e-0000-4000-8000-00000000abcd"
    cfg = config.build({"consistency": "crash", "domains": {"vm1": {"consistency": "auto"}},
                        "projects": {"p-db": {"consistency": "filesystem"}, "p-scratch": {"consistency": "crash"}}})
    base = options_from_config(cfg, "vm1")
    plain = f"<domain><name>vm1</name><uuid>{u}</uuid></domain>"
    assert consistency_policy(base, "vm1", u, plain, "p-db") == "auto"               # the domain's own first
    assert consistency_policy(base, "vm2", u, plain, "p-db") == "filesystem"         # then its project's
    assert consistency_policy(base, "vm2", u, plain, "p-other") == "crash"           # then the default
    assert consistency_policy(base, "vm2", u, plain, "") == "crash"                  # not a Nova domain
    assert consistency_policy(base, "vm2", u, NOVA_QUIESCE.format(u=u, v="yes"), "p-scratch") == "filesystem"


@pytest.mark.parametrize("raw,key", [
    ({"projects": {"p1": {"consistency": "fs"}}}, "projects.p1.consistency"),
    ({"projects": {"p1": {"consistency": "auto", "retention": 3}}}, "projects.p1.retention"),
    ({"projects": {"p1": "filesystem"}}, "projects.p1"),
    ({"projects": ["p1"]}, "projects"),
    ({"consistency": "quiesce"}, "consistency"),
    ({"consistency": True}, "consistency"),
    ({"domains": {"vm1": {"consistency": "fs"}}}, "domains.vm1.consistency"),
    ({"targets": {"t1": {"engine": "qmp", "qmp_socket": "/q", "node": "n", "consistency": "x"}}},
     "targets.t1.consistency"),
    ({"targets": {"t1": {"engine": "libvirt", "guest_agent_socket": "/g"}}}, "targets.t1.guest_agent_socket"),
    ({"guest_agent_timeout": 0}, "guest_agent_timeout"),
])
def test_config_errors_name_the_key(raw, key):
    from ekko_libvirt import config
    from ekko_libvirt.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        config.build(raw)
    assert e.value.key == key


def test_manifest_keeps_consistency_and_ignores_a_malformed_one():
    from ekko_libvirt.format import manifest as mf
    t = mf.SegmentTable(2)
    m = mf.Manifest("20260101T000000000Z-abcdef", "t1", 2 << 20, 1 << 20, t,
                    consistency={"level": "filesystem", "mountpoints": ["/"], "freeze_ms": 12})
    assert mf.decode(mf.encode(m)).consistency == m.consistency
    m.consistency = None
    blob = mf.encode(m)
    assert b"consistency" not in blob                   # as written before it existed
    assert mf.decode(blob).consistency is None
    m.consistency = {"level": 3}
    assert mf.decode(mf.encode(m)).consistency is None  # information, never a reason to refuse


def test_a_reader_from_before_consistency_reads_the_new_manifests():
    """The manifest reader of commit f73564f (before `consistency` existed), loaded from git, decodes
    a manifest that has it: same segments, same header otherwise."""
    import importlib.util
    import subprocess
    from ekko_libvirt.format import manifest as mf
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = subprocess.run(["git", "-C", root, "show", "f73564f:ekko_libvirt/format/manifest.py"],
                         capture_output=True, text=True, check=True).stdout
    assert "consistency" not in src
    spec = importlib.util.spec_from_loader("ekko_libvirt.format._manifest_before_17", loader=None)
    old = importlib.util.module_from_spec(spec)
    old.__package__ = "ekko_libvirt.format"
    exec(compile(src, "manifest@f73564f", "exec"), old.__dict__)
    t = mf.SegmentTable(3)
    t.set_data(1, bytes(range(16)))
    m = mf.Manifest("20260101T000000000Z-abcdef", "t1", 3 << 20, 1 << 20, t, kind="full",
                    consistency={"level": "crash", "reason": "consistency: crash (configured)"})
    got = old.decode(mf.encode(m))
    assert bytes(got.table.flags) == bytes(t.flags) and bytes(got.table.digests) == bytes(t.digests)
    assert {k: v for k, v in got.header().items()} == {k: v for k, v in m.header().items() if k != "consistency"}


def test_thaw_reaper_process_thaws_when_its_pipe_closes_without_done(tmp_path):
    """The real reaper process (engine/reaper_main.py, kind thaw) against a fake agent: abandoned
    (what a SIGKILLed ekko or a failed thaw does), it syncs, thaws and asks until it hears thawed."""
    from ekko_libvirt.engine.reaper import Reaper
    seen, state = [], {"frozen": True}

    def behave(conn, msg):
        seen.append(msg["execute"])
        if msg["execute"] == "guest-fsfreeze-thaw":
            state["frozen"] = False
            conn.sendall(b'{"return": 2}\n')
        elif msg["execute"] == "guest-fsfreeze-status":
            conn.sendall(json.dumps({"return": "frozen" if state["frozen"] else "thawed"}).encode() + b"\n")
        else:
            honest(conn, msg)
    srv = FakeServer(behave)
    try:
        r = Reaper({"kind": "thaw", "name": "t1", "agent": {"kind": "socket", "path": srv.path, "timeout": 2}},
                   str(tmp_path / "reaper.log")).start()
        proc = r.proc
        assert proc is not None
        r.abandon()
        assert proc.wait(timeout=60) == 0, (tmp_path / "reaper.log").read_text()
        assert seen == ["guest-sync-delimited", "guest-fsfreeze-thaw", "guest-fsfreeze-status"], seen
        assert "ended without settling its session: thawing its guest" in (tmp_path / "reaper.log").read_text()
    finally:
        srv.close()


def test_thaw_reaper_process_says_done_and_does_nothing(tmp_path):
    from ekko_libvirt.engine.reaper import Reaper
    seen = []
    srv = FakeServer(lambda conn, msg: seen.append(msg))
    try:
        r = Reaper({"kind": "thaw", "name": "t1", "agent": {"kind": "socket", "path": srv.path, "timeout": 2}},
                   str(tmp_path / "reaper.log")).start()
        proc = r.proc
        r.done()
        assert proc is not None and proc.returncode == 0
        assert seen == [] and not (tmp_path / "reaper.log").exists()
    finally:
        srv.close()


def test_an_agent_that_refuses_fsinfo_is_still_frozen():
    """guest-get-fsinfo blocked in the guest (qemu-ga -b): the agent answers, so it is frozen all
    the same; the manifest names no mount points. A refused freeze is a freeze failure."""
    def behave(conn, msg):
        if msg["execute"] == "guest-get-fsinfo":
            conn.sendall(b'{"error": {"class": "GenericError", "desc": "The command guest-get-fsinfo has been '
                         b'disabled for this instance"}}\n')
        elif msg["execute"] == "guest-fsfreeze-thaw":
            conn.sendall(b'{"return": 2}\n')
        else:
            honest(conn, msg)
    srv = FakeServer(behave)
    try:
        q = Quiescer(AUTO, AgentAccess(SocketAgent(srv.path, timeout=5)), "t1")
        q.prepare()
        with q.window():
            pass
        q.close()
        assert q.result is not None and q.result.level == FILESYSTEM and q.result.mountpoints == ()
    finally:
        srv.close()

    def refuse_freeze(conn, msg):
        if msg["execute"] == "guest-fsfreeze-freeze":
            conn.sendall(b'{"error": {"class": "GenericError", "desc": "fsfreeze hook has failed with status 1"}}\n')
        elif msg["execute"] == "guest-fsfreeze-thaw":
            conn.sendall(b'{"return": 0}\n')
        else:
            honest(conn, msg)
    srv = FakeServer(refuse_freeze)
    try:
        q = Quiescer(FILESYSTEM, AgentAccess(SocketAgent(srv.path, timeout=5)), "t1")
        q.prepare()
        with pytest.raises(FreezeRequired, match="fsfreeze hook has failed with status 1"):
            with q.window():
                pass
        q.close()
    finally:
        srv.close()

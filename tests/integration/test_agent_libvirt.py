"""`ekko agent` as a real process against a real libvirtd, driven by the installed hook.

The agent runs as `python -m ekko_libvirt.cli -c CFG agent` with the spool and state directory the
`ekko_hook` fixture baked into /etc/libvirt/hooks/qemu.d/ekko. Scheduled backups are off by default
(`schedule: {enabled: false}`) and switched on per test domain under `domains:`, so the agent never
touches a domain this module did not create. Also here: `ekko status`, `ekko hook install/uninstall`
and `ekko restore --define`.
"""

import datetime
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT, Ekko, read_raw
from tests.harness.pause import open_fifo_when_waited_on
from ekko_libvirt.agent.state import ChainStatus, StateDir
from ekko_libvirt.engine.domain_xml import NOVA_NS
from harness.libvirtd import make_workdir, qemu_pid, quiet_libvirt_errors
from libvirt_fixtures import ekko_hook, images, libvirt_conn, libvirtd, test_domains  # noqa: F401
from tests.integration.test_libvirt_backup import start_guest

KiB, MiB = 1024, 1024 * 1024


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)


class AgentProcess:
    """One `ekko agent` subprocess; its stderr goes to a log file the test can read."""

    def __init__(self, ekko: Ekko, env=None):
        self.log = os.path.join(ekko.workdir, f"agent-{time.monotonic_ns()}.log")
        e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "agent"],
                                         env=e, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_log(self, needle: str, timeout: float = 30) -> None:
        def seen():
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode}:\n{self.text()}"
            return needle in self.text()
        wait_for(seen, timeout, f"'{needle}' in the agent's log:\n{self.text()}")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def agents():
    """agents(ekko, env=None) -> a started AgentProcess; every one is stopped at teardown (by PID)."""
    started = []

    def start(ekko, env=None, ready=True):
        a = AgentProcess(ekko, env)
        started.append(a)
        if ready:
            a.wait_log("agent ready")
        return a
    yield start
    for a in started:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
            try:
                a.proc.wait(60)
            except subprocess.TimeoutExpired:
                a.kill()


@pytest.fixture
def lvwork():
    d = make_workdir("ekko-agt-")
    yield d
    subprocess.run(["rm", "-rf", d])


def agent_ekko(work, hook, domains=None, **agent) -> Ekko:
    cfg = {"store": {"type": "local", "path": os.path.join(work, "store")},
           "state_dir": hook.state_dir, "run_dir": os.path.join(work, "run"), "segment_size": "256KiB",
           "workers": 2, "agent": dict({"spool_dir": hook.spool_dir, "poll_interval": 0.2}, **agent),
           "schedule": {"enabled": False}, "domains": domains or {}}
    return Ekko(work, cfg)


def window_around_now() -> str:
    now = datetime.datetime.now()
    a, b = now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1)
    return f"{a:%H:%M}-{b:%H:%M}"


def status_of(ekko, name):
    p = ekko.run("status", name, json_out=True)
    (row,) = p.data["domains"]
    return row


def backups_of(ekko, name):
    """{backup_id: {dev: summary}} from `ekko list`, oldest first."""
    out = {}
    for ns_row in ekko.run("list", json_out=True).data["backups"]:
        target = ns_row["target"]
        if target.startswith(name + "."):
            out.setdefault(ns_row["backup_id"], {})[target.rsplit(".", 1)[1]] = ns_row
    return dict(sorted(out.items()))


def domain_state(hook, uuid):
    return StateDir(hook.state_dir).load_domain(uuid)


# --- events ----------------------------------------------------------------------------------------

def test_agent_follows_hook_and_libvirt_events(libvirtd, ekko_hook, test_domains, images, lvwork, agents):
    dom = test_domains.define("ekko-test-agev", [(images("agev"), "qcow2", "vda")])
    uuid, name = dom.UUIDString(), dom.name()
    ekko = agent_ekko(lvwork, ekko_hook)
    agent = agents(ekko)

    dom.create()
    wait_for(lambda: (st := domain_state(ekko_hook, uuid)) and st.running and st.last_event == "started", 20,
             "started processed")
    dom.destroy()
    wait_for(lambda: (st := domain_state(ekko_hook, uuid)) and st.last_event == "release"
             and not st.running and st.clean_shutdown is True, 20, "stop processed")

    dom.create()
    wait_for(lambda: domain_state(ekko_hook, uuid).running, 20, "second start")
    libvirtd.restart()                    # the domain keeps running: libvirtd reconnects to it (hook: reconnect)
    wait_for(lambda: domain_state(ekko_hook, uuid).last_event == "reconnect", 30, "reconnect processed")
    agent.wait_log("reconnected to libvirt")          # the agent's own connection came back too
    row = status_of(ekko, name)
    assert (row["uuid"], row["active"], row["last_event"], row["chain"]["status"]) == (uuid, True, "reconnect", "none")
    assert row["next"]["why"] == "disabled"

    # libvirt's own lifecycle events arrive on the new connection: QEMU killed -> the chain needs a full
    conn = libvirtd.connect()
    try:
        os.kill(qemu_pid(conn.lookupByUUIDString(uuid)), signal.SIGKILL)
        st = wait_for(lambda: (s := domain_state(ekko_hook, uuid)).chain.status is ChainStatus.FULL_REQUIRED and s,
                      20, "QEMU's death noticed")
        assert "QEMU ended unexpectedly" in st.chain.reason
    finally:
        conn.close()
    assert agent.terminate() == 0
    assert "Traceback" not in agent.text(), agent.text()


def test_events_kept_while_agent_is_down(libvirtd, ekko_hook, test_domains, images, lvwork, agents):
    from ekko_libvirt.agent.spool import Spool
    dom = test_domains.define("ekko-test-agdown", [(images("agdown"), "qcow2", "vda")])
    uuid = dom.UUIDString()
    ekko = agent_ekko(lvwork, ekko_hook)
    agent = agents(ekko)
    dom.create()
    wait_for(lambda: (st := domain_state(ekko_hook, uuid)) and st.running, 20, "start processed")
    assert agent.terminate() == 0

    dom.destroy()                          # nobody reads the spool now
    spool = Spool(ekko_hook.spool_dir)
    kept = [e for e in (spool.read(x) for x in spool.pending()) if e.uuid == uuid]
    assert [(e.op, e.subop) for e in kept] == [("stopped", "end"), ("release", "end")]
    assert domain_state(ekko_hook, uuid).running

    agent = agents(ekko)                   # processes them before it says ready
    st = domain_state(ekko_hook, uuid)
    assert (st.running, st.clean_shutdown, st.last_event) == (False, True, "release")
    assert not [x for x in spool.pending() if spool.read(x).uuid == uuid]
    assert agent.terminate() == 0


# --- scheduled backups ---------------------------------------------------------------------------

def test_scheduled_backups_and_status(libvirtd, ekko_hook, test_domains, images, lvwork, agents):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-agsch")
    name = g.dom.name()
    g.write("vda", 0, os.urandom(300 * KiB))
    g.write("vdb", 1 * MiB, os.urandom(100 * KiB))
    exp = g.snapshot()
    ekko = agent_ekko(lvwork, ekko_hook, domains={name: {"schedule": {
        "enabled": True, "interval": 2, "window": window_around_now()}}})
    agent = agents(ekko)

    first = wait_for(lambda: status_of(ekko, name)["chain"]["last_backup_id"], 60, "a scheduled backup")
    ids = wait_for(lambda: len(b := backups_of(ekko, name)) >= 2 and b, 60, "a second scheduled backup")
    assert agent.terminate() == 0
    stopped = time.time()                  # no backup of it starts after this
    (b1, d1), (b2, d2) = list(ids.items())[:2]
    assert b1 == first
    assert (d1["vda"]["kind"], d1["vdb"]["kind"]) == ("full", "full")
    assert d2["vda"]["kind"] == "incremental" and d2["vda"]["parent"] == b1
    assert g.dom.listAllCheckpoints() == []            # Nova: no checkpoint metadata between backups
    for dev in ("vda", "vdb"):                         # nothing was written after the first backup's start
        out = os.path.join(lvwork, f"r-{dev}.raw")
        ekko.run("restore", b1, "--disk", dev, "--to", out)
        assert read_raw(out) == exp[dev], dev

    # 2 s (the interval; +1 for a time kept in whole seconds) after the agent stopped, the
    # newest backup is surely older than the interval: the next one is due, whenever this runs
    time.sleep(max(0.0, stopped + 3 - time.time()))
    row = status_of(ekko, name)
    newest = list(backups_of(ekko, name))[-1]
    assert row["chain"]["status"] == "ok" and row["chain"]["last_backup_id"] == newest
    assert set(row["last_backup"]) == {"vda", "vdb"} and row["last_backup"]["vda"]["backup_id"] == newest
    assert (row["next"]["interval_s"], row["next"]["why"], row["next"]["due"]) == (2, "interval-elapsed", True)
    assert row["job"] is None
    last = row["last_job"]
    assert last["status"] == "succeeded" and last["backup_id"] == newest
    assert last["bytes_done"] == last["bytes_total"] == 24 * MiB       # progress covers both disks
    text = ekko.run("status", name).stdout
    assert name in text and "chain   ok" in text and "agent: not running" in text


def test_agent_killed_during_backup_recovers_at_start(libvirtd, ekko_hook, test_domains, images, lvwork, agents):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-agkill")
    name, uuid = g.dom.name(), g.dom.UUIDString()
    ekko = agent_ekko(lvwork, ekko_hook)
    g.write("vda", 0, os.urandom(300 * KiB))
    b1 = ekko.run("backup", name, json_out=True).data["backups"][0]["backup_id"]      # full, by the CLI
    g.write("vda", 3 * MiB, os.urandom(200 * KiB))

    fifo = os.path.join(lvwork, "pause.fifo")
    os.mkfifo(fifo)
    on = {name: {"schedule": {"enabled": True, "interval": 1, "window": "00:00-24:00"}}}
    ekko.cfg["domains"] = on
    ekko.write_config()
    agent = agents(ekko, env={"EKKO_TEST_PAUSE": f"after-transaction:{fifo}"})
    fd = open_fifo_when_waited_on(fifo)        # the agent's job holds libvirt's pull backup open here
    try:
        assert [c.getName() for c in g.dom.listAllCheckpoints()]       # its new checkpoint
        g.dom.backupGetXMLDesc(0)                                       # its libvirt job
        assert status_of(ekko, name)["job"]["status"] == "running"
        agent.kill()
    finally:
        os.close(fd)
    g.write("vda", 6 * MiB, os.urandom(100 * KiB))
    g.write("vdb", 2 * MiB, os.urandom(64 * KiB))
    exp = g.snapshot()
    assert status_of(ekko, name)["job"]["status"] == "stale"

    ekko.cfg["domains"] = {}                   # restart without scheduling: only the recovery runs
    ekko.write_config()
    agent = agents(ekko)
    assert "marked abandoned" in agent.text() and "aborted the backup job of an interrupted run" in agent.text()
    import libvirt
    with quiet_libvirt_errors(), pytest.raises(libvirt.libvirtError):
        g.dom.backupGetXMLDesc(0)              # libvirt's job is gone
    assert g.dom.listAllCheckpoints() == []    # and no checkpoint metadata is left on the domain
    row = status_of(ekko, name)
    assert row["job"] is None and row["last_job"]["status"] == "abandoned"
    assert row["chain"]["last_backup_id"] == b1

    ekko.cfg["domains"] = on                   # SIGHUP: the schedule comes back, the next backup runs
    ekko.write_config()
    agent.proc.send_signal(signal.SIGHUP)
    b2 = wait_for(lambda: (bid := status_of(ekko, name)["chain"]["last_backup_id"]) != b1 and bid, 60,
                  "the next scheduled backup")
    assert agent.terminate() == 0
    disks = backups_of(ekko, name)[b2]
    assert disks["vda"]["kind"] == "incremental" and disks["vda"]["parent"] == b1
    assert g.dom.listAllCheckpoints() == []
    for dev in ("vda", "vdb"):
        out = os.path.join(lvwork, f"r-{dev}.raw")
        ekko.run("restore", b2, "--disk", dev, "--to", out)
        assert read_raw(out) == exp[dev], dev


def test_sigterm_cancels_a_running_backup_cleanly(libvirtd, ekko_hook, test_domains, images, lvwork, agents):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-agterm")
    name = g.dom.name()
    g.write("vda", 0, os.urandom(200 * KiB))
    fifo = os.path.join(lvwork, "pause.fifo")
    os.mkfifo(fifo)
    ekko = agent_ekko(lvwork, ekko_hook, domains={name: {"schedule": {"enabled": True, "interval": 3600}}})
    agent = agents(ekko, env={"EKKO_TEST_PAUSE": f"after-transaction:{fifo}"})
    fd = open_fifo_when_waited_on(fifo)
    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_log("stopping")
    os.close(fd)                               # let the job go on: it sees the stop at its first segment
    assert agent.proc.wait(60) == 0
    assert "cancelled: the agent is stopping" in agent.text()
    import libvirt
    with quiet_libvirt_errors(), pytest.raises(libvirt.libvirtError):
        g.dom.backupGetXMLDesc(0)
    assert g.dom.listAllCheckpoints() == []
    row = status_of(ekko, name)
    assert row["last_job"]["status"] == "failed" and "cancelled" in row["last_job"]["error"]
    assert row["chain"]["last_backup_id"] is None and backups_of(ekko, name) == {}
    b = ekko.run("backup", name, json_out=True).data["backups"]             # the domain is fine afterwards
    assert {x["kind"] for x in b} == {"full"}


# --- restore --define ------------------------------------------------------------------------------

def test_restore_define_new_domain(libvirtd, ekko_hook, test_domains, images, lvwork):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-agrst", nova=True)
    g.write("vda", 0, os.urandom(400 * KiB))
    g.write("vdb", 3 * MiB, os.urandom(128 * KiB))
    ekko = agent_ekko(lvwork, ekko_hook)
    ekko.run("backup", g.dom.name(), json_out=True)
    g.write("vda", 5 * MiB, os.urandom(128 * KiB))
    exp = g.snapshot()
    bid = ekko.run("backup", g.dom.name(), json_out=True).data["backups"][0]["backup_id"]

    new = "ekko-test-agrst-copy"
    test_domains.names.append(new)             # cleaned up with the others
    target = os.path.join(lvwork, "restored")
    res = ekko.run("restore", bid, "--define", new, "--to", target, json_out=True).data
    assert res["ok"] and res["domain"] == new and res["backup_id"] == bid
    paths = {d["dev"]: d["path"] for d in res["disks"]}
    assert paths == {"vda": os.path.join(target, "vda.qcow2"), "vdb": os.path.join(target, "vdb.raw")}
    for dev, path in paths.items():
        assert read_raw(path) == exp[dev], dev

    dom = test_domains.conn.lookupByName(new)
    root = ET.fromstring(dom.XMLDesc(0))
    assert dom.UUIDString() == res["uuid"] != g.dom.UUIDString()
    assert root.find(f"metadata/{{{NOVA_NS}}}instance") is None
    sources = {d.find("target").get("dev"): d.find("source").get("file") for d in root.findall("devices/disk")}
    assert sources == paths
    dom.create()                               # it runs on the restored files
    assert dom.isActive()
    dom.destroy()
    for dev, path in paths.items():            # and they still hold exactly the backup
        assert read_raw(path) == exp[dev], dev

    again = ekko.run("restore", bid, "--define", new, "--to", os.path.join(lvwork, "other"), check=False)
    assert again.returncode == 2 and "exists already" in again.stderr
    assert not os.path.exists(os.path.join(lvwork, "other", "vda.qcow2"))


# --- ekko hook install / uninstall ------------------------------------------------------------

def test_hook_install_and_uninstall(lvwork):
    spool, state = os.path.join(lvwork, "spool"), os.path.join(lvwork, "state")
    ekko = Ekko(lvwork, {"store": {"type": "local", "path": os.path.join(lvwork, "store")}, "state_dir": state,
                         "agent": {"spool_dir": spool}})
    dest = os.path.join(lvwork, "hooks", "qemu.d", "ekko")
    p = ekko.run("hook", "install", "--dest", dest, "--no-reload", json_out=True)
    assert p.data["hook"] == dest and p.data["libvirtd_pid"] is None
    assert os.stat(dest).st_mode & 0o777 == 0o755 and os.path.isdir(spool)
    text = open(dest).read()
    assert f'SPOOL_DIR = "{spool}"' in text and f'STATE_DIR = "{state}"' in text
    assert os.listdir(os.path.dirname(dest)) == ["ekko"]          # no temp file where libvirt runs hooks
    out = subprocess.run([dest, "vm1", "started", "begin", "-"], input=b"", capture_output=True, timeout=10)
    assert out.returncode == 0 and len(os.listdir(spool)) == 1     # the installed hook writes into the spool
    assert "removed" in ekko.run("hook", "uninstall", "--dest", dest, "--no-reload").stdout
    assert not os.path.exists(dest)
    assert "was not installed" in ekko.run("hook", "uninstall", "--dest", dest, "--no-reload").stdout
    with open(dest, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    p = ekko.run("hook", "uninstall", "--dest", dest, "--no-reload", check=False)
    assert p.returncode == 1 and "not ekko's hook" in p.stderr and os.path.exists(dest)

"""hooks/qemu against a real libvirtd, and the agent's spool reading what it wrote.

The first group runs the hook directly (as libvirt does: argv + XML on stdin, a bare environment)
and needs no libvirtd; the second installs it into /etc/libvirt/hooks/qemu.d/ekko of a libvirtd
started by the harness and drives real domains through start / destroy / libvirtd restart.
"""

import json
import os
import shutil
import subprocess
import time

import pytest

from ekko_libvirt.agent.events import EventKind
from ekko_libvirt.agent.spool import Spool, render_hook
from ekko_libvirt.agent.state import DomainState, StateDir
from harness.libvirtd import make_workdir, quiet_libvirt_errors
from libvirt_fixtures import HOOK_SOURCE, ekko_hook, images, libvirt_conn, libvirtd, test_domains  # noqa: F401

UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"
NAME = "instance-0000000a"

NOVA_XML = f"""<domain type='kvm' id='7'>
  <name>{NAME}</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:package version="27.1.0"/>
      <nova:name>web-01</nova:name>
      <nova:creationTime>2024-05-01 10:00:00</nova:creationTime>
      <nova:flavor name="m1.small"><nova:memory>2048</nova:memory><nova:disk>20</nova:disk></nova:flavor>
      <nova:owner>
        <nova:user uuid="11111111-2222-3333-4444-555555555555">admin</nova:user>
        <nova:project uuid="aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee">admin</nova:project>
      </nova:owner>
    </nova:instance>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>1</vcpu>
  <sysinfo type='smbios'><system><entry name='uuid'>{UUID}</entry></system></sysinfo>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/><smbios mode='sysinfo'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
""" + "".join(f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/nova/instances/{UUID}/disk{i}' index='{i + 1}'/>
      <target dev='vd{chr(97 + i)}' bus='virtio'/>
      <alias name='virtio-disk{i}'/>
    </disk>
""" for i in range(4)) + """    <interface type='bridge'><mac address='fa:16:3e:00:00:01'/><source bridge='br-int'/>
      <model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <graphics type='vnc' port='-1' autoport='yes' listen='0.0.0.0'/>
  </devices>
</domain>
"""


# --- the hook run directly -----------------------------------------------------------------------

@pytest.fixture
def sandbox():
    """A baked copy of the hook (exactly what `install_hook` writes) in a dir with spool/ state/ cwd/."""
    root = make_workdir("ekko-hk-")
    for d in ("state/locks", "cwd"):
        os.makedirs(os.path.join(root, d))
    hook = os.path.join(root, "ekko-hook")
    with open(HOOK_SOURCE) as f:
        text = render_hook(f.read(), os.path.join(root, "spool"), os.path.join(root, "state"))
    with open(hook, "w") as f:
        f.write(text)
    os.chmod(hook, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_hook(sandbox, args, stdin=NOVA_XML.encode(), env=None):
    """Run the hook as libvirt does: argv, XML on stdin, only LC_ALL/PATH/HOME in the environment."""
    e = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    e.update(env or {})
    return subprocess.run([os.path.join(sandbox, "ekko-hook"), *args], input=stdin, capture_output=True,
                          env=e, cwd=os.path.join(sandbox, "cwd"), timeout=30)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def spool_events(spool_dir, uuid=None):
    sp = Spool(spool_dir)
    events = [sp.read(e) for e in sp.pending()]
    return [e for e in events if uuid is None or e.uuid == uuid]


def test_hook_records_one_event_with_uuid_and_nova_metadata(sandbox):
    p = run_hook(sandbox, [NAME, "started", "begin", "-"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == b""                         # stdout is the new XML for migrate/restore: never print
    names = files_under(os.path.join(sandbox, "spool"))
    assert len(names) == 1 and not names[0].startswith(".")
    st = os.stat(os.path.join(sandbox, "spool", names[0]))
    assert st.st_mode & 0o777 == 0o600
    (ev,) = spool_events(os.path.join(sandbox, "spool"))
    assert (ev.kind, ev.domain, ev.uuid, ev.xml_status, ev.vetoed) == (EventKind.STARTED, NAME, UUID, "ok", False)
    assert ev.nova.name == "web-01" and ev.nova.flavor == "m1.small"
    assert ev.nova.project_uuid == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert files_under(os.path.join(sandbox, "cwd")) == []


def test_hook_records_one_event_per_call(sandbox):
    """Its runtime (median well under 100 ms) is measured by bench/hook.py, not asserted here."""
    ops = [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"), ("release", "end")]
    for i in range(20):
        op, sub = ops[i % len(ops)]
        p = run_hook(sandbox, [NAME, op, sub, "-"])
        assert p.returncode == 0, p.stderr
    events = spool_events(os.path.join(sandbox, "spool"))
    assert [(e.domain, e.uuid) for e in events] == [(NAME, UUID)] * 20
    assert len(os.listdir(os.path.join(sandbox, "spool"))) == 20


@pytest.mark.parametrize("args", [
    ["../../etc", "prepare", "begin", "-"],
    ["a/b", "started", "begin", "-"],
    ["..", "started", "begin", "-"],
    ["", "started", "begin", "-"],
    ["x" * 200, "started", "begin", "-"],
    ["vm\u00e9", "started", "begin", "-"],
    ["vm\nstarted", "started", "begin", "-"],
    [NAME, "start;rm -rf /", "begin", "-"],
    [NAME, "STARTED", "begin", "-"],
    [NAME, "started", "begin/../x", "-"],
    [NAME, "started", "begin"],
    [NAME, "started", "begin", "-", "extra"],
    [],
], ids=lambda a: repr(a)[:40])
def test_hook_drops_malformed_argv(sandbox, args):
    p = run_hook(sandbox, args)
    assert p.returncode == 0
    assert b"dropped a malformed call" in p.stderr
    assert files_under(sandbox) == ["ekko-hook"]      # nothing written: not in the spool, not anywhere


def test_hook_path_traversal_name_writes_nothing_outside_spool(sandbox):
    before = set(os.listdir("/etc"))
    for args in (["../../etc/ekko-pwn", "prepare", "begin", "-"], ["../spool/../../x", "started", "begin", "-"]):
        assert run_hook(sandbox, args).returncode == 0
    assert set(os.listdir("/etc")) == before
    assert files_under(sandbox) == ["ekko-hook"]


@pytest.mark.parametrize("stdin,status", [
    (b"A" * (8 << 20), "oversize"),                                     # 8 MiB: drained, not kept
    (os.urandom(64 << 10), "malformed"),                                # binary garbage
    (b"", "empty"),
    (b"<domain><name>x</name></domain", "malformed"),                  # truncated
    (b"<notadomain><uuid>" + UUID.encode() + b"</uuid></notadomain>", "malformed"),
    (b"<domain><name>" + NAME.encode() + b"</name><uuid>not-a-uuid</uuid></domain>", "malformed"),
    (b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>"
     b"<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;'>]><domain><name>&c;</name><uuid>" + UUID.encode()
     + b"</uuid></domain>", "malformed"),                               # entities: DTD refused
    (b"<!DOCTYPE d SYSTEM 'file:///etc/shadow'><domain><name>&x;</name></domain>", "malformed"),
    (b"<domain><name>other-name</name><uuid>" + UUID.encode() + b"</uuid></domain>", "name-mismatch"),
], ids=["huge", "binary", "empty", "truncated", "wrong-root", "bad-uuid", "entities", "external-dtd",
        "name-mismatch"])
def test_hook_untrusted_stdin_is_recorded_safely(sandbox, stdin, status):
    p = run_hook(sandbox, [NAME, "stopped", "end", "-"], stdin=stdin)     # timeout=30: a hang fails
    assert p.returncode == 0, p.stderr
    (ev,) = spool_events(os.path.join(sandbox, "spool"))
    assert ev.xml_status == status
    assert ev.uuid == (UUID if status == "name-mismatch" else None)
    assert ev.domain == NAME and ev.kind is EventKind.STOPPED
    assert files_under(sandbox) == ["ekko-hook"] + [os.path.join("spool", n) for n in os.listdir(
        os.path.join(sandbox, "spool"))]


def test_hook_unknown_operation_is_recorded_as_unknown(sandbox):
    assert run_hook(sandbox, [NAME, "frobnicate", "begin", "-"]).returncode == 0
    (ev,) = spool_events(os.path.join(sandbox, "spool"))
    assert ev.kind is EventKind.UNKNOWN and ev.op == "frobnicate"
    raw = json.loads(open(Spool(os.path.join(sandbox, "spool")).pending()[0].path).read())
    assert raw["known"] is False


def test_hook_exits_0_when_spool_unwritable(sandbox):
    with open(os.path.join(sandbox, "spool"), "w") as f:     # a file where the directory should be
        f.write("x")
    p = run_hook(sandbox, [NAME, "started", "begin", "-"])
    assert p.returncode == 0
    assert p.stderr.count(b"\n") == 1 and b"cannot write to spool" in p.stderr and b"event lost" in p.stderr


def test_hook_veto_and_stale_marker(sandbox):
    sd = StateDir(os.path.join(sandbox, "state"))
    sd.mark_offline_backup(UUID, NAME, job_id="job-1")
    p = run_hook(sandbox, [NAME, "prepare", "begin", "-"])
    assert p.returncode == 1
    msg = p.stderr.decode()
    assert f"ekko: offline backup of {NAME} in progress since " in msg
    assert "start refused, try again after it ends" in msg
    # only `prepare begin` is vetoed; other operations pass
    assert run_hook(sandbox, [NAME, "start", "begin", "-"]).returncode == 0
    assert run_hook(sandbox, [NAME, "release", "end", "-"]).returncode == 0
    evs = spool_events(os.path.join(sandbox, "spool"))
    assert [(e.op, e.vetoed) for e in evs] == [("prepare", True), ("start", False), ("release", False)]
    # a marker whose owner is gone (pid of an exited process) is stale: ignored
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker = sd.offline_marker_path(UUID)
    data = json.load(open(marker))
    data.update(pid=dead.pid, pid_start=1)
    json.dump(data, open(marker, "w"))
    p = run_hook(sandbox, [NAME, "prepare", "begin", "-"])
    assert p.returncode == 0 and b"stale offline backup marker" in p.stderr
    # a garbled marker still refuses (fail closed); a removed one lets the start through
    open(marker, "w").write("garbage")
    assert run_hook(sandbox, [NAME, "prepare", "begin", "-"]).returncode == 1
    sd.clear_offline_backup(UUID)
    assert run_hook(sandbox, [NAME, "prepare", "begin", "-"]).returncode == 0


# --- against libvirtd ----------------------------------------------------------------------------

def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def ops_of(events):
    return [(e.op, e.subop) for e in events]


START = [("prepare", "begin"), ("start", "begin"), ("started", "begin")]
STOP = [("stopped", "end"), ("release", "end")]


def test_lifecycle_events_in_order_kept_until_acked(libvirtd, ekko_hook, test_domains, images):
    import libvirt
    dom = test_domains.define("ekko-test-hooks", [(images("hooks-a"), "qcow2", "vda"),
                                                  (images("hooks-b", "raw"), "raw", "vdb")])
    uuid, name = dom.UUIDString(), dom.name()
    spool = Spool(ekko_hook.spool_dir)

    dom.create()
    assert ops_of(spool_events(ekko_hook.spool_dir, uuid)) == START
    first_files = {e.name for e in spool.pending()}

    dom.destroy()
    assert ops_of(spool_events(ekko_hook.spool_dir, uuid)) == START + STOP
    dom.create()
    libvirtd.restart()                             # domain keeps running; libvirtd reconnects to it
    conn = libvirtd.connect()
    try:
        dom = conn.lookupByName(name)
        assert dom.isActive()
        # libvirtd reconnects to running domains in a thread of its own, after it answers
        expected = START + STOP + START + [("reconnect", "begin")]
        wait_for(lambda: len(spool_events(ekko_hook.spool_dir, uuid)) >= len(expected), 20, "reconnect event")
        assert ops_of(spool_events(ekko_hook.spool_dir, uuid)) == expected
        dom.destroy()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    finally:
        conn.close()

    events = spool_events(ekko_hook.spool_dir, uuid)
    assert ops_of(events) == START + STOP + START + [("reconnect", "begin")] + STOP
    assert all(e.uuid == uuid and e.domain == name and e.xml_status == "ok" for e in events)
    assert [e.wall_ns for e in events] == sorted(e.wall_ns for e in events)
    # nobody consumed them: the first ones are still there
    assert first_files <= {e.name for e in spool.pending()}

    # the agent's side: drain in order through the reaction table into the domain state, ack each
    sd = StateDir(os.path.join(ekko_hook.state_dir)).ensure()
    seen = []

    def handle(ev):
        if ev.uuid is None:
            return
        seen.append(ev.kind)
        sd.apply_event(ev)

    result = spool.drain(handle)
    assert result.error is None and result.quarantined == ()
    assert seen == [EventKind.PREPARE, EventKind.START, EventKind.STARTED, EventKind.STOPPED, EventKind.RELEASED,
                    EventKind.PREPARE, EventKind.START, EventKind.STARTED, EventKind.RECONNECT,
                    EventKind.STOPPED, EventKind.RELEASED]
    assert spool.pending() == []
    st = sd.load_domain(uuid)
    assert isinstance(st, DomainState)
    assert (st.name, st.running, st.clean_shutdown, st.last_event) == (name, False, True, "release")


def test_offline_backup_marker_vetoes_start(libvirtd, ekko_hook, test_domains, images):
    import libvirt
    dom = test_domains.define("ekko-test-veto", [(images("veto"), "qcow2", "vda")])
    uuid, name = dom.UUIDString(), dom.name()
    sd = StateDir(ekko_hook.state_dir).ensure()
    with sd.offline_backup(uuid, name, job_id="job-veto"):
        with quiet_libvirt_errors(), pytest.raises(libvirt.libvirtError) as err:
            dom.create()
        assert not dom.isActive()
    msg = str(err.value)
    print(f"\nlibvirt's error for the vetoed start: {msg}")
    assert f"ekko: offline backup of {name} in progress since " in msg
    assert "start refused, try again after it ends" in msg
    evs = spool_events(ekko_hook.spool_dir, uuid)
    # libvirt cleans up after the refused start: stopped + release follow the vetoed prepare
    assert [(e.op, e.subop, e.vetoed) for e in evs] == [("prepare", "begin", True), ("stopped", "end", False),
                                                        ("release", "end", False)]

    dom.create()                                   # marker gone: the start goes through
    assert dom.isActive()
    assert ops_of(spool_events(ekko_hook.spool_dir, uuid))[-3:] == START
    dom.destroy()
    Spool(ekko_hook.spool_dir).drain(lambda ev: None)

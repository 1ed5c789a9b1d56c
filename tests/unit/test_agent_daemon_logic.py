"""The pure parts behind `ekko agent`, `ekko status` and `ekko restore --define`: settings from the
config, libvirt lifecycle events, retry back-off, chain state over a backup request, job progress,
status rows, and the domain XML of a restored domain."""

import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone

import pytest

from ekko_libvirt.cli import check_sections
from ekko_libvirt import config
from ekko_libvirt.agent.events import Action, lifecycle_reactions
from ekko_libvirt.agent.jobs import JobCancelled, JobProgress, request_for_chain
from ekko_libvirt.agent.scheduler import INHERIT, Policy, TimeWindow, Why, decide, retry_delay_s
from ekko_libvirt.agent.settings import AgentSettings
from ekko_libvirt.agent.state import (ChainStatus, DomainState, JobRecord, JobStatus, StateDir, apply_lifecycle, record_backup, require_full, seed_chain)
from ekko_libvirt.agent.status import describe, domain_status, newest_head, row
from ekko_libvirt.backup.domain import DomainBackupRequest
from ekko_libvirt.restore.domain import disk_of, select
from ekko_libvirt.engine import domain_xml as dx
from ekko_libvirt.errors import ConfigError, UsageError

UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"
NOVA = dx.NOVA_NS


# --- settings ------------------------------------------------------------------------------------

def test_settings_defaults_and_full_mapping():
    s = AgentSettings.from_mapping({})
    assert (s.spool_dir, s.max_concurrent, s.poll_interval_s, s.shared_storage) == \
        ("/var/spool/ekko/events", 1, 1.0, False)
    assert s.schedule == Policy() and s.domains == ()
    s = AgentSettings.from_mapping({
        "agent": {"spool_dir": "/x/spool", "max_concurrent": 3, "poll_interval": 0.5, "shared_storage": True,
                  "hook_path": "/x/hook", "keep_jobs_days": 2},
        "schedule": {"interval": "2h", "window": "22:00-06:00", "enabled": False},
        "domains": {"web-1": {"schedule": {"enabled": True, "interval": 60}},
                    UUID.upper(): {"schedule": {"disks": ["vda"]}}, "quiet": None}})
    assert (s.spool_dir, s.max_concurrent, s.poll_interval_s, s.shared_storage, s.hook_path, s.keep_jobs_days) == \
        ("/x/spool", 3, 0.5, True, "/x/hook", 2)
    assert s.schedule == Policy(7200, TimeWindow.parse("22:00-06:00"), None, False)
    ovs = s.overrides([("u-1", "web-1"), (UUID, "web-1"), ("u-2", "other")])
    assert ovs["u-1"].enabled is True and ovs["u-1"].interval_s == 60
    assert ovs[UUID].disks == ("vda",) and ovs[UUID].enabled is INHERIT      # the UUID entry wins
    assert "u-2" not in ovs
    assert s.schedule.merged(ovs["u-1"]) == Policy(60, TimeWindow.parse("22:00-06:00"), None, True)


@pytest.mark.parametrize("raw,key", [
    ({"agent": {"spool": "/x"}}, "agent.spool"),
    ({"agent": {"spool_dir": "relative"}}, "agent.spool_dir"),
    ({"agent": {"max_concurrent": 0}}, "agent.max_concurrent"),
    ({"agent": {"poll_interval": "fast"}}, "agent.poll_interval"),
    ({"agent": {"shared_storage": "yes"}}, "agent.shared_storage"),
    ({"agent": []}, "agent"),
    ({"schedule": {"interval": "soon"}}, "schedule.interval"),
    ({"schedule": {"every": "1h"}}, "schedule.every"),
    ({"domains": {"web-1": {"schedule": {"window": "25:00-26:00"}}}}, "domains.web-1.schedule.window"),
    ({"domains": {"web-1": {"interval": "1h"}}}, "domains.web-1.interval"),
    ({"domains": ["web-1"]}, "domains"),
])
def test_settings_errors_name_the_key_and_fail_at_config_load(raw, key):
    with pytest.raises(ConfigError) as e:
        AgentSettings.from_mapping(raw)
    assert e.value.key == key
    with pytest.raises(ConfigError) as e:          # every command checks the sections first: fail fast
        check_sections(config.build(raw))
    assert e.value.key == key


# --- libvirt lifecycle events, back-off, chain state over a request ----------------------------

def test_lifecycle_reactions():
    died = lifecycle_reactions(5, 5)                 # STOPPED / FAILED: QEMU killed
    assert [r.action for r in died] == [Action.MARK_UNCLEAN, Action.REQUIRE_FULL]
    assert [r.action for r in lifecycle_reactions(2, 3)] == [Action.REQUIRE_FULL]     # started from snapshot
    for ev in ((5, 1), (5, 0), (2, 0), (0, 0), (8, 0)):   # destroyed, shutdown, booted, defined, crashed
        assert lifecycle_reactions(*ev) == ()
    st = apply_lifecycle(record_backup(DomainState(UUID, running=True), "b1", "cp1", 5), died)
    assert st.clean_shutdown is False and st.chain.status is ChainStatus.FULL_REQUIRED
    assert "QEMU ended unexpectedly" in st.chain.reason and st.chain.last_backup_id == "b1"


def test_retry_delay_backs_off_within_limits():
    assert [retry_delay_s(n, 86400) for n in range(8)] == [0, 60, 120, 240, 480, 960, 1920, 3600]
    assert retry_delay_s(30, 86400) == 3600
    assert retry_delay_s(5, 300) == 300 and retry_delay_s(1, 2) == 2


def test_request_for_chain():
    req = DomainBackupRequest("vm")
    assert request_for_chain(req, None) is req
    ok = record_backup(DomainState(UUID), "b1", "cp1", 5)
    assert request_for_chain(req, ok) is req
    broken = require_full(ok, "incoming migration without shared storage")
    assert request_for_chain(req, broken).chain_broken == "incoming migration without shared storage"
    assert request_for_chain(DomainBackupRequest("vm", force_full=True), broken).chain_broken is None


def test_seed_chain_keeps_a_decided_status():
    st = seed_chain(DomainState(UUID), "b1", "ekko-b1", 7)
    assert (st.chain.status, st.chain.last_backup_id, st.chain.last_backup_ns) == (ChainStatus.OK, "b1", 7)
    assert seed_chain(st, "b0", None, 1) == st
    full = seed_chain(require_full(DomainState(UUID), "migrated"), "b1", None, 7)
    assert full.chain.status is ChainStatus.FULL_REQUIRED and full.chain.last_backup_id == "b1"


# --- job progress ----------------------------------------------------------------------------------

def test_job_progress_saves_throttled_and_cancels(tmp_path):
    sd = StateDir(str(tmp_path)).ensure()
    job = sd.begin_job(UUID, "online", now_ns=1)
    now = [0.0]
    seen = []
    cancel = threading.Event()
    p = JobProgress(sd, job, lambda d, t: seen.append((d, t)), cancel, every_s=1.0, clock=lambda: now[0])
    p(10, 100)
    p(30, 100)                                     # within a second: passed on, not saved
    assert sd.load_job(job.job_id).bytes_done == 10
    now[0] = 1.5
    p(20, 100)                                     # out of order: progress never goes back
    assert (sd.load_job(job.job_id).bytes_done, sd.load_job(job.job_id).bytes_total) == (30, 100)
    p(100, 100)                                    # the end is always saved
    assert sd.load_job(job.job_id).bytes_done == 100
    assert seen == [(10, 100), (30, 100), (20, 100), (100, 100)]
    cancel.set()
    with pytest.raises(JobCancelled):
        p(100, 100)


# --- status rows -----------------------------------------------------------------------------------

def test_status_row_and_text():
    now = datetime(2024, 6, 10, 12, 0, tzinfo=timezone.utc)
    st = record_backup(DomainState(UUID, name="web-1", running=True), "b1", "ekko-b1",
                       int((now - timedelta(hours=1)).timestamp() * 1e9))
    policy = Policy(interval_s=3600 * 6)
    dec = decide(now, domain_status(UUID, st, True, False), policy)
    assert dec.why is Why.NOT_DUE and dec.next_due == now + timedelta(hours=5)
    running = JobRecord("j2", UUID, "online", JobStatus.RUNNING, 10, 20, 1, bytes_done=25, bytes_total=100)
    failed = JobRecord("j1", UUID, "online", JobStatus.FAILED, 1, 2, 1, error="boom")
    heads = {"vda": {"backup_id": "b1", "kind": "incremental", "created": "x", "reason": "changes",
                     "target": "web-1.vda"}}
    r = row(UUID, "web-1", True, st, [(failed, False), (running, True)], heads, dec)
    assert r["chain"]["status"] == "ok" and r["chain"]["last_backup_id"] == "b1"
    assert r["next"]["why"] == "not-due" and r["next"]["at"] == "2024-06-10T17:00:00+00:00"
    assert r["job"]["percent"] == 25.0 and r["job"]["status"] == "running"
    assert r["last_job"]["status"] == "failed" and r["last_job"]["error"] == "boom"
    stale = row(UUID, None, None, st, [(running, False)], {}, None)
    assert stale["job"]["status"] == "stale" and stale["name"] == "web-1" and stale["active"] is True
    text = describe(r)
    assert "web-1" in text and "25.0%" in text and "not-due" in text and "boom" in text
    assert describe(row(UUID, "x", False, None, [], {}, None)).startswith("x  " + UUID + "  shut off")


def test_newest_head():
    assert newest_head({}) is None
    heads = {"vda": {"backup_id": "20240102", "generation": {"bitmap": "ekko-20240102"}, "timings": {"started": 2.5}},
             "vdb": {"backup_id": "20240101", "generation": None, "timings": {"started": 1.0}}}
    assert newest_head(heads) == ("20240102", "ekko-20240102", 2500000000)


# --- restore --define: which manifests, and the new domain's XML ---------------------------------

def test_select_manifests_of_one_backup():
    found = [(None, "manifests/vm.vda/B1"), (None, "manifests/vm.vdb/B1")]
    assert disk_of("manifests/my.vm.vdb/B1") == "vdb"
    assert select(found, (), "B1") == found
    assert select(found, ["vdb"], "B1") == [found[1]]
    with pytest.raises(UsageError, match="no disk 'vdc'"):
        select(found, ["vdc"], "B1")
    with pytest.raises(UsageError, match="ambiguous"):
        select(found + [(None, "manifests/vm.vda/B2")], (), "B")
    with pytest.raises(UsageError, match="no backup"):
        select([], (), "B9")


NOVA_DOMAIN = f"""<domain type='kvm'>
  <name>instance-0000000a</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <nova:instance xmlns:nova="{NOVA}"><nova:name>web-01</nova:name></nova:instance>
    <other:x xmlns:other="http://example.org/other"/>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <sysinfo type='smbios'><system><entry name='uuid'>{UUID}</entry><entry name='serial'>{UUID.upper()}</entry>
    <entry name='manufacturer'>OpenStack</entry></system></sysinfo>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <auth username='nova'><secret type='ceph' uuid='11111111-2222-3333-4444-555555555555'/></auth>
      <source protocol='rbd' name='vms/{UUID}_disk'/>
      <target dev='vda' bus='virtio'/>
      <serial>vol-1</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nova/instances/{UUID}/disk.eph0'/>
      <backingStore type='file'><format type='raw'/><source file='/base'/></backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/nova/instances/{UUID}/disk.swap'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/cfg.iso'/><target dev='hda' bus='ide'/><readonly/></disk>
    <interface type='bridge'><mac address='fa:16:3e:00:00:01'/><source bridge='br-int'/>
      <virtualport type='openvswitch'><parameters interfaceid='port-1'/></virtualport>
      <target dev='tap-port-1'/><model type='virtio'/></interface>
    <serial type='file'><source path='/var/lib/nova/instances/{UUID}/console.log'/><target port='0'/></serial>
    <graphics type='vnc' port='-1' autoport='yes' passwd='hunter2'/>
  </devices>
</domain>"""


def test_storable_xml_strips_secret_values_only():
    out = dx.storable_xml(NOVA_DOMAIN)
    assert "hunter2" not in out and "passwd" not in out
    assert "11111111-2222-3333-4444-555555555555" in out       # a secret's reference stays
    assert dx.parse_nova(out)["instance_name"] == "web-01"      # Nova metadata kept with the backup


def test_restored_domain_xml():
    new_uuid = "0b6f2a4e-0000-4000-8000-000000000001"
    xml, notes = dx.restored_domain_xml(dx.storable_xml(NOVA_DOMAIN), "restored-web", new_uuid,
                                        {"vda": ("/r/vda.raw", "raw"), "vdb": ("/r/vdb.qcow2", "qcow2")})
    root = ET.fromstring(xml)
    assert root.findtext("name") == "restored-web" and root.findtext("uuid") == new_uuid
    assert [e.text for e in root.iter("entry")] == [new_uuid, new_uuid, "OpenStack"]
    assert root.find(f"metadata/{{{NOVA}}}instance") is None
    assert root.find("metadata/{http://example.org/other}x") is not None
    disks = {d.find("target").get("dev"): d for d in root.findall("devices/disk")}
    assert sorted(disks) == ["hda", "vda", "vdb"]                 # the swap disk (not restored) is gone
    vda, vdb = disks["vda"], disks["vdb"]
    assert (vda.get("type"), vda.find("source").attrib, vda.find("driver").get("type")) == \
        ("file", {"file": "/r/vda.raw"}, "raw")
    assert vda.find("driver").get("cache") == "none" and vda.findtext("serial") == "vol-1"
    assert vda.find("auth") is None
    assert vdb.find("source").attrib == {"file": "/r/vdb.qcow2"} and vdb.find("backingStore") is None
    assert disks["hda"].find("source").get("file") == "/cfg.iso"
    iface = root.find("devices/interface")
    assert iface.find("mac") is None and iface.find("target") is None
    assert "interfaceid" not in iface.find("virtualport/parameters").attrib
    serial = root.find("devices/serial")
    assert serial.get("type") == "pty" and serial.find("source") is None
    assert any("vdc" in n for n in notes) and any("Nova" in n for n in notes)
    with pytest.raises(ValueError, match="no disk vdz"):
        dx.restored_domain_xml(NOVA_DOMAIN, "x", new_uuid, {"vdz": ("/r/vdz.raw", "raw")})


# --- the daemon's event handling and back-off, without libvirt -----------------------------------

def _agent(tmp_path, **agent):
    from ekko_libvirt.agent.daemon import Agent
    cfg = config.build({"state_dir": str(tmp_path / "state"), "agent": dict({"spool_dir": str(tmp_path / "spool")},
                                                                           **agent)})
    a = Agent(cfg, AgentSettings.from_config(cfg), "test:///default")
    a.sd.ensure()
    return a


def _event(op, subop="begin", wall_ns=100):
    from ekko_libvirt.agent.events import parse_event
    return parse_event({"v": 1, "wall_ns": wall_ns, "mono_ns": 1, "pid": 1, "domain": "vm1", "op": op,
                        "subop": subop, "uuid": UUID, "xml": "ok"})


def test_daemon_handles_hook_events(tmp_path):
    from ekko_libvirt.agent.job_runner import Worker
    a = _agent(tmp_path)
    a.handle_event(_event("started"))
    assert a.sd.load_domain(UUID).running and not a.jobs.to_settle
    a.handle_event(_event("reconnect"))
    assert a.jobs.to_settle == {UUID}                              # RECONCILE: settled through libvirt later
    w = a.jobs.workers[UUID] = Worker(UUID, "vm1", 3600, started_ns=200)
    a.sd.begin_job(UUID, "online")
    a.handle_event(_event("stopped", "end", wall_ns=150))          # written before the job started: stale
    assert not w.cancel.is_set()
    a.handle_event(_event("release", "end", wall_ns=300))          # the domain stopped under the job
    assert w.cancel.is_set()
    st = a.sd.load_domain(UUID)
    assert (st.running, st.clean_shutdown) == (False, True)


def test_daemon_migration_needs_a_full_unless_shared_storage(tmp_path):
    a = _agent(tmp_path / "a")
    a.sd.update_domain(UUID, lambda s: record_backup(s, "b1", "cp1", 5))
    a.handle_event(_event("migrate"))
    assert a.sd.load_domain(UUID).chain.status is ChainStatus.FULL_REQUIRED
    b = _agent(tmp_path / "b", shared_storage=True)
    b.sd.update_domain(UUID, lambda s: record_backup(s, "b1", "cp1", 5))
    b.handle_event(_event("migrate"))
    assert b.sd.load_domain(UUID).chain.status is ChainStatus.CHECK_REQUIRED


def test_daemon_backs_off_failed_domains(tmp_path):
    from ekko_libvirt.agent.job_runner import BUSY_RETRY_S, Worker
    a = _agent(tmp_path).jobs
    for n, outcome in enumerate(("failed", "failed", "busy", "ok"), 1):
        a.workers[UUID] = Worker(UUID, "vm1", 86400, outcome=outcome)
        before = time.monotonic()
        a.reap()
        after = time.monotonic()       # retry_at = (a monotonic time between the two) + the delay
        assert UUID not in a.workers
        if outcome == "failed":
            delay = 60 * 2 ** (n - 1)
            assert a.failures[UUID] == n and before + delay <= a.retry_at[UUID] <= after + delay
        elif outcome == "busy":
            assert a.failures[UUID] == 2 and before + BUSY_RETRY_S <= a.retry_at[UUID] <= after + BUSY_RETRY_S
        else:
            assert UUID not in a.failures and UUID not in a.retry_at

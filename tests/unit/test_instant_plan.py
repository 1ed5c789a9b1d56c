"""restore/instant_plan.py: the new domain's XML, the record, the supervisor's decisions."""

import itertools
import xml.etree.ElementTree as ET

import pytest

from ekko_libvirt.restore.instant_plan import (RESUME_GAP_S, Action, DiskState, InstantDisk, InstantJob, World,
                                               check_name, decide, describe, instant_domain_xml, nbd_backed)

XML = """<domain type='kvm'><name>new</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='/r/vda.qcow2'/>
<target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/r/vdb.qcow2'/>
<target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/></disk>
</devices></domain>"""
SOCKETS = {"vda": "/r/vda.nbd.sock", "vdb": "/r/vdb.nbd.sock"}


def test_xml_backs_each_disk_by_its_socket_and_stops_on_errors():
    root = ET.fromstring(instant_domain_xml(XML, SOCKETS))
    disks = {d.find("target").get("dev"): d for d in root.findall("devices/disk")}
    for dev, sock in SOCKETS.items():
        d = disks[dev]
        drv = d.find("driver")
        assert (drv.get("type"), drv.get("error_policy"), drv.get("rerror_policy")) == ("qcow2", "stop", "stop")
        assert drv.get("cache") == ("none" if dev == "vda" else None)         # the rest of the driver kept
        bs = d.find("backingStore")
        assert bs.get("type") == "network" and bs.find("format").get("type") == "raw"
        assert bs.find("source").get("protocol") == "nbd"
        assert bs.find("source/host").attrib == {"transport": "unix", "socket": sock}
        assert bs.find("backingStore") is not None and len(bs.find("backingStore")) == 0    # end of chain
        assert [c.tag for c in d][:3] == ["driver", "source", "backingStore"]
    assert disks["sda"].find("backingStore") is None and disks["sda"].find("driver").get("error_policy") is None
    assert nbd_backed(instant_domain_xml(XML, SOCKETS), SOCKETS) == {"vda", "vdb"}


def test_xml_refuses_a_missing_disk_or_a_raw_overlay():
    with pytest.raises(ValueError, match="has no disk vdc"):
        instant_domain_xml(XML, dict(SOCKETS, vdc="/r/vdc.sock"))
    with pytest.raises(ValueError, match="disk sda: an instant restore's overlay must be qcow2"):
        instant_domain_xml(XML, {"sda": "/r/s"})


def test_nbd_backed_only_counts_our_socket():
    xml = instant_domain_xml(XML, SOCKETS)
    assert nbd_backed(xml, {"vda": "/r/vda.nbd.sock", "vdb": "/other.sock"}) == {"vda"}
    assert nbd_backed(XML, SOCKETS) == set()          # pulled: libvirt dropped the backingStore


def test_record_round_trips_and_progress_counts_done_disks_whole():
    job = InstantJob("new", "u", "b1", "/r", "/etc/ekko.yaml", 0, 1.0,
                     [InstantDisk("vda", None, "manifests/x.vda/b1", "/r/vda.qcow2", "/r/vda.nbd.sock", "/l", 100,
                                  cur=40, end=100),
                      InstantDisk("vdb", "p1", "manifests/x.vdb/b1", "/r/vdb.qcow2", "/r/vdb.nbd.sock", "/l", 50,
                                  cur=7, end=50, done=True)])
    assert InstantJob.from_dict(job.to_dict()) == job
    assert job.progress() == (90, 150)
    job.disks[0].cur = 10**9                           # a job's counter never counts past the disk
    assert job.progress() == (150, 150)
    assert "instant restore new from b1: starting; 100.0% pulled; supervisor NOT running; servers 1/2 up" \
        == describe(job, False, [True, False])


def world(disks, exists=True, active=True, paused=False, now=100.0, last_resume=None):
    return World(exists, active, paused, tuple(disks), now, last_resume)


def reference(w: World):
    """What must happen, written as rules over the whole world (not in decide's order)."""
    kinds = set()
    if not w.domain_exists:
        kinds.add(("abandon", None))
    elif not any(d.backed for d in w.disks):
        kinds.add(("complete", None))
    for d in w.disks:
        if d.server_alive and (not w.domain_exists or not d.backed):
            kinds.add(("stop_server", d.dev))
        if w.domain_exists and d.backed and not d.server_alive:
            kinds.add(("restart_server", d.dev))
        if w.domain_exists and w.active and d.backed and d.job is None:
            kinds.add(("start_pull", d.dev))
    if (w.domain_exists and w.active and w.paused_on_io_error and any(d.backed for d in w.disks)
            and (w.last_resume is None or w.now - w.last_resume >= RESUME_GAP_S)):
        kinds.add(("resume", None))
    return kinds


def test_decide_against_the_rules_for_every_small_world():
    n = 0
    for exists, active, paused, resumed in itertools.product((True, False), repeat=4):
        states = [(b, s, j) for b in (True, False) for s in (True, False) for j in (None, (5, 10))]
        for a, b in itertools.product(states, repeat=2):
            disks = [DiskState("vda", *a), DiskState("vdb", *b)]
            w = world(disks, exists, active, paused, last_resume=100.0 - RESUME_GAP_S / 2 if resumed else None)
            got = decide(w)
            assert {(x.kind, x.dev) for x in got} == reference(w), w
            assert len(got) == len(set(got)), w
            kinds = [x.kind for x in got]
            if "resume" in kinds:          # the servers first: the guest's retried read must find them
                assert all(i < kinds.index("resume") for i, k in enumerate(kinds) if k == "restart_server")
            assert kinds.count("complete") + kinds.count("abandon") <= 1 and (
                not {"complete", "abandon"} & set(kinds) or kinds[-1] in ("complete", "abandon"))
            n += 1
    assert n == 16 * 64


def test_decide_named_cases():
    dead = DiskState("vda", True, False, None)
    assert decide(world([dead], paused=True)) == [Action("restart_server", "vda"), Action("resume"),
                                                  Action("start_pull", "vda")]
    assert decide(world([dead], paused=True, last_resume=100.0 - RESUME_GAP_S + 0.1)) == [
        Action("restart_server", "vda"), Action("start_pull", "vda")]           # no resume storm
    assert decide(world([DiskState("vda", True, True, (1, 2))])) == []          # streaming: nothing to do
    assert decide(world([DiskState("vda", False, True, None)])) == [Action("stop_server", "vda"),
                                                                    Action("complete")]
    assert decide(world([DiskState("vda", True, False, None)], active=False)) == [Action("restart_server", "vda")]
    assert decide(world([DiskState("vda", True, True, None)], exists=False)) == [Action("stop_server", "vda"),
                                                                                Action("abandon")]


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden", "a\nb", "x\x00", "é" * 101])
def test_names_that_would_name_other_files_are_refused(name):
    with pytest.raises(ValueError, match="one printable path component"):
        check_name(name)


@pytest.mark.parametrize("name", ["vm1-copy", "a.b", "instance-0000002a", "é" * 100])
def test_ordinary_names_pass(name):
    check_name(name)

"""The libvirt engine against a real libvirtd: running domains with a qcow2 and a raw disk,
chains across kill -9, a killed agent, Nova's undefine/define, and offline backups."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Ekko, read_raw, release_pauses, small_fs
from harness.libvirtd import disk_alias, domain_log, domain_xml, make_workdir, monitor, qemu_pid
from libvirt_fixtures import ekko_hook, images, libvirt_conn, libvirtd, test_domains  # noqa: F401

KiB, MiB = 1024, 1024 * 1024
NOVA = """<metadata><nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
<nova:name>web-1</nova:name><nova:owner><nova:user uuid="u-1234">alice</nova:user>
<nova:project uuid="p-5678">demo</nova:project></nova:owner></nova:instance></metadata>"""


class Guest:
    """A running test domain plus the model of what its disks should contain."""

    def __init__(self, dom, disks, workdir):
        self.dom = dom
        self.workdir = workdir
        self.model = {dev: bytearray(os.path.getsize(path) if fmt == "raw" else size)
                      for path, fmt, dev, size in disks}
        self.paths = {dev: path for path, _, dev, _ in disks}

    def write(self, dev, offset, data):
        """Random data through the virtio device (HMP qemu-io -d ...), result read from the log."""
        pat = os.path.join(self.workdir, f"pat-{offset}-{len(data)}")
        with open(pat, "wb") as f:
            f.write(data)
        os.chmod(pat, 0o644)
        log = domain_log(self.dom.name())
        start = os.path.getsize(log)
        dev_path = f"/machine/peripheral/{disk_alias(self.dom, dev)}/virtio-backend"
        out = monitor(self.dom, f'qemu-io -d {dev_path} "write -s {pat} {offset} {len(data)}"')
        assert not out.strip(), out
        ok = f"wrote {len(data)}/{len(data)} bytes at offset {offset}".encode()
        deadline = time.monotonic() + 20
        while True:
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read()
            if ok in text:
                break
            assert b"failed" not in text, text
            assert time.monotonic() < deadline, "qemu-io gave no result"
            time.sleep(0.01)
        os.unlink(pat)
        self.model[dev][offset:offset + len(data)] = data

    def dom_disk(self, dev):
        return self.paths[dev]

    def flush(self, dev):
        monitor(self.dom, f'qemu-io -d /machine/peripheral/{disk_alias(self.dom, dev)}/virtio-backend "flush"')

    def snapshot(self):
        return {dev: bytes(m) for dev, m in self.model.items()}


@pytest.fixture
def lvwork():
    d = make_workdir("ekko-lvt-")
    yield d
    subprocess.run(["rm", "-rf", d])


def make_ekko(work, state_dir=None):
    cfg = {"store": {"type": "local", "path": os.path.join(work, "store")},
           "state_dir": state_dir or os.path.join(work, "state"), "run_dir": os.path.join(work, "run"),
           "segment_size": "256KiB", "workers": 2}
    return Ekko(work, cfg)


def start_guest(test_domains, images, lvwork, name, nova=False):
    qcow = images(f"{name}-a", "qcow2", 16 * MiB)
    raw = images(f"{name}-b", "raw", 8 * MiB)
    xml = domain_xml(name, [(qcow, "qcow2", "vda"), (raw, "raw", "vdb")], test_domains.dom_type)
    if nova:
        xml = xml.replace("</name>", "</name>\n" + NOVA, 1)
    dom = test_domains.conn.defineXML(xml)
    test_domains.names.append(name)
    dom.create()
    return Guest(dom, [(qcow, "qcow2", "vda", 16 * MiB), (raw, "raw", "vdb", 8 * MiB)], lvwork), xml


def backups_by_disk(ekko, name, *extra, **kw):
    p = ekko.run("backup", name, *extra, json_out=True, **kw)
    if p.returncode != 0:
        return p
    return {b["target"].rsplit(".", 1)[1]: b for b in p.data["backups"]}


def test_running_domain_full_and_incrementals_qcow2_and_raw(libvirt_conn, test_domains, images, lvwork):
    rnd = random.Random(11)
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-bk1", nova=True)
    ekko = make_ekko(lvwork)
    g.write("vda", 0, rnd.randbytes(600 * KiB))
    g.write("vdb", 1 * MiB, rnd.randbytes(300 * KiB))
    history = []
    for step in range(3):
        exp = g.snapshot()
        b = backups_by_disk(ekko, "ekko-test-bk1")
        history.append((b, exp))
        assert g.dom.listAllCheckpoints() == []          # Nova: no checkpoint metadata between backups
        g.write("vda", rnd.randrange(0, 15) * MiB + rnd.randrange(0, 4096), rnd.randbytes(100 * KiB))
        g.write("vdb", rnd.randrange(0, 7) * MiB, rnd.randbytes(64 * KiB))
    assert [h[0]["vda"]["kind"] for h in history] == ["full", "incremental", "incremental"]
    assert all(h[0]["vdb"]["kind"] == "full" for h in history)
    assert history[1][0]["vda"]["read_bytes"] <= 1 * MiB
    # Nova metadata is stored with each backup, and the project gets its own namespace
    show = ekko.run("show", history[0][0]["vda"]["backup_id"], "--disk", "vda", json_out=True).data["backup"]
    assert show["labels"]["project_id"] == "p-5678" and show["labels"]["instance_name"] == "web-1"
    assert os.path.isdir(os.path.join(ekko.store_dir, "projects", "p-5678", "manifests"))
    for b, exp in history:
        for dev in ("vda", "vdb"):
            out = os.path.join(lvwork, f"r-{dev}.{'qcow2' if dev == 'vda' else 'raw'}")
            ekko.run("restore", b[dev]["backup_id"], "--disk", dev, "--to", out, "--force")
            assert read_raw(out) == exp[dev], (dev, b[dev]["backup_id"])


def test_qemu_kill9_next_backup_is_full(libvirt_conn, test_domains, images, lvwork):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-bk2")
    ekko = make_ekko(lvwork)
    g.write("vda", 0, os.urandom(200 * KiB))
    b1 = backups_by_disk(ekko, "ekko-test-bk2")
    # no guest OS to shut down: destroy sends QEMU SIGTERM, which stores the bitmaps cleanly
    g.dom.destroy()
    g.dom.create()
    g.write("vda", 2 * MiB, os.urandom(100 * KiB))
    b2 = backups_by_disk(ekko, "ekko-test-bk2")
    assert b2["vda"]["kind"] == "incremental" and b2["vda"]["parent"] == b1["vda"]["backup_id"]
    g.dom.destroy()
    g.dom.create()
    g.write("vda", 5 * MiB, os.urandom(100 * KiB))
    g.flush("vda")
    os.kill(qemu_pid(g.dom), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while g.dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    g.dom.create()
    exp = g.snapshot()
    b3 = backups_by_disk(ekko, "ekko-test-bk2")
    assert b3["vda"]["kind"] == "full", b3["vda"]
    # libvirt's REDEFINE_VALIDATE refuses the checkpoint: QEMU loads a bitmap it did not store
    # cleanly as inconsistent (backupBegin's own VIR_ERR_CHECKPOINT_INCONSISTENT is not reached)
    reason = b3["vda"]["reason"]
    assert reason.startswith("chain broken: checkpoint ekko-") and reason.endswith(
        "cannot be trusted: checkpoint inconsistent: missing or broken bitmap "
        f"'{reason.split()[3]}' for disk 'vda'"), reason
    out = os.path.join(lvwork, "r.raw")
    ekko.run("restore", b3["vda"]["backup_id"], "--disk", "vda", "--to", out)
    assert read_raw(out) == exp["vda"]
    g.write("vda", 9 * MiB, os.urandom(64 * KiB))
    b4 = backups_by_disk(ekko, "ekko-test-bk2")
    assert b4["vda"]["kind"] == "incremental" and b4["vda"]["parent"] == b3["vda"]["backup_id"]
    # the dead generation was removed from the image: only the chain's current one is left
    g.dom.destroy()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", g.dom_disk("vda")],
                                     capture_output=True, text=True, check=True).stdout)
    names = [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]
    assert names == [b4["vda"]["generation"]["bitmap"]], names


@pytest.mark.parametrize("point", ["after-transaction", "during-read", "before-commit"])
def test_agent_killed_during_backup(point, libvirt_conn, test_domains, images, lvwork):
    g, _ = start_guest(test_domains, images, lvwork, f"ekko-test-k{point[:6]}")
    ekko = make_ekko(lvwork)
    g.write("vda", 0, os.urandom(300 * KiB))
    b1 = backups_by_disk(ekko, g.dom.name())
    g.write("vda", 3 * MiB, os.urandom(200 * KiB))
    p = ekko.run("backup", g.dom.name(), env={"EKKO_TEST_CRASH": point}, check=False)
    assert p.returncode == -9
    # its reaper ends libvirt's pull job (and with it copy-before-write) at once...
    import libvirt
    from ekko_libvirt.engine.libvirt import CheckpointState
    reaper = CheckpointState(ekko.cfg["state_dir"]).job(g.dom.UUIDString()).reaper_pid
    assert reaper
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{reaper}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{reaper}"), "the reaper did not finish"
    with pytest.raises(libvirt.libvirtError):
        g.dom.backupGetXMLDesc(0)
    if point != "before-commit":
        # ...and leaves the new checkpoint to the next run, which knows what to keep
        assert [c.getName() for c in g.dom.listAllCheckpoints()]
    g.write("vda", 6 * MiB, os.urandom(100 * KiB))
    exp = g.snapshot()
    b2 = backups_by_disk(ekko, g.dom.name())
    assert b2["vda"]["kind"] == "incremental" and b2["vda"]["parent"] == b1["vda"]["backup_id"]
    assert g.dom.listAllCheckpoints() == []
    for dev in ("vda", "vdb"):
        out = os.path.join(lvwork, f"r-{dev}.raw")
        ekko.run("restore", b2[dev]["backup_id"], "--disk", dev, "--to", out)
        assert read_raw(out) == exp[dev], dev


def test_undefine_and_redefine_like_nova_hard_reboot(libvirt_conn, test_domains, images, lvwork):
    g, xml = start_guest(test_domains, images, lvwork, "ekko-test-bk3", nova=True)
    ekko = make_ekko(lvwork)
    g.write("vda", 0, os.urandom(128 * KiB))
    b1 = backups_by_disk(ekko, "ekko-test-bk3")
    uuid = g.dom.UUIDString()
    g.dom.destroy()
    g.dom.undefine()          # Nova passes no checkpoint flag: works because no metadata is left
    dom = libvirt_conn.defineXML(xml.replace("<name>", f"<uuid>{uuid}</uuid><name>", 1))
    dom.create()
    g.dom = dom
    g.write("vda", 4 * MiB, os.urandom(128 * KiB))
    exp = g.snapshot()
    b2 = backups_by_disk(ekko, uuid)              # by UUID, like virsh
    assert b2["vda"]["kind"] == "incremental" and b2["vda"]["parent"] == b1["vda"]["backup_id"]
    out = os.path.join(lvwork, "r.qcow2")
    ekko.run("restore", b2["vda"]["backup_id"], "--disk", "vda", "--to", out)
    assert read_raw(out) == exp["vda"]


def test_offline_backup_and_start_is_refused_meanwhile(libvirt_conn, test_domains, images, lvwork, ekko_hook):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-bk4")
    ekko = make_ekko(lvwork, state_dir=ekko_hook.state_dir)
    g.write("vda", 0, os.urandom(256 * KiB))
    b1 = backups_by_disk(ekko, "ekko-test-bk4")
    g.write("vda", 1 * MiB, os.urandom(256 * KiB))
    g.write("vdb", 2 * MiB, os.urandom(64 * KiB))
    g.dom.destroy()
    exp = g.snapshot()
    fifo = os.path.join(lvwork, "pause.fifo")
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"after-transaction:{fifo}")
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "backup", "ekko-test-bk4",
                             "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import libvirt
    with open(fifo, "wb"):                     # blocks until the backup reaches the pause point
        with pytest.raises(libvirt.libvirtError) as e:
            g.dom.create()
        assert "offline backup" in str(e.value) and "ekko" in str(e.value)
    release_pauses(fifo, proc)                 # one pause per disk: let the others pass
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    import json
    res = {b["target"].rsplit(".", 1)[1]: b for b in json.loads(out)["backups"]}
    assert res["vda"]["kind"] == "incremental" and res["vda"]["parent"] == b1["vda"]["backup_id"]
    # one backup of the domain: one id for both disks, as online (restore --define finds them all)
    assert res["vda"]["backup_id"] == res["vdb"]["backup_id"]
    for dev in ("vda", "vdb"):
        o = os.path.join(lvwork, f"r-{dev}.raw")
        ekko.run("restore", res[dev]["backup_id"], "--disk", dev, "--to", o)
        assert read_raw(o) == exp[dev], dev
    g.dom.create()                             # allowed again once the backup ended
    g.write("vda", 3 * MiB, os.urandom(64 * KiB))
    b3 = backups_by_disk(ekko, "ekko-test-bk4")
    assert b3["vda"]["kind"] == "incremental" and b3["vda"]["parent"] == res["vda"]["backup_id"]


def _storage_daemons_of(pid):
    """PIDs of the qemu-storage-daemon processes whose parent is `pid`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                comm, rest = f.read().rsplit(b")", 1)
        except OSError:
            continue
        if b"(qemu-storage-d" in comm and int(rest.split()[1]) == pid:
            out.append(int(name))
    return out


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def test_killed_offline_backup_does_not_keep_the_images(libvirt_conn, test_domains, images, lvwork, ekko_hook):
    """SIGKILL (the OOM killer) in the middle of an offline backup: the qemu-storage-daemon that
    holds the shut-off domain's images, write locks included, is stopped by the backup's reaper,
    so the domain starts again, and the next backup carries the chain on and restores exactly.
    (Before: the daemon ran on in its own session and the domain could not start.)"""
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-bk10")
    ekko = make_ekko(lvwork, state_dir=ekko_hook.state_dir)
    g.write("vda", 0, os.urandom(256 * KiB))
    b1 = backups_by_disk(ekko, "ekko-test-bk10")
    g.write("vda", 1 * MiB, os.urandom(256 * KiB))
    g.dom.destroy()
    fifo = os.path.join(lvwork, "read.fifo")
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"during-read:{fifo}")
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "backup", "ekko-test-bk10"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with open(fifo, "wb"):              # a worker waits in the middle of the read
            daemons = _storage_daemons_of(proc.pid)
            assert len(daemons) == 1, daemons
            proc.kill()
            proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    deadline = time.monotonic() + 30
    while not _gone(daemons[0]):
        assert time.monotonic() < deadline, "qemu-storage-daemon still holds the images 30 s after the kill"
        time.sleep(0.05)
    g.dom.create()                          # the images are free again (and the hook's marker is stale)
    g.write("vda", 2 * MiB, os.urandom(128 * KiB))
    g.write("vdb", 0, os.urandom(64 * KiB))
    exp = g.snapshot()
    b2 = backups_by_disk(ekko, "ekko-test-bk10")
    # The killed run had disabled the checkpoint's bitmap in its transaction, and which generation
    # to keep is decided with the store, by the next run: libvirt calls the checkpoint
    # inconsistent, so the next backup is a full, as it should be (nothing trusted blindly).
    assert b2["vda"]["kind"] == "full" and "inconsistent" in b2["vda"]["reason"], b2["vda"].get("reason")
    assert b1["vda"]["kind"] == "full"
    for dev in ("vda", "vdb"):
        o = os.path.join(lvwork, f"r-{dev}.raw")
        ekko.run("restore", b2[dev]["backup_id"], "--disk", dev, "--to", o)
        assert read_raw(o) == exp[dev], dev
    assert not os.listdir(os.path.join(ekko_hook.state_dir, "scratch"))     # no fleece file left


def test_domain_backup_gives_way_before_libvirts_scratch_fills(libvirt_conn, test_domains, images, lvwork):
    """libvirt's pull backup has the same copy-before-write filter: with its scratch files on a
    10 MiB tmpfs and 15 MiB of old data overwritten, the job is ended before a guest write can
    fail (without the guard, the write at ~10 MiB fails)."""
    rnd = random.Random(13)
    proc = None
    # mounted before the domain starts: libvirt gives QEMU its own mount namespace, a copy of ours
    with small_fs(lvwork, "scratchfs", 10, mode="0755") as mnt:
        try:
            g, _ = start_guest(test_domains, images, lvwork, "ekko-test-bk9")
            ekko = make_ekko(lvwork, state_dir=os.path.join(mnt, "state"))
            ekko.cfg["scratch_reserve"] = "6MiB"
            ekko.write_config()
            g.write("vda", 0, rnd.randbytes(15 * MiB))
            b1 = backups_by_disk(ekko, "ekko-test-bk9")
            fifo = os.path.join(lvwork, "read.fifo")
            os.mkfifo(fifo)
            env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"during-read:{fifo}")
            proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "backup",
                                     "ekko-test-bk9"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            with open(fifo, "wb"):
                for i in range(30):         # the first 15 MiB of vda, 2.5 MiB/s
                    g.write("vda", i * 512 * KiB, rnd.randbytes(512 * KiB))
                    time.sleep(0.2)
            release_pauses(fifo, proc)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 1 and "scratch space" in err and "gave way" in err, err
            exp = g.snapshot()
            b2 = backups_by_disk(ekko, "ekko-test-bk9")
            assert b2["vda"]["kind"] == "incremental" and b2["vda"]["parent"] == b1["vda"]["backup_id"]
            for dev in ("vda", "vdb"):
                o = os.path.join(lvwork, f"r-{dev}.raw")
                ekko.run("restore", b2[dev]["backup_id"], "--disk", dev, "--to", o)
                assert read_raw(o) == exp[dev], dev
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_backup_refused_after_recover_leaves_no_checkpoint(libvirt_conn, test_domains, images, lvwork):
    """recover() redefines the base checkpoint for begin(); when a check between them fails (here
    the scratch reserve: ScratchSpaceLow) begin never comes and the checkpoint must go again:
    left defined, it is the metadata Nova's undefine trips on. The chain is intact: the next
    backup is an incremental with every write since the full."""
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-abandon")
    ekko = make_ekko(lvwork)
    g.write("vda", 0, os.urandom(200 * KiB))
    first = backups_by_disk(ekko, "ekko-test-abandon")
    assert first["vda"]["kind"] == "full" and g.dom.listAllCheckpoints() == []
    g.write("vda", 3 * MiB, os.urandom(100 * KiB))
    ekko.cfg["scratch_reserve"] = "1000TiB"
    ekko.write_config()
    refused = ekko.run("backup", "ekko-test-abandon", check=False)
    assert refused.returncode != 0 and "scratch" in refused.stderr.lower(), refused.stderr
    assert g.dom.listAllCheckpoints() == []
    del ekko.cfg["scratch_reserve"]
    ekko.write_config()
    exp = g.snapshot()
    nxt = backups_by_disk(ekko, "ekko-test-abandon")
    assert nxt["vda"]["kind"] == "incremental" and nxt["vda"]["parent"] == first["vda"]["backup_id"]
    assert g.dom.listAllCheckpoints() == []
    out = os.path.join(lvwork, "r-vda.qcow2")
    ekko.run("restore", nxt["vda"]["backup_id"], "--disk", "vda", "--to", out)
    assert read_raw(out) == exp["vda"]

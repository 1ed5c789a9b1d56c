"""`ekko restore BACKUP --define NEW --instant` against a real libvirtd, real nbdkit and QEMU.

The source domain's disk holds a boot sector (BOOT below) that SeaBIOS runs in the NEW domain: a
loop of BIOS disk reads over the last 4 MiB of the disk, i.e. real guest reads through the
virtio-blk device, which is what error_policy/rerror_policy act on (HMP qemu-io is not: it
bypasses the device). So when the server dies mid-stream, the guest itself reads from the gone
export, and must be paused (reason I/O error), never shown the error.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT, Ekko, read_raw
from harness.libvirtd import domain_xml, make_workdir
from libvirt_fixtures import images, libvirt_conn, libvirtd, test_domains  # noqa: F401
from tests.integration.test_libvirt_backup import NOVA, Guest, make_ekko

KiB, MiB = 1024, 1024 * 1024
SIZE = 128 * MiB
LOOP_FROM = SIZE - 4 * MiB          # the boot loop reads [LOOP_FROM, SIZE) again and again

# 16-bit code at 0x7c00 (GNU as, .code16; linked with -Ttext=0x7c00, objcopy -O binary):
#   cli; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00; sti; mov [0x7c40],dl    ; boot drive
#   again: mov si,0x7c50; mov ah,0x42; mov dl,[0x7c40]; int 0x13                 ; extended read
#          add dword [0x7c58],64; mov eax,[0x7c58]; cmp eax,[0x7c48]; jb again    ; next 32 KiB
#          mov eax,[0x7c44]; mov [0x7c58],eax; jmp again                          ; wrap around
#   0x40 drive, 0x44 first LBA, 0x48 end LBA, 0x50 disk address packet (16 bytes, 64 sectors to
#   0x1000:0000, LBA at 0x58), 0x1fe 55 aa. The read's result is ignored: the test looks at
#   whether QEMU paused the guest, which it does before the guest could see an error.
BOOT_CODE = bytes.fromhex("fa31c08ed88ed0bc007cfb8816407cbe507cb4428a16407ccd13668306587c4066a1587c663b06487c"
                          "72e466a1447c66a3587cebda")


def boot_sector(first: int, end: int) -> bytes:
    b = bytearray(512)
    b[:len(BOOT_CODE)] = BOOT_CODE
    first_lba, end_lba = first // 512, end // 512
    b[0x44:0x48] = first_lba.to_bytes(4, "little")
    b[0x48:0x4c] = end_lba.to_bytes(4, "little")
    b[0x50:0x58] = bytes([0x10, 0, 64, 0, 0, 0, 0, 0x10])
    b[0x58:0x5c] = first_lba.to_bytes(4, "little")
    b[0x1fe:] = b"\x55\xaa"
    return bytes(b)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def alive(pid, ticks):
    from ekko_libvirt import procs
    return procs.process_running(pid, ticks)


def nbdkits_serving(directory):
    """PIDs of nbdkit processes whose command line names a socket in `directory` (read only)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nbdkit") and any(directory.encode() in a for a in argv):
            out.append(int(entry))
    return out


@pytest.fixture
def lvwork():
    d = make_workdir("ekko-inst-")
    yield d
    subprocess.run(["rm", "-rf", d])


@pytest.fixture
def cleanup_instant():
    """Stops, by PID and start time, the servers and supervisors a test's instant restores left."""
    cfgs = []
    yield cfgs.append
    from ekko_libvirt import config
    from ekko_libvirt.restore import instant
    from ekko_libvirt.serve import server
    for path in cfgs:
        cfg = config.load(path)
        for job in instant.jobs(cfg):
            if job.supervisor_pid and job.supervisor_ticks and alive(job.supervisor_pid, job.supervisor_ticks):
                os.kill(job.supervisor_pid, signal.SIGKILL)
            for d in job.disks:
                if d.server_pid:
                    server.stop_pid(d.server_pid, d.server_ticks)


def source_backup(test_domains, images, lvwork, name, rnd, size=SIZE, raw_vdb=False, nova=False):
    """A running domain with one qcow2 disk (and with raw_vdb a raw vdb of 4 MiB + 512 B): the boot
    loop at 0, random data in places (the loop's area too), backed up once; then shut off.
    -> (ekko, backup id, the disk at the backup)."""
    qcow = images(f"{name}-a", "qcow2", size)
    disks = [(qcow, "qcow2", "vda")] + ([(images(f"{name}-b", "raw", 4 * MiB + 512), "raw", "vdb")] if raw_vdb else [])
    xml = domain_xml(name, disks, test_domains.dom_type)
    if nova:                      # a Nova instance's backups go to its project's namespace
        xml = xml.replace("</name>", "</name>\n" + NOVA, 1)
    dom = test_domains.conn.defineXML(xml)
    test_domains.names.append(name)
    dom.create()
    g = Guest(dom, [(p, f, d, size if d == "vda" else 4 * MiB + 512) for p, f, d in disks], lvwork)
    if raw_vdb:
        g.write("vdb", 4096, rnd.randbytes(64 * KiB))
    g.write("vda", 0, boot_sector(size - 4 * MiB, size))
    # One run of data from 1 MiB: a pull limited to 512 KiB/s moves through it at that pace (zero
    # segments are skipped at once, uncounted by the limit), so it is still far from the loop's
    # area when the test kills the server.
    for off, n in ((1 * MiB, 39 * MiB + 4 * KiB), (size // 2, 1 * MiB + 512), (size - 4 * MiB, 4 * MiB)):
        if off + n <= size:
            g.write("vda", off, rnd.randbytes(n))
    ekko = make_ekko(lvwork)
    ekko.cfg.update(agent={"spool_dir": os.path.join(lvwork, "spool"), "poll_interval": 0.2},
                    schedule={"enabled": False})        # an agent here only takes over supervisors
    ekko.write_config()
    bid = ekko.run("backup", name, json_out=True).data["backups"][0]["backup_id"]
    exp = g.snapshot()["vda"]
    dom.destroy()
    return ekko, bid, exp


def job_record(ekko, name):
    with open(os.path.join(ekko.cfg["state_dir"], "instant", f"{name}.json")) as f:
        return json.load(f)


def test_instant_restore_runs_at_once_survives_a_dead_server_and_ends_on_its_own(
        libvirtd, libvirt_conn, test_domains, images, lvwork, cleanup_instant):
    seed = int(os.environ.get("EKKO_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (EKKO_TEST_SEED to replay)")
    rnd = random.Random(seed)
    ekko, bid, exp = source_backup(test_domains, images, lvwork, "ekko-test-inst-src", rnd)
    cleanup_instant(ekko.path)
    new = "ekko-test-inst-new"
    test_domains.names.append(new)
    target = os.path.join(lvwork, "new")

    t0 = time.monotonic()
    res = ekko.run("restore", bid, "--define", new, "--instant", "--to", target, "--bandwidth", "512KiB",
                   json_out=True).data
    took = time.monotonic() - t0
    dom = libvirt_conn.lookupByName(new)
    info = dom.blockJobInfo("vda", 0)
    import libvirt
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert info and info["end"] == SIZE and info["cur"] < 0.05 * SIZE, info
    print(f"restore --instant returned after {took:.2f} s, domain running, {info['cur']} of {SIZE} bytes pulled")
    assert res["ok"] and res["phase"] == "streaming" and res["backup_id"] == bid and res["supervisor_alive"]
    disk = res["disks"][0]
    overlay, sock = disk["overlay"], disk["socket"]
    assert overlay == os.path.join(target, "vda.qcow2") and sock == os.path.join(target, "vda.nbd.sock")
    head = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay], check=True,
                                     capture_output=True, text=True).stdout)
    assert head["backing-filename"] == f"nbd+unix:///?socket={sock}"
    assert head["backing-filename-format"] == "raw"
    drv = ET.fromstring(dom.XMLDesc(0)).find("devices/disk/driver")
    assert (drv.get("error_policy"), drv.get("rerror_policy")) == ("stop", "stop")

    # guest writes during the stream: ahead of it (data and zero areas, the loop's area) and behind
    g = Guest(dom, [(overlay, "qcow2", "vda", SIZE)], lvwork)
    g.model["vda"] = bytearray(exp)
    for off, n in ((0x3000, 4 * KiB), (20 * MiB + 512, 128 * KiB), (90 * MiB, 64 * KiB), (LOOP_FROM + 4096, 64 * KiB)):
        g.write("vda", off, rnd.randbytes(n))

    # the server dies while the supervisor is held (SIGSTOP): the guest's next read of the export
    # pauses it; the supervisor, let go, starts the server again and resumes the guest
    rec = job_record(ekko, new)
    sup_pid, sup_ticks = rec["supervisor_pid"], rec["supervisor_ticks"]
    srv_pid, srv_ticks = rec["disks"][0]["server_pid"], rec["disks"][0]["server_ticks"]
    os.kill(sup_pid, signal.SIGSTOP)
    try:
        os.kill(srv_pid, signal.SIGKILL)
        wait_for(lambda: dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR], 30,
                 "pause on the I/O error")
        assert dom.diskErrors() == {"vda": libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC}
    finally:
        os.kill(sup_pid, signal.SIGCONT)
    rec = wait_for(lambda: (r := job_record(ekko, new))["guest_resumes"] >= 1 and r, 30, "resume recorded")
    assert rec["server_restarts"] == 1 and rec["phase"] == "streaming"
    srv_pid, srv_ticks = rec["disks"][0]["server_pid"], rec["disks"][0]["server_ticks"]
    assert alive(srv_pid, srv_ticks)
    # QEMU's NBD client reconnects when asked again: the first retried read may fail and pause the
    # guest once more (the supervisor resumes it again). Once the new pull moves, the connection
    # is back: from then on the guest runs.
    first = wait_for(lambda: dom.blockJobInfo("vda", 0), 30, "the pull started again")
    wait_for(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
             and dom.blockJobInfo("vda", 0).get("cur", 0) > first["cur"], 30, "the pull moving, the guest running")
    g.write("vda", 40 * MiB, rnd.randbytes(192 * KiB))         # the guest writes again after the resume

    # the supervisor killed outright: guest and server go on; the agent, at its start, gives the
    # job a new supervisor, which takes over the same server (found by PID + start time)
    os.kill(sup_pid, signal.SIGKILL)
    wait_for(lambda: not alive(sup_pid, sup_ticks), 10, "supervisor gone")
    assert alive(srv_pid, srv_ticks) and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    st = ekko.run("status", new, json_out=True).data["instant_restores"][0]
    assert st["phase"] == "streaming" and not st["supervisor_alive"] and st["servers_alive"] == [True]
    agent_log = os.path.join(lvwork, "agent.log")
    with open(agent_log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "agent"],
                                 env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=out)
    try:
        rec = wait_for(lambda: (r := job_record(ekko, new))["supervisor_pid"] != sup_pid and r, 60,
                       "a new supervisor from the agent")
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0, open(agent_log).read()
    assert "its supervisor was gone, a new one took over" in open(agent_log).read()
    assert alive(rec["supervisor_pid"], rec["supervisor_ticks"])      # outlives the agent

    # libvirtd restarted mid-pull: QEMU and its block job go on, the supervisor connects again
    libvirtd.restart()
    conn = libvirtd.connect()
    dom = conn.lookupByName(new)
    g.dom = dom
    wait_for(lambda: dom.blockJobInfo("vda", 0), 20, "the block job, seen by the new libvirtd")
    dom.blockJobSetSpeed("vda", 0, 0)                          # the rest at full speed

    rec = wait_for(lambda: (r := job_record(ekko, new))["phase"] != "streaming" and r, 60, "end of the stream")
    assert rec["phase"] == "complete", rec
    assert rec["server_restarts"] == 1 and rec["disks"][0]["server_pid"] == srv_pid    # the takeover kept it
    assert not alive(srv_pid, srv_ticks) and not os.path.exists(sock) and nbdkits_serving(target) == []
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    with open(os.path.join(ekko.cfg["run_dir"], "instant", f"{new}-supervisor.log")) as f:
        assert "connecting again" in f.read()                   # it saw the connection go, and came back
    assert ET.fromstring(dom.XMLDesc(0)).find("devices/disk/backingStore/source") is None
    st = ekko.run("status", json_out=True).data["instant_restores"]
    assert [(s["domain"], s["phase"], s["pulled_bytes"], s["total_bytes"]) for s in st] == \
        [(new, "complete", SIZE, SIZE)]
    human = ekko.run("status", new).stdout
    assert f"instant restore {new} from {bid}: complete; 1 server restart(s)" in human, human

    # the overlay is the backup plus the guest's writes (the reference is the model, built from
    # the bytes written, never read back from QEMU), no backing left
    g.flush("vda")
    ref = os.path.join(lvwork, "ref.raw")
    with open(ref, "wb") as f:
        f.write(g.model["vda"])
    cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", overlay, ref],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    dom.destroy()
    head = json.loads(subprocess.run(["qemu-img", "info", "--output=json", overlay], check=True,
                                     capture_output=True, text=True).stdout)
    assert "backing-filename" not in head
    # the backup's zero segments are holes of the export: the pull did not copy them (~45 MiB of
    # data and writes in a 128 MiB disk; copied zeros would make it the whole disk)
    assert head["actual-size"] < 64 * MiB, head
    assert read_raw(overlay) == bytes(g.model["vda"])

    # the source backup is unchanged
    assert ekko.run("verify", bid, "--deep", json_out=True).returncode == 0
    out = os.path.join(lvwork, "again.raw")
    ekko.run("restore", bid, "--to", out)
    assert read_raw(out) == exp
    conn.close()


def test_instant_restore_errors_leave_nothing_behind(libvirt_conn, test_domains, images, lvwork, cleanup_instant):
    rnd = random.Random(7)
    ekko, bid, _ = source_backup(test_domains, images, lvwork, "ekko-test-inst-err", rnd, size=8 * MiB, raw_vdb=True,
                                 nova=True)
    cleanup_instant(ekko.path)
    new = "ekko-test-inst-err2"
    test_domains.names.append(new)
    target = os.path.join(lvwork, "t")
    state = os.path.join(ekko.cfg["state_dir"], "instant")

    def nothing_left(where=target):
        for dev in ("vda", "vdb"):
            assert not os.path.exists(os.path.join(where, f"{dev}.qcow2"))
            assert not os.path.exists(os.path.join(where, f"{dev}.nbd.sock"))
        assert nbdkits_serving(where) == []
        assert not [n for n in (os.listdir(state) if os.path.isdir(state) else []) if n.endswith(".json")]
        assert new not in [d.name() for d in libvirt_conn.listAllDomains()]

    cases = [
        (("restore", "nosuchbackup", "--define", new, "--instant", "--to", target), "no backup 'nosuchbackup'"),
        (("restore", bid, "--define", "ekko-test-inst-err", "--instant", "--to", target), "exists already"),
        (("restore", bid, "--instant", "--to", target), "needs --define"),
        (("restore", bid, "--define", "../../evil", "--instant", "--to", target), "one printable path component"),
        (("restore", bid, "--define", new, "--instant", "--to", ekko.path), "not a directory"),
        (("restore", bid, "--define", new, "--instant", "--to", os.path.join(ekko.path, "sub")), "not writable"),
        (("restore", bid, "--define", new, "--instant", "--to", os.path.join(lvwork, "x" * 100)), "too long"),
    ]
    for argv, message in cases:
        p = ekko.run(*argv, check=False)
        assert p.returncode == 2 and message in p.stderr, (argv, p.returncode, p.stderr)
        nothing_left()
    os.makedirs(os.path.join(lvwork, "nolv"))
    no_lv = Ekko(os.path.join(lvwork, "nolv"), dict(ekko.cfg, libvirt={"uri": "qemu+unix:///system?socket=/no/sock"}))
    p = no_lv.run("restore", bid, "--define", new, "--instant", "--to", target, check=False)
    assert p.returncode == 1 and "libvirt at qemu+unix:///system?socket=/no/sock cannot be reached" in p.stderr, \
        p.stderr
    nothing_left()

    # SIGTERM with everything up (servers, overlay, domain running, pull started): all undone
    fifo = os.path.join(lvwork, "pause.fifo")
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"instant-started:{fifo}")
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "restore", bid, "--define",
                             new, "--instant", "--to", target], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb"):                         # returns once the command is at the point
        import libvirt
        assert libvirt_conn.lookupByName(new).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert len(nbdkits_serving(target)) == 2 and os.path.exists(os.path.join(target, "vdb.qcow2"))
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    nothing_left()
    assert not os.path.exists(target)              # it made the directory: gone again

    # the new domain undefined mid-stream (a race the supervisor met in the bench: the domain
    # gone between two libvirt calls): the job ends 'abandoned', its server stopped
    res = ekko.run("restore", bid, "--define", new, "--instant", "--to", target, "--bandwidth", "64KiB",
                   json_out=True).data
    assert [d["dev"] for d in res["disks"]] == ["vda", "vdb"]       # both disks, each on its own server
    assert {d["namespace"] for d in res["disks"]} == {"p-5678"}      # served from the project's namespace
    root = ET.fromstring(libvirt_conn.lookupByName(new).XMLDesc(0))
    assert sorted(h.get("socket") for h in root.iter("host")) == [d["socket"] for d in res["disks"]]
    from harness.libvirtd import destroy_and_undefine
    destroy_and_undefine(libvirt_conn, new)
    rec = wait_for(lambda: (r := job_record(ekko, new))["phase"] != "streaming" and r, 30, "the job's end")
    assert rec["phase"] == "abandoned" and "undefined" in rec["message"]
    assert not any(alive(d["server_pid"], d["server_ticks"]) for d in res["disks"])
    assert nbdkits_serving(target) == []
    wait_for(lambda: not alive(rec["supervisor_pid"], rec["supervisor_ticks"]), 10, "the supervisor's exit")

    # the name is free again (the finished job's record is replaced); a job under way keeps it,
    # even once its domain is gone (its supervisor held, so it has not noticed yet)
    again = ekko.run("restore", bid, "--define", new, "--instant", "--to", os.path.join(lvwork, "t2"),
                     "--bandwidth", "64KiB", json_out=True).data
    assert again["phase"] == "streaming" and job_record(ekko, new)["uuid"] == again["uuid"] != res["uuid"]
    sup = job_record(ekko, new)
    os.kill(sup["supervisor_pid"], signal.SIGSTOP)
    try:
        destroy_and_undefine(libvirt_conn, new)
        p = ekko.run("restore", bid, "--define", new, "--instant", "--to", os.path.join(lvwork, "t3"), check=False)
        assert p.returncode == 2 and "still under way" in p.stderr, p.stderr
        assert not os.path.exists(os.path.join(lvwork, "t3"))
    finally:
        os.kill(sup["supervisor_pid"], signal.SIGCONT)
    rec = wait_for(lambda: (r := job_record(ekko, new))["phase"] != "streaming" and r, 30, "the second job's end")
    assert rec["phase"] == "abandoned"
    assert not any(alive(d["server_pid"], d["server_ticks"]) for d in again["disks"])

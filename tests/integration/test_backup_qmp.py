"""The backup core against a real QEMU: chains, point-in-time semantics, crashes, damage."""

import contextlib
import os
import random
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_raw, release_pauses, remount, small_fs
from ekko_libvirt.store import catalog
from ekko_libvirt.format import segment
from ekko_libvirt.engine.qmp import QMPEngine, QMPTarget
from ekko_libvirt.backup.options import BackupOptions
from ekko_libvirt.backup.transaction import DiskJob, run_transaction

KiB, MiB = 1024, 1024 * 1024


def restore_equals(ekko, backup_id, expected, workdir, ext="raw", extra=()):
    out = os.path.join(workdir, f"r-{backup_id}.{ext}")
    ekko.run("restore", backup_id, "--to", out, *extra)
    got = read_raw(out)
    for p in (out, out + ".raw"):
        if os.path.exists(p):
            os.unlink(p)
    return got == expected


def ours(disk):
    return sorted(b["name"] for b in disk.bitmaps() if b["name"].startswith("ekko-"))


def test_full_then_three_incrementals_restore_exact(store_kind, qdisk, ekko_for, workdir):
    rnd = random.Random(7)
    disk = qdisk(32 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, rnd.randbytes(3 * MiB))
    disk.write(10 * MiB, b"log line 42\n" * 40000)
    expected, backups = [], []
    for step in range(4):
        expected.append(disk.snapshot())
        b = ekko.backup()
        backups.append(b)
        # writes between backups: new data, overwrite, zeroing, unaligned spans across segments
        disk.write(rnd.randrange(0, 31 * MiB), rnd.randbytes(rnd.randrange(1, 300 * KiB)))
        disk.write(rnd.randrange(0, 31 * MiB) & ~4095, bytes([step + 1]) * 70000)
        if step == 1:
            disk.write_zeroes(0, 1 * MiB)
    assert [b["kind"] for b in backups] == ["full", "incremental", "incremental", "incremental"]
    assert [b["parent"] for b in backups[1:]] == [b["backup_id"] for b in backups[:-1]]
    assert backups[0]["reason"] == "first backup of this disk"
    # each incremental read only a handful of segments, not the disk
    for b in backups[1:]:
        assert 0 < b["read_bytes"] <= 2 * MiB
    for i, (b, exp) in enumerate(zip(backups, expected)):
        assert restore_equals(ekko, b["backup_id"], exp, workdir, "qcow2" if i % 2 else "raw"), b["backup_id"]
    # exactly one generation remains: the one the newest manifest names
    assert ours(disk) == [backups[-1]["generation"]["bitmap"]]


def test_writes_after_transaction_are_in_next_backup_only(store_kind, qdisk, workdir, ekko_for):
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    disk.write(1 * MiB, b"A" * (512 * KiB))
    first = ekko.backup()
    disk.write(2 * MiB, b"B" * (256 * KiB))
    at_instant = disk.snapshot()

    late = b"C" * (128 * KiB)

    class WritesDuringBackup(QMPEngine):
        def begin(self, plans, sizes, backup_id, quiesce=None):
            session = super().begin(plans, sizes, backup_id, quiesce)
            # the guest keeps writing while the backup reads the point-in-time view
            disk.write(2 * MiB + 64 * KiB, late)
            disk.write(9 * MiB, late)
            return session

    cfg = ekko.cfg
    engine = WritesDuringBackup([QMPTarget("t1", disk.qmp_socket, "disk0", os.path.join(workdir, "state", "scratch"),
                                           cfg["run_dir"])])
    store = ekko.store()
    try:
        [res] = run_transaction(engine, store, [DiskJob("t1")],
                                BackupOptions(target="t1", segment_size=256 * KiB,
                                              lock_dir=os.path.join(workdir, "state", "locks")))
    finally:
        engine.close()
    assert res.manifest.kind == "incremental" and res.manifest.parent == first["backup_id"]
    assert restore_equals(ekko, res.manifest.backup_id, at_instant, workdir)
    after = disk.snapshot()
    assert after != at_instant
    nxt = ekko.backup()
    assert nxt["kind"] == "incremental"
    assert restore_equals(ekko, nxt["backup_id"], after, workdir)


def test_qemu_kill9_between_backups_forces_full_with_reason(store_kind, qdisk, ekko_for, workdir):
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, os.urandom(1 * MiB))
    first = ekko.backup()
    # a clean restart writes the generation into the qcow2 (flags: auto)...
    disk.stop()
    disk.start()
    disk.write(4 * MiB, os.urandom(300 * KiB))
    inc = ekko.backup()
    assert inc["kind"] == "incremental" and inc["parent"] == first["backup_id"]
    disk.stop()
    disk.start()
    # ...a kill -9 leaves it flagged in-use: QEMU then reports it inconsistent
    disk.write(5 * MiB, os.urandom(200 * KiB))
    disk.kill9()
    disk.start()
    gen = inc["generation"]["bitmap"]
    assert any(b["name"] == gen and b.get("inconsistent") for b in disk.bitmaps())
    expected = disk.snapshot()
    b = ekko.backup()
    assert b["kind"] == "full"
    assert "inconsistent" in b["reason"] and "uncleanly" in b["reason"]
    show = ekko.run("show", b["backup_id"]).stdout
    assert "uncleanly" in show
    assert restore_equals(ekko, b["backup_id"], expected, workdir, "qcow2")
    assert ours(disk) == [b["generation"]["bitmap"]]
    disk.write(8 * MiB, b"after" * 1000)
    inc = ekko.backup()
    assert inc["kind"] == "incremental"
    assert restore_equals(ekko, inc["backup_id"], disk.snapshot(), workdir)


def test_qemu_kill9_before_bitmap_was_ever_stored(qdisk, ekko_for, workdir):
    """A generation created after QEMU started reaches the qcow2 only at a clean close: a
    kill -9 loses it entirely. Missing, not inconsistent: still a full, with that reason."""
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, os.urandom(512 * KiB))
    ekko.backup()
    disk.kill9()
    disk.start()
    expected = disk.snapshot()
    b = ekko.backup("t1", "--incremental", check=False)
    assert b.returncode == 2 and "missing" in b.stderr
    b = ekko.backup()
    assert b["kind"] == "full" and "missing" in b["reason"]
    assert restore_equals(ekko, b["backup_id"], expected, workdir)


@pytest.mark.parametrize("point", ["after-transaction", "during-read", "during-store", "before-commit",
                                   "after-commit"])
def test_ekko_kill9_mid_backup_next_backup_exact(point, store_kind, qdisk, ekko_for, workdir):
    rnd = random.Random(point)
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, rnd.randbytes(2 * MiB))
    first = ekko.backup()
    disk.write(3 * MiB, rnd.randbytes(600 * KiB))
    disk.write(12 * MiB, rnd.randbytes(100 * KiB))
    killed = ekko.run("backup", "t1", env={"EKKO_TEST_CRASH": point}, check=False)
    assert killed.returncode == -9, killed.stderr
    disk.write(7 * MiB, rnd.randbytes(64 * KiB))      # the guest goes on writing
    expected = disk.snapshot()
    b = ekko.backup()
    if point == "after-commit":
        # the killed run committed: this one builds on it
        assert b["kind"] == "incremental" and b["parent"] != first["backup_id"]
    else:
        assert b["kind"] == "incremental" and b["parent"] == first["backup_id"]
    assert restore_equals(ekko, b["backup_id"], expected, workdir)
    assert ours(disk) == [b["generation"]["bitmap"]]
    store = ekko.store()
    for key in catalog.keys(store):
        m = catalog.load(store, key)
        for _, d in m.table.data_entries():
            assert store.exists(segment.segment_key(d)), (key, d.hex())
    # nothing of the killed run is left in QEMU or on disk
    nodes = [n["node-name"] for n in disk.admin.execute("query-named-block-nodes", {"flat": True})]
    assert not [n for n in nodes if n.startswith("ek")]
    assert not os.listdir(os.path.join(workdir, "state", "scratch"))


def test_damaged_and_missing_segments(store_kind, qdisk, ekko_for, workdir):
    rnd = random.Random(3)
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, rnd.randbytes(2 * MiB))
    expected = disk.snapshot()
    b1 = ekko.backup()
    disk.write(6 * MiB, rnd.randbytes(100 * KiB))
    b2 = ekko.backup()
    store = ekko.store()
    m = catalog.load(store, catalog.find(store, b1["backup_id"]))
    entries = list(m.table.data_entries())
    (i_flip, d_flip), (i_del, d_del) = entries[1], entries[4]
    ekko.corrupt(segment.segment_key(d_flip))
    ekko.lose(segment.segment_key(d_del))

    shallow = ekko.run("verify", check=False, json_out=True)
    assert shallow.returncode == 3
    assert [x["key"] for x in shallow.data["damaged_segments"]] == [segment.segment_key(d_del)]
    deep = ekko.run("verify", "--deep", check=False, json_out=True)
    assert deep.returncode == 3
    damaged = {x["key"]: x for x in deep.data["damaged_segments"]}
    assert set(damaged) == {segment.segment_key(d_flip), segment.segment_key(d_del)}
    for x in damaged.values():
        assert x["used_by"] == sorted([b1["backup_id"], b2["backup_id"]])
    human = ekko.run("verify", "--deep", check=False).stdout
    assert segment.segment_key(d_flip) in human and b1["backup_id"] in human

    out = os.path.join(workdir, "r.raw")
    p = ekko.run("restore", b1["backup_id"], "--to", out, check=False)
    assert p.returncode == 3
    assert segment.segment_key(d_flip) in p.stderr and str(i_flip * m.segment_size) in p.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".ekko-partial")

    p = ekko.run("restore", b1["backup_id"], "--to", out, "--allow-damaged", check=False, json_out=True)
    assert p.returncode == 3
    holes = {(h["index"], h["offset"]) for h in p.data["holes"]}
    assert holes == {(i_flip, i_flip * m.segment_size), (i_del, i_del * m.segment_size)}
    got = read_raw(out)
    exp = bytearray(expected)
    for i in (i_flip, i_del):
        exp[i * m.segment_size:(i + 1) * m.segment_size] = bytes(m.segment_size)
    assert got == bytes(exp)


def test_store_out_of_space_fails_clearly_leaves_nothing_and_the_chain_goes_on(qdisk, ekko_for, workdir):
    """A store file system that fills up mid-backup: a clear error naming the store, no
    manifest, no temp file, and the next backup (space freed) is an incremental with every
    block written since the last good one."""
    with small_fs(workdir, "small", 8) as mnt:
        disk = qdisk(32 * MiB)
        ekko = ekko_for(disk)
        ekko.cfg["store"]["path"] = os.path.join(mnt, "store")
        ekko.write_config()
        rnd = random.Random(11)
        disk.write(0, rnd.randbytes(2 * MiB))
        full = ekko.backup()
        assert full["kind"] == "full"
        disk.write(4 * MiB, rnd.randbytes(12 * MiB))        # more than the 6 MiB left
        expected = disk.snapshot()
        failed = ekko.backup(check=False)
        assert failed.returncode != 0
        assert "No space left on device" in failed.stderr and mnt in failed.stderr, failed.stderr
        assert [k.rsplit("/", 1)[1] for k in catalog.keys(ekko.store(), "t1")] == [full["backup_id"]]
        left = [f for _, _, fs in os.walk(mnt) for f in fs if ".tmp-" in f]
        assert left == []
        assert ours(disk) == [full["generation"]["bitmap"]]     # the failed generation merged back
        remount(mnt, "size=64m")
        inc = ekko.backup()
        assert inc["kind"] == "incremental" and inc["parent"] == full["backup_id"]
        assert restore_equals(ekko, inc["backup_id"], expected, workdir)
        # a restore onto a file system too small: the error says so, no partial image stays
        st = os.statvfs(mnt)
        used_mib = (st.f_blocks - st.f_bfree) * st.f_frsize // MiB
        remount(mnt, f"size={used_mib + 4}m")         # 4 MiB free
        for ext in ("raw", "qcow2"):
            out = os.path.join(mnt, f"r.{ext}")
            p = ekko.run("restore", inc["backup_id"], "--to", out, check=False)
            assert p.returncode == 1 and p.stderr.startswith("ekko: error: cannot write the restored image " + out)
            assert "No space left on device" in p.stderr and "Traceback" not in p.stderr, p.stderr
            assert not [f for f in os.listdir(mnt) if f.startswith("r.")]
        # with room, the same restore onto tmpfs (no O_DIRECT there: the buffered path) is exact
        remount(mnt, f"size={used_mib + 40}m")
        out = os.path.join(mnt, "r.qcow2")
        ekko.run("restore", inc["backup_id"], "--to", out)
        assert subprocess.run(["qemu-img", "check", "-q", out]).returncode == 0
        assert read_raw(out) == expected


def test_backup_gives_way_before_copy_before_write_could_fail_a_guest_write(qdisk, ekko_for, workdir):
    """QEMU 7.2's copy-before-write fails the GUEST's write when the scratch file cannot take the
    old data. With the scratch file system on a 16 MiB tmpfs and 20 MiB of guest overwrites
    during an incremental, the backup must give way (filter removed) before that: every guest
    write succeeds, the backup fails naming the scratch space, nothing is committed, and the next
    backup has every block."""
    with small_fs(workdir, "scratchfs", 16) as mnt:
        disk = qdisk(64 * MiB)
        ekko = ekko_for(disk)
        ekko.cfg.update(state_dir=os.path.join(mnt, "state"), scratch_reserve="12MiB")
        ekko.write_config()
        rnd = random.Random(5)
        disk.write(0, rnd.randbytes(48 * MiB))
        full = ekko.backup()
        disk.write(50 * MiB, rnd.randbytes(1 * MiB))
        # a worker holds its segment; the main thread watches
        with paused_at(ekko, workdir, "during-read", "backup", "t1") as proc:
            for i in range(80):         # 20 MiB of overwrites, 5 MiB/s: each one must succeed
                disk.write(i * 256 * KiB, rnd.randbytes(256 * KiB))
                time.sleep(0.05)
        err = proc.err
        assert proc.returncode == 1, err
        assert "scratch space" in err and "gave way" in err and mnt in err, err
        assert [k.rsplit("/", 1)[1] for k in catalog.keys(ekko.store(), "t1")] == [full["backup_id"]]
        assert ours(disk) == [full["generation"]["bitmap"]]
        assert not os.listdir(os.path.join(mnt, "state", "scratch"))       # fleece file removed
        expected = disk.snapshot()
        inc = ekko.backup()
        assert inc["kind"] == "incremental" and inc["parent"] == full["backup_id"]
        assert restore_equals(ekko, inc["backup_id"], expected, workdir)
        # too little room to start: refused before anything changes
        ekko.cfg["scratch_reserve"] = "64MiB"
        ekko.write_config()
        p = ekko.run("backup", "t1", check=False)
        assert p.returncode == 1 and "the backup needs scratch_reserve = 64.0 MiB to start" in p.stderr, p.stderr
        assert ours(disk) == [inc["generation"]["bitmap"]]


@contextlib.contextmanager
def paused_at(ekko, workdir, point, *args):
    """Run `ekko ARGS` (EKKO_TEST_PAUSE) until a thread of it waits at pause point `point`; the
    block runs meanwhile, then every waiter is let go and the command runs to its end. Yields
    the Popen; its stderr is in .err afterwards. Kills it (our child, by PID) if the block fails."""
    fifo = os.path.join(workdir, f"{point}.fifo")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"{point}:{fifo}")
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with open(fifo, "wb"):          # returns once a thread waits at the point
            yield proc
        release_pauses(fifo, proc)
        proc.out, proc.err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sigterm_taken(proc, timeout=30):
    """Wait until ekko's SIGTERM handler has run in its main thread: the handler's first act is to
    restore SIGTERM's default action ("a second SIGTERM ends the process at once"), which clears
    SIGTERM from SigCgt in /proc/PID/status; its next is to raise Terminated there."""
    import signal
    bit = 1 << (signal.SIGTERM - 1)
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{proc.pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        if not caught & bit:
            return
        assert proc.poll() is None, "ekko exited before its SIGTERM handler ran"
        assert time.monotonic() < deadline, f"ekko's SIGTERM handler did not run within {timeout} s"
        time.sleep(0.01)


def test_disk_grown_between_backups_next_is_a_full_with_the_reason(qdisk, ekko_for, workdir):
    """block_resize of the live disk (as Nova's resize does): the old generation cannot describe
    the new size, so the next backup is a full that says why, and both restore exactly."""
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    rnd = random.Random(17)
    disk.write(0, rnd.randbytes(1 * MiB))
    b1, exp1 = ekko.backup(), disk.snapshot()
    disk.admin.execute("block_resize", {"node-name": "disk0", "size": 24 * MiB})
    disk.model.extend(bytes(8 * MiB))
    disk.write(20 * MiB, rnd.randbytes(512 * KiB))
    disk.write(0, rnd.randbytes(4 * KiB))
    b2, exp2 = ekko.backup(), disk.snapshot()
    assert b2["kind"] == "full" and "disk size changed" in b2["reason"], b2
    assert b2["virtual_size"] == 24 * MiB
    b3 = ekko.backup()
    assert b3["kind"] == "incremental" and b3["parent"] == b2["backup_id"]
    assert restore_equals(ekko, b1["backup_id"], exp1, workdir)
    assert restore_equals(ekko, b3["backup_id"], exp2, workdir, "qcow2")
    assert ours(disk) == [b3["generation"]["bitmap"]]


def test_a_read_only_store_still_lists_restores_and_verifies(qdisk, ekko_for, workdir):
    """A store mounted read-only (a replica at a recovery site): everything that only reads
    works; verify reports and warns that it could not record; a backup fails clearly and
    forgets nothing."""
    with small_fs(workdir, "replica", 64) as mnt:
        disk = qdisk(8 * MiB)
        ekko = ekko_for(disk)
        ekko.cfg["store"]["path"] = os.path.join(mnt, "store")
        ekko.write_config()
        disk.write(0, os.urandom(1 * MiB))
        b, exp = ekko.backup(), disk.snapshot()
        remount(mnt, "ro")
        assert b["backup_id"] in ekko.run("list").stdout
        assert ekko.run("show", b["backup_id"], json_out=True).data["backup"]["backup_id"] == b["backup_id"]
        assert restore_equals(ekko, b["backup_id"], exp, workdir)
        v = ekko.run("verify", "--deep", json_out=True)
        assert v.returncode == 0 and v.data["ok"] and "Read-only file system" in v.data["not_recorded"][0]
        assert "the results were not recorded in the store" in v.stderr
        disk.write(0, os.urandom(4 * KiB))
        p = ekko.run("backup", "t1", check=False)
        assert p.returncode == 1 and "Read-only file system" in p.stderr and "Traceback" not in p.stderr
        assert ours(disk) == [b["generation"]["bitmap"]]


def test_qemu_killed_mid_backup_reports_the_read_error_and_the_next_backup_is_full(qdisk, ekko_for, workdir):
    """QEMU dies while a backup reads: the error is the read's (not the failed undo's), one
    warning says QEMU's connection is gone, nothing is committed, and once QEMU runs again the
    next backup is a full (the bitmap is inconsistent after a kill) that restores exactly."""
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, os.urandom(8 * MiB))
    first = ekko.backup()
    disk.write(0, os.urandom(8 * MiB))     # 32 dirty segments: more than the read-ahead holds
    with paused_at(ekko, workdir, "during-read", "backup", "t1") as proc:
        disk.kill9()
    err = proc.err
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("ekko: error: NBD read failed"), err
    assert err.count("QMP connection is gone") == 1 and "teardown step failed" not in err, err
    assert [k.rsplit("/", 1)[1] for k in catalog.keys(ekko.store(), "t1")] == [first["backup_id"]]
    disk.start()
    expected = disk.snapshot()
    b = ekko.backup()
    assert b["kind"] == "full", b
    assert restore_equals(ekko, b["backup_id"], expected, workdir)
    assert ours(disk) == [b["generation"]["bitmap"]]


def test_sigterm_mid_backup_undoes_everything_in_qemu_at_once(qdisk, ekko_for, workdir):
    """`kill PID` (a timeout, a service stop) while a backup reads: exit 143, nothing committed,
    and QEMU is left as before the backup - no export, no filter or fleece node, no job, the new
    generation merged back - not only at the next run. Then the chain goes on."""
    import signal
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, os.urandom(4 * MiB))
    first = ekko.backup()
    disk.write(0, os.urandom(4 * MiB))
    expected = disk.snapshot()
    nodes_before = sorted(n["node-name"] for n in disk.admin.execute("query-named-block-nodes", {"flat": True}))
    with paused_at(ekko, workdir, "during-read", "backup", "t1") as proc:
        proc.send_signal(signal.SIGTERM)
        sigterm_taken(proc)                  # the main thread took it while the worker still waits
    err = proc.err
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM); nothing was committed" in err and "Traceback" not in err, err
    assert [k.rsplit("/", 1)[1] for k in catalog.keys(ekko.store(), "t1")] == [first["backup_id"]]
    assert disk.admin.execute("query-block-exports") == [] and disk.admin.execute("query-block-jobs") == []
    assert sorted(n["node-name"] for n in disk.admin.execute("query-named-block-nodes", {"flat": True})) == nodes_before
    assert ours(disk) == [first["generation"]["bitmap"]]
    assert not os.listdir(os.path.join(workdir, "state", "scratch"))
    assert not [f for _, _, fs in os.walk(ekko.store_dir) for f in fs if ".tmp-" in f], err
    inc = ekko.backup()
    assert inc["kind"] == "incremental" and inc["parent"] == first["backup_id"]
    assert restore_equals(ekko, inc["backup_id"], expected, workdir)
    # a restore that gets SIGTERM in the middle leaves no partial image
    out = os.path.join(workdir, "r.qcow2")
    with paused_at(ekko, workdir, "restore-write", "restore", inc["backup_id"], "--to", out) as r:
        assert os.path.exists(out + ".ekko-partial")        # a restore thread is about to write
        r.send_signal(signal.SIGTERM)
        sigterm_taken(r)                                    # before the write is let go
    assert r.returncode == 128 + signal.SIGTERM, r.err
    assert not os.path.exists(out + ".ekko-partial") and not os.path.exists(out)


def test_a_killed_backup_leaves_no_copy_before_write_behind(qdisk, ekko_for, workdir):
    """SIGKILL (the OOM killer) while a backup reads: the run cannot undo anything, but its
    reaper removes the export, the nodes, the job (and with it the copy-before-write filter) and
    the fleece file within seconds, so guest overwrites stop filling the scratch. The generations
    wait for the next run, whose recovery makes the chain go on exactly."""
    import json
    import signal
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, os.urandom(4 * MiB))
    first = ekko.backup()
    nodes_before = sorted(n["node-name"] for n in disk.admin.execute("query-named-block-nodes", {"flat": True}))
    disk.write(0, os.urandom(4 * MiB))
    scratch = os.path.join(workdir, "state", "scratch")
    with paused_at(ekko, workdir, "during-read", "backup", "t1") as proc:
        assert os.listdir(scratch)                       # the fleece file exists
        journal = [f for f in os.listdir(os.path.join(workdir, "run")) if f.endswith(".journal.json")]
        with open(os.path.join(workdir, "run", journal[0])) as f:
            reaper_pid = json.load(f)["reaper_pid"]
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{reaper_pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{reaper_pid}"), "the reaper did not finish"
    assert disk.admin.execute("query-block-exports") == [] and disk.admin.execute("query-block-jobs") == []
    assert sorted(n["node-name"] for n in disk.admin.execute("query-named-block-nodes", {"flat": True})) == nodes_before
    assert not os.listdir(scratch)
    disk.write(8 * MiB, os.urandom(1 * MiB))        # straight to the disk: nothing copies it aside
    expected = disk.snapshot()
    inc = ekko.backup()
    assert inc["kind"] == "incremental" and inc["parent"] == first["backup_id"]
    assert restore_equals(ekko, inc["backup_id"], expected, workdir)
    assert ours(disk) == [inc["generation"]["bitmap"]]

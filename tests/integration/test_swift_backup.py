"""Backups into a real Swift whose servers fail: object server killed mid-backup, proxy down at
start, another project's credentials, and restore on a host that has nothing but the config."""

import json
import os
import subprocess
import sys
import time

from conftest import ROOT, Ekko, make_config, read_raw, swift_section
from ekko_libvirt.store import catalog
from ekko_libvirt.format import segment
from ekko_libvirt.store.swift import open_swift_store

KiB, MiB = 1024, 1024 * 1024


def swift_ekko(workdir, disk, server, account="test", prefix=None, **store_over):
    cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}})
    cfg["store"] = swift_section(server, account)
    if prefix:
        cfg["store"]["container_prefix"] = prefix
    cfg["store"].update(store_over)
    return Ekko(workdir, cfg)


def ours(disk):
    return sorted((b["name"], b["recording"]) for b in disk.bitmaps() if b["name"].startswith("ekko-"))


def restore_exact(ekko, bid, expected, workdir):
    out = os.path.join(workdir, f"r-{bid}.raw")
    ekko.run("restore", bid, "--to", out)
    ok = read_raw(out) == expected
    os.unlink(out)
    return ok


def test_object_server_killed_mid_backup(swift_server, qdisk, workdir):
    disk = qdisk(16 * MiB)
    ekko = swift_ekko(workdir, disk, swift_server, retries=6, starting_backoff=0.5, max_backoff=2)
    disk.write(0, os.urandom(2 * MiB))
    first = ekko.backup()
    disk.write(4 * MiB, os.urandom(3 * MiB))
    fifo = os.path.join(workdir, "pause")
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"after-transaction:{fifo}")
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "backup", "t1", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proxy_log = swift_server.log_path("proxy")
    with open(fifo, "wb"):                       # the backup holds after its transaction...
        swift_server.kill_server("object")       # ...the object server dies before any upload
        logged = proxy_log.stat().st_size
    # The object server comes back once the proxy has answered the backup 503 (its first try
    # failed), well inside the window of its retries (6, backing off 0.5 s to 2 s: about 9 s).
    deadline = time.monotonic() + 60
    while b" 503 " not in proxy_log.read_bytes()[logged:]:
        assert proc.poll() is None, f"the backup ended before a try failed: {proc.communicate()}"
        assert time.monotonic() < deadline, "the proxy answered no 503 within 60 s"
        time.sleep(0.05)
    swift_server.start_server("object")
    out, err = proc.communicate(timeout=180)
    store = ekko.store()
    heads = catalog.keys(store, "t1")
    assert proc.returncode == 0, err             # the retries carried it through
    assert len(heads) == 2
    expected = disk.snapshot()
    nxt = ekko.backup()
    assert nxt["kind"] == "incremental"
    assert restore_exact(ekko, nxt["backup_id"], expected, workdir)
    for key in catalog.keys(store):
        m = catalog.load(store, key)
        assert all(store.exists(segment.segment_key(d)) for _, d in m.table.data_entries())
    assert first["backup_id"] in [k.rsplit("/", 1)[1] for k in heads]


def test_proxy_down_at_backup_start(swift_server, qdisk, workdir):
    disk = qdisk(8 * MiB)
    ekko = swift_ekko(workdir, disk, swift_server, retries=1, starting_backoff=0.1, max_backoff=0.2, timeout=5)
    disk.write(0, os.urandom(MiB))
    ekko.backup()
    disk.write(3 * MiB, os.urandom(300 * KiB))
    before = ours(disk)
    swift_server.stop_proxy()
    try:
        p = ekko.run("backup", "t1", check=False, json_out=True)
        assert p.returncode == 1
        assert "swift" in p.stderr.lower() and "Traceback" not in p.stderr
        assert "testing" not in p.stderr and "testing" not in p.stdout
        assert ours(disk) == before              # nothing changed in QEMU: the dirty blocks are kept
    finally:
        swift_server.start_proxy()
    expected = disk.snapshot()
    b = ekko.backup()
    assert b["kind"] == "incremental" and b["read_bytes"] >= 300 * KiB
    assert restore_exact(ekko, b["backup_id"], expected, workdir)


def test_other_project_cannot_read_or_list(swift_server, qdisk, workdir):
    disk = qdisk(4 * MiB)
    prefix = f"ekko-{os.urandom(4).hex()}"
    ekko = swift_ekko(workdir, disk, swift_server, prefix=prefix)
    disk.write(0, os.urandom(256 * KiB))
    b = ekko.backup()
    # project B's credentials, pointed at project A's container by its storage URL
    other = os.path.join(workdir, "b")
    os.makedirs(other)
    intruder = swift_ekko(other, disk, swift_server, account="test2", prefix=prefix,
                          storage_url=swift_server.storage_url("test"))
    p = intruder.run("list", check=False)
    assert p.returncode != 0 and "403" in p.stderr, p.stderr
    p = intruder.run("restore", b["backup_id"], "--to", os.path.join(other, "x.raw"), check=False)
    assert p.returncode == 1 and "access denied (403)" in p.stderr, p.stderr     # refused, not "no backup"
    assert not os.path.exists(os.path.join(other, "x.raw"))
    # and with its own account it sees only its own (empty) container
    own_dir = os.path.join(other, "own")
    os.makedirs(own_dir)
    own = swift_ekko(own_dir, disk, swift_server, account="test2", prefix=prefix)
    p = own.run("list", json_out=True)
    assert p.data["backups"] == []


def test_restore_on_another_host_with_only_the_config(swift_server, qdisk, workdir):
    disk = qdisk(8 * MiB)
    ekko = swift_ekko(workdir, disk, swift_server)
    disk.write(MiB, os.urandom(MiB))
    ekko.backup()
    disk.write(5 * MiB, os.urandom(200 * KiB))
    expected = disk.snapshot()
    b = ekko.backup()
    # a new host: fresh state dir, no local cache, the same store section
    dr = os.path.join(workdir, "dr")
    os.makedirs(dr)
    cfg = dict(ekko.cfg, state_dir=os.path.join(dr, "state"), run_dir=os.path.join(dr, "run"), targets={})
    host2 = Ekko(dr, cfg)
    listed = host2.run("list", json_out=True).data["backups"]
    assert [x["backup_id"] for x in listed][-1] == b["backup_id"]
    out = os.path.join(dr, "r.qcow2")
    host2.run("restore", b["backup_id"], "--to", out)
    assert read_raw(out) == expected
    assert host2.run("verify", "--deep").returncode == 0


def _proxy_requests(server, since: int, method: str, needle: str) -> int:
    """Requests `method` whose path holds `needle`, in the proxy's log after byte `since`."""
    text = server.log_path("proxy").read_bytes()[since:].decode(errors="replace")
    return sum(1 for line in text.splitlines() if f" {method} " in line and needle in line)


def test_a_full_lists_segments_once_instead_of_a_head_each_and_a_segment_gc_took_is_stored_again(
        swift_server, qdisk, workdir):
    """A full asks Swift about each distinct segment: by one listing, not a HEAD per segment
    (backup/presence.py); the commit-time check lists again, after the flush, and stores again
    what vanished meanwhile (here: deleted behind the paused backup's back, as gc would)."""
    disk = qdisk(16 * MiB)
    ekko = swift_ekko(workdir, disk, swift_server)
    disk.write(0, os.urandom(9 * MiB))              # 36 distinct segments: more questions than
    disk.write(10 * MiB, b"text " * 200_000)        # a listing page costs in HEADs (store/swift.py)
    log = swift_server.log_path("proxy")
    since = log.stat().st_size
    first = ekko.backup()
    assert first["kind"] == "full"
    time.sleep(1)   # the proxy logs a request after answering it
    assert _proxy_requests(swift_server, since, "HEAD", "/segments/") == 0
    assert _proxy_requests(swift_server, since, "GET", "prefix%3Dsegments") >= 2   # copy + commit check

    # A second full of the same disk reuses every segment: the listing says they are there.
    # Paused before its commit-time check, three of them vanish; the check finds them.
    fifo = os.path.join(workdir, "pause")
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"after-segments:{fifo}")
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "backup", "t1", "--full",
                             "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo, "wb"):
        store = open_swift_store(ekko.cfg["store"])
        manifest = catalog.load(store, catalog.manifest_key("t1", first["backup_id"]))
        gone = sorted(manifest.table.unique_digests())[:3]
        for d in gone:
            store.delete(segment.segment_key(d))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "3 segment(s) vanished from the store before the commit" in err
    second = json.loads(out)["backup"]
    shown = ekko.run("show", second["backup_id"], json_out=True).data["backup"]["counts"]
    assert shown["restored_segments"] == 3 and shown["new_segments"] == 3     # put again: only those
    assert ekko.run("verify", "--deep", json_out=True).data["ok"]
    assert restore_exact(ekko, second["backup_id"], disk.snapshot(), workdir)
    assert restore_exact(ekko, first["backup_id"], disk.snapshot(), workdir)

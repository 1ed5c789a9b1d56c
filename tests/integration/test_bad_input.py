"""Bad input gets a clear error naming what is wrong, a non-zero exit, and loses nothing."""

import os
import socket
import threading

import pytest

from conftest import Ekko, make_config, read_raw
from ekko_libvirt import catalog
from ekko_libvirt.engine.qmp import QMPEngine, QMPTarget
from ekko_libvirt.errors import ReaderError
from ekko_libvirt.pipeline import BackupOptions, run_backup
from ekko_libvirt.store.local import LocalStore

KiB, MiB = 1024, 1024 * 1024


def manifests(ekko):
    return catalog.keys(LocalStore(ekko.store_dir)) if os.path.isdir(ekko.store_dir) else []


@pytest.mark.parametrize("mutate, key, words", [
    (lambda c: c["targets"]["t1"].pop("qmp_socket"), "targets.t1.qmp_socket", "non-empty string"),
    (lambda c: c.update(segment_size="3MiB"), "segment_size", "power of two"),
    (lambda c: c.update(segment_size="lots"), "segment_size", "not a size"),
    (lambda c: c.update(colour="blue"), "colour", "unknown key"),
    (lambda c: c["targets"]["t1"].update(engine="xen"), "targets.t1.engine", "unknown engine"),
    (lambda c: c["store"].update(type="tape"), "store.type", "unknown store type"),
    (lambda c: c.update(workers=0), "workers", "integer from 1"),
])
def test_bad_config_names_the_key(workdir, mutate, key, words):
    cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": "/nonexistent", "node": "disk0"}})
    mutate(cfg)
    ekko = Ekko(workdir, cfg)
    p = ekko.run("backup", "t1", check=False)
    assert p.returncode == 2
    assert f"config: {key}:" in p.stderr and words in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_config_file_and_bad_yaml(workdir):
    ekko = Ekko(workdir, {})
    os.unlink(ekko.path)
    p = ekko.run("list", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
    with open(ekko.path, "w") as f:
        f.write("store: [unclosed\n")
    p = ekko.run("list", check=False)
    assert p.returncode == 2 and "not valid YAML" in p.stderr


def test_bad_cli_arguments(workdir):
    ekko = Ekko(workdir, make_config(workdir, {}))
    p = ekko.run("backup", check=False)
    assert p.returncode == 2 and "target" in p.stderr
    p = ekko.run("backup", "t1", "--full", "--incremental", check=False)
    assert p.returncode == 2 and "not allowed with" in p.stderr
    p = ekko.run("show", "nosuchbackup", check=False)
    assert p.returncode == 2 and "no backup 'nosuchbackup'" in p.stderr


def test_unusable_state_dir_is_a_clear_error(qdisk, workdir):
    disk = qdisk(4 * MiB)
    blocker = os.path.join(workdir, "a-file")
    with open(blocker, "w") as f:
        f.write("not a directory")
    cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}})
    cfg["state_dir"] = os.path.join(blocker, "state")
    ekko = Ekko(workdir, cfg)
    p = ekko.run("backup", "t1", check=False, json_out=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("ekko: error: Not a directory (") and blocker in p.stderr
    assert p.data["ok"] is False
    assert disk.bitmaps() == []


def test_unknown_target_and_unknown_disk(qdisk, workdir):
    disk = qdisk(4 * MiB)
    ekko = Ekko(workdir, make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket,
                                                       "node": "vdz"}}))
    p = ekko.run("backup", "nope", check=False)
    assert p.returncode == 2 and "unknown target 'nope'" in p.stderr and "t1" in p.stderr
    p = ekko.run("backup", "t1", check=False, json_out=True)
    assert p.returncode == 2 and "no block node 'vdz'" in p.stderr and "disk0" in p.stderr
    assert p.data["ok"] is False and p.data["error_type"] == "DiskNotFound"
    assert manifests(ekko) == []
    assert disk.bitmaps() == []


def test_raw_disk_incremental_refused_full_allowed(qdisk, ekko_for, workdir):
    disk = qdisk(4 * MiB, fmt="raw")
    ekko = ekko_for(disk)
    disk.write(0, os.urandom(300 * KiB))
    p = ekko.run("backup", "t1", "--incremental", check=False)
    assert p.returncode == 2 and "raw cannot hold a persistent dirty bitmap" in p.stderr
    assert manifests(ekko) == []
    b1 = ekko.backup()
    assert b1["kind"] == "full" and "raw" in b1["reason"]
    disk.write(MiB, os.urandom(100 * KiB))
    expected = disk.snapshot()
    b2 = ekko.backup()
    assert b2["kind"] == "full" and b2["stored_bytes"] < 200 * KiB   # unchanged segments deduplicated
    out = os.path.join(workdir, "r.raw")
    ekko.run("restore", b2["backup_id"], "--to", out)
    assert read_raw(out) == expected
    # bad restore targets: a clear error each, nothing written, the existing file untouched
    p = ekko.run("restore", b2["backup_id"], "--to", out, check=False)
    assert p.returncode == 2 and "exists: refusing to overwrite" in p.stderr
    assert read_raw(out) == expected
    for bad in (os.path.join(workdir, "no-such-dir", "r.raw"), os.path.join(workdir, "no-such-dir", "r.qcow2")):
        p = ekko.run("restore", b2["backup_id"], "--to", bad, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"{os.path.join(workdir, 'no-such-dir')}: no such directory" in p.stderr
    assert not os.path.exists(os.path.join(workdir, "no-such-dir"))


def test_qmp_socket_that_does_not_answer(workdir):
    path = os.path.join(workdir, "mute.qmp")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(srv.accept()), daemon=True)
    t.start()
    cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": path, "node": "disk0"},
                                "t2": {"engine": "qmp", "qmp_socket": path + ".gone", "node": "disk0"}})
    cfg["qmp_timeout"] = 2
    ekko = Ekko(workdir, cfg)
    try:
        p = ekko.run("backup", "t1", check=False)
        assert p.returncode == 1
        assert f"QMP socket {path} does not answer" in p.stderr and "no QMP greeting" in p.stderr
        p = ekko.run("backup", "t2", check=False)
        assert p.returncode == 1 and "no such socket" in p.stderr
        assert manifests(ekko) == []
    finally:
        srv.close()


def test_export_without_bitmap_context_is_not_no_changes(qdisk, ekko_for, workdir):
    """If the NBD export lacks the dirty-bitmap context, block status for it is simply never
    reported; read naively that is "nothing changed". Ekko must refuse, commit nothing, and
    keep every dirty block for the next backup."""
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, os.urandom(MiB))
    first = ekko.backup()
    disk.write(5 * MiB, os.urandom(200 * KiB))

    class ExportWithoutBitmap(QMPEngine):
        def _add_export(self, plan):
            self.qmp.execute("block-export-add", {"type": "nbd", "id": self.names.export_id,
                                                  "node-name": self.names.snap_node, "name": "ekko"})

    engine = ExportWithoutBitmap(QMPTarget("t1", disk.qmp_socket, "disk0",
                                           os.path.join(workdir, "state", "scratch"), ekko.cfg["run_dir"]))
    try:
        with pytest.raises(ReaderError, match="does not offer qemu:dirty-bitmap:ekko-"):
            run_backup(engine, LocalStore(ekko.store_dir),
                       BackupOptions(target="t1", segment_size=256 * KiB,
                                     lock_dir=os.path.join(workdir, "state", "locks")))
    finally:
        engine.close()
    assert len(manifests(ekko)) == 1
    # the old generation was merged back and records again; nothing of ours is left over
    bms = [b for b in disk.bitmaps() if b["name"].startswith("ekko-")]
    assert [b["name"] for b in bms] == [first["generation"]["bitmap"]] and bms[0]["recording"]
    expected = disk.snapshot()
    b = ekko.backup()
    assert b["kind"] == "incremental" and b["read_bytes"] >= 200 * KiB
    out = os.path.join(workdir, "r.raw")
    ekko.run("restore", b["backup_id"], "--to", out)
    assert read_raw(out) == expected


def test_second_backup_of_same_target_waits_its_turn(qdisk, ekko_for, workdir):
    from ekko_libvirt.errors import LockBusy
    from ekko_libvirt.pipeline import TargetLock
    disk = qdisk(4 * MiB)
    ekko = ekko_for(disk)
    with TargetLock(os.path.join(workdir, "state", "locks"), "t1"):
        p = ekko.run("backup", "t1", check=False)
        assert p.returncode == 1 and "another ekko job" in p.stderr
        with pytest.raises(LockBusy):
            with TargetLock(os.path.join(workdir, "state", "locks"), "t1"):
                pass
    assert manifests(ekko) == []
    ekko.backup()

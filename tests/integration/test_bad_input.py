"""Bad input gets a clear error naming what is wrong, a non-zero exit, and loses nothing."""

import os
import socket
import threading

import pytest

from conftest import Ekko, make_config, read_raw
from ekko_libvirt.store import catalog
from ekko_libvirt.engine.qmp import QMPEngine, QMPTarget
from ekko_libvirt.errors import ReaderError
from ekko_libvirt.backup.options import BackupOptions
from ekko_libvirt.backup.transaction import DiskJob, run_transaction
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
        def export_args(self, name, plan):
            args = super().export_args(name, plan)
            del args["bitmaps"]
            return args

    engine = ExportWithoutBitmap([QMPTarget("t1", disk.qmp_socket, "disk0",
                                            os.path.join(workdir, "state", "scratch"), ekko.cfg["run_dir"])])
    try:
        with pytest.raises(ReaderError, match="does not offer qemu:dirty-bitmap:ekko-"):
            run_transaction(engine, LocalStore(ekko.store_dir), [DiskJob("t1")],
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
    from ekko_libvirt.backup.transaction import TargetLock
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


# ---- hostile config shapes: exit 2, one line naming the field, never a traceback or a secret ----

SECRET = "s3cr3t-VALUE-x9"
SECRET_NUMBER = 987654321


def _swift_cfg(workdir):
    """A swift store on a port nothing listens on: a shape that passed the checks would end in
    a connection error (exit 1), never in exit 2."""
    cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": "/nonexistent", "node": "disk0"}})
    cfg["store"] = {"type": "swift", "auth_url": "http://127.0.0.1:9/auth/v1.0", "user": "acct:user",
                    "key": "k3y-ok", "retries": 0}
    return cfg


def _set(path, value):
    def mutate(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


HOSTILE = [
    # credentials: named, never shown
    ("store.key", [SECRET]), ("store.key", {"nested": SECRET}), ("store.key", SECRET_NUMBER),
    ("store.key", 1.5), ("store.key", True), ("store.key", None), ("store.key", SECRET + "\n"),
    ("store.key", SECRET * 1000), ("store.key", [[[[SECRET]]]]),
    ("store.user", [SECRET]), ("store.user", SECRET_NUMBER),
    ("store.auth_url", "http://acct:" + SECRET + "@127.0.0.1:9/auth/v1.0"),
    ("store.password", SECRET), ("store.token", SECRET), ("store.application_credential_secret", [SECRET]),
    # every other swift field
    ("store.auth_url", [1]), ("store.auth_url", "ftp://h/"), ("store.auth_url", {"a": 1}),
    ("store.auth_version", [3]), ("store.auth_version", "2"), ("store.retries", "5"), ("store.retries", 10 ** 30),
    ("store.threads", -1), ("store.timeout", float("inf")), ("store.insecure", "no"),
    ("store.listing_page_size", []), ("store.container_prefix", ["x"]), ("store.storage_url", 5),
    ("store.project_name", {"a": 1}), ("store.type", ["swift"]), ("store", [1, 2]), ("store", "swift"),
    # the rest of the file
    ("workers", [1]), ("workers", "4"), ("workers", None), ("workers", 10 ** 30), ("segment_size", {"a": 1}),
    ("segment_size", "x" * 10000), ("bitmap_granularity", -1), ("compression", False), ("compression", [1]),
    ("compression.level", None), ("read", "fast"), ("read.in_flight", 1.5), ("qmp_timeout", "30"),
    ("state_dir", ["/var"]), ("state_dir", "/var/\x00x"), ("run_dir", 5), ("scratch_reserve", [1]),
    ("targets", ["t1"]), ("targets.t1", "x"), ("targets.t1.engine", ["qmp"]), ("targets.t1.disks", 5),
    ("encryption", [1]), ("encryption.key_file", 5), ("encryption.enabled", "yes"),
    ("libvirt", ["qemu:///system"]), ("libvirt.uri", 5),
    ("retention", [1]), ("retention.keep_last", "x"), ("schedule", 5), ("schedule.interval", [1]),
    ("agent", "x"), ("agent.max_concurrent", None), ("domains", [1]), ("domains.vm", 5),
]


@pytest.mark.parametrize("field, value", HOSTILE, ids=[f"{f}={type(v).__name__}{i}" for i, (f, v) in
                                                      enumerate(HOSTILE)])
def test_hostile_config_shapes(workdir, capsys, field, value):
    """In-process (many shapes, one interpreter): an exception out of cli.main is what a user
    would see as a traceback."""
    from ekko_libvirt import cli
    cfg = _swift_cfg(workdir)
    _set(field, value)(cfg)
    ekko = Ekko(workdir, cfg)
    for command in (["list"], ["backup", "t1"], ["--json", "show", "x"]):
        code = cli.main(["-c", ekko.path, *command])
        out, err = capsys.readouterr()
        assert code == 2, (command, out, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ekko: error: config: "), err
        named = lines[0][len("ekko: error: config: "):].split(":", 1)[0]
        top = field.split(".")[0]
        assert named.startswith(top), (field, err)
        for text in (out, err):
            assert SECRET not in text and str(SECRET_NUMBER) not in text and "Traceback" not in text


@pytest.mark.parametrize("text", [
    "store: {type: swift, auth_url: 'http://127.0.0.1:9/auth/v1.0', user: u, key: [%s]}" % SECRET,
    "store: {type: swift, auth_url: 'http://127.0.0.1:9/auth/v1.0', user: u, key: %d}" % SECRET_NUMBER,
    "store:\n  type: swift\n  key: \"%s\\q\"\n" % SECRET,
    "workers: " + "9" * 5000,
    "workers: " + "[" * 800 + "]" * 800,
    "workers:\n  - &a0 [x, x, x, x]\n" + "".join(f"  - &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
                                                  for i in range(1, 11)),
], ids=["key-list", "key-number", "yaml-error-on-key-line", "huge-int", "deep", "alias-bomb"])
def test_hostile_config_files_through_the_real_command(workdir, text):
    ekko = Ekko(workdir, {})
    with open(ekko.path, "w") as f:
        f.write(text)
    p = ekko.run("list", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("ekko: error: config: ")
    assert len(p.stderr) < 400
    assert SECRET not in p.stderr + p.stdout and str(SECRET_NUMBER) not in p.stderr + p.stdout

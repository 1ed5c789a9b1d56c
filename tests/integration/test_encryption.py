"""Encryption at rest against a real QEMU, through the real CLI: byte-exact chains, nothing
readable in the store, tampering found, wrong/missing/open keys refused before anything is
written, and no segment name shared between two projects' keys."""

import hashlib
import os
import random
import stat

from conftest import Ekko, make_config, read_raw
from ekko_libvirt.store import catalog
from ekko_libvirt.format import segment
from ekko_libvirt.store.local import LocalStore

KiB, MiB = 1024, 1024 * 1024
MARK = b"EKKO-KNOWN-PLAINTEXT-4f1d9c2e"


def encrypted_ekko(workdir, disk, store="store", key_file=None, name="t1", config_name="ekko.yaml"):
    cfg = make_config(workdir, {name: {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}})
    cfg["store"]["path"] = os.path.join(workdir, store)
    cfg["encryption"] = {"enabled": True, "key_file": key_file or os.path.join(workdir, "keys", "{project}.key")}
    ekko = Ekko(workdir, cfg)
    ekko.path = os.path.join(workdir, config_name)
    ekko.write_config()
    return ekko


def create_key(ekko, *args):
    p = ekko.run("key", "create", *args, json_out=True)
    return p.data["fingerprint"], p.data["key_file"]


def marked(rnd, n):
    """Random bytes with MARK every 4 KiB: incompressible, so a plain store would hold MARK verbatim."""
    buf = bytearray(rnd.randbytes(n))
    for off in range(0, n - len(MARK), 4096):
        buf[off:off + len(MARK)] = MARK
    return bytes(buf)


def store_files(root):
    """relative path -> sha256 of every file under the store directory (temp files included)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def grep_store(root, needles):
    hits = []
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                data = f.read()
            hits += [(os.path.join(d, n), x) for x in needles if x in data]
    return hits


def restored(ekko, backup_id, workdir, ext="raw"):
    out = os.path.join(workdir, f"r-{backup_id}.{ext}")
    ekko.run("restore", backup_id, "--to", out)
    got = read_raw(out)
    for p in (out, out + ".raw"):
        if os.path.exists(p):
            os.unlink(p)
    return got


def segment_names(store_dir):
    return {k.rsplit("/", 1)[1] for k in LocalStore(store_dir).list("segments/")}


def test_encrypted_chain_restores_exact_and_store_reveals_nothing(qdisk, workdir):
    rnd = random.Random(11)
    disk = qdisk(24 * MiB)
    ekko = encrypted_ekko(workdir, disk)
    fp, key_file = create_key(ekko)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    with open(key_file, "rb") as f:
        key = f.read()
    outputs = []

    disk.write(0, marked(rnd, 3 * MiB))
    disk.write(10 * MiB, b"log line 42 of a very compressible text\n" * 30000)
    expected, backups = [], []
    for step in range(3):
        expected.append(disk.snapshot())
        p = ekko.run("backup", "t1", "-v", json_out=True)
        outputs += [p.stdout, p.stderr]
        backups.append(p.data["backup"])
        disk.write(rnd.randrange(0, 23 * MiB), marked(rnd, rnd.randrange(64 * KiB, 600 * KiB)))
        disk.write(rnd.randrange(0, 23 * MiB) & ~4095, bytes([step + 1]) * 70000)
    assert [b["kind"] for b in backups] == ["full", "incremental", "incremental"]
    assert [b["parent"] for b in backups[1:]] == [b["backup_id"] for b in backups[:-1]]
    for b, exp in zip(backups, expected):
        assert restored(ekko, b["backup_id"], workdir, "qcow2" if b["kind"] == "full" else "raw") == exp

    show = ekko.run("show", backups[-1]["backup_id"], json_out=True)
    outputs += [show.stdout, show.stderr]
    assert show.data["backup"]["encryption"] == {"cipher": "aes-256-gcm", "key_fingerprint": fp,
                                                  "naming": "hmac-sha256-128"}
    keys = ekko.run("key", "show", json_out=True)
    outputs += [keys.stdout]
    (row,) = keys.data["keys"]
    assert row["fingerprint"] == fp and row["backups"] == {fp: 3}
    deep = ekko.run("verify", "--deep", json_out=True)
    assert deep.data["ok"] and deep.data["segments_checked"] > 0

    # dedupe within one key: a full of an unchanged disk stores nothing new
    ekko.run("backup", "t1", "--full", json_out=True)
    again = ekko.run("backup", "t1", "--full", json_out=True).data["backup"]
    assert again["stored_bytes"] == 0 and again["data_segments"] > 0

    # nothing of the disk, and no key, in any file of the store; no key in any output
    assert MARK in segment.encode(marked(rnd, 64 * KiB)).blob     # what a plain store would hold
    secrets = [MARK, b"log line 42", key, key.hex().encode()]
    assert grep_store(ekko.store_dir, secrets) == []
    for text in outputs:
        assert key.hex() not in text and fp in "".join(outputs)
    names = segment_names(ekko.store_dir)
    plain_names = {segment.digest(expected[0][i:i + 256 * KiB]).hex() for i in range(0, 3 * MiB, 256 * KiB)}
    assert names and not names & plain_names


def test_flipped_bits_in_segment_and_manifest_are_found(qdisk, workdir):
    rnd = random.Random(5)
    disk = qdisk(8 * MiB)
    ekko = encrypted_ekko(workdir, disk)
    create_key(ekko)
    disk.write(0, rnd.randbytes(2 * MiB))
    b1 = ekko.backup()
    raw_store = LocalStore(ekko.store_dir)
    # one of b1's segments (names are keyed, so their order changes with every key: a segment
    # picked after b2 could be the one only b2 uses)
    seg_key = sorted(raw_store.list("segments/"))[4]
    disk.write(5 * MiB, rnd.randbytes(100 * KiB))
    b2 = ekko.backup()
    m2_key = catalog.manifest_key("t1", b2["backup_id"])
    for k, pos in ((seg_key, 1000), (m2_key, 60)):
        path = os.path.join(ekko.store_dir, k)
        with open(path, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)
            f.seek(pos)
            f.write(bytes([byte[0] ^ 0x08]))

    out = os.path.join(workdir, "r.raw")
    p = ekko.run("restore", b1["backup_id"], "--to", out, check=False)
    assert p.returncode == 3 and seg_key in p.stderr and "authentication failed" in p.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".ekko-partial")
    p = ekko.run("restore", b2["backup_id"], "--to", out, check=False)
    assert p.returncode == 3 and m2_key in p.stderr
    assert not os.path.exists(out)

    deep = ekko.run("verify", "--deep", check=False, json_out=True)
    assert deep.returncode == 3
    assert [x["key"] for x in deep.data["damaged_segments"]] == [seg_key]
    assert b1["backup_id"] in deep.data["damaged_segments"][0]["used_by"]
    assert list(deep.data["bad_manifests"]) == [m2_key]
    lst = ekko.run("list", json_out=True).data["backups"]
    assert [r.get("damaged") is not None for r in lst] == [False, True]


def test_wrong_missing_and_open_keys_are_refused_before_anything_is_written(qdisk, workdir):
    rnd = random.Random(9)
    disk = qdisk(8 * MiB)
    ekko = encrypted_ekko(workdir, disk)
    fp, key_file = create_key(ekko)
    other_fp, other_file = create_key(ekko, "--key-file", os.path.join(workdir, "other", "x.key"))
    disk.write(0, rnd.randbytes(1 * MiB))
    b1 = ekko.backup()
    disk.write(3 * MiB, rnd.randbytes(200 * KiB))
    before = store_files(ekko.store_dir)
    bitmaps = sorted(b["name"] for b in disk.bitmaps())
    out = os.path.join(workdir, "r.raw")
    keys = []
    for path in (key_file, other_file):
        with open(path, "rb") as f:
            keys.append(f.read().hex())

    def refused(*words):
        for args in (("backup", "t1"), ("backup", "t1", "--incremental"), ("restore", b1["backup_id"], "--to", out),
                     ("verify", "--deep"), ("show", b1["backup_id"]), ("gc", "--grace-hours", "0")):
            p = ekko.run(*args, check=False, json_out=True)
            assert p.returncode == 2, (args, p.stderr)
            for w in words:
                assert w in p.stderr, (args, w, p.stderr)
            assert p.data["ok"] is False and "Traceback" not in p.stderr
            assert not any(k in p.stderr + p.stdout for k in keys)
        ekko.run("prune", "--keep-last", "1", check=False)      # keeps what it cannot read
        assert store_files(ekko.store_dir) == before
        assert sorted(b["name"] for b in disk.bitmaps()) == bitmaps
        assert not os.path.exists(out)

    # wrong key: names the fingerprint the chain needs, and the way out
    ekko.cfg["encryption"]["key_file"] = other_file
    ekko.write_config()
    refused(fp)
    p = ekko.run("backup", "t1", check=False)
    assert other_fp in p.stderr and "--full" in p.stderr
    lst = ekko.run("list", json_out=True).data["backups"]
    assert lst[0]["key_fingerprint"] == fp and "locked" in lst[0]

    # missing key file: names the path and the fingerprint the store's backups need
    ekko.cfg["encryption"]["key_file"] = os.path.join(workdir, "keys", "gone.key")
    ekko.write_config()
    refused("gone.key", "does not exist", fp)

    # a key file others may read
    ekko.cfg["encryption"]["key_file"] = key_file
    ekko.write_config()
    os.chmod(key_file, 0o644)
    refused(key_file, "0644", "chmod 600")

    # the right key again: the chain carries on
    os.chmod(key_file, 0o600)
    expected = disk.snapshot()
    b2 = ekko.backup()
    assert b2["kind"] == "incremental" and b2["parent"] == b1["backup_id"]
    assert restored(ekko, b2["backup_id"], workdir) == expected

    # a deliberate key change: --full starts a new chain, with the reason recorded
    ekko.cfg["encryption"]["key_file"] = other_file
    ekko.write_config()
    b3 = ekko.backup("t1", "--full")
    assert b3["kind"] == "full" and "key changed" in b3["reason"] and fp in b3["reason"]
    assert restored(ekko, b3["backup_id"], workdir) == expected
    b4 = ekko.backup()
    assert b4["kind"] == "incremental" and b4["parent"] == b3["backup_id"]


def test_encryption_on_starts_a_new_chain_and_off_needs_full(qdisk, workdir, ekko_for):
    rnd = random.Random(4)
    disk = qdisk(8 * MiB)
    plain = ekko_for(disk)
    disk.write(0, rnd.randbytes(512 * KiB))
    p1 = plain.backup()
    enc = Ekko(workdir, dict(plain.cfg, encryption={"key_file": os.path.join(workdir, "keys", "{project}.key")}))
    create_key(enc)
    disk.write(1 * MiB, rnd.randbytes(64 * KiB))
    e1 = enc.backup()
    assert e1["kind"] == "full" and "encryption is on now" in e1["reason"] and p1["backup_id"] in e1["reason"]
    assert enc.backup()["kind"] == "incremental"
    # the old plain backup is not read through an encrypting config, and the reverse
    p = enc.run("restore", p1["backup_id"], "--to", os.path.join(workdir, "x.raw"), check=False)
    assert p.returncode == 2 and "is not encrypted" in p.stderr
    plain.cfg.pop("encryption", None)
    plain.write_config()
    p = plain.run("backup", "t1", check=False)
    assert p.returncode == 2 and "encryption is not configured" in p.stderr
    expected = disk.snapshot()
    p2 = plain.backup("t1", "--full")
    assert p2["kind"] == "full" and "encryption is off now" in p2["reason"]
    assert restored(plain, p2["backup_id"], workdir) == expected
    assert restored(plain, p1["backup_id"], workdir) != expected        # the old plain chain still restores


def test_two_projects_with_different_keys_share_no_segment_name(qdisk, workdir):
    data = random.Random(21).randbytes(3 * MiB)
    disks = [qdisk(8 * MiB, name=f"d{i}") for i in range(2)]
    for d in disks:
        d.write(0, data)
        d.write(5 * MiB, b"same text on both disks\n" * 20000)
    keygen = encrypted_ekko(workdir, disks[0], config_name="keys.yaml")
    fps = [create_key(keygen, "--project", p)[0] for p in ("alpha", "beta")]
    assert fps[0] != fps[1]
    names = []
    for i, project in enumerate(("alpha", "beta")):
        ekko = encrypted_ekko(workdir, disks[i], store=f"store-{project}",
                              key_file=os.path.join(workdir, "keys", f"{project}.key"), config_name=f"{project}.yaml")
        b = ekko.backup()
        assert b["kind"] == "full"
        assert restored(ekko, b["backup_id"], workdir) == disks[i].snapshot()
        names.append(segment_names(ekko.store_dir))
    assert len(names[0]) == len(names[1]) > 0
    assert not names[0] & names[1]

"""The format promise of docs/format.md, tested: stores written by an earlier release
(tests/data/golden/, made by scripts/make_golden_stores.py) are listed, verified deep and restored
byte-exact by this one, through the real CLI, from a COPY (the committed data are never written).

A failure here means this release cannot read backups its users already have. Fix the reader;
never regenerate the golden data to make the test pass.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")

with open(os.path.join(GOLDEN, "expected.json")) as _f:
    EXPECTED = json.load(_f)


def _generator():
    spec = importlib.util.spec_from_file_location("make_golden_stores",
                                                  os.path.join(ROOT, "scripts", "make_golden_stores.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fingerprint(top: str) -> str:
    """Names, sizes and contents of every file under top."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(top):
        dirnames.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                h.update(os.path.relpath(path, top).encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _ekko(cfg: str, *args, json_out=True):
    cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", cfg, *args] + (["--json"] if json_out else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert p.returncode == 0, f"ekko {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout) if json_out else p


@pytest.mark.parametrize("flavor", sorted(EXPECTED["stores"]))
def test_golden_store_lists_verifies_and_restores_exactly(flavor, tmp_path):
    exp = EXPECTED["stores"][flavor]
    before = _fingerprint(GOLDEN)
    base = tmp_path / flavor
    shutil.copytree(os.path.join(GOLDEN, flavor), base)
    cfg = {"store": {"type": "local", "path": str(base / "store")}, "state_dir": str(tmp_path / "state"),
           "run_dir": str(tmp_path / "run")}
    if exp["encrypted"]:
        os.chmod(base / "default.key", 0o600)         # git keeps no modes; ekko refuses a readable key
        cfg["encryption"] = {"enabled": True, "key_file": str(base / "{project}.key")}
    path = tmp_path / "ekko.yaml"
    path.write_text(yaml.safe_dump(cfg))

    rows = _ekko(str(path), "list")["backups"]
    assert [(r["backup_id"], r["kind"], r["parent"]) for r in rows] == \
        [(b["backup_id"], b["kind"], b["parent"]) for b in exp["backups"]]
    for r in rows:
        assert (r["target"], r["virtual_size"], r["segment_size"]) == \
            (exp["target"], exp["virtual_size"], exp["segment_size"])
        assert r["protected"] == (r["backup_id"] in exp["protected"])
        assert r["verified"]["ok"] and r["verified"]["deep"]     # the golden verify/ markers are read

    report = _ekko(str(path), "verify", "--deep")
    assert report["ok"], report

    for b in exp["backups"]:
        out = tmp_path / f"{b['backup_id']}.raw"
        _ekko(str(path), "restore", b["backup_id"], "--to", str(out))
        with open(out, "rb") as f:
            data = f.read()
        assert len(data) == exp["virtual_size"]
        assert hashlib.sha256(data).hexdigest() == b["sha256"], f"{flavor} {b['backup_id']} restores other bytes"
        out.unlink()

    assert _fingerprint(GOLDEN) == before, "the test wrote into the committed golden data"


def test_golden_checksums_are_what_the_seed_regenerates():
    """expected.json records the disk contents by checksum; the generator rebuilds the contents
    themselves from the seed, so a failure of the test above can be looked at byte by byte."""
    gen = _generator()
    for flavor, exp in EXPECTED["stores"].items():
        states = gen.disk_states(exp["seed"])
        assert [hashlib.sha256(s).hexdigest() for s in states] == [b["sha256"] for b in exp["backups"]], flavor
        assert {len(s) for s in states} == {exp["virtual_size"]}
    assert EXPECTED["stores"]["plain"]["virtual_size"] % EXPECTED["stores"]["plain"]["segment_size"]


def test_golden_manifest_v1_decodes_with_its_fields():
    from ekko_libvirt.format import manifest as mf
    with open(os.path.join(GOLDEN, "manifest-v1.bin"), "rb") as f:
        blob = f.read()
    m = mf.decode(blob, "manifest-v1.bin")
    assert mf.decode_header(blob)["format"] == 1
    assert (m.backup_id, m.target, m.kind, m.parent) == \
        ("20261205T120000000Z-a1b2c3", "vm1.vda", "incremental", "20261204T120000000Z-d4e5f6")
    assert (m.virtual_size, m.segment_size, m.table.count) == (4 * 65536 + 1536, 65536, 5)
    assert m.reason == "bitmap ekko-x recorded every write since"
    assert m.generation == {"bitmap": "ekko-20261205T120000000Z-a1b2c3", "granularity": 65536}
    assert m.disk == {"node": "disk0", "filename": "/var/lib/nova/instances/x/disk", "format": "qcow2"}
    assert m.created == "2026-12-05T12:00:00+00:00"
    assert m.timings == {"started": 1796472000.0, "finished": 1796472001.5, "seconds": 1.5}
    assert m.counts["data_segments"] == 4 and m.counts["zero_segments"] == 1 and m.counts["stored_bytes"] == 1000
    assert m.labels == {"project": "p1"}
    assert (m.hash, m.compression, m.encryption) == ("xxh3-128", "zstd", None)
    assert list(m.table.flags) == [mf.FLAG_DATA, mf.FLAG_DATA, mf.FLAG_ZERO, mf.FLAG_DATA, mf.FLAG_DATA]
    assert [(i, d.hex()) for i, d in m.table.data_entries()] == [
        (0, "0102030405060708090a0b0c0d0e0f10"), (1, "1112131415161718191a1b1c1d1e1f20"),
        (3, "0102030405060708090a0b0c0d0e0f10"), (4, "2122232425262728292a2b2c2d2e2f30")]
    assert bytes(m.table.digests[32:48]) == bytes(16)      # a ZERO entry's digest is 16 zero bytes


def test_golden_manifest_v1_damage_is_refused():
    """The checksum covers every byte: the golden file with one bit flipped is not read."""
    from ekko_libvirt.format import manifest as mf
    from ekko_libvirt.errors import ManifestError
    with open(os.path.join(GOLDEN, "manifest-v1.bin"), "rb") as f:
        blob = bytearray(f.read())
    for pos in (0, 20, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(ManifestError):
            mf.decode(bytes(bad), "flipped")

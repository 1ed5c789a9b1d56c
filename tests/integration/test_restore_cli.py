"""`ekko restore` through the real CLI against a local store holding a hand-made backup (no
QEMU): where the output cannot go, the exit code and the message say why and what was left."""

import os
import random

import pytest

from conftest import Ekko, make_config, manifest_of, read_raw, remount, small_fs
from ekko_libvirt.store import catalog

KiB, MiB = 1024, 1 << 20
SEG = 256 * KiB


def _ekko_with_backup(workdir, contents, size=None):
    """An Ekko whose local store holds one backup of `contents` (segments; None: zeros)."""
    cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": os.path.join(workdir, "none.qmp"),
                                       "node": "disk0"}}, "256KiB")
    ekko = Ekko(workdir, cfg)
    store = ekko.store()
    m = manifest_of(store, contents, SEG, size)
    catalog.commit(store, m)
    return ekko, m


@pytest.mark.parametrize("name", ["r.raw", "r.qcow2"])
def test_restore_into_a_missing_directory_is_a_bad_argument(workdir, name):
    rnd = random.Random(1)
    ekko, m = _ekko_with_backup(workdir, [rnd.randbytes(SEG), None])
    missing = os.path.join(workdir, "no-such-dir")
    out = os.path.join(missing, name)
    p = ekko.run("restore", m.backup_id, "--to", out, check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert f"{missing}: no such directory" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "partial image" not in p.stderr, p.stderr       # none was ever created
    p = ekko.run("restore", m.backup_id, "--to", out, check=False, json_out=True)
    assert p.returncode == 2 and p.data["error_type"] == "UsageError", p.stdout
    # a file where the directory should be
    afile = os.path.join(workdir, "afile")
    open(afile, "w").close()
    p = ekko.run("restore", m.backup_id, "--to", os.path.join(afile, name), check=False)
    assert p.returncode == 2 and f"{afile} is not a directory" in p.stderr, p.stderr
    assert not os.path.exists(missing)


def test_a_failure_says_partial_image_removed_only_when_one_was_created(workdir):
    """A read-only directory: no image could be created, and the message says so. A directory
    that fills up: the image was created, and its removal is reported (and true)."""
    rnd = random.Random(2)
    contents = [rnd.randbytes(SEG) for _ in range(8)]       # 2 MiB of data
    ekko, m = _ekko_with_backup(workdir, contents)
    with small_fs(workdir, "small", 1) as mnt:
        out = os.path.join(mnt, "r.raw")
        remount(mnt, "ro")
        p = ekko.run("restore", m.backup_id, "--to", out, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert "no image was created" in p.stderr and "partial image was removed" not in p.stderr, p.stderr
        remount(mnt, "rw")
        p = ekko.run("restore", m.backup_id, "--to", out, check=False)
        assert p.returncode == 1 and "No space left on device" in p.stderr, p.stderr
        assert "the partial image was removed" in p.stderr, p.stderr
        assert os.listdir(mnt) == []


def test_force_over_an_existing_file_writes_the_zeros_too(workdir):
    """The zero blocks inside data segments are not written, which is right only on a new file:
    --force over a file full of other bytes (longer than the disk) still gives the disk exactly."""
    rnd = random.Random(3)
    segs = []
    for i in range(6):
        s = bytearray(SEG)
        o = rnd.randrange(SEG // 4096) * 4096
        s[o:o + 4096] = rnd.randbytes(4096)
        segs.append(bytes(s) if i % 3 else None)
    size = 6 * SEG
    ekko, m = _ekko_with_backup(workdir, segs, size)
    disk = b"".join(s or bytes(SEG) for s in segs)
    for name in ("r.raw", "r.qcow2"):
        out = os.path.join(workdir, name)
        with open(out, "wb") as f:
            f.write(b"\xa5" * (size + 1 * MiB))
        ekko.run("restore", m.backup_id, "--to", out, "--force")
        assert read_raw(out) == disk, name

"""`ekko files` through the real CLI: a raw image with a GPT partition table and an ext4 file
system made from a directory tree (mke2fs -d), written into a QEMU disk, backed up, changed
(a file modified, one deleted, one added) and backed up again; both backups are listed and
extracted through `ekko serve` (real nbdkit) and the libguestfs appliance, and compared with
their source trees: content, modes, mtimes, symlinks (one to /etc/passwd stays a symlink, and
nothing outside DIR is written)."""

import hashlib
import os
import random
import shutil
import subprocess
import tempfile

import pytest

from conftest import Ekko, make_config
from harness import in_ci
from harness.qemu import QemuDisk

MiB = 1024 * 1024
SIZE = 24 * MiB
PART = 1 * MiB             # the partition's first byte
CHUNK = 64 * 1024

if in_ci():      # CI installs it (scripts/install-deps.sh all): missing there is a failure, never a skip
    import guestfs  # noqa: F401
else:
    pytest.importorskip("guestfs", reason="python3-guestfs (scripts/install-deps.sh all)")


def fill_tree(root, rnd, second=False):
    """The guest's files: modes, integer mtimes (what mke2fs -d keeps), symlinks, a name with a newline."""
    os.makedirs(os.path.join(root, "etc", "ssh"))
    os.makedirs(os.path.join(root, "home", "ann", "empty"))
    files = {"etc/hostname": b"vm1\n", "etc/ssh/sshd_config": b"PermitRootLogin no\n" * 50,
             "home/ann/notes.txt": b"first version\n", "home/ann/big.bin": rnd.randbytes(300 * 1024),
             "home/ann/two\nlines": b"a name with a newline\n", "home/ann/old.txt": b"deleted later\n"}
    if second:
        files["home/ann/notes.txt"] = b"second version, longer than the first\n"
        del files["home/ann/old.txt"]
        files["home/ann/new.txt"] = b"added after the full\n"
    modes = {"etc/ssh/sshd_config": 0o600, "home/ann/big.bin": 0o750, "home/ann/notes.txt": 0o640}
    for i, (rel, data) in enumerate(sorted(files.items())):
        p = os.path.join(root, rel)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, modes.get(rel, 0o644))
        os.utime(p, (1_600_000_000 + i * 3600, 1_600_000_000 + i * 3600))
    os.symlink("/etc/passwd", os.path.join(root, "etc", "passwd"))
    os.symlink("../../etc/hostname", os.path.join(root, "home", "ann", "host"))
    os.symlink("../../../../../../../tmp/escape", os.path.join(root, "home", "ann", "up"))
    os.chmod(os.path.join(root, "home", "ann"), 0o700)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (1_650_000_000, 1_650_000_000), follow_symlinks=False)
            if not os.path.islink(os.path.join(dirpath, n)) and os.path.isfile(os.path.join(dirpath, n)):
                break


def make_image(path, tree):
    """GPT, one partition from 1 MiB, ext4 filled from `tree`; nothing mounted on this host."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:+20M", "-t", "1:8300", path], check=True, capture_output=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, "-E", f"offset={PART},nodiscard", path, "20M"],
                   check=True, capture_output=True)
    with open(path, "rb") as f:
        return f.read()


def snapshot(root):
    """rel path -> (type, mode, mtime, content or target) of everything below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("symlink", int(st.st_mtime), os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("directory", st.st_mode & 0o7777, int(st.st_mtime))
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime), f.read())
    return out


@pytest.fixture(scope="module")
def chain():
    rnd = random.Random(1616)
    workdir = tempfile.mkdtemp(prefix="ekf", dir="/tmp")
    trees = [os.path.join(workdir, "tree1"), os.path.join(workdir, "tree2")]
    fill_tree(trees[0], rnd)
    fill_tree(trees[1], random.Random(1616), second=True)
    disk = QemuDisk(workdir, SIZE, "qcow2", "disk").start()
    try:
        cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}})
        ekko = Ekko(workdir, cfg)
        first = make_image(os.path.join(workdir, "one.raw"), trees[0])
        disk.write(0, first)
        full = ekko.backup()
        second = make_image(os.path.join(workdir, "two.raw"), trees[1])
        for off in range(0, SIZE, CHUNK):
            if first[off:off + CHUNK] != second[off:off + CHUNK]:
                disk.write(off, second[off:off + CHUNK])
        inc = ekko.backup()
    finally:
        disk.stop()
    assert (full["kind"], inc["kind"]) == ("full", "incremental")
    yield ekko, workdir, [(full, trees[0]), (inc, trees[1])]
    shutil.rmtree(workdir, ignore_errors=True)


def test_list_a_directory_of_the_incremental(chain):
    ekko, workdir, backups = chain
    inc, tree = backups[1]
    data = ekko.run("files", inc["backup_id"], "/home/ann", json_out=True).data
    assert data["fstype"] == "ext4" and data["filesystem"] == "/dev/sda1"
    got = {e["name"]: e for e in data["entries"]}
    src = os.path.join(tree, "home", "ann")
    assert sorted(got) == sorted(os.listdir(src))
    for name, e in got.items():
        st = os.lstat(os.path.join(src, name))
        kind = "symlink" if os.path.islink(os.path.join(src, name)) else "directory" if os.path.isdir(
            os.path.join(src, name)) else "file"
        assert e["type"] == kind, name
        assert int(e["mtime"]) == int(st.st_mtime), name
        if kind == "file":
            assert (e["size"], e["mode"]) == (st.st_size, f"{st.st_mode & 0o7777:04o}"), name
        if kind == "symlink":
            assert e["target"] == os.readlink(os.path.join(src, name))
    assert "old.txt" not in got and "new.txt" in got


@pytest.mark.parametrize("which", [0, 1])
def test_extract_everything_exactly(chain, which):
    ekko, workdir, backups = chain
    b, tree = backups[which]
    parent = tempfile.mkdtemp(prefix=f"x{which}", dir=workdir)
    into = os.path.join(parent, "out")
    with open("/etc/passwd", "rb") as f:
        passwd = hashlib.sha256(f.read()).hexdigest()
    data = ekko.run("files", b["backup_id"], "/etc", "/home", "--extract", into, json_out=True).data
    assert data["symlinks"] == 3 and data["skipped"] == []
    assert os.listdir(parent) == ["out"]                  # nothing beside DIR
    assert not os.path.lexists("/tmp/escape")
    with open("/etc/passwd", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == passwd
    assert os.readlink(os.path.join(into, "etc", "passwd")) == "/etc/passwd"
    want = {k: v for k, v in snapshot(tree).items()}
    got = snapshot(into)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == want[k], k


def test_errors(chain, workdir):
    ekko, _, backups = chain
    full = backups[0][0]
    p = ekko.run("files", "nosuchbackup", check=False)
    assert p.returncode == 2 and "no backup" in p.stderr
    p = ekko.run("files", full["backup_id"], "/etc/../..", check=False)
    assert p.returncode == 2 and "'..' is not accepted" in p.stderr
    p = ekko.run("files", full["backup_id"], "/a", "/b", check=False)
    assert p.returncode == 2 and "one PATH to list" in p.stderr
    into = os.path.join(workdir, "none")
    p = ekko.run("files", full["backup_id"], "/etc", "/no/such", "--extract", into, check=False)
    assert p.returncode == 2 and "/no/such: no such file or directory" in p.stderr, p.stderr
    assert not os.path.exists(into) or os.listdir(into) == []

"""`ekko files` on guest disks made without a guest (tests/harness/guestimg.py), backed up through
the QMP path, then changed (a file rewritten, one deleted, one added) and backed up again:

- a GPT disk with an ext4 and an XFS file system, an MBR disk with an ext4 and an LVM volume
  (ext4); every file of both backups on every file system listed and extracted, compared with
  the source trees (content, modes, mtimes, symlink targets, hard links); `--fs` and its error;
  the incremental's ext4 has a journal to replay (needs_recovery: a crash-consistent backup);
- a hostile disk: a symlink to /etc/passwd, names with '/' and '..' written raw into ext4
  directory blocks, a 100,000-entry directory (XFS), a 1 TiB file with no block and a sparse
  one, a file system with a corrupted superblock: correct listings or clear errors (exit codes
  of the README), nothing written outside DIR, and nothing mounted on this host
  (/proc/self/mountinfo compared around every command).

Appliance launches are the cost here (15-30 s each under TCG on this machine): one builds every
image; the four file systems of one backup of both disks share one appliance (two drives,
serve.files.Guest.use), through the API; the CLI is run where its output or exit code is what is
tested.
"""

import contextlib
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

from conftest import Ekko, make_config, swift_section
from ekko_libvirt import config
from ekko_libvirt.cli.serve import locate_namespace
from harness import guestimg, in_ci
from harness.qemu import QemuDisk
from tests.swift_fixtures import swift_server  # noqa: F401

if in_ci():      # CI installs it (scripts/install-deps.sh all): missing there is a failure, never a skip
    import guestfs  # noqa: F401
else:
    pytest.importorskip("guestfs", reason="python3-guestfs (scripts/install-deps.sh all)")

MiB = guestimg.MiB
CHUNK = 64 * 1024
SEED = 1616
MANY = 100_000


def write_image(disk, new: bytes, old: bytes) -> None:
    """The chunks of `new` that differ from `old`, written through QEMU in runs of at most 4 MiB."""
    off = 0
    while off < len(new):
        if new[off:off + CHUNK] == old[off:off + CHUNK]:
            off += CHUNK
            continue
        end = off + CHUNK
        while end < len(new) and end - off < 4 * MiB and new[end:end + CHUNK] != old[end:end + CHUNK]:
            end += CHUNK
        disk.write(off, new[off:end])
        off = end


def mounts() -> set:
    with open("/proc/self/mountinfo") as f:
        return set(f.read().splitlines())


DISK_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "msdos", "ntfs", "ntfs3", "iso9660", "squashfs",
           "udf", "hfsplus", "f2fs", "jfs", "reiserfs", "fuse.guestmount", "fuse.fuse2fs", "fuseblk"}


class NoMounts:
    """Around a command: nothing it could have mounted appears in /proc/self/mountinfo. Other
    work on this machine mounts tmpfs and FUSE file systems of its own meanwhile: a new entry
    counts when it is a disk file system (or guestmount, fuse2fs), has a device as its source,
    or names our directory."""

    def __init__(self, workdir):
        self.workdir = workdir

    def __enter__(self):
        self.before = mounts()
        return self

    def __exit__(self, *exc):
        new = mounts() - self.before
        ours = []
        for m in new:
            fstype, source = (m.split(" - ", 1)[1].split() + ["", ""])[:2]
            if fstype in DISK_FS or source.startswith("/dev/") or self.workdir in m:
                ours.append(m)
        assert not ours, f"mounted on the host during the command: {ours}"
        if new:
            print(f"(new mounts by other work meanwhile, not ours: {sorted(new)})")


def run(ekko, workdir, *args, **kw):
    t = time.monotonic()
    with NoMounts(workdir):
        p = ekko.run(*args, **kw)
    print(f"ekko {' '.join(args[:3])}...: exit {p.returncode} in {time.monotonic() - t:.1f} s")
    return p


def backed_up(workdir, name, states, size=guestimg.DISK):
    """A QEMU disk written with each raw image in turn, backed up after each: -> (Ekko, [backups])."""
    d = os.path.join(workdir, name)
    os.makedirs(d)
    disk = QemuDisk(d, size, "qcow2", "disk", model=False).start()
    try:
        ekko = Ekko(d, make_config(d, {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}}))
        before = bytes(size)
        backups = []
        for image in states:
            with open(image, "rb") as f:
                now = f.read()
            write_image(disk, now, before)
            backups.append(ekko.backup())
            before = now
    finally:
        disk.stop()
    assert [b["kind"] for b in backups] == ["full", "incremental"][:len(states)]
    return ekko, backups


@pytest.fixture(scope="session")
def images():
    """Once per session: every image (one appliance launch builds what needs a kernel)."""
    workdir = tempfile.mkdtemp(prefix="ekg", dir="/tmp")
    t = time.monotonic()
    rnd = random.Random(SEED)
    hostile, partial = hostile_image(workdir, rnd)
    imgs = guestimg.build_all(workdir, rnd.randbytes(300 * 1024))
    print(f"guest images built in {time.monotonic() - t:.1f} s (seed {SEED})")
    yield workdir, imgs, hostile, partial
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_disks(images):
    """Both disks, each backed up twice (full, incremental)."""
    workdir, imgs, _, _ = images
    chains = {label: backed_up(workdir, label, getattr(imgs, label)) for label in ("gpt", "mbr")}
    yield workdir, imgs, chains


def guest_of(ekko, backup):
    """(server context, cfg, manifest key) to open a Guest on one backup in this process."""
    from ekko_libvirt.serve import server
    cfg = config.build(ekko.cfg, source=ekko.path)
    ns, key = locate_namespace(cfg, None, backup["backup_id"], None)
    return server.serving(cfg, ns, key)


def expected_tree(tree):
    return guestimg.kept(guestimg.snapshot(tree))


@pytest.mark.parametrize("which", [0, 1])
def test_every_file_of_a_backup_on_every_file_system(guest_disks, which):
    """The full (0) or the incremental (1) of both disks, served at once to one appliance (gpt is
    sda, mbr sdb): four file systems, each listed and extracted whole."""
    from ekko_libvirt.serve import files
    workdir, imgs, chains = guest_disks
    tree = imgs.trees[which]
    want = expected_tree(tree)
    expected = {"/dev/sda1": "ext4", "/dev/sda2": "xfs", "/dev/sdb1": "ext4", "/dev/ekkovg/data": "ext4"}
    t = time.monotonic()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(guest_of(chains[label][0], chains[label][1][which])) for label in ("gpt", "mbr")]
        stack.enter_context(NoMounts(workdir))
        g = stack.enter_context(files.Guest([s.socket for s in servers], "/dev/sda1"))
        usable = {d: t for d, t in g.filesystems.items() if t not in files.NOT_MOUNTABLE}
        assert usable == expected
        for fs, fstype in expected.items():
            g.use(fs)
            assert (g.device, g.fstype) == (fs, fstype)
            entries, refused = g.listdir("/home/ann")
            assert refused == []
            src = os.path.join(tree, "home", "ann")
            assert [e.name for e in entries] == sorted(os.listdir(src))
            for e in entries:
                st = os.lstat(os.path.join(src, e.name))
                assert (e.mtime_ns, e.mode) == (st.st_mtime_ns, st.st_mode & 0o7777), (fs, e.name)
                assert e.size == st.st_size or e.type != "file", (fs, e.name)
            into = os.path.join(workdir, f"x-{which}-{fs.replace('/', '_')}")
            done = files.extract(g, ["/"], into)
            assert done.failed == [] and done.skipped == [] and done.hardlinks == 1, (fs, done)
            got = guestimg.snapshot(into, skip=("lost+found",))
            assert sorted(got) == sorted(want), (fs, set(got) ^ set(want))
            for k in want:
                assert got[k] == want[k], (which, fs, k)
            if fstype == "ext4":
                assert os.listdir(os.path.join(into, "lost+found")) == []
            assert not os.path.lexists("/tmp/ekko-files-escape")
            shutil.rmtree(into)
    print(f"backup {which}: {len(expected)} file systems on 2 disks listed and extracted in "
          f"{time.monotonic() - t:.1f} s (one appliance)")
    # the second state: changed, deleted, added
    assert ("home/ann/old.txt" in want) == (which == 0) and ("home/ann/new.txt" in want) == (which == 1)


def test_fs_choice_and_its_error_through_the_cli(guest_disks):
    workdir, imgs, chains = guest_disks
    ekko, backups = chains["gpt"]
    inc = backups[1]["backup_id"]
    p = run(ekko, workdir, "files", inc, "/home/ann", check=False)
    assert p.returncode == 2, p.stderr
    assert "several file systems: /dev/sda1 (ext4), /dev/sda2 (xfs); choose one with --fs" in p.stderr
    data = run(ekko, workdir, "files", inc, "/home/ann", "--fs", "/dev/sda2", json_out=True).data
    assert (data["filesystem"], data["fstype"], data["refused"]) == ("/dev/sda2", "xfs", [])
    src = os.path.join(imgs.trees[1], "home", "ann")
    assert [e["name"] for e in data["entries"]] == sorted(os.listdir(src))
    for e in data["entries"]:
        st = os.lstat(os.path.join(src, e["name"]))
        assert e["mtime_ns"] == st.st_mtime_ns and e["mode"] == f"{st.st_mode & 0o7777:04o}", e
        if e["type"] == "symlink":
            assert e["target"] == os.readlink(os.path.join(src, e["name"]))
    assert "new.txt" in [e["name"] for e in data["entries"]] and "old.txt" not in [e["name"] for e in data["entries"]]


def test_extract_from_the_lvm_volume_through_the_cli(guest_disks):
    workdir, imgs, chains = guest_disks
    ekko, backups = chains["mbr"]
    into = os.path.join(workdir, "lvm-out")
    p = run(ekko, workdir, "files", backups[0]["backup_id"], "/home", "/etc/passwd", "--fs", "/dev/ekkovg/data",
            "--extract", into)
    assert "hard links from" in p.stdout and "/dev/ekkovg/data" in p.stdout, p.stdout
    want = {k: v for k, v in expected_tree(imgs.trees[0]).items() if k.startswith("home")}
    got = guestimg.snapshot(into)
    assert os.readlink(os.path.join(into, "passwd")) == "/etc/passwd"
    del got["passwd"]
    assert got == want
    shutil.rmtree(into)


def test_files_from_a_swift_replica_alone(guest_disks, request):
    """Issue 18: `ekko files` works from a replica alone. The MBR chain is synced (`ekko sync`) into
    a real Swift; with the source store moved out of reach, a host whose only store is the replica
    extracts the LVM volume's files of the incremental, equal to the source tree (one appliance
    launch: 30-60 s here under TCG)."""
    swift = request.getfixturevalue("swift_server")
    workdir, imgs, chains = guest_disks
    ekko, backups = chains["mbr"]
    site = Ekko(ekko.workdir, dict(ekko.cfg, stores={"site2": swift_section(swift, "test")}))
    done = site.run("sync", "default", "site2", json_out=True).data
    assert sorted(done["namespaces"][0]["copied"]) == sorted(f"t1/{b['backup_id']}" for b in backups), done
    d = os.path.join(workdir, "replica-host")
    os.makedirs(d)
    only = {k: v for k, v in ekko.cfg.items() if k not in ("stores", "targets")}
    host = Ekko(d, dict(only, store=site.cfg["stores"]["site2"], state_dir=os.path.join(d, "state"),
                        run_dir=os.path.join(d, "run")))
    source = ekko.cfg["store"]["path"]
    os.rename(source, source + ".away")          # the replica alone answers
    try:        # the incremental: its unchanged blocks are the full's segments, which the sync had to copy too
        which, b = 1, backups[1]
        into = os.path.join(workdir, "replica-out")
        p = run(host, workdir, "files", b["backup_id"], "/home", "--fs", "/dev/ekkovg/data", "--extract", into)
        assert "/dev/ekkovg/data" in p.stdout, p.stdout
        want = {k: v for k, v in expected_tree(imgs.trees[which]).items() if k.startswith("home")}
        assert "home/ann/new.txt" in want and guestimg.snapshot(into) == want
        shutil.rmtree(into)
    finally:
        os.rename(source + ".away", source)


# -- a hostile disk ---------------------------------------------------------------------------------
EVIL = (1 * MiB, 16 * MiB)
BROKEN = (17 * MiB, 8 * MiB)
MANYFS = (25 * MiB, 96 * MiB)
HOSTILE_DISK = 122 * MiB
HUGE = 1 << 40
PARTIAL = 24 * MiB


def craft(image: str, old: bytes, new: bytes) -> None:
    """Rewrite one directory entry's name in place (same length, name_len and file type byte
    before it; the file system has no metadata checksums to betray it)."""
    assert len(old) == len(new)
    with open(image, "r+b") as f:
        data = f.read()
        pattern = bytes([len(old), 1]) + old
        at = data.find(pattern)
        assert at >= 0 and data.find(pattern, at + 1) < 0, f"{old!r} is not in {image} exactly once"
        f.seek(at + 2)
        f.write(new)


def hostile_image(workdir, rnd):
    """The hostile disk (built on this host, nothing mounted): -> (image, content of partial.img)."""
    tree = os.path.join(workdir, "evil")
    os.makedirs(os.path.join(tree, "etc"))
    os.symlink("/etc/passwd", os.path.join(tree, "etc", "passwd"))
    os.symlink("/", os.path.join(tree, "root-link"))
    with open(os.path.join(tree, "huge.img"), "wb") as f:
        f.truncate(HUGE)                                   # no block at all
    with open(os.path.join(tree, "partial.img"), "wb") as f:
        f.write(rnd.randbytes(8192))
        f.seek(20 * MiB)
        f.write(rnd.randbytes(5000))
        f.truncate(PARTIAL)
    with open(os.path.join(tree, "partial.img"), "rb") as f:
        partial = f.read()
    for d, names in (("crafted", ["ZZescape1", "ok.txt"]), ("dotdot", ["Q7", "fine.txt"])):
        os.makedirs(os.path.join(tree, d))
        for n in names:
            with open(os.path.join(tree, d, n), "wb") as f:
                f.write(n.encode())
    image = os.path.join(workdir, "hostile.raw")
    with open(image, "wb") as f:
        f.truncate(HOSTILE_DISK)
    parts = []
    for n, (off, size) in enumerate((EVIL, BROKEN, MANYFS), 1):
        parts += ["-n", f"{n}:{off // 512}:+{size // 512}"]
    subprocess.run(["sgdisk", "-o", *parts, image], check=True, capture_output=True)
    guestimg.ext4_into(image, EVIL, tree, "-O", "^metadata_csum")
    broken = os.path.join(workdir, "broken")
    os.makedirs(broken)
    with open(os.path.join(broken, "lost.txt"), "wb") as f:
        f.write(b"unreachable\n")
    guestimg.ext4_into(image, BROKEN, broken, "-O", "^metadata_csum")
    # 100,000 entries in one directory: XFS from a protofile (mkfs.xfs's own directory code, a
    # few seconds; mke2fs -d adds them to a linear directory, quadratic: minutes)
    guestimg.xfs_into(image, MANYFS, ("many", [f"f{i:06d}" for i in range(MANY)]))
    craft_and_break(image)
    return image, partial


def craft_and_break(image: str) -> None:
    craft(image, b"ZZescape1", b"../escape")               # Linux refuses a name with '/': EUCLEAN
    craft(image, b"Q7", b"..")                             # a second '..': never listed, never followed
    with open(image, "r+b") as f:                          # s_inodes_per_group = 0: the kernel refuses it
        f.seek(BROKEN[0] + 1024 + 40)
        f.write(struct.pack("<I", 0))


@pytest.fixture(scope="module")
def hostile(images):
    workdir, _, image, partial = images
    ekko, (full,) = backed_up(workdir, "h", [image], HOSTILE_DISK)
    yield workdir, ekko, full["backup_id"], partial


def test_hostile_a_100000_entry_directory_listed_exactly(hostile):
    workdir, ekko, full, _ = hostile
    t = time.monotonic()
    data = run(ekko, workdir, "files", full, "/many", "--fs", "/dev/sda3", json_out=True).data
    print(f"{MANY} entries listed (JSON) in {time.monotonic() - t:.1f} s")
    names = [e["name"] for e in data["entries"]]
    assert names == [f"f{i:06d}" for i in range(MANY)]
    assert all(e["type"] == "file" and e["size"] == 0 and e["mode"] == "0644" for e in data["entries"])
    assert data["refused"] == []


def test_hostile_extract_everything_it_can_and_name_the_rest(hostile):
    workdir, ekko, full, partial = hostile
    parent = tempfile.mkdtemp(prefix="hx", dir=workdir)
    into = os.path.join(parent, "out")
    with open("/etc/passwd", "rb") as f:
        passwd = f.read()
    t = time.monotonic()
    p = run(ekko, workdir, "files", full, "/", "--fs", "/dev/sda1", "--extract", into, json_out=True, check=False)
    print(f"hostile extraction in {time.monotonic() - t:.1f} s")
    assert p.returncode == 3, p.stderr
    data = p.data
    assert [f["path"] for f in data["failed"]] == ["/crafted"], data["failed"]
    assert re.search("Structure needs cleaning|cannot be read whole", data["failed"][0]["error"]), data["failed"]
    assert "not extracted: /crafted: " in p.stderr and "1 entries could not be read" in p.stderr
    assert os.listdir(parent) == ["out"]                   # nothing beside DIR, no "escape" anywhere
    assert os.listdir(into + "/crafted") == []
    assert sorted(os.listdir(into + "/dotdot")) == ["fine.txt"]      # the crafted '..' is not an entry
    with open("/etc/passwd", "rb") as f:
        assert f.read() == passwd
    assert os.readlink(os.path.join(into, "etc", "passwd")) == "/etc/passwd"
    assert os.readlink(os.path.join(into, "root-link")) == "/"
    st = os.stat(os.path.join(into, "huge.img"))
    assert st.st_size == HUGE and st.st_blocks == 0
    with open(os.path.join(into, "partial.img"), "rb") as f:
        assert f.read() == partial
    assert os.stat(os.path.join(into, "partial.img")).st_blocks * 512 <= 2 * 2 * MiB
    assert data["files"] == 3 and data["skipped"] == []      # huge, partial, dotdot/fine.txt


def test_hostile_a_corrupted_superblock_is_a_clear_error(hostile):
    workdir, ekko, full, _ = hostile
    into = os.path.join(workdir, "never")
    p = run(ekko, workdir, "files", full, "/", "--fs", "/dev/sda2", "--extract", into, check=False)
    assert p.returncode == 3, p.stderr
    assert "/dev/sda2 (ext4) cannot be mounted read-only" in p.stderr and "damaged in this backup" in p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith("ekko: error:")]) == 1, p.stderr
    assert not os.path.exists(into)


def test_errors_through_the_cli(guest_disks):
    """Bad input: exit 2 naming what is wrong; nothing written (tests/integration/test_files.py
    had these, on the GPT + ext4 disk it made; this file's disks cover what it did)."""
    workdir, _, chains = guest_disks
    ekko, backups = chains["gpt"]
    full = backups[0]["backup_id"]
    p = ekko.run("files", "nosuchbackup", check=False)
    assert p.returncode == 2 and "no backup" in p.stderr
    p = ekko.run("files", full, "/etc/../..", check=False)
    assert p.returncode == 2 and "'..' is not accepted" in p.stderr
    p = ekko.run("files", full, "/a", "/b", check=False)
    assert p.returncode == 2 and "one PATH to list" in p.stderr
    p = ekko.run("files", full, "--extract", os.path.join(workdir, "x"), check=False)
    assert p.returncode == 2 and "give the guest PATHs to extract" in p.stderr
    into = os.path.join(workdir, "none")
    p = run(ekko, workdir, "files", full, "/etc", "/no/such", "--fs", "/dev/sda1", "--extract", into, check=False)
    assert p.returncode == 2 and "/no/such: no such file or directory in /dev/sda1" in p.stderr, p.stderr
    assert not os.path.exists(into)

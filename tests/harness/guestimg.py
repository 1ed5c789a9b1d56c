"""Guest disks made without a guest, for `ekko files` (tests/integration/test_files_fs.py).

Nothing is mounted on this host. ext4 is made from a directory tree by `mke2fs -d` into the
image file; XFS is made empty by `mkfs.xfs` on the image file and filled inside a libguestfs
appliance (guestfs `tar_in`: GNU tar keeps modes, mtimes, symlinks, hard links); the LVM
physical volume, volume group and logical volume are made inside the same appliance. One
appliance launch builds every image of a session (`build_all`), and the results are kept in the
session's temporary directory.

The disks (each as two raw images: the state of the full backup, and the state after one file
was changed, one deleted and one added):

    gpt   96 MiB  GPT   p1 ext4 (mke2fs -d)   p2 XFS (tar_in)
    mbr   96 MiB  MBR   p1 ext4 (mke2fs -d)   p2 LVM PV -> VG ekkovg -> LV data, ext4 (tar_in)
    (the second state of gpt's ext4 also has needs_recovery set: a crash-consistent backup's
     journal, which a read-only mount must cope with)

The trees (`make_tree`) hold regular files of several modes (setuid and sticky included),
integer mtimes (what mke2fs -d keeps), symlinks absolute, relative, dangling and pointing out
of the tree, a hard link, empty directories, names with spaces, a newline, a tab, UTF-8 and 255
bytes. `snapshot` reads a tree (the source, or what ekko extracted) for comparison.
"""

import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

MiB = 1024 * 1024
DISK = 96 * MiB
P1 = (1 * MiB, 40 * MiB)                # (offset, size) of partition 1 on both disks
P2 = (41 * MiB, DISK - 42 * MiB)        # partition 2: the rest, less GPT's backup header
MTIME0 = 1_600_000_000
LONG = "L" * 251 + ".txt"                # 255 bytes, the longest name ext4 and XFS take


def make_tree(root: str, seed_bytes: bytes, second: bool = False) -> None:
    """The guest's files. `second`: notes.txt changed (its hard link with it), old.txt deleted,
    new.txt added; the directory they are in keeps the first state's mtime."""
    dirs = {"etc": 0o755, "etc/ssh": 0o755, "home": 0o755, "home/ann": 0o700, "home/ann/empty": 0o755,
            "dir with space": 0o750, "ünïcødé": 0o755, "tmp": 0o1777, "srv/deep/er/still": 0o711,
            "srv": 0o755, "srv/deep": 0o755, "srv/deep/er": 0o755}
    files: Dict[str, Tuple[bytes, int]] = {
        "etc/hostname": (b"vm1\n", 0o644),
        "etc/ssh/sshd_config": (b"PermitRootLogin no\n" * 50, 0o600),
        "home/ann/notes.txt": (b"first version\n", 0o640),
        "home/ann/big.bin": (seed_bytes, 0o750),
        "home/ann/two\nlines": (b"a name with a newline\n", 0o644),
        "home/ann/tab\there": (b"a tab\n", 0o644),
        "home/ann/old.txt": (b"deleted later\n", 0o444),
        "home/ann/empty.txt": (b"", 0o644),
        "dir with space/file with space.txt": (b"spaces\n", 0o664),
        "ünïcødé/файл.txt": ("юникод\n".encode(), 0o644),
        "ünïcødé/" + LONG: (b"long name\n", 0o600),
        "srv/deep/er/still/setuid-tool": (b"#!/bin/sh\n", 0o4755),
        "srv/-dash": (b"starts with a dash\n", 0o644),
        "srv/zeros.bin": (bytes(200 * 1024), 0o644),
    }
    if second:
        files["home/ann/notes.txt"] = (b"second version, longer than the first one\n", 0o640)
        del files["home/ann/old.txt"]
        files["home/ann/new.txt"] = (b"added after the full\n", 0o600)
    for d in sorted(dirs):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i, (rel, (data, mode)) in enumerate(sorted(files.items())):
        p = os.path.join(root, rel)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        os.utime(p, (MTIME0 + i * 3600, MTIME0 + i * 3600))
    os.link(os.path.join(root, "home/ann/notes.txt"), os.path.join(root, "home/ann/notes-hardlink"))
    links = {"etc/passwd": "/etc/passwd", "home/ann/host": "../../etc/hostname",
             "home/ann/up": "../../../../../../../tmp/ekko-files-escape", "srv/dangling": "no/such/file",
             "ünïcødé/ссылка": "файл.txt"}
    for i, (rel, target) in enumerate(sorted(links.items())):
        os.symlink(target, os.path.join(root, rel))
        os.utime(os.path.join(root, rel), (MTIME0 + 7 * i, MTIME0 + 7 * i), follow_symlinks=False)
    for i, d in enumerate(sorted(dirs, key=lambda d: -d.count("/"))):      # deepest first: children are done
        os.chmod(os.path.join(root, d), dirs[d])
        os.utime(os.path.join(root, d), (MTIME0 + 100_000 + i, MTIME0 + 100_000 + i))


def snapshot(root: str, skip: Tuple[str, ...] = ()) -> Dict[str, tuple]:
    """rel path -> (type, mode, mtime ns, content or target) of everything below root; for
    files also the rel path of the first name of their inode (hard links)."""
    out: Dict[str, tuple] = {}
    first: Dict[Tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel in skip:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", st.st_mtime_ns, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("directory", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    data = f.read()
                ident = first.setdefault((st.st_dev, st.st_ino), rel)
                out[rel] = ("file", st.st_mode & 0o7777, st.st_mtime_ns, data, ident)
    return out


def kept(snap: Dict[str, tuple]) -> Dict[str, tuple]:
    """What an extraction must give for a source snapshot: setuid/setgid bits dropped."""
    return {k: (v[0], v[1] & 0o1777) + v[2:] if v[0] != "symlink" else v for k, v in snap.items()}


# -- images -----------------------------------------------------------------------------------
def _run(*cmd: str, env=None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")


def ext4_into(image: str, part: Tuple[int, int], tree: str, *extra: str) -> None:
    """An ext4 file system made from `tree` at partition `part` of `image` (no mount)."""
    off, size = part
    _run("mke2fs", "-q", "-F", "-t", "ext4", *extra, "-d", tree, "-E", f"offset={off},nodiscard",
         image, f"{size // 1024}k")


def xfs_into(image: str, part: Tuple[int, int], empty_files: Optional[Tuple[str, List[str]]] = None) -> None:
    """An XFS at `part` of `image` (made in a temp file spliced in: mkfs.xfs has no offset
    option); empty, or with one directory of empty files (name, [names]) from a protofile.
    mkfs.xfs refuses file systems under 300 MB unless told it is a test run."""
    off, size = part
    tmp = image + ".xfs"
    with open(tmp, "wb") as f:
        f.truncate(size)
    env = dict(os.environ, TEST_DIR="1", TEST_DEV="1", QA_CHECK_FS="1")
    proto = []
    if empty_files is not None:
        # boot image, blocks and inodes (ignored), the root, then the entries; "$" ends a directory
        proto = ["-i", "maxpct=90", "-p", tmp + ".proto"]
        with open(tmp + ".proto", "w") as f:
            f.write(f"/dev/null\n0 0\nd--755 0 0\n{empty_files[0]} d--755 0 0\n")
            f.writelines(f"{n} ---644 0 0 /dev/null\n" for n in empty_files[1])
            f.write("$\n$\n")
    _run("mkfs.xfs", "-q", "-f", "-K", *proto, tmp, env=env)
    if proto:
        os.unlink(tmp + ".proto")
    splice(image, off, tmp)
    os.unlink(tmp)


def splice(image: str, off: int, piece: str) -> None:
    with open(piece, "rb") as src, open(image, "r+b") as dst:
        dst.seek(off)
        shutil.copyfileobj(src, dst, 4 * MiB)


def partition_copy(image: str, part: Tuple[int, int], out: str) -> None:
    with open(image, "rb") as src, open(out, "wb") as dst:
        src.seek(part[0])
        left = part[1]
        while left:
            b = src.read(min(left, 4 * MiB))
            dst.write(b)
            left -= len(b)


def set_needs_recovery(image: str, part: Tuple[int, int]) -> None:
    """Mark the ext4 at `part` as having a journal to replay (the state of a file system backed
    up while mounted), through debugfs on a copy of the partition (the superblock checksum stays
    right)."""
    tmp = image + ".p"
    partition_copy(image, part, tmp)
    _run("debugfs", "-w", "-R", "feature needs_recovery", tmp)
    splice(image, part[0], tmp)
    os.unlink(tmp)


def tarball(tree: str, out: str) -> None:
    """`tree` as a GNU tar (hard links as links; names are bytes of UTF-8)."""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT, encoding="utf-8") as t:
        for name in sorted(os.listdir(tree)):
            t.add(os.path.join(tree, name), arcname=name, recursive=True)


def blank(path: str, label: str) -> None:
    with open(path, "wb") as f:
        f.truncate(DISK)
    if label == "gpt":
        _run("sgdisk", "-o", "-n", f"1:{P1[0] // 512}:+{P1[1] // 512}", "-t", "1:8300",
             "-n", f"2:{P2[0] // 512}:+{P2[1] // 512}", "-t", "2:8300", path)
    else:
        script = f"label: dos\nstart={P1[0] // 512}, size={P1[1] // 512}, type=83\n" \
                 f"start={P2[0] // 512}, size={P2[1] // 512}, type=8e\n"
        p = subprocess.run(["sfdisk", "-q", path], input=script, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"sfdisk: {p.stderr}")


@dataclass
class Images:
    trees: List[str]                       # [state 1 tree, state 2 tree]
    gpt: List[str]                         # raw images, per state
    mbr: List[str]


def build_all(workdir: str, seed_bytes: bytes) -> Images:
    """Both trees, both disks in both states; one libguestfs appliance for everything that needs
    a kernel (XFS filling, LVM, the changes of the second state inside XFS and the LV)."""
    import guestfs                    # python3-guestfs: system Python 3.11 only
    trees = [os.path.join(workdir, "tree1"), os.path.join(workdir, "tree2")]
    make_tree(trees[0], seed_bytes)
    make_tree(trees[1], seed_bytes, second=True)
    tars = [os.path.join(workdir, "tree1.tar"), os.path.join(workdir, "tree2.tar")]
    for tree, tar in zip(trees, tars, strict=True):
        tarball(tree, tar)
    imgs = Images(trees, [os.path.join(workdir, f"gpt{i}.raw") for i in (1, 2)],
                  [os.path.join(workdir, f"mbr{i}.raw") for i in (1, 2)])
    for i in (0, 1):
        blank(imgs.gpt[i], "gpt")
        ext4_into(imgs.gpt[i], P1, trees[i])
        xfs_into(imgs.gpt[i], P2)
        blank(imgs.mbr[i], "mbr")
        ext4_into(imgs.mbr[i], P1, trees[i])
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])          # no KVM for the appliance here (README "Files inside")
    for path in imgs.gpt + imgs.mbr:
        g.add_drive_opts(path, format="raw", readonly=0)
    g.launch()
    try:
        # sda gpt1, sdb gpt2, sdc mbr1, sdd mbr2
        for dev, tar in (("/dev/sda2", tars[0]), ("/dev/sdb2", tars[1])):
            g.mount(dev, "/")
            g.tar_in(tar, "/")
            g.umount_all()
        g.pvcreate("/dev/sdc2")
        g.vgcreate("ekkovg", ["/dev/sdc2"])
        g.lvcreate_free("data", "ekkovg", 100)
        g.mkfs("ext4", "/dev/ekkovg/data")
        g.mount("/dev/ekkovg/data", "/")
        g.tar_in(tars[0], "/")
        g.umount_all()
        g.vg_activate(False, ["ekkovg"])
        # mbr2 gets mbr1's PV (the VG with the first tree) byte for byte, then the second tree's
        # changes, with LVM looking at sdd alone (two PVs of one UUID would clash)
        g.copy_device_to_device("/dev/sdc2", "/dev/sdd2")
        g.lvm_set_filter(["/dev/sdd"])
        g.vg_activate(True, ["ekkovg"])
        change(g, "/dev/ekkovg/data", trees[1])
        g.vg_activate(False, ["ekkovg"])
        g.sync()
    finally:
        g.shutdown()
        g.close()
    set_needs_recovery(imgs.gpt[1], P1)
    return imgs


def change(g, device: str, tree2: str) -> None:
    """The second state's changes (notes.txt rewritten, old.txt deleted, new.txt added) made in
    the file system `device`, with the second tree's modes and mtimes."""
    g.mount(device, "/")
    g.rm("/home/ann/old.txt")
    for rel in ("home/ann/notes.txt", "home/ann/new.txt"):
        src = os.path.join(tree2, rel)
        st = os.lstat(src)
        g.upload(src, "/" + rel)          # notes.txt: rewritten in place, its hard link follows
        g.chmod(st.st_mode & 0o7777, "/" + rel)
        g.utimens("/" + rel, st.st_mtime_ns // 10 ** 9, 0, st.st_mtime_ns // 10 ** 9, 0)
    st = os.lstat(os.path.join(tree2, "home/ann"))
    g.utimens("/home/ann", st.st_mtime_ns // 10 ** 9, 0, st.st_mtime_ns // 10 ** 9, 0)
    g.umount_all()

"""serve/files.py's pure parts and its writer into DIR: guest paths, hostile names from a guest
directory, where each extracted entry lands, and that no write follows a symlink or leaves DIR."""

import os

import pytest

from ekko_libvirt.errors import UsageError
from ekko_libvirt.serve import files
from ekko_libvirt.serve.files import Entry, FilesError


def test_guest_path_normal_form():
    assert files.guest_path("") == "/"
    assert files.guest_path("etc//ssh/./sshd_config") == "/etc/ssh/sshd_config"
    assert files.guest_path("/home/ann/") == "/home/ann"


@pytest.mark.parametrize("bad", ["..", "../etc", "/etc/../../root", "a/b/../../../x"])
def test_guest_path_refuses_dotdot(bad):
    with pytest.raises(UsageError, match=r"'\.\.' is not accepted"):
        files.guest_path(bad)


def test_guest_path_refuses_nul():
    with pytest.raises(UsageError, match="NUL"):
        files.guest_path("/etc\0/passwd")


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "x\0y"])
def test_hostile_names_from_the_guest_are_refused(bad):
    with pytest.raises(FilesError, match="refusing it"):
        files.check_name(bad)


def test_names_with_newlines_are_valid_and_printed_escaped():
    assert files.check_name("two\nlines") == "two\nlines"
    assert files.printable("two\nlines") == "two\\nlines"
    assert files.printable("plain name") == "plain name"


def test_destination_under_dir():
    assert files.destination("/etc", "/etc") == ["etc"]
    assert files.destination("/etc", "/etc/ssh/sshd_config") == ["etc", "ssh", "sshd_config"]
    assert files.destination("/", "/etc/passwd") == ["etc", "passwd"]
    assert files.destination("/etc/passwd", "/etc/passwd") == ["passwd"]
    assert files.destination("/", "/") == []


def test_destination_outside_the_root_is_refused():
    with pytest.raises(FilesError, match="is not inside"):
        files.destination("/etc", "/etcetera/x")
    with pytest.raises(UsageError, match="not accepted"):
        files.destination("/etc", "/etc/../root")


def test_kept_mode_drops_setuid_setgid():
    assert files.kept_mode(0o4755) == 0o755
    assert files.kept_mode(0o2750) == 0o750
    assert files.kept_mode(0o1777) == 0o1777


def test_choose_filesystem():
    assert files.choose_filesystem({"/dev/sda1": "ext4", "/dev/sda2": "swap"}, None) == ("/dev/sda1", "ext4")
    assert files.choose_filesystem({"/dev/sda1": "ext4", "/dev/vg/root": "xfs"}, "/dev/vg/root") == (
        "/dev/vg/root", "xfs")
    with pytest.raises(FilesError, match="several file systems: /dev/sda1 \\(ext4\\), /dev/sda2 \\(xfs\\)"):
        files.choose_filesystem({"/dev/sda1": "ext4", "/dev/sda2": "xfs"}, None)
    with pytest.raises(FilesError, match="no file system found"):
        files.choose_filesystem({"/dev/sda": "unknown"}, None)
    with pytest.raises(FilesError, match="no file system /dev/sdb1"):
        files.choose_filesystem({"/dev/sda1": "ext4"}, "/dev/sdb1")


def test_entry_of_lstatns():
    st = {"st_mode": 0o120777, "st_size": 11, "st_mtime_sec": 1700000000, "st_mtime_nsec": 5}
    e = files.entry_of("/etc", "passwd", st, "/etc/passwd")
    assert e == Entry("passwd", "/etc/passwd", "symlink", 11, 0o777, 1700000000 * 10**9 + 5, "/etc/passwd")
    assert e.as_dict()["mode"] == "0777"


def entry(kind, mode=0o644, target=None, mtime=1600000000):
    return Entry("x", "/x", kind, 0, mode, mtime * 10**9, target)


def test_writer_keeps_symlinks_as_symlinks_and_never_follows_them(tmp_path):
    into = tmp_path / "out"
    w = files.Writer(str(into))
    w.directory(["etc"], entry("directory", 0o555))
    w.symlink(["etc", "passwd"], entry("symlink", 0o777, "/etc/passwd"))
    w.symlink(["etc", "up"], entry("symlink", 0o777, "../../../../outside"))
    w.file(["etc", "motd"], entry("file", 0o4640), lambda fd: os.write(fd, b"hi\n"))
    # a file "through" the guest's symlink: refused (the link is not followed), nothing written there
    with pytest.raises(OSError):
        w.file(["etc", "passwd", "x"], entry("file"), lambda fd: os.write(fd, b"owned"))
    with pytest.raises(FilesError, match="exists: not overwritten"):
        w.file(["etc", "passwd"], entry("file"), lambda fd: os.write(fd, b"owned"))
    w.finish()
    w.close()
    assert os.readlink(into / "etc" / "passwd") == "/etc/passwd"
    assert os.readlink(into / "etc" / "up") == "../../../../outside"
    assert os.lstat(into / "etc" / "passwd").st_mtime == 1600000000
    assert (into / "etc" / "motd").read_bytes() == b"hi\n"
    assert oct(os.stat(into / "etc" / "motd").st_mode & 0o7777) == oct(0o640)
    assert oct(os.stat(into / "etc").st_mode & 0o7777) == oct(0o555)
    assert not (tmp_path / "outside").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_writer_refuses_a_symlink_planted_in_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    into = tmp_path / "out"
    into.mkdir()
    os.symlink(str(outside), into / "etc")
    w = files.Writer(str(into))
    with pytest.raises(OSError):
        w.file(["etc", "shadow"], entry("file"), lambda fd: os.write(fd, b"x"))
    w.close()
    assert os.listdir(outside) == []
    with pytest.raises(OSError):
        files.Writer(str(into / "etc"))      # DIR itself a symlink: not followed either


def test_writer_names_with_newlines(tmp_path):
    w = files.Writer(str(tmp_path))
    w.file(["a\nb"], entry("file"), lambda fd: os.write(fd, b"z"))
    w.close()
    assert os.listdir(tmp_path) == ["a\nb"]


def test_human_listing_line():
    from ekko_libvirt.cli.files import _line
    link = Entry("pass\nwd", "/etc/pass\nwd", "symlink", 11, 0o777, 1_600_000_000 * 10**9, "/etc/passwd")
    assert _line(link) == "lrwxrwxrwx           11 2020-09-13 12:26:40 pass\\nwd -> /etc/passwd"
    d = Entry("ann", "/home/ann", "directory", 1024, 0o700, 0, None)
    assert _line(d) == "drwx------         1024 1970-01-01 00:00:00 ann"


# -- copy plans, sparse copies, hard links, failures (issue 16 hardening) ----------------------------
def sized(size, blocks, kind="file"):
    return Entry("f", "/f", kind, size, 0o644, 0, None, blocks)


def test_copy_plan():
    assert files.copy_plan(sized(0, 0)) == "empty"
    assert files.copy_plan(sized(0, 8)) == "empty"
    # no block and bigger than any inline data: all hole (a 1 TiB sparse file costs nothing)
    assert files.copy_plan(sized(1 << 40, 0)) == "hole"
    assert files.copy_plan(sized(files.INLINE_MAX + 1, 0)) == "hole"
    # no block but small enough to live in the inode (ext4 inline_data): read it
    assert files.copy_plan(sized(60, 0)) == "sparse"
    assert files.copy_plan(sized(files.INLINE_MAX, 0)) == "sparse"
    assert files.copy_plan(sized(1 << 30, 8)) == "sparse"
    assert files.copy_plan(sized(4096, 8)) == "dense"
    assert files.copy_plan(sized(4097, 8)) == "sparse"
    assert files.copy_plan(sized(4096, 16)) == "dense"     # preallocated beyond its size


def test_accel_order():
    assert files.accel_order(kvm_device=True, forced_tcg=False, refused_here=False) == [False, True]
    assert files.accel_order(kvm_device=False, forced_tcg=False, refused_here=False) == [True]
    assert files.accel_order(kvm_device=True, forced_tcg=True, refused_here=False) == [True]
    assert files.accel_order(kvm_device=True, forced_tcg=False, refused_here=True) == [True]


def test_kvm_refusal_is_remembered_per_qemu_and_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBGUESTFS_CACHEDIR", str(tmp_path))
    assert files._verdict_path() is None                   # libguestfs' directory not there: nothing kept
    d = tmp_path / f".guestfs-{os.getuid()}"
    d.mkdir(mode=0o755)
    path = files._verdict_path()
    assert path == str(d / "ekko-kvm-refused.json") and not files._refused(path)
    files._remember_refusal(path, "failed to set MSR 0x10a\nto 0x69")
    assert files._refused(path)
    monkeypatch.setattr(files, "_host_key", lambda: {"kernel": "another"})
    assert not files._refused(path)                        # a new kernel or QEMU: KVM is tried again
    (d / "ekko-kvm-refused.json").write_text("not json")
    assert not files._refused(path)
    os.chmod(d, 0o777)                                     # writable by others: not trusted
    assert files._verdict_path() is None


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_fill_sparse_writes_data_and_leaves_zero_pieces_as_holes(tmp_path, seed):
    import random
    rnd = random.Random(seed)
    print("seed", seed)
    piece = files.PIECE
    size = rnd.randrange(3 * piece, 12 * piece)
    dense = seed == 9                      # a dense file: every piece written, zero ones too
    content = bytearray(size)
    for _ in range(rnd.randrange(1, 4)):                  # a few data runs, anywhere, any length
        off = rnd.randrange(size)
        n = rnd.randrange(1, min(size - off, piece * 2) + 1)
        content[off:off + n] = rnd.randbytes(n)
    calls = []

    def read(n, off):
        calls.append((off, n))
        return bytes(content[off:off + n])
    out = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = files.fill_sparse(read, size, out, holes=not dense)
    finally:
        os.close(out)
    assert (tmp_path / "f").read_bytes() == bytes(content)
    data_pieces = [o for o in range(0, size, piece) if any(content[o:o + piece]) or dense]
    assert written == sum(min(piece, size - o) for o in data_pieces)
    assert calls == [(o, min(piece, size - o)) for o in range(0, size, piece)]
    # the zero pieces are holes: allocation at most the data pieces (plus a block each side)
    assert os.stat(tmp_path / "f").st_blocks * 512 <= written + 2 * 4096 * len(data_pieces) + 4096


def test_fill_sparse_short_read_is_damage(tmp_path):
    out = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(files.DamagedFileSystem, match="short read: 10 of 4096 bytes at offset 0"):
            files.fill_sparse(lambda n, off: b"x" * 10, 4096, out)
    finally:
        os.close(out)


class FakeGuest:
    """A guest tree in memory, as serve.files.Guest answers: stat, walk (with its failure
    callback) and read; `bad_dirs` cannot be listed, `bad_files` fail their read (half-way)."""

    def __init__(self, tree, bad_dirs=(), bad_files=(), refused=()):
        self.tree, self.bad_dirs, self.bad_files, self.refused = tree, set(bad_dirs), set(bad_files), refused

    def stat(self, path):
        return self.tree[path]

    def walk(self, path, failed):
        yield self.tree[path]
        for p in sorted(self.tree):
            if p.startswith(path.rstrip("/") + "/") and p != path:
                if any(p.startswith(b + "/") for b in self.bad_dirs):
                    continue
                yield self.tree[p]
        for b in sorted(self.bad_dirs):
            failed(b, "Structure needs cleaning")
        for r in self.refused:
            failed(r, "not a single path component: refused")

    def _data(self, path):
        if path in self.bad_files:
            raise files.DamagedFileSystem(f"{path}: Input/output error")
        return self.tree[path].name.encode() * 3

    def read(self, path, n, off):
        if path in self.bad_files and off > 0:
            raise files.DamagedFileSystem(f"{path}: Input/output error")
        data = self.tree[path].name.encode() * 3 if path not in self.bad_files else bytes(self.tree[path].size)
        return data[off:off + n]


def node(path, kind, size=0, ino=0, nlink=1, target=None, blocks=None):
    name = path.rsplit("/", 1)[1] or "/"
    return Entry(name, path, kind, size, 0o644 if kind != "directory" else 0o755, 1_600_000_000 * 10**9, target,
                 (size + 511) // 512 if blocks is None else blocks, ino, nlink)


def test_extract_keeps_hard_links_and_names_what_it_cannot_read(tmp_path):
    tree = {p: node(p, k, **kw) for p, k, kw in [
        ("/", "directory", {}), ("/d", "directory", {}), ("/d/a", "file", {"size": 3, "ino": 5, "nlink": 2}),
        ("/d/b", "file", {"size": 3, "ino": 5, "nlink": 2}), ("/d/c", "file", {"size": 3, "ino": 6}),
        ("/bad", "directory", {}), ("/bad/x", "file", {"size": 3}), ("/broken", "file", {"size": files.PIECE + 10}),
        ("/huge", "file", {"size": 1 << 40, "blocks": 0}), ("/empty", "file", {}),
        ("/l", "symlink", {"target": "/etc/passwd"}), ("/fifo", "fifo", {})]}
    g = FakeGuest(tree, bad_dirs=["/bad"], bad_files=["/broken"], refused=["/d/../x"])
    into = tmp_path / "out"
    done = files.extract(g, ["/"], str(into))
    assert (done.files, done.hardlinks, done.directories, done.symlinks) == (4, 1, 3, 1)
    assert done.skipped == ["/fifo"]
    assert done.failed == [("/broken", "/broken: Input/output error"), ("/bad", "Structure needs cleaning"),
                           ("/d/../x", "not a single path component: refused")]
    assert os.stat(into / "d" / "a").st_ino == os.stat(into / "d" / "b").st_ino
    assert os.stat(into / "d" / "a").st_nlink == 2 and (into / "d" / "b").read_bytes() == b"aaa"
    assert os.stat(into / "d" / "c").st_nlink == 1
    assert not (into / "broken").exists()                 # the half-written copy removed
    assert os.listdir(into / "bad") == []
    st = os.stat(into / "huge")
    assert st.st_size == 1 << 40 and st.st_blocks == 0    # a hole: nothing read, nothing allocated
    assert (into / "empty").read_bytes() == b""
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_reason_drops_the_function_prefix():
    assert files._reason(RuntimeError("mount_ro: /dev/sda2 on / (options: 'ro'): mount: bad\n superblock")) == (
        "/dev/sda2 on / (options: 'ro'): mount: bad superblock")
    assert files._reason(RuntimeError("no prefix here")) == "no prefix here"


class FakeHandle:
    """libguestfs' handle as Guest calls it: each method answers from `answers` (a value, or an
    exception raised as the binding raises RuntimeError)."""

    def __init__(self, **answers):
        self.answers, self.calls = answers, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name,) + args)
            a = self.answers[name]
            if isinstance(a, Exception):
                raise a
            return a
        return call


def guest_on(handle, device="/dev/sda1", fstype="ext4"):
    g = files.Guest.__new__(files.Guest)          # no appliance: the handle is the fake
    g.g, g.device, g.fstype, g.filesystems = handle, device, fstype, {device: fstype, "/dev/sda2": "xfs"}
    return g


def test_a_directory_the_kernel_refuses_part_way_is_damage_not_a_short_listing():
    # ls streams the names and loses the kernel's error; readdir ends quietly with what came before it
    h = FakeHandle(ls=RuntimeError("ls: file receive cancelled by daemon"), readdir=[{"name": "."}, {"name": "ok"}])
    with pytest.raises(files.DamagedFileSystem, match=r"^/crafted: the directory cannot be read whole"):
        guest_on(h)._names("/crafted")
    assert [c[0] for c in h.calls] == ["ls", "readdir"]
    # readdir that says why: its reason
    h = FakeHandle(ls=RuntimeError("ls: file receive cancelled by daemon"),
                   readdir=RuntimeError("readdir: /crafted: Structure needs cleaning"))
    with pytest.raises(files.DamagedFileSystem, match=r"Structure needs cleaning .*reading /dev/sda1 \(ext4\)"):
        guest_on(h)._names("/crafted")
    # another failure of ls is the appliance's (exit 1), not damage
    h = FakeHandle(ls=RuntimeError("ls: connection lost"))
    with pytest.raises(files.ApplianceError, match="libguestfs ls: ls: connection lost"):
        guest_on(h)._names("/x")


@pytest.mark.parametrize("message, error", [
    ("lstatns: /x: No such file or directory", FilesError),
    ("lstatns: /x/y: Not a directory", FilesError),
    ("pread: /x: Input/output error", files.DamagedFileSystem),
    ("pread: /x: Bad message", files.DamagedFileSystem),
    ("lstatns: /x: Structure needs cleaning", files.DamagedFileSystem),
    ("lstatns: something else", files.ApplianceError),
])
def test_appliance_errors_are_sorted_by_their_strerror(message, error):
    h = FakeHandle(lstatns=RuntimeError(message))
    with pytest.raises(error):
        guest_on(h)._call("lstatns", "/x")


def test_use_mounts_another_file_system_and_a_refused_mount_is_damage():
    h = FakeHandle(umount_all=None, mount_ro=None)
    g = guest_on(h)
    g.use("/dev/sda2")
    assert (g.device, g.fstype) == ("/dev/sda2", "xfs") and h.calls == [("umount_all",), ("mount_ro", "/dev/sda2", "/")]
    h.answers["mount_ro"] = RuntimeError("mount_ro: /dev/sda1 on / (options: 'ro'): mount: can't read superblock")
    with pytest.raises(files.DamagedFileSystem, match=r"^/dev/sda1 \(ext4\) cannot be mounted read-only: /dev/sda1 "
                       r"on / \(options: 'ro'\): mount: can't read superblock; the file system is damaged"):
        g.use("/dev/sda1")
    assert g.device == ""                          # nothing mounted, and the Guest says so
    with pytest.raises(FilesError, match="no file system /dev/sdb1"):
        g.use("/dev/sdb1")

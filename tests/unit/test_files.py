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

"""Files inside a backup's guest file systems: `ekko files BACKUP [PATH]` lists a directory,
`ekko files BACKUP PATH... --extract DIR` copies files and trees out.

    ekko serve (server.serving: nbdkit, read-only, unix socket)
      -> libguestfs appliance (its own kernel in a QEMU of its own: the drive is the NBD export,
         format raw, read-only; partitions, LVM, ext4/XFS are parsed in there, never by this host)
      -> Guest (below): one handle per command, the chosen file system mounted read-only on /
      -> listing (Entry) or extraction into DIR

The pure parts come first and have unit tests (tests/unit/test_files.py): what a guest path
the user gave means (`guest_path`), which names from a guest directory are acceptable
(`check_name`), where each extracted entry lands under DIR (`destination`), which mode bits are
kept (`kept_mode`). The writes into DIR (`Writer`) never follow a symlink and never leave DIR:
every directory is opened relative to its parent's descriptor with O_NOFOLLOW, every file is
created with O_EXCL|O_NOFOLLOW, and symlinks are made as symlinks, their targets never resolved
(a guest's `etc/passwd -> /etc/passwd` is extracted as exactly that link). Nothing existing in DIR
is overwritten. Owners are not restored; setuid/setgid bits are dropped (the files belong to
whoever runs ekko, root: a guest's setuid binary must not become a setuid-root one here).

libguestfs (Debian python3-guestfs, system Python 3.11 only) is imported when a command needs
it. The appliance runs under KVM when /dev/kvm works and TCG otherwise (LIBGUESTFS_BACKEND=direct
unless set).
"""

import errno
import importlib
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import EkkoError, UsageError

log = logging.getLogger("ekko.files")

# lstatns' st_mode file type -> our name for it
TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
# file systems worth mounting: what list_filesystems reports that is not one
NOT_MOUNTABLE = {"swap", "unknown", "luks", "crypto_LUKS", "LVM2_member", "linux_raid_member"}


class FilesError(EkkoError):
    """A file-level request that cannot be met as asked (exit 2): no file system, no such path,
    a destination that exists, a guest name that cannot be extracted safely."""
    exit_code = 2


class ApplianceError(EkkoError):
    """The libguestfs appliance could not start or failed (exit 1); the message is its own."""


# -- pure parts ---------------------------------------------------------------------------------
def guest_path(text: str) -> str:
    """A path in the guest file system as given by the user -> its absolute normal form.
    '.' and repeated slashes go; '..' is refused (it has no meaning worth guessing at here,
    and a path with it is the usual way out of where one meant to be)."""
    if "\0" in text:
        raise UsageError(f"path {text!r} contains a NUL byte")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"path {text!r}: '..' is not accepted; give the path from the guest's root")
    return "/" + "/".join(parts)


def check_name(name: str) -> str:
    """A name read from a guest directory: one path component, never '.', '..' or with '/'
    or NUL (a damaged or hostile file system may say anything). Newlines are valid names."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FilesError(f"the guest file system has an entry named {name!r}: refusing it")
    return name


def destination(root: str, entry: str) -> List[str]:
    """Where guest path `entry`, extracted as part of the request for guest path `root`, lands
    under DIR: the components of its path relative to DIR (the last component of `root`, then
    the rest of `entry` below `root`). Extracting '/' puts its content straight into DIR."""
    root, entry = guest_path(root), guest_path(entry)
    if entry != root and not entry.startswith(root.rstrip("/") + "/"):
        raise FilesError(f"{entry!r} is not inside {root!r}")
    below = [check_name(p) for p in entry[len(root):].split("/") if p]
    top = [check_name(posixpath.basename(root))] if root != "/" else []
    return top + below


def kept_mode(mode: int) -> int:
    """The permission bits extracted files keep: rwx for all and the sticky bit; not setuid or
    setgid (see the module docstring)."""
    return mode & 0o1777


def printable(name: str) -> str:
    """A name for a human line: control characters (a newline in a name) shown escaped."""
    if name.isprintable():
        return name
    return repr(name)[1:-1]


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    type: str             # TYPES' values, or "other"
    size: int
    mode: int             # permission bits (st_mode & 0o7777)
    mtime_ns: int
    target: Optional[str] = None      # a symlink's target, as stored (never resolved)

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "path": self.path, "type": self.type, "size": self.size,
                "mode": f"{self.mode:04o}", "mtime": self.mtime_ns / 1e9, "mtime_ns": self.mtime_ns,
                "target": self.target}


def entry_of(directory: str, name: str, st: Dict[str, int], target: Optional[str]) -> Entry:
    """An Entry from a guestfs lstatns dict."""
    mode = int(st["st_mode"])
    kind = TYPES.get(stat.S_IFMT(mode), "other")
    mtime = int(st["st_mtime_sec"]) * 1_000_000_000 + int(st["st_mtime_nsec"])
    return Entry(name, posixpath.join(directory, name), kind, int(st["st_size"]), mode & 0o7777, mtime,
                 target if kind == "symlink" else None)


def choose_filesystem(found: Dict[str, str], wanted: Optional[str]) -> Tuple[str, str]:
    """(device, type) to mount, from list_filesystems' {device: type}: the one asked for, or
    the only mountable one. FilesError names the candidates otherwise."""
    usable = {d: t for d, t in sorted(found.items()) if t not in NOT_MOUNTABLE}
    listing = ", ".join(f"{d} ({t})" for d, t in usable.items()) or "none"
    if wanted is not None:
        if wanted not in usable:
            raise FilesError(f"no file system {wanted} on this disk (found: {listing})")
        return wanted, usable[wanted]
    if not usable:
        seen = ", ".join(f"{d} ({t})" for d, t in sorted(found.items())) or "nothing"
        raise FilesError("no file system found on this disk (partitions, LVM and whole-disk file systems "
                         f"were searched; found: {seen})")
    if len(usable) > 1:
        raise FilesError(f"this disk has several file systems: {listing}; choose one with --fs")
    return next(iter(usable.items()))


# -- guestfs I/O ----------------------------------------------------------------------------------
class Guest:
    """One libguestfs handle on one NBD export (unix socket), a file system mounted read-only on
    '/'. Each call is a round trip to the appliance; a directory is listed in three."""

    def __init__(self, socket: str, fs: Optional[str] = None, trace: bool = False):
        os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
        try:
            guestfs: Any = importlib.import_module("guestfs")
        except ImportError as e:
            raise ApplianceError("libguestfs' Python binding is not installed (Debian: apt install python3-guestfs "
                                 "libguestfs-tools linux-image-amd64; it exists for the system python3.11 only)") from e
        self.g: Any = None
        tcg = not os.access("/dev/kvm", os.R_OK | os.W_OK) or "force_tcg" in os.environ.get(
            "LIBGUESTFS_BACKEND_SETTINGS", "")
        try:
            self._launch(guestfs, socket, tcg, trace)
        except RuntimeError as e:
            self.close()
            if tcg:
                raise ApplianceError(f"the libguestfs appliance failed to start: {e}") from e
            # KVM is there but the appliance's `-cpu host` may not run on it (nested KVM refusing an
            # MSR, measured here): TCG then, slower but the same result.
            log.warning("the libguestfs appliance did not start under KVM; using TCG (slower)")
            log.debug("under KVM: %s", e)
            try:
                self._launch(guestfs, socket, True, trace)
            except RuntimeError as e2:
                self.close()
                raise ApplianceError(f"the libguestfs appliance failed to start: {e2}") from e2
        found = self._call("list_filesystems")
        self.device, self.fstype = choose_filesystem(dict(found), fs)
        self._call("mount_ro", self.device, "/")

    def _launch(self, guestfs: Any, socket: str, tcg: bool, trace: bool) -> None:
        self.g = g = guestfs.GuestFS(python_return_dict=True)
        if trace:
            g.set_trace(1)
        if tcg:
            g.set_backend_settings(["force_tcg"])
        g.add_drive_opts("", format="raw", readonly=1, protocol="nbd", server=[f"unix:{socket}"])
        g.launch()

    def close(self) -> None:
        if self.g is not None:
            try:
                self.g.close()
            finally:
                self.g = None

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, name: str, *args) -> Any:
        try:
            return getattr(self.g, name)(*args)
        except RuntimeError as e:
            # the Python binding has no last_errno: the daemon's message carries strerror
            if any(os.strerror(c) in str(e) for c in (errno.ENOENT, errno.ENOTDIR)):
                raise FilesError(f"{args[0] if args else ''}: no such file or directory in {self.device}") from e
            raise ApplianceError(f"libguestfs {name}: {e}") from e

    def stat(self, path: str) -> Entry:
        path = guest_path(path)
        st = self._call("lstatns", path)
        target = self._call("readlink", path) if stat.S_ISLNK(int(st["st_mode"])) else None
        return entry_of(posixpath.dirname(path), posixpath.basename(path) or "/", st, target)

    def listdir(self, path: str) -> List[Entry]:
        """The entries of directory `path`, sorted by name (a file: itself)."""
        top = self.stat(path)
        if top.type != "directory":
            return [top]
        names = sorted(check_name(n) for n in self._call("ls", top.path))
        if not names:
            return []
        stats = self._call("lstatnslist", top.path, names)
        links = [n for n, st in zip(names, stats, strict=True) if stat.S_ISLNK(int(st["st_mode"]))]
        targets = dict(zip(links, self._call("readlinklist", top.path, links), strict=True)) if links else {}
        return [entry_of(top.path, n, st, targets.get(n)) for n, st in zip(names, stats, strict=True)]

    def walk(self, path: str) -> Iterator[Entry]:
        """`path` and, for a directory, everything below it, parents before children."""
        top = self.stat(path)
        yield top
        if top.type == "directory":
            for e in self.listdir(top.path):
                if e.type == "directory":
                    yield from self.walk(e.path)
                else:
                    yield e

    def download(self, path: str, fd: int) -> None:
        """The content of regular file `path` into the open file `fd` (through /proc: the file
        ekko created, not whatever a name might point to by then)."""
        self._call("download", path, f"/proc/self/fd/{fd}")


@dataclass
class Extracted:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: Optional[List[str]] = None     # devices, fifos, sockets: not extracted


class Writer:
    """Creates entries under DIR, each given as its components (destination()); every step is
    relative to a directory descriptor opened with O_NOFOLLOW, so no symlink (the guest's, or one
    that appeared in DIR) is ever followed. Directories' modes and mtimes are applied at the end,
    deepest first (a read-only directory still receives its children)."""

    def __init__(self, root: str):
        os.makedirs(root, exist_ok=True)
        self.root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.dirs: List[Tuple[List[str], Entry]] = []

    def close(self) -> None:
        os.close(self.root)

    def _parent(self, parts: List[str]) -> int:
        fd = os.dup(self.root)
        try:
            for p in parts[:-1]:
                nxt = os.open(check_name(p), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def directory(self, parts: List[str], e: Entry) -> None:
        if parts:
            fd = self._parent(parts)
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=fd)
            except FileExistsError:
                raise FilesError(f"{self._show(parts)} exists: not overwritten") from None
            finally:
                os.close(fd)
            self.dirs.append((parts, e))       # DIR itself (extracting '/') keeps its own mode

    def file(self, parts: List[str], e: Entry, fill) -> None:
        fd = self._parent(parts)
        try:
            out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        except FileExistsError:
            raise FilesError(f"{self._show(parts)} exists: not overwritten") from None
        finally:
            os.close(fd)
        try:
            fill(out)
            os.fchmod(out, kept_mode(e.mode))
            os.utime(out, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(out)

    def symlink(self, parts: List[str], e: Entry) -> None:
        assert e.target is not None
        fd = self._parent(parts)
        try:
            os.symlink(e.target, parts[-1], dir_fd=fd)
            os.utime(parts[-1], ns=(e.mtime_ns, e.mtime_ns), dir_fd=fd, follow_symlinks=False)
        except FileExistsError:
            raise FilesError(f"{self._show(parts)} exists: not overwritten") from None
        finally:
            os.close(fd)

    def finish(self) -> None:
        for parts, e in sorted(self.dirs, key=lambda d: -len(d[0])):
            fd = self._parent(parts)
            try:
                d = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = d
                os.fchmod(fd, kept_mode(e.mode))
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)

    def _show(self, parts: List[str]) -> str:
        return printable("/".join(parts))


def extract(guest: Guest, paths: List[str], into: str) -> Extracted:
    """Copy each guest path (file, symlink or tree) into directory `into`, as destination() says."""
    roots = [guest_path(p) for p in paths]
    for r in roots:
        guest.stat(r)                   # every path exists, before anything is written
    done = Extracted(skipped=[])
    w = Writer(into)
    try:
        for root in roots:
            for e in guest.walk(root):
                parts = destination(root, e.path)
                if e.type == "directory":
                    w.directory(parts, e)
                    done.directories += 1
                elif e.type == "file":
                    w.file(parts, e, lambda fd, e=e: guest.download(e.path, fd))
                    done.files += 1
                    done.bytes += e.size
                elif e.type == "symlink":
                    w.symlink(parts, e)
                    done.symlinks += 1
                else:
                    assert done.skipped is not None
                    done.skipped.append(e.path)
        w.finish()
    finally:
        w.close()
    return done

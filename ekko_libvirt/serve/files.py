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

Hard links are kept (one inode, several names, within one extraction). Regular files are copied
as their allocation says (`copy_plan`): an empty one costs no transfer, one with no block at all
is made as a hole of its size (a hostile 1 TiB sparse file costs nothing here), a sparse one is
read in pieces and its zero pieces are left as holes, so DIR never holds more than the data.
Content comes through guestfs `pread`, 2 MiB a call: one round trip, ~2 ms for a small file,
where a `download` costs ~200 ms of protocol per file under TCG (measured here), and 50 MB/s
against download's 33 for big ones.
What the guest file system cannot give (a directory the kernel finds damaged, a read error, a
name that is not one path component) is skipped and named, the rest extracted (exit 3).

libguestfs (Debian python3-guestfs, system Python 3.11 only) is imported when a command needs
it. The appliance runs under KVM when /dev/kvm works and TCG otherwise (LIBGUESTFS_BACKEND=direct
unless set). Where KVM is there but refuses the appliance (nested KVM here), every launch would
first fail under KVM (~3 s) and start again under TCG: the refusal is remembered in
libguestfs' own cache directory, per QEMU binary and host kernel (`accel_order`).
"""

import errno
import importlib
import json
import logging
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import EkkoError, UsageError

log = logging.getLogger("ekko.files")

# lstatns' st_mode file type -> our name for it
TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
# file systems worth mounting: what list_filesystems reports that is not one
NOT_MOUNTABLE = {"swap", "unknown", "luks", "crypto_LUKS", "LVM2_member", "linux_raid_member"}
# errors of the guest's kernel that mean "the file system is damaged here" (EUCLEAN is also what
# Linux returns for a directory entry whose name holds a '/'), or a read that failed (EIO: a
# damaged segment of the backup too, which the server's log then names)
DAMAGE = tuple(os.strerror(c) for c in (errno.EUCLEAN, errno.EIO, errno.EBADMSG))
# Larger than any file data kept inside an inode (ext4 inline data, btrfs inline extents, NTFS
# resident data are at most a block): a file this big with no block allocated is all hole.
INLINE_MAX = 64 * 1024
PIECE = 2 * 1024 * 1024        # guestfs pread returns at most 2 MiB per call


class FilesError(EkkoError):
    """A file-level request that cannot be met as asked (exit 2): no file system, no such path,
    a destination that exists, a guest name that cannot be extracted safely."""
    exit_code = 2


class ApplianceError(EkkoError):
    """The libguestfs appliance could not start or failed (exit 1); the message is its own."""


class DamagedFileSystem(EkkoError):
    """The guest file system cannot be mounted or read there: damaged as the guest left it, or a
    damaged segment of the backup (exit 3, as for damaged data elsewhere)."""
    exit_code = 3


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
    blocks: int = 0                   # 512-byte units allocated (st_blocks): the file's data, holes not
    ino: int = 0
    nlink: int = 1

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
                 target if kind == "symlink" else None, max(0, int(st.get("st_blocks", 0))), int(st.get("st_ino", 0)),
                 int(st.get("st_nlink", 1)))


def copy_plan(e: Entry) -> str:
    """How a regular file's content comes out of the appliance: 'empty' (nothing to transfer),
    'hole' (no block allocated and too big to live in its inode: all zeros, made as a hole of its
    size), 'sparse' (fewer blocks than its size: read in pieces, zero pieces left as holes) or
    'dense' (read in pieces, every piece written)."""
    if e.size <= 0:
        return "empty"
    if e.blocks == 0 and e.size > INLINE_MAX:
        return "hole"
    if e.blocks * 512 < e.size:
        return "sparse"
    return "dense"


def accel_order(kvm_device: bool, forced_tcg: bool, refused_here: bool) -> List[bool]:
    """Launches to try, in order (True: TCG). KVM first when it may work; TCG after it, since
    nested KVM may refuse the appliance's CPU; straight to TCG when KVM already refused this
    QEMU on this host kernel."""
    if not kvm_device or forced_tcg or refused_here:
        return [True]
    return [False, True]


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

    def __init__(self, socket: Union[str, Sequence[str]], fs: Optional[str] = None, trace: bool = False):
        """socket: one NBD export (unix socket), or several: one appliance, several disks (sda,
        sdb, ... in that order), so one launch serves them all."""
        os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
        try:
            guestfs: Any = importlib.import_module("guestfs")
        except ImportError as e:
            raise ApplianceError("libguestfs' Python binding is not installed (Debian: apt install python3-guestfs "
                                 "libguestfs-tools linux-image-amd64; it exists for the system python3.11 only)") from e
        self.g: Any = None
        self.device = self.fstype = ""
        verdict = _verdict_path()
        order = accel_order(os.access("/dev/kvm", os.R_OK | os.W_OK),
                            "force_tcg" in os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", ""),
                            _refused(verdict))
        for n, tcg in enumerate(order):
            try:
                self._launch(guestfs, [socket] if isinstance(socket, str) else list(socket), tcg, trace)
                break
            except RuntimeError as e:
                self.close()
                if n == len(order) - 1:
                    raise ApplianceError(f"the libguestfs appliance failed to start: {e}") from e
                # KVM is there but the appliance's `-cpu host` may not run on it (nested KVM refusing
                # an MSR, measured here): TCG then, slower but the same result; remembered.
                log.warning("the libguestfs appliance did not start under KVM; using TCG (slower)")
                log.debug("under KVM: %s", e)
                _remember_refusal(verdict, str(e))
        self.filesystems: Dict[str, str] = dict(self._call("list_filesystems"))
        self.use(fs)

    def use(self, fs: Optional[str] = None) -> None:
        """Mount file system `fs` (or the only one) read-only on '/', instead of the one before.
        DamagedFileSystem when the guest's kernel cannot mount it."""
        device, fstype = choose_filesystem(self.filesystems, fs)
        if self.device:
            self._call("umount_all")
            self.device = self.fstype = ""
        try:
            self.g.mount_ro(device, "/")
        except RuntimeError as e:
            raise DamagedFileSystem(f"{device} ({fstype}) cannot be mounted read-only: {_reason(e)}; the file "
                                    "system is damaged in this backup (as the guest left it, or a damaged segment: "
                                    "the server's log names those)") from e
        self.device, self.fstype = device, fstype

    def _launch(self, guestfs: Any, sockets: List[str], tcg: bool, trace: bool) -> None:
        self.g = g = guestfs.GuestFS(python_return_dict=True)
        if trace:
            g.set_trace(1)
        if tcg:
            g.set_backend_settings(["force_tcg"])
        for socket in sockets:
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
            what = printable(str(args[0])) if args else ""
            if any(os.strerror(c) in str(e) for c in (errno.ENOENT, errno.ENOTDIR)):
                raise FilesError(f"{what}: no such file or directory in {self.device}") from e
            if any(d in str(e) for d in DAMAGE):
                raise DamagedFileSystem(f"{what}: {_reason(e)} (reading {self.device} ({self.fstype}): damaged "
                                        "there in this backup, or a damaged segment: the server's log names those)"
                                        ) from e
            raise ApplianceError(f"libguestfs {name}: {e}") from e

    def stat(self, path: str) -> Entry:
        path = guest_path(path)
        st = self._call("lstatns", path)
        target = self._call("readlink", path) if stat.S_ISLNK(int(st["st_mode"])) else None
        return entry_of(posixpath.dirname(path), posixpath.basename(path) or "/", st, target)

    def listdir(self, path: str) -> Tuple[List[Entry], List[str]]:
        """The entries of directory `path`, sorted by name (a file: itself), and the names in it
        refused (not one path component: never looked up, since the lookup would go elsewhere).
        Three round trips to the appliance whatever the number of entries."""
        top = self.stat(path)
        if top.type != "directory":
            return [top], []
        names, refused = [], []
        for n in self._names(top.path):
            try:
                names.append(check_name(n))
            except FilesError:
                refused.append(posixpath.join(top.path, n))
        names.sort()
        if not names:
            return [], refused
        stats = self._call("lstatnslist", top.path, names)
        links = [n for n, st in zip(names, stats, strict=True) if stat.S_ISLNK(int(st["st_mode"]))]
        targets = dict(zip(links, self._call("readlinklist", top.path, links), strict=True)) if links else {}
        return [entry_of(top.path, n, st, targets.get(n)) for n, st in zip(names, stats, strict=True)], refused

    def _names(self, path: str) -> List[str]:
        """The names in directory `path`. `ls` streams them (no message size limit: 100,000
        names are fine), but when the guest's kernel fails the directory part-way its error is
        lost ("file receive cancelled by daemon"). `readdir` may then say why; it cannot be
        trusted to list (guestfsd's readdir ends quietly at the error, with what came before)."""
        try:
            return list(self._call("ls", path))
        except ApplianceError as e:
            if "cancelled" not in str(e):
                raise
            log.debug("ls %r: %s; asking readdir why", path, e)
            self._call("readdir", path)         # DamagedFileSystem with the kernel's reason, if it has one
            raise DamagedFileSystem(f"{printable(path)}: the directory cannot be read whole: the guest's kernel "
                                    "stopped part-way (a damaged directory, e.g. an entry whose name holds '/', "
                                    f"in {self.device} ({self.fstype}) of this backup)") from e

    def walk(self, path: str, failed: Callable[[str, str], None]) -> Iterator[Entry]:
        """`path` and, for a directory, everything below it, parents before children. What
        cannot be listed (a damaged directory, a refused name) goes to failed(path, why)."""
        top = self.stat(path)
        yield top
        if top.type != "directory":
            return
        stack = [top.path]
        while stack:
            d = stack.pop()
            try:
                entries, refused = self.listdir(d)
            except DamagedFileSystem as err:
                failed(d, str(err))
                continue
            for r in refused:
                failed(r, "not a single path component: refused")
            for e in entries:
                yield e
            stack.extend(reversed([e.path for e in entries if e.type == "directory"]))

    def read(self, path: str, size: int, offset: int) -> bytes:
        return self._call("pread", path, size, offset)



@dataclass
class Extracted:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0                      # names made as links to a file extracted before
    bytes: int = 0
    skipped: List[str] = field(default_factory=list)     # devices, fifos, sockets: not extracted
    failed: List[Tuple[str, str]] = field(default_factory=list)    # (guest path, why): could not be read


def fill_sparse(read: Callable[[int, int], bytes], size: int, out: int, holes: bool = True) -> int:
    """Copy `size` bytes, read in PIECE-sized pieces, into `out` at their offsets, leaving the
    all-zero pieces as holes (holes=False: writing them too); the length set at the end.
    -> bytes written."""
    zero = bytes(PIECE)
    written = 0
    for off in range(0, size, PIECE):
        n = min(PIECE, size - off)
        data = read(n, off)
        if len(data) != n:
            raise DamagedFileSystem(f"short read: {len(data)} of {n} bytes at offset {off}")
        if not holes or data != zero[:n]:
            os.pwrite(out, data, off)
            written += n
    os.ftruncate(out, size)
    return written


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

    def link(self, parts: List[str], first: List[str]) -> None:
        """A hard link at `parts` to the file extracted before at `first` (both under DIR)."""
        src, dst = self._parent(first), self._parent(parts)
        try:
            os.link(first[-1], parts[-1], src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
        except FileExistsError:
            raise FilesError(f"{self._show(parts)} exists: not overwritten") from None
        finally:
            os.close(src)
            os.close(dst)

    def remove(self, parts: List[str]) -> None:
        """Remove the file this Writer created at `parts` (a copy that failed half-way)."""
        fd = self._parent(parts)
        try:
            os.unlink(parts[-1], dir_fd=fd)
        finally:
            os.close(fd)

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
    """Copy each guest path (file, symlink or tree) into directory `into`, as destination() says.
    A FilesError (a destination that exists) stops it; what the guest cannot give is in .failed."""
    roots = [guest_path(p) for p in paths]
    for r in roots:
        guest.stat(r)                   # every path exists, before anything is written
    done = Extracted()
    w = Writer(into)

    def failed(path: str, why: str) -> None:
        done.failed.append((path, why))
    try:
        for root in roots:
            seen: Dict[int, List[str]] = {}          # inode -> where its first name went
            for e in guest.walk(root, failed):
                parts = destination(root, e.path)
                if e.type == "directory":
                    w.directory(parts, e)
                    done.directories += 1
                elif e.type == "file" and e.nlink > 1 and e.ino in seen:
                    w.link(parts, seen[e.ino])
                    done.hardlinks += 1
                elif e.type == "file":
                    try:
                        w.file(parts, e, lambda fd, e=e: _fill(guest, e, fd))
                    except DamagedFileSystem as err:
                        w.remove(parts)
                        failed(e.path, str(err))
                        continue
                    if e.nlink > 1:
                        seen[e.ino] = parts
                    done.files += 1
                    done.bytes += e.size
                elif e.type == "symlink":
                    w.symlink(parts, e)
                    done.symlinks += 1
                else:
                    done.skipped.append(e.path)
        w.finish()
    finally:
        w.close()
    return done


def _fill(guest: Guest, e: Entry, fd: int) -> None:
    plan = copy_plan(e)
    if plan == "hole":
        os.ftruncate(fd, e.size)
    elif plan in ("sparse", "dense"):
        fill_sparse(lambda n, off: guest.read(e.path, n, off), e.size, fd, holes=plan == "sparse")


def _reason(e: BaseException) -> str:
    """libguestfs' message without its function-name prefix, on one line."""
    text = " ".join(str(e).split())
    head, sep, rest = text.partition(": ")
    return rest if sep and " " not in head else text


# -- KVM's refusal, remembered --------------------------------------------------------------------
def _verdict_path() -> Optional[str]:
    """A file in libguestfs' own cache directory for this user (the appliance lives there), or
    None when that directory is not there or not ours (then nothing is remembered)."""
    base = os.environ.get("LIBGUESTFS_CACHEDIR") or os.environ.get("TMPDIR") or "/var/tmp"
    d = os.path.join(base, f".guestfs-{os.getuid()}")
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return os.path.join(d, "ekko-kvm-refused.json")


def _host_key() -> Dict[str, Any]:
    """What KVM's refusal depends on: the QEMU binary and the host kernel."""
    key: Dict[str, Any] = {"kernel": os.uname().release}
    for exe in ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"):
        try:
            st = os.stat(exe)
        except OSError:
            continue
        key["qemu"] = [exe, st.st_size, st.st_mtime_ns]
        break
    return key


def _refused(path: Optional[str]) -> bool:
    if path is None:
        return False
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read(65536))
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("key") == _host_key()


def _remember_refusal(path: Optional[str], error: str) -> None:
    if path is None:
        return
    from ..durable import write_json_atomic
    try:
        write_json_atomic(path, {"key": _host_key(), "error": " ".join(error.split())[:500]})
    except OSError as e:
        log.debug("could not remember that KVM refused the appliance: %s", e)

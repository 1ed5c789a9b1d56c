"""crashfs: a FUSE file system that forgets, at a simulated power cut, what was never made durable.

It passes every operation through to a backing directory (what processes see is always the
newest state), and beside it keeps a model of what a power cut would leave: the DURABLE state.
At a cut, the model is written out as a new directory: the disk as the machine finds it when it
boots again. The rules are the weakest a POSIX file system is allowed (what ext4 promises by
default is more; a store that survives this survives ext4, xfs and btrfs):

    file data      durable after fsync/fdatasync of that file, or a syncfs of the file system.
                   Unsynced writes are lost ("strict") or torn ("torn": each 4 KiB page is the
                   old or the new content, independently; the size is the old or the new one).
                   A file created and never synced is empty after the cut.
    names          a create, mkdir, rename, unlink or rmdir is durable after an fsync of the
                   DIRECTORY it changed (both directories for a rename between two), or a
                   syncfs. fsync of a file does not make its name durable, and fsync of a
                   directory does not make the directory's own name in its parent durable.
                   Unsynced name changes are all lost ("strict"), or each directory keeps an
                   independent random prefix of its own unsynced changes ("torn": a rename is
                   atomic in its directory; two directories' changes are not ordered).
    a parent       a directory whose name is lost takes its whole subtree with it.

    keep_dirs      crash(..., keep_dirs=[...]) keeps every unsynced name change in the listed
                   directories (and below): the adversarial image in which, say, gc's unsynced
                   deletions survived and prune's did not.

syncfs. The kernel does not tell a FUSE server about syncfs(2) (fs/fuse/inode.c fuse_sync_fs
sends FUSE_SYNCFS only when fc->sync_fs is set, which only virtiofs sets). So processes that use
the file system run with LD_PRELOAD=syncfs_shim(): its syncfs() runs the real system call and
then asks for the extended attribute BARRIER_XATTR on the same file descriptor, which this
server takes as "syncfs now" (elsewhere the getxattr fails harmlessly and is ignored). Without
the shim the model would only be stricter (every syncfs unseen): never more lenient. sync(2)
is not modelled (ekko does not use it).

The cut. `arm(k)` cuts power just before the k-th state-changing operation from then on
(create, mkdir, write, truncate, rename, unlink, rmdir, chmod, utimens, fsync, fsyncdir, syncfs):
that operation is not performed, the process that asked for it is SIGKILLed before it can see
an answer, and every later operation fails with EIO (the machine is off). `crash(out, ...)`
then writes the durable state into `out`; the test unmounts, and mounts a new crashfs on `out`.

Server: `python crashfs.py BACKING MOUNTPOINT`, commands as JSON lines on stdin, answers on
stdout ("ready" once mounted). Harness side: class CrashFS. Single-threaded FUSE loop: every
operation is applied in the order the kernel hands them over.
"""

import errno
import json
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

BARRIER_XATTR = "user.crashfs.syncfs"
PAGE = 4096
LIVE = object()     # a file's durable content is its live backing file, unchanged since the sync

_SHIM_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

/* syncfs(2), then tell a crashfs server (tests/harness/crashfs.py) that it happened. */
int syncfs(int fd)
{
    if (syscall(SYS_syncfs, fd) != 0)
        return -1;
    int saved = errno;
    fgetxattr(fd, "%s", NULL, 0);
    errno = saved;
    return 0;
}
""" % BARRIER_XATTR


# -- the model ----------------------------------------------------------------------------------
class FileNode:
    def __init__(self, nid: int, parent, name: str, durable, mtime: float, mode: int, dirty: bool):
        self.id = nid
        self.parent = parent            # live parent DirNode; None once unlinked
        self.name = name
        self.durable = durable          # bytes | shadow file path (str) | LIVE
        self.mtime = mtime              # of the durable content
        self.mode = mode
        self.dirty = dirty              # written since the last sync
        self.latest: Optional[str] = None   # shadow path of the newest content once unlinked


class DirNode:
    def __init__(self, nid: int, parent, name: str, mode: int):
        self.id = nid
        self.parent = parent
        self.name = name
        self.mode = mode
        self.live: Dict[str, object] = {}
        self.durable: Dict[str, object] = {}
        self.log: List[tuple] = []      # unsynced name changes, in order


class Model:
    """The live tree (mirrors the backing directory) and the durable one, node by node."""

    def __init__(self, backing: str, shadow: str):
        self.backing = backing
        self.shadow = shadow
        self.next_id = 0
        self.nodes: Dict[int, object] = {}
        self.root = self._dir(None, "", 0o700)
        self._scan(self.root)

    # nodes
    def _dir(self, parent, name, mode) -> DirNode:
        self.next_id += 1
        d = DirNode(self.next_id, parent, name, mode)
        self.nodes[d.id] = d
        return d

    def _file(self, parent, name, durable, mtime, mode, dirty) -> FileNode:
        self.next_id += 1
        f = FileNode(self.next_id, parent, name, durable, mtime, mode, dirty)
        self.nodes[f.id] = f
        return f

    def _scan(self, d: DirNode) -> None:
        """What is in the backing directory at mount time is durable."""
        for entry in os.scandir(self.real(d)):
            st = entry.stat(follow_symlinks=False)
            if entry.is_dir(follow_symlinks=False):
                sub = self._dir(d, entry.name, stat.S_IMODE(st.st_mode))
                self._scan(sub)
            else:
                sub = self._file(d, entry.name, LIVE, st.st_mtime, stat.S_IMODE(st.st_mode), False)
            d.live[entry.name] = d.durable[entry.name] = sub

    def path_of(self, node) -> str:
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))

    def real(self, node) -> str:
        return os.path.join(self.backing, self.path_of(node))

    def lookup(self, path: str):
        node = self.root
        for part in [p for p in path.split("/") if p]:
            if not isinstance(node, DirNode) or part not in node.live:
                raise OSError(errno.ENOENT, path)
            node = node.live[part]
        return node

    def parent_of(self, path: str):
        head, name = os.path.split(path.rstrip("/"))
        parent = self.lookup(head)
        if not isinstance(parent, DirNode):
            raise OSError(errno.ENOTDIR, head)
        return parent, name

    # content kept aside before the live file changes or goes away
    def _shadow_path(self, node, what: str) -> str:
        return os.path.join(self.shadow, f"{node.id}.{what}.{time.monotonic_ns()}")

    def before_change(self, f: FileNode) -> None:
        """f's backing file is about to be written or truncated: keep its durable content."""
        if f.durable is LIVE:
            keep = self._shadow_path(f, "durable")
            shutil.copyfile(self.real(f), keep)
            f.durable = keep
        f.dirty = True

    def before_removal(self, f: FileNode) -> None:
        """f's name is about to go from the live tree (unlink, rename over it)."""
        src = self.real(f)
        if f.durable is LIVE:
            keep = self._shadow_path(f, "durable")
            os.link(src, keep)
            f.durable = keep
        elif f.dirty:
            f.latest = self._shadow_path(f, "latest")
            os.link(src, f.latest)

    # name changes (already done on the backing directory)
    def added(self, parent: DirNode, name: str, node) -> None:
        parent.live[name] = node
        parent.log.append(("add", name, node))

    def removed(self, parent: DirNode, name: str) -> None:
        node = parent.live.pop(name)
        node.parent = None
        parent.log.append(("del", name))

    def renamed(self, src: DirNode, old: str, dst: DirNode, new: str) -> None:
        node = src.live.pop(old)
        replaced = dst.live.get(new)
        if replaced is not None:
            replaced.parent = None
        dst.live[new] = node
        node.parent, node.name = dst, new
        if src is dst:
            src.log.append(("rename", old, new, node))
        else:
            src.log.append(("del", old))
            dst.log.append(("add", new, node))

    # syncs
    def sync_file(self, f: FileNode) -> None:
        if not f.dirty:
            return
        if f.parent is not None:
            f.durable, f.mtime = LIVE, os.stat(self.real(f)).st_mtime
        elif f.latest is not None:
            f.durable = f.latest
        f.dirty, f.latest = False, None

    def sync_dir(self, d: DirNode) -> None:
        d.durable = dict(d.live)
        d.log = []

    def sync_all(self) -> None:
        for node in list(self.nodes.values()):
            if isinstance(node, DirNode):
                self.sync_dir(node)
            else:
                self.sync_file(node)
        # the durable tree is the live tree now: forget the rest and its shadow copies
        reachable = {}
        stack = [self.root]
        while stack:
            n = stack.pop()
            reachable[n.id] = n
            if isinstance(n, DirNode):
                stack.extend(n.live.values())
        self.nodes = reachable
        for name in os.listdir(self.shadow):
            os.unlink(os.path.join(self.shadow, name))

    # the image a power cut leaves
    def image(self, out: str, rng: random.Random, mode: str, keep_dirs=()) -> Dict[str, int]:
        """Write the durable state into `out` (created); -> counts of what was dropped."""
        counts = {"files": 0, "dirs": 0, "names_dropped": 0, "names_kept": 0, "files_torn": 0,
                  "files_reverted": 0}
        os.makedirs(out, mode=0o700)
        self._image_dir(self.root, out, "", rng, mode, tuple(keep_dirs), counts)
        return counts

    def _entries(self, d: DirNode, path: str, rng, mode, keep_dirs, counts) -> Dict[str, object]:
        entries = dict(d.durable)
        if any(path == k or path.startswith(k.rstrip("/") + "/") for k in keep_dirs):
            n = len(d.log)
        elif mode == "torn":
            n = rng.randint(0, len(d.log))
        else:
            n = 0
        for op in d.log[:n]:
            if op[0] == "add":
                entries[op[1]] = op[2]
            elif op[0] == "del":
                entries.pop(op[1], None)
            else:
                entries.pop(op[1], None)
                entries[op[2]] = op[3]
        counts["names_kept"] += n
        counts["names_dropped"] += len(d.log) - n
        return entries

    def _image_dir(self, d: DirNode, out: str, path: str, rng, mode, keep_dirs, counts) -> None:
        counts["dirs"] += 1
        for name, node in sorted(self._entries(d, path, rng, mode, keep_dirs, counts).items()):
            dest = os.path.join(out, name)
            sub = f"{path}/{name}" if path else name
            if isinstance(node, DirNode):
                os.mkdir(dest, node.mode or 0o700)
                self._image_dir(node, dest, sub, rng, mode, keep_dirs, counts)
                continue
            data = self._content(node, rng, mode, counts)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, node.mode or 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.utime(dest, (node.mtime, node.mtime))
            counts["files"] += 1

    def _read(self, what, node) -> bytes:
        if what is LIVE:
            what = self.real(node)
        if isinstance(what, bytes):
            return what
        with open(what, "rb") as f:
            return f.read()

    def _content(self, f: FileNode, rng, mode, counts) -> bytes:
        old = self._read(f.durable, f)
        if not f.dirty:
            return old
        if mode != "torn":
            counts["files_reverted"] += 1
            return old
        new = self._read(f.latest if f.latest is not None else LIVE, f) if (f.parent or f.latest) else old
        size = rng.choice((len(old), len(new)))
        out = bytearray(size)
        for off in range(0, size, PAGE):
            src = old if rng.random() < 0.5 else new
            piece = src[off:off + PAGE]
            out[off:off + len(piece)] = piece
        counts["files_torn"] += 1
        return bytes(out)


# -- the FUSE server ----------------------------------------------------------------------------
def _serve(backing: str, mountpoint: str) -> int:
    import mfusepy

    shadow = backing.rstrip("/") + ".shadow"
    os.makedirs(shadow, exist_ok=True)
    lock = threading.RLock()
    state = {"ops": 0, "arm": None, "frozen": False, "cut": None, "killed": None, "errors": []}
    model = Model(backing, shadow)
    out = sys.stdout
    fds: Dict[int, FileNode] = {}

    def reply(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def gate(what: str, mutating: bool) -> None:
        """Count a state-changing operation; at the armed one, cut the power."""
        if state["frozen"]:
            raise OSError(errno.EIO, "power is off")
        if not mutating:
            return
        state["ops"] += 1
        if state["arm"] is not None and state["ops"] >= state["arm"]:
            state["frozen"], state["cut"] = True, f"#{state['ops']} {what}"
            pid = mfusepy.fuse_get_context()[2]
            tgid = _tgid(pid)
            if tgid and tgid != os.getpid():
                os.kill(tgid, signal.SIGKILL)
                state["killed"] = tgid
            raise OSError(errno.EIO, "power cut")

    def op(name: str, mutating: bool = False):
        def wrap(fn):
            def run(self, *args):
                with lock:
                    gate(f"{name} {args[0] if args else ''}", mutating)
                    try:
                        return fn(self, *args)
                    except OSError:
                        raise
                    except Exception as e:      # a bug of the model: make the test fail loudly
                        state["errors"].append(f"{name}{args[:2]}: {type(e).__name__}: {e}")
                        print(f"crashfs: {name}{args[:2]}: {e!r}", file=sys.stderr, flush=True)
                        raise OSError(errno.EIO, str(e)) from e
            run.__name__ = fn.__name__
            return run
        return wrap

    def real(path: str) -> str:
        return os.path.join(backing, path.lstrip("/"))

    def node_for(path: Optional[str], fh: Optional[int]):
        if fh is not None and fh in fds:
            return fds[fh]
        return model.lookup(path)

    class Ops(mfusepy.Operations):
        use_ns = True

        def init(self, path):
            reply({"ready": True, "pid": os.getpid()})

        @op("getattr")
        def getattr(self, path, fh=None):
            st = os.fstat(fh) if fh in fds else os.lstat(real(path))     # a directory's fh is 0: not ours
            return {"st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_size": st.st_size, "st_uid": st.st_uid,
                    "st_gid": st.st_gid, "st_ino": st.st_ino, "st_atime": st.st_atime_ns,
                    "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

        @op("access")
        def access(self, path, amode):
            if not os.access(real(path), amode):
                raise OSError(errno.EACCES, path)
            return 0

        @op("opendir")
        def opendir(self, path):
            model.lookup(path)
            return 0

        @op("readdir")
        def readdir(self, path, fh):
            return [".", ".."] + sorted(os.listdir(real(path)))

        def releasedir(self, path, fh):
            return 0

        @op("statfs")
        def statfs(self, path):
            sv = os.statvfs(backing)
            return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

        @op("create", mutating=True)
        def create(self, path, mode, flags):
            parent, name = model.parent_of(path)
            fd = os.open(real(path), (flags & ~os.O_DIRECT) | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
            node = model._file(parent, name, b"", time.time(), stat.S_IMODE(mode), True)
            model.added(parent, name, node)
            fds[fd] = node
            return fd

        @op("open")
        def open(self, path, flags):
            node = model.lookup(path)
            if flags & os.O_TRUNC:
                gate(f"truncate-on-open {path}", True)
                model.before_change(node)
            fd = os.open(real(path), flags & ~(os.O_DIRECT | os.O_CREAT | os.O_EXCL))
            fds[fd] = node
            return fd

        @op("read")
        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        @op("write", mutating=True)
        def write(self, path, data, offset, fh):
            model.before_change(node_for(path, fh))
            return os.pwrite(fh, data, offset)

        @op("truncate", mutating=True)
        def truncate(self, path, length, fh=None):
            model.before_change(node_for(path, fh))
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(real(path), length)
            return 0

        def flush(self, path, fh):
            return 0

        def release(self, path, fh):
            fds.pop(fh, None)
            os.close(fh)
            return 0

        @op("fsync", mutating=True)
        def fsync(self, path, datasync, fh):
            model.sync_file(node_for(path, fh))
            return 0

        @op("fsyncdir", mutating=True)
        def fsyncdir(self, path, datasync, fh):
            model.sync_dir(model.lookup(path))
            return 0

        def getxattr(self, path, name, position=0):
            if name != BARRIER_XATTR:
                with lock:
                    gate("getxattr", False)
                raise OSError(errno.ENODATA, name)
            return self._barrier(path)

        @op("syncfs", mutating=True)
        def _barrier(self, path):
            model.sync_all()
            return b""

        def listxattr(self, path):
            return []

        @op("mkdir", mutating=True)
        def mkdir(self, path, mode):
            parent, name = model.parent_of(path)
            os.mkdir(real(path), stat.S_IMODE(mode))
            model.added(parent, name, model._dir(parent, name, stat.S_IMODE(mode)))
            return 0

        @op("unlink", mutating=True)
        def unlink(self, path):
            parent, name = model.parent_of(path)
            node = model.lookup(path)
            if isinstance(node, FileNode):
                model.before_removal(node)
            os.unlink(real(path))
            model.removed(parent, name)
            return 0

        @op("rmdir", mutating=True)
        def rmdir(self, path):
            parent, name = model.parent_of(path)
            os.rmdir(real(path))
            model.removed(parent, name)
            return 0

        @op("rename", mutating=True)
        def rename(self, old, new):
            src, oname = model.parent_of(old)
            dst, nname = model.parent_of(new)
            victim = dst.live.get(nname)
            if isinstance(victim, FileNode):
                model.before_removal(victim)
            os.rename(real(old), real(new))
            model.renamed(src, oname, dst, nname)
            return 0

        @op("chmod", mutating=True)
        def chmod(self, path, mode):
            os.chmod(real(path), stat.S_IMODE(mode))
            model.lookup(path).mode = stat.S_IMODE(mode)
            return 0

        @op("chown", mutating=True)
        def chown(self, path, uid, gid):
            os.chown(real(path), uid, gid)
            return 0

        @op("utimens", mutating=True)
        def utimens(self, path, times=None):
            node = model.lookup(path)
            if isinstance(node, FileNode):
                model.before_change(node)
            if times is None:
                os.utime(real(path))
            else:
                os.utime(real(path), ns=times)
            return 0

        def link(self, target, source):
            raise OSError(errno.EPERM, "crashfs models no hard links")

        def symlink(self, target, source):
            raise OSError(errno.EPERM, "crashfs models no symbolic links")

    def control() -> None:
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
                with lock:
                    what = cmd["cmd"]
                    if what == "arm":
                        state["arm"] = state["ops"] + int(cmd["at"])
                        reply({"ok": True})
                    elif what == "disarm":
                        state["arm"] = None
                        reply({"ok": True})
                    elif what == "status":
                        reply({k: state[k] for k in ("ops", "frozen", "cut", "killed", "errors")})
                    elif what == "crash":
                        state["frozen"] = True
                        counts = model.image(cmd["out"], random.Random(cmd["seed"]), cmd["mode"],
                                             cmd.get("keep_dirs") or ())
                        reply({"ok": True, "counts": counts, "errors": state["errors"]})
                    else:
                        reply({"error": f"unknown command {what!r}"})
            except Exception as e:      # noqa: BLE001 - answered, the harness raises it
                reply({"error": f"{type(e).__name__}: {e}"})

    threading.Thread(target=control, daemon=True).start()
    mfusepy.FUSE(Ops(), mountpoint, foreground=True, nothreads=True, hard_remove=True, fsname="crashfs",
                 subtype="crashfs", attr_timeout=0, entry_timeout=0, negative_timeout=0)
    shutil.rmtree(shadow, ignore_errors=True)
    return 0


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


# -- the harness side ---------------------------------------------------------------------------
class CrashFSError(Exception):
    pass


def syncfs_shim(cache_dir: str) -> str:
    """The LD_PRELOAD library that forwards syncfs to a crashfs server (compiled once per dir)."""
    so = os.path.join(cache_dir, "crashfs_syncfs.so")
    if not os.path.exists(so):
        src = os.path.join(cache_dir, "crashfs_syncfs.c")
        with open(src, "w") as f:
            f.write(_SHIM_C)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", so + ".tmp", src], check=True)
        os.rename(so + ".tmp", so)
    return so


class CrashFS:
    """One crashfs server: mount(), arm()/status()/crash(), unmount(). Started and stopped by PID."""

    TIMEOUT = 60

    def __init__(self, backing: str, mountpoint: str, log_path: str):
        self.backing = backing
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def mount(self) -> "CrashFS":
        os.makedirs(self.backing, mode=0o700, exist_ok=True)
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.backing, self.mountpoint],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         start_new_session=True)
        try:
            self._answer()
        except BaseException:
            self.unmount()
            raise
        return self

    def _answer(self) -> dict:
        """The server's next line on stdout, within TIMEOUT seconds."""
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise CrashFSError(f"crashfs server gave no answer (exit {self.proc.poll()}); see {self.log_path}")
        answer = json.loads(line)
        if "error" in answer:
            raise CrashFSError(f"crashfs: {answer['error']}")
        return answer

    def call(self, **cmd) -> dict:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self._answer()

    def arm(self, at: int) -> None:
        """Cut the power just before the at-th state-changing operation from now on (at >= 1).
        The process that asks for that operation is SIGKILLed: arm only while a child process
        (ekko) writes, never while the test process itself does."""
        self.call(cmd="arm", at=at)

    def disarm(self) -> None:
        self.call(cmd="disarm")

    def status(self) -> dict:
        return self.call(cmd="status")

    def crash(self, out: str, seed: int, mode: str = "strict", keep_dirs=()) -> dict:
        """Write the durable state to `out`: mode "strict" (every unsynced change lost) or "torn"."""
        return self.call(cmd="crash", out=out, seed=seed, mode=mode, keep_dirs=list(keep_dirs))

    def mounted(self) -> bool:
        """From /proc/mounts: stat() of a frozen mount point fails, so os.path.ismount cannot tell."""
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == self.mountpoint for line in f)

    def unmount(self) -> None:
        if self.proc is None:
            return
        if self.mounted():
            busy = subprocess.run(["umount", self.mountpoint], capture_output=True, text=True)
            if busy.returncode:
                print(f"crashfs: umount {self.mountpoint}: {busy.stderr.strip()}: detaching it", file=sys.stderr)
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        try:
            self.proc.wait(timeout=self.TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"crashfs: server {self.proc.pid} still runs {self.TIMEOUT} s after the unmount: killed",
                  file=sys.stderr)
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc = None


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: crashfs.py BACKING MOUNTPOINT")
    sys.exit(_serve(sys.argv[1], sys.argv[2]))

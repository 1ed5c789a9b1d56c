"""Local-directory store: the embedded default.

Layout: <root>/<key>, directories 0700, files 0600. A put writes '<name>.tmp-<random>' in the
target directory, fsyncs it, renames it over the final name and fsyncs the directory, so a crash
leaves either the old state or the whole new object; stray '.tmp-' files are invisible to list()
and are removed by gc.

Objects of DIRECT_MIN bytes or more (segments) are written around the page cache (O_DIRECT):
a backup writes them once and nothing reads them soon, so caching them only evicts what the
hypervisor's guests had cached. It is also cheaper: a buffered write allocates and fills a page
cache page for every byte stored; the benchmark's full backup spent 2.5 of its 8 CPU seconds
there (bench/, perf). A file system that refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE)
gets buffered writes, decided at the first refusal.
"""

import ctypes
import errno
import logging
import os
import secrets
import threading
from typing import Callable, Iterable, Iterator, List, Tuple, TypeVar, Union

from .. import units
from ..directio import fsync_path, read_direct, write_new_file
from ..errors import ObjectNotFound, StoreError
from .base import Batch, ObjectInfo, Store, check_key

TMP_MARK = ".tmp-"
DIRECT_MIN = 64 << 10
# the largest segment object: a segment of the largest size the config allows, plus its header
DIRECT_MAX = units.MAX_SEGMENT_SIZE + 64
SEGMENTS = "segments/"

log = logging.getLogger(__name__)
T = TypeVar("T")


def _read(path: str) -> bytes:
    """The whole file, read around the page cache when it is a segment-sized object (DIRECT_MIN
    to DIRECT_MAX bytes, whatever the segment size: a restore reads each segment once, and
    caching it would evict the guests' pages and cost a page allocation per byte, as writing
    does). Others are read as usual."""
    size = os.stat(path).st_size
    if DIRECT_MIN <= size <= DIRECT_MAX:
        return read_direct(path, size)
    return _read_buffered(path)


def _read_buffered(path: str) -> bytes:
    with open(path, "rb") as f:     # a big manifest is read whole, without a second copy
        return f.read()


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.direct = hasattr(os, "O_DIRECT")      # until the file system refuses it
        try:
            # top down, each new directory 0700 (os.makedirs(mode=) gives it to the last one only:
            # 'projects/' of a namespace, or the store's own parents, were 0755)
            self._makedirs(self.root, sync=False)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e.strerror}") from e
        if not os.path.isdir(self.root):
            raise StoreError(f"cannot create store directory {self.root}: a file of that name is in the way")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            tmp = self._write_temp(path, data, sync=True)
            os.rename(tmp, path)
            self._fsync_dir(directory)
        except OSError as e:
            raise StoreError(f"cannot write {key} in {self.root}: {e.strerror}") from e

    def batch(self) -> "LocalBatch":
        return LocalBatch(self)

    def _write_temp(self, path: str, data: bytes, sync: bool) -> str:
        """Write `data` to a new temp file next to `path` (fsynced with `sync`) -> its name."""
        self._makedirs(os.path.dirname(path), sync)
        tmp = f"{path}{TMP_MARK}{secrets.token_hex(6)}"
        if len(data) >= DIRECT_MIN:
            self._around_cache(lambda: write_new_file(tmp, data, direct=True, sync=sync),
                               lambda: write_new_file(tmp, data, sync=sync))
        else:
            write_new_file(tmp, data, sync=sync)
        return tmp

    def _around_cache(self, direct: Callable[[], T], buffered: Callable[[], T]) -> T:
        """direct() while the file system takes O_DIRECT; buffered() from its first refusal on
        (EINVAL: tmpfs before Linux 6.6, some FUSE), for writes and reads alike."""
        if self.direct:
            try:
                return direct()
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.info("%s refuses direct I/O (%s): using the page cache", self.root, e.strerror)
                self.direct = False
        return buffered()

    def _makedirs(self, directory: str, sync: bool = True) -> None:
        """Create `directory` and its missing parents, top down. With `sync` each new name is
        made durable in its parent (a new directory entry is durable only once its parent is
        synced): 'manifests/<target>/' in a fresh store is two new names, and a manifest put
        there must not vanish at a power cut because 'manifests' did (tests/integration/
        test_store_crash.py). Without `sync` the caller's syncfs covers them (LocalBatch)."""
        if os.path.isdir(directory):
            return
        parent = os.path.dirname(directory)
        self._makedirs(parent, sync)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass        # made meanwhile by another writer, maybe not synced yet: sync it all the same
        if sync:
            self._fsync_dir(parent)

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        fsync_path(directory)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return self._around_cache(lambda: _read(path), lambda: _read_buffered(path))
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StoreError(f"cannot read {key} in {self.root}: {e.strerror}") from e

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the directory that can hold the prefix, not the whole store.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *base.split("/")) if base else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in sorted(filenames):
                if TMP_MARK in name:
                    continue
                key = rel + name
                if key.startswith(prefix):
                    yield key

    def list_sorted(self, prefix: str = "") -> Iterator[str]:
        """list() in ascending byte order of the keys, a directory at a time (segments/ of 10^7
        objects is 4096 directories of ~2,500). A directory 'abc' sorts as 'abc/': its keys
        come after a file 'abc-1' ('-' < '/') and before 'abc0'."""
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, *base.split("/")) if base else self.root
        keys = _walk_sorted(start, base + "/" if base else "")
        if prefix.endswith("/") or not prefix:
            return keys                  # every key under that directory has the prefix
        return (k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        """Remove the object; durably (its directory synced) unless it is a segment. A manifest
        that prune deleted must stay deleted before gc frees the segments only it named: after a
        power cut that kept gc's deletions and lost prune's, it would name segments that are
        gone (tests/integration/test_store_crash.py). A segment that comes back is garbage
        for the next gc, so gc's thousands of deletions cost no fsync each."""
        path = self._path(key)
        try:
            os.unlink(path)
            if not key.startswith(SEGMENTS):
                self._fsync_dir(os.path.dirname(path))
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise StoreError(f"cannot delete {key} in {self.root}: {e.strerror}") from e

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise StoreError(f"cannot stat {key} in {self.root}: {e.strerror}") from e
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def clean_temp(self, older_than: float) -> int:
        """Remove '.tmp-' files of interrupted puts last modified before `older_than`. A put in
        progress keeps its temp file young (it is written, fsynced and renamed within seconds)."""
        removed = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if TMP_MARK not in name:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.stat(path).st_mtime < older_than:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue        # renamed into place or removed meanwhile
                except OSError as e:
                    raise StoreError(f"cannot remove temp file {path}: {e.strerror}") from e
        return removed

    def describe(self) -> str:
        return f"local store {self.root}"


def _walk_sorted(directory: str, rel: str) -> Iterator[str]:
    """Keys under `directory` (whose key prefix is `rel`) in ascending order; temp files skipped.
    Iterative, each directory's run of files handed out as one list: one generator level for
    every key, whatever the depth (this runs once per segment of the store)."""
    stack: List[Union[List[str], Tuple[str, str]]] = [(directory, rel)]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            yield from item
            continue
        path, prefix = item
        pieces: List[Union[List[str], Tuple[str, str]]] = []
        run: List[str] = []
        for name in _sorted_entries(path):
            if name.endswith("/"):
                if run:
                    pieces.append(run)
                    run = []
                pieces.append((os.path.join(path, name[:-1]), prefix + name))
            elif TMP_MARK not in name:
                run.append(prefix + name)
        if run:
            pieces.append(run)
        stack.extend(reversed(pieces))


def _sorted_entries(path: str) -> List[str]:
    """The names in a directory, a sub-directory's with '/' appended, in byte order."""
    try:
        with os.scandir(path) as it:
            names = [e.name + "/" if e.is_dir(follow_symlinks=False) else e.name for e in it]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreError(f"cannot list {path}: {e.strerror}") from e
    names.sort()
    return names


class LocalBatch(Batch):
    """Puts whose durability is settled together, for a backup's segments: one fsync of the
    file and one of its directory per object cost the benchmark's full backup 1 of its 6 CPU
    seconds (2,000 objects; each fsync is a device cache flush).

    put() writes the object to its temp name and nothing more. flush() syncs the file system
    (syncfs: data and metadata of every file written so far), renames each temp file into place
    and syncs again. Until its flush an object is invisible (get, exists and list skip temp
    files), so a crash or a power loss before it leaves only temp files, which gc removes; and
    an object's bytes are durable before its name exists, so a name never points at bytes a
    power loss could have lost. A batch flushes by itself every FLUSH_EVERY objects, so its
    temp files stay young (gc removes temp files older than its grace period).

    syncfs also writes back other dirty data on the same file system: on a hypervisor whose
    guests' disks use cache=none (OpenStack's default) there is little of it."""

    FLUSH_EVERY = 256

    def __init__(self, store: LocalStore):
        self.store = store
        self.pending: List[Tuple[str, str]] = []          # (temp path, final path)
        self.lock = threading.Lock()
        self.flushing = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        path = self.store._path(key)
        try:
            tmp = self.store._write_temp(path, data, sync=False)
        except OSError as e:
            raise StoreError(f"cannot write {key} in {self.store.root}: {e.strerror}") from e
        with self.lock:
            self.pending.append((tmp, path))
            full = len(self.pending) >= self.FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        with self.flushing:
            with self.lock:
                items, self.pending = self.pending, []
            if not items:
                # Nothing of ours, but a backup that only reused segments still syncs once: a
                # segment it found with exists() may be another backup's, renamed into place
                # and not yet synced, and the manifest naming it comes next (invariant 2).
                try:
                    _sync_files(self.store.root, [])
                except OSError as e:
                    raise StoreError(f"cannot sync {self.store.root}: {e.strerror}") from e
                return
            try:
                _sync_files(self.store.root, [tmp for tmp, _ in items])
                for tmp, path in items:
                    os.rename(tmp, path)
                _sync_files(self.store.root, sorted({os.path.dirname(p) for _, p in items}))
            except OSError as e:
                self._remove([tmp for tmp, _ in items])
                raise StoreError(f"cannot make {len(items)} object(s) durable in {self.store.root}: "
                                 f"{e.strerror}") from e

    def abort(self) -> None:
        """Remove what was put and not flushed (a failed backup leaves no temp files)."""
        with self.lock:
            items, self.pending = self.pending, []
        self._remove([tmp for tmp, _ in items])

    @staticmethod
    def _remove(paths: Iterable[str]) -> None:
        for p in paths:
            try:
                os.unlink(p)
            except OSError:
                pass        # renamed already, or gone: gc handles what is left


def _sync_files(root: str, paths: Iterable[str]) -> None:
    """Make `paths` (files or directories under root) durable: one syncfs of root's file system
    where the C library has it, else an fsync of each."""
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        return
    for p in paths:
        fsync_path(p)


def _load_syncfs():
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()

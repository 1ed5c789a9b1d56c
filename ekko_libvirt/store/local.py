"""Local-directory store: the embedded default.

Layout: <root>/<key>, directories 0700, files 0600. A put writes '<name>.tmp-<random>' in the
target directory, fsyncs it, renames it over the final name and fsyncs the directory, so a crash
leaves either the old state or the whole new object; stray '.tmp-' files are invisible to list()
and are removed by gc.
"""

import errno
import os
import secrets
from typing import Iterator

from ..errors import ObjectNotFound, StoreError
from .base import ObjectInfo, check_key

TMP_MARK = ".tmp-"


class LocalStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e.strerror}") from e

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            self._makedirs(directory)
            tmp = f"{path}{TMP_MARK}{secrets.token_hex(6)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            os.rename(tmp, path)
            self._fsync_dir(directory)
        except OSError as e:
            raise StoreError(f"cannot write {key} in {self.root}: {e.strerror}") from e

    def _makedirs(self, directory: str) -> None:
        if os.path.isdir(directory):
            return
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # A new directory entry is only durable once its parent is synced.
        self._fsync_dir(os.path.dirname(directory))

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
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

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
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

"""In-memory store, for unit tests of pure logic and for the contract test."""

import threading
import time
from typing import Callable, Dict, Iterator

from ..errors import ObjectNotFound
from .base import ObjectInfo, Store, check_key


class MemoryStore(Store):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._objects: Dict[str, bytes] = {}
        self._mtimes: Dict[str, float] = {}
        self._clock = clock          # tests pass a fake clock to age objects
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[check_key(key)] = bytes(data)
            self._mtimes[key] = self._clock()

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[check_key(key)]
            except KeyError:
                raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        with self._lock:
            return check_key(key) in self._objects

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        return iter(keys)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)
            self._mtimes.pop(key, None)

    def stat(self, key: str) -> ObjectInfo:
        with self._lock:
            try:
                return ObjectInfo(key, len(self._objects[check_key(key)]), self._mtimes[key])
            except KeyError:
                raise ObjectNotFound(key) from None

    def describe(self) -> str:
        return "memory store"

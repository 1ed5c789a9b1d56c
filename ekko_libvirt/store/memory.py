"""In-memory store, for unit tests of pure logic and for the contract test."""

import threading
from typing import Dict, Iterator

from ..errors import ObjectNotFound
from .base import check_key


class MemoryStore:
    def __init__(self) -> None:
        self._objects: Dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[check_key(key)] = bytes(data)

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

    def describe(self) -> str:
        return "memory store"

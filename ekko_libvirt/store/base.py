"""The Store contract: five operations on opaque objects named by keys.

Keys are '/'-separated ASCII paths made of [A-Za-z0-9._-] parts (see `check_key`). A store holds
one namespace (one project): isolation between projects is the backend's job (a directory, a
Swift container with its own credentials).

Contract every backend must keep (tests/unit/test_store_contract.py runs it against each):
- put(key, data): atomic and durable when it returns: a reader sees the whole object or nothing,
  never a prefix, and the object survives a crash of this host. Idempotent: putting the same
  key twice is allowed (content-addressed keys make that a no-op in effect).
- get(key) -> bytes: the whole object; ObjectNotFound if absent. Never returns partial data.
- exists(key) -> bool: cheap; no data transfer.
- list(prefix) -> iterator of keys starting with prefix, in no promised order, complete even
  for millions of keys (backends page internally).
- delete(key): idempotent; deleting a missing key is not an error.
- stat(key) -> ObjectInfo: size and last-modified time (Unix seconds, the backend's clock: file
  mtime locally, X-Timestamp / Last-Modified on Swift); ObjectNotFound if absent. No data
  transfer. GC compares it with its grace period, so a put must set it to the time of the put.
Optional, for backends that can leave temporary objects behind (local: '.tmp-' files of an
interrupted put): clean_temp(older_than: float) -> int removes those last modified before
`older_than` (Unix seconds) and returns how many. GC calls it when the backend has it.
Optional, for backends where durability costs per object (local: an fsync of the file and of
its directory): batch() -> a Batch whose put() is atomic but not yet visible nor durable, and
whose flush() makes every object put so far durable and then visible, together. A backup puts
its segments through a batch and flushes it before its manifest (the commit point) is written.
`batch_of(store)` gives every store one (for the others each put is durable on return).
Retry policy and concurrency limits belong in wrappers or in the backend's transport, not in
callers.
"""

import re
from dataclasses import dataclass
from typing import Iterator, Protocol

_KEY_PART = re.compile(r"^[A-Za-z0-9._-]+$")


def check_key(key: str) -> str:
    """Refuse keys that could escape a directory or a container ('..', absolute, odd bytes)."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or not _KEY_PART.match(p) for p in parts):
        raise ValueError(f"invalid store key: {key!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float         # Unix seconds, when the object was last put


class Store(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def delete(self, key: str) -> None: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def describe(self) -> str:
        """Where this store is, for messages. Never includes credentials."""
        ...


class Batch(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def abort(self) -> None: ...


class ImmediateBatch:
    """The batch of a store whose put is durable when it returns (Swift, memory)."""

    def __init__(self, store):
        self.store = store

    def put(self, key: str, data: bytes) -> None:
        self.store.put(key, data)

    def flush(self) -> None:
        pass

    def abort(self) -> None:
        pass


def batch_of(store) -> Batch:
    make = getattr(store, "batch", None)
    return make() if make is not None else ImmediateBatch(store)

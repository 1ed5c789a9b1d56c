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
- list_sorted(prefix) -> the same keys in ascending byte order, as they come (gc and verify merge
  the listing of segments/ with the sorted digests the manifests name: lifecycle/sorted_merge.py,
  which fails on a listing out of order). Default: list() sorted in memory, for small stores
  (memory); the local store walks its directories in order, Swift lists in name order.
- delete(key): idempotent; deleting a missing key is not an error.
- stat(key) -> ObjectInfo: size in the store (a sealing store adds its envelope) and last-modified
  time (Unix seconds, the backend's clock: file mtime locally, X-Timestamp / Last-Modified on
  Swift); ObjectNotFound if absent. No data transfer. GC compares it with its grace period, so a
  put must set it to the time of the put.
- clean_temp(older_than) -> int: removes temporary objects an interrupted put left behind, last
  modified before `older_than` (Unix seconds); how many. GC calls it. Default: none to remove.
- batch() -> Batch: put() atomic but not yet visible nor durable; flush() makes every object put
  so far durable and then visible, together; abort() drops what was not flushed. A backup puts
  its segments through a batch and flushes it before its manifest (the commit point) is written.
  Default: each put is durable on return (ImmediateBatch); the local store batches the fsyncs.
- prefers_listing(checks) -> bool: whether answering `checks` existence questions about segments
  costs less by one listing of segments/ than by one exists() each (Swift: a HEAD per object
  against a page of 10,000 names). Default False: exists() is cheap (a stat).
- codec: how objects are named and sealed (format/codec.py: a Codec). PLAIN; SealedStore seals.
- close(): release connections. Default: nothing to release.
Every method is declared here: a wrapper (SealedStore) implements each one explicitly, so a
method added later cannot slip through a wrapper unsealed. Retry policy and concurrency limits
belong in wrappers or in the backend's transport, not in callers. One contract test suite
(tests/unit/test_store_contract.py; Swift: tests/integration/test_store_contract_swift.py) runs
against every store.
"""

import abc
import re
from dataclasses import dataclass
from typing import Iterator

from ..format.codec import PLAIN, Codec

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


class Batch(abc.ABC):
    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...


class Store(abc.ABC):
    @property
    def codec(self) -> Codec:
        return PLAIN

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    def list_sorted(self, prefix: str = "") -> Iterator[str]:
        return iter(sorted(self.list(prefix)))

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where this store is, for messages. Never includes credentials."""

    def batch(self) -> Batch:
        return ImmediateBatch(self)

    def clean_temp(self, older_than: float) -> int:
        return 0

    def prefers_listing(self, checks: int) -> bool:
        return False

    def close(self) -> None:    # noqa: B027 - a default on purpose: most stores hold nothing to release
        pass


class ImmediateBatch(Batch):
    """The batch of a store whose put is durable when it returns (Swift, memory)."""

    def __init__(self, store: Store):
        self.store = store

    def put(self, key: str, data: bytes) -> None:
        self.store.put(key, data)

    def flush(self) -> None:
        pass

    def abort(self) -> None:
        pass

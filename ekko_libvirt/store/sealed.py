"""A store that seals every object on put and opens it on get (format/crypto.py: AES-256-GCM,
the object's key as associated data). The segments' names are the codec's keyed hashes."""

import threading
from typing import Callable, Iterator, Optional

from ..errors import IntegrityError, KeyMismatch
from ..format.crypto import MANIFESTS, SealedCodec
from .base import Batch, ObjectInfo, Store, check_key


class SealedStore(Store):
    """Any Store, with every object sealed on put and opened on get. Keys pass unchanged; the
    codec (and with it the key file) is loaded on first use, so a namespace nobody reads needs
    no key. Everything else (exists, list, list_sorted, delete, stat, clean_temp, close) is the inner store's,
    each forwarded explicitly (store/base.py: a new method must be written here, or it is abstract).

    put() opens what it sealed and compares before storing (verify before store)."""

    def __init__(self, inner: Store, load_codec: Callable[[], SealedCodec]):
        self.inner = inner
        self._load = load_codec
        self._codec: Optional[SealedCodec] = None
        self._lock = threading.Lock()

    @property
    def codec(self) -> SealedCodec:
        if self._codec is None:
            with self._lock:
                if self._codec is None:
                    self._codec = self._load()
        return self._codec

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(check_key(key), self._sealed(key, data))

    def _sealed(self, key: str, data: bytes) -> bytes:
        codec = self.codec
        blob = codec.seal(key, data)
        if codec.open(key, blob) != data:
            raise IntegrityError(f"{key}: sealing did not round-trip; nothing stored")
        return blob

    def batch(self) -> "_SealedBatch":
        return _SealedBatch(self, self.inner.batch())

    def get(self, key: str) -> bytes:
        blob = self.inner.get(key)
        try:
            return self.codec.open(key, blob)
        except KeyMismatch as e:
            if key.startswith(MANIFESTS):
                raise
            # Only manifests tell which key a backup needs; anything they lead to was sealed with
            # the same key, so another key (or none) there means the object was replaced.
            what = f"sealed with another key (fingerprint {e.needed})" if e.needed else "not encrypted"
            raise IntegrityError(f"{key}: {what}: not the object this store wrote") from e

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def list_sorted(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list_sorted(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def describe(self) -> str:
        return f"{self.inner.describe()} (encrypted)"

    def clean_temp(self, older_than: float) -> int:
        return self.inner.clean_temp(older_than)

    def prefers_listing(self, checks: int) -> bool:
        return self.inner.prefers_listing(checks)

    def close(self) -> None:
        self.inner.close()


class _SealedBatch(Batch):
    def __init__(self, store: SealedStore, inner: Batch):
        self.store = store
        self.inner = inner

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(check_key(key), self.store._sealed(key, data))

    def flush(self) -> None:
        self.inner.flush()

    def abort(self) -> None:
        self.inner.abort()

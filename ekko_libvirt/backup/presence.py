"""Which segments a store has: one exists() per question, or one listing for many.

A full backup asks "is this segment stored already?" once per distinct segment, and its
commit-time check asks again for every segment of its table. On Swift each question is a HEAD
(hours for 10^7 segments); a listing of segments/ answers all of them with a request per
10,000 names. The store says which is cheaper (Store.prefers_listing); `presence()` picks.

A listed answer is as of the listing: a segment listed may be deleted by gc afterwards (the
commit-time check lists again after the segments are flushed, and stores a vanished one again),
and a segment another backup stores after the listing is put once more (puts are idempotent).
Neither loses data; a "yes" for a segment that was never stored would, so names that do not
parse as segment keys are never counted as present.

Memory: the listed digests packed in one bytes object, 16 bytes per segment (10^7 segments:
160 MB), looked up by binary search; no Python object per segment.
"""

import bisect
from typing import Iterable, Iterator, Protocol, Set

from ..format import segment
from ..store.base import Store

SEGMENTS = "segments/"


class Presence(Protocol):
    def exists(self, digest: bytes) -> bool: ...


class PerObject:
    """One store.exists() per question."""

    def __init__(self, store: Store):
        self.store = store

    def exists(self, digest: bytes) -> bool:
        return self.store.exists(segment.segment_key(digest))


class _Packed:
    """A sorted run of 16-byte digests as a sequence, for bisect."""

    def __init__(self, packed: bytes):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed) // segment.DIGEST_SIZE

    def __getitem__(self, i: int) -> bytes:
        at = i * segment.DIGEST_SIZE
        return self.packed[at:at + segment.DIGEST_SIZE]


class Listed:
    """The segments a listing of the store showed."""

    def __init__(self, packed: bytes):
        if len(packed) % segment.DIGEST_SIZE:
            raise ValueError("packed digests must be a multiple of 16 bytes")
        self._run = _Packed(packed)

    @classmethod
    def of(cls, store: Store) -> "Listed":
        return cls(pack_sorted(digests_in(store.list(SEGMENTS))))

    def __len__(self) -> int:
        return len(self._run)

    def exists(self, digest: bytes) -> bool:
        i = bisect.bisect_left(self._run, digest)
        return i < len(self._run) and self._run[i] == digest


def digest_of_key(key: str) -> "bytes | None":
    """The digest a segment key names, or None for anything else under segments/ (a temp file,
    a stray name): `segments/<first 3 hex>/<32 lowercase hex>` exactly."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "segments":
        return None
    name = parts[2]
    if len(name) != 2 * segment.DIGEST_SIZE or parts[1] != name[:3] or name != name.lower():
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


def digests_in(keys: Iterable[str]) -> Iterator[bytes]:
    for key in keys:
        d = digest_of_key(key)
        if d is not None:
            yield d


def pack_sorted(digests: Iterable[bytes]) -> bytes:
    """Digests packed in ascending order, duplicates dropped. A listing in name order (Swift)
    is packed as it streams; any other order is sorted once at the end."""
    out = bytearray()
    last = b""
    in_order = True
    for d in digests:
        if d == last:
            continue
        if d < last:
            in_order = False
        out += d
        last = d
    if in_order:
        return bytes(out)
    n = segment.DIGEST_SIZE
    chunks = sorted({bytes(out[i:i + n]) for i in range(0, len(out), n)})
    return b"".join(chunks)


def presence(store: Store, checks: int) -> Presence:
    """How to answer about `checks` segments: listing when the store says it is cheaper."""
    if store.prefers_listing(checks):
        return Listed.of(store)
    return PerObject(store)


def missing(store: Store, digests: Set[bytes]) -> "Set[bytes] | None":
    """The digests the store does not have, by one listing, when the store prefers that for
    so many; None: ask per object instead."""
    if not store.prefers_listing(len(digests)):
        return None
    listed = Listed.of(store)
    return {d for d in digests if not listed.exists(d)}

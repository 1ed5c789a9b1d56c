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
from typing import Iterable, Protocol, Set

from ..format import segment
from ..lifecycle.digest_sets import ListingCounts, segment_blocks
from ..store.base import Store


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
        """From the store's sorted listing of segments/ (names that are not exactly a segment key
        this format writes are left out: lifecycle/digest_sets.segment_blocks, which gc and
        verify use too)."""
        return cls(pack_sorted(d for block in segment_blocks(store, ListingCounts()) for d in block))

    def __len__(self) -> int:
        return len(self._run)

    def exists(self, digest: bytes) -> bool:
        i = bisect.bisect_left(self._run, digest)
        return i < len(self._run) and self._run[i] == digest


def pack_sorted(digests: Iterable[bytes]) -> bytes:
    """Digests packed in ascending order, duplicates dropped. A sorted listing is packed as it
    streams; any other order (a store that lists out of order) is sorted once at the end."""
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

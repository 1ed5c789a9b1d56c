"""Sets of segment digests too large for a Python set: sorted runs of packed digests on disk.

A Python set of 10^7 digests costs ~1 GiB (an object and a slot for each); the same digests
sorted and packed are 160 MB, and on disk they cost no memory at all. So gc and verify collect
the digests the manifests name with a DigestSorter: it takes a manifest's table a block at a
time, sorts CHUNK digests at a time in memory (~25 MiB of short-lived objects), writes each
sorted chunk as a run file of packed 16-byte digests, and finish() merges the runs into one file
of distinct digests in ascending order: a SortedDigests, which is streamed in blocks (merges in
sorted_merge.py), counted, and searched (contains: a binary search by pread, for the few lookups
of markers). Memory stays flat whatever the number of segments; the temporary directory holds
up to 32 bytes per digest named (runs and the merged file), under $TMPDIR unless given.

Identical table blocks (4096 entries, the same flags and digests) are taken once: the
incrementals of a chain repeat most of their parent's table, and sorting each copy again would
make gc's cost grow with the number of backups rather than with the data.

segment_blocks() turns the store's listing of segments/ into such blocks: only keys of the form
this format writes count (segments/<first 3 hex>/<32 lowercase hex>); the others are counted as
foreign and left alone.
"""

import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from itertools import compress, islice
from operator import itemgetter
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Union

import xxhash

from ..format.manifest import FLAG_DATA, SegmentTable, TableStream
from ..format.segment import DIGEST_SIZE
from ..store.base import Store
from . import sorted_merge

BLOCK = 4096                    # digests per block (64 KiB packed)
CHUNK = 1 << 18                 # digests sorted in memory at once before they go to a run file
SEGMENTS = "segments/"
MERGE_BUDGET = 8 * BLOCK        # digests held by the blocks of all runs being merged at once (~2 MiB)
MIN_MERGE_BLOCK = 256
LIST_BLOCK = 10000              # listed keys parsed at once (a Swift page)
# segments/<hhh>/<digest>, one per line: lowercase hex, the fan-out directory the first 3 digits
# of the name (findall: (directory, digest hex) of each)
_SEGMENT_KEYS = re.compile(r"^segments/([0-9a-f]{3})/(\1[0-9a-f]{29})$", re.M)

_unpackers: Dict[int, struct.Struct] = {}


def split(packed: bytes) -> List[bytes]:
    """Packed 16-byte digests -> a list of them (one C call: struct with n '16s' fields)."""
    n = len(packed) // DIGEST_SIZE
    if n * DIGEST_SIZE != len(packed):
        raise ValueError(f"{len(packed)} bytes are not a whole number of {DIGEST_SIZE}-byte digests")
    unpack = _unpackers.get(n)
    if unpack is None:
        unpack = _unpackers.setdefault(n, struct.Struct(f"{DIGEST_SIZE}s" * n))
    return list(unpack.unpack(packed))


def table_blocks(table: SegmentTable) -> Iterator[tuple]:
    """(flags, packed digests) of a manifest table, BLOCK entries at a time, in disk order."""
    view = memoryview(table.digests)
    for start in range(0, table.count, BLOCK):
        end = min(start + BLOCK, table.count)
        yield bytes(table.flags[start:end]), bytes(view[start * DIGEST_SIZE:end * DIGEST_SIZE])


def data_digests(flags: bytes, packed: bytes) -> List[bytes]:
    """The digests of the DATA entries of one table block (ZERO entries name no object)."""
    digests = split(packed)
    if flags.count(FLAG_DATA) == len(flags):
        return digests
    return list(compress(digests, flags))       # flags are 0 (ZERO) or 1 (DATA): decode() checked


@dataclass
class ListingCounts:
    listed: int = 0            # keys listed under segments/
    foreign: int = 0           # of which not a segment name this format writes


def segment_blocks(store: Store, counts: ListingCounts, on_block: Optional[Callable[[], None]] = None
                   ) -> Iterator[List[bytes]]:
    """The digests of the segment objects in the store, ascending, LIST_BLOCK keys at a time,
    from its sorted listing (store.list_sorted). A listing out of order is caught by the merge.
    Each block is parsed by one regular expression over its keys joined by newlines and one
    fromhex: no Python-level work per key but the listing's own."""
    keys = store.list_sorted(SEGMENTS)
    while True:
        batch = list(islice(keys, LIST_BLOCK))
        if not batch:
            return
        text = "\n".join(batch)
        if text.count("\n") != len(batch) - 1:       # a name with a newline in it (not one of ours)
            text = "\n".join(k for k in batch if "\n" not in k)
        names = "".join(map(itemgetter(1), _SEGMENT_KEYS.findall(text)))
        found = len(names) // 32
        counts.listed += len(batch)
        counts.foreign += len(batch) - found
        if on_block is not None:
            on_block()
        yield split(bytes.fromhex(names))


class SortedDigests:
    """Distinct digests in ascending order, packed in a file. Use as a context manager, or
    close(): the file is removed."""

    def __init__(self, path: str, count: int, cleanup: Optional[Callable[[], None]] = None):
        self.path = path
        self.count = count
        self._cleanup = cleanup

    def __len__(self) -> int:
        return self.count

    def blocks(self, size: int = BLOCK) -> Iterator[List[bytes]]:
        with open(self.path, "rb", buffering=0) as f:
            while True:
                packed = f.read(size * DIGEST_SIZE)
                if not packed:
                    return
                yield split(packed)

    def __iter__(self) -> Iterator[bytes]:
        for block in self.blocks():
            yield from block

    def contains(self, d: bytes) -> bool:
        """Binary search in the file: ~log2(n) reads of 16 bytes, for a few lookups."""
        lo, hi = 0, self.count
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            while lo < hi:
                mid = (lo + hi) // 2
                here = os.pread(fd, DIGEST_SIZE, mid * DIGEST_SIZE)
                if here == d:
                    return True
                if here < d:
                    lo = mid + 1
                else:
                    hi = mid
        return False

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None

    def __enter__(self) -> "SortedDigests":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_block(runs: int) -> int:
    """Digests read at once from each of `runs` runs being merged: MERGE_BUDGET in all (a block
    of each run is in memory during the merge, and the runs are as many as the digests named
    / CHUNK), but not fewer than MIN_MERGE_BLOCK a run, where a read costs more than the digests."""
    return max(MIN_MERGE_BLOCK, min(BLOCK, MERGE_BUDGET // max(1, runs)))


class DigestSorter:
    """Collects digests in any order; finish() -> SortedDigests of the distinct ones."""

    def __init__(self, tmpdir: Optional[str] = None, chunk: int = CHUNK):
        self.dir = tempfile.mkdtemp(prefix="ekko-digests-", dir=tmpdir)
        self.chunk_size = chunk
        self._chunk: List[bytes] = []
        self._runs: List[str] = []
        self._blocks_seen: Set[bytes] = set()
        self._handed_over = False        # finish() gave the directory to its SortedDigests

    def add(self, digests: Iterable[bytes]) -> None:
        self._chunk.extend(digests)
        if len(self._chunk) >= self.chunk_size:
            self._spill()

    def add_table(self, table: Union[SegmentTable, TableStream], pick: Optional[Callable[[bytes], bool]] = None
                  ) -> None:
        """The DATA digests of a manifest table (those `pick` selects), each identical block once.
        A TableStream is read a block at a time: no copy of its digests is held whole."""
        blocks = table.blocks(BLOCK) if isinstance(table, TableStream) else table_blocks(table)
        for flags, packed in blocks:
            h = xxhash.xxh3_128_digest(packed, seed=len(flags)) + xxhash.xxh3_64_digest(flags)
            if h in self._blocks_seen:
                continue
            self._blocks_seen.add(h)
            digests = data_digests(flags, packed)
            self.add(digests if pick is None else [d for d in digests if pick(d)])

    def _spill(self) -> None:
        if not self._chunk:
            return
        path = os.path.join(self.dir, f"run-{len(self._runs):06d}")
        with open(path, "wb") as f:
            f.write(b"".join(sorted(set(self._chunk))))
        self._runs.append(path)
        self._chunk = []

    def finish(self) -> SortedDigests:
        """Merge the runs into one file of distinct digests; the sorter's own files go."""
        if self._handed_over:
            raise RuntimeError("DigestSorter.finish() called twice")
        self._spill()
        path = os.path.join(self.dir, "sorted")
        count = 0
        readers = [SortedDigests(p, 0).blocks(merge_block(len(self._runs))) for p in self._runs]
        with open(path, "wb") as out:
            for block in sorted_merge.union(readers):
                out.write(b"".join(block))
                count += len(block)
        for p in self._runs:
            os.unlink(p)
        self._runs = []
        self._blocks_seen = set()
        self._handed_over = True
        directory = self.dir
        return SortedDigests(path, count, cleanup=lambda: shutil.rmtree(directory, ignore_errors=True))

    def close(self) -> None:
        """Remove the runs; after finish() the directory is its SortedDigests' to remove."""
        if not self._handed_over:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "DigestSorter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_sorted(blocks: Iterable[Sequence[bytes]], tmpdir: Optional[str] = None) -> SortedDigests:
    """A SortedDigests of a stream already sorted and distinct (checked), e.g. a merge's output."""
    directory = tempfile.mkdtemp(prefix="ekko-digests-", dir=tmpdir)
    path = os.path.join(directory, "sorted")
    count = 0
    last: Optional[bytes] = None
    try:
        with open(path, "wb") as out:
            for block in blocks:
                sorted_merge.check_block(block, last, "a sorted run")
                if block:
                    out.write(b"".join(block))
                    count += len(block)
                    last = block[-1]
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return SortedDigests(path, count, cleanup=lambda: shutil.rmtree(directory, ignore_errors=True))

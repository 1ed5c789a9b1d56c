"""Write a fresh qcow2 image (version 3, 64 KiB clusters, no backing file) whose data is known in
advance: the restore of one manifest.

Why our own writer: a restore through qemu-nbd waited on its single thread allocating clusters one
write at a time (36% of the restore both cores idle; bench/, README "Benchmark"). Here the whole
layout is computed from the manifest before a byte is written, so the restore threads write
each segment straight to its final place in the file, in any order, and the metadata is written
once at the end. The image is what `qemu-img check` calls clean: every cluster used exactly once,
refcount 1, the COPIED flag set.

Layout (all numbers big-endian, per QEMU's docs/interop/qcow2.txt):

    cluster 0               header (104 bytes) + end-of-extensions marker
    refcount table          ceil(refcount blocks * 8 / C) clusters
    refcount blocks         16-bit refcounts, C / 2 clusters covered by each
    L1 table                8 bytes per 512 MiB of virtual size (C * C / 8)
    L2 tables               one per 512 MiB region that holds data
    data                    the data segments, in disk order, ceil(length / C) clusters each

Segments whose digest is all zeros are not written: unallocated clusters read as zeros. Inside a
data segment, a cluster that holds only zeros is left unallocated too (refcount 0, L2 entry 0):
the writer says which clusters it wrote (Allocation), and only those are mapped. Their place in
the file stays a hole, so the image takes the room of its data, not of its data segments.
"""

import array
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Sequence, Set, Tuple

from ..directio import pwrite_all

CLUSTER_BITS = 16
C = 1 << CLUSTER_BITS
L2_ENTRIES = C // 8                 # 8-byte entries per L2 table
REGION = C * L2_ENTRIES             # virtual bytes one L2 table maps: 512 MiB
REFCOUNT_ORDER = 4                  # 16-bit refcounts
REFS_PER_BLOCK = C * 8 // (1 << REFCOUNT_ORDER)
COPIED = 1 << 63                    # refcount is exactly 1
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Layout:
    """Where everything of the image lives, in bytes of the file. The k-th data segment (in disk
    order) is at data + k * segment_size: nothing per segment is kept, whatever the disk size."""
    virtual_size: int
    segment_size: int
    refcount_table: int
    refcount_table_clusters: int
    refcount_blocks: int            # offset of the first; they follow each other
    refcount_block_count: int
    l1_table: int
    l1_entries: int
    l2_tables: Dict[int, int]       # region number -> offset of its L2 table
    data: int                       # offset of the first data segment
    clusters: int                   # the file's length in clusters

    @property
    def file_size(self) -> int:
        return self.clusters * C

    def host_offset(self, rank: int) -> int:
        """Where the data segment that is the `rank`-th (from 0) in disk order goes."""
        return self.data + rank * self.segment_size

    @property
    def data_clusters(self) -> int:
        """Clusters reserved for data segments; the j-th is at data + j * C, and the k-th cluster
        of the rank-th segment is j = rank * (segment_size // C) + k (only the last segment of
        the disk can be shorter, and it is the last one here too)."""
        return self.clusters - self.data // C


class Allocation:
    """Which of a layout's data clusters hold data (a bit each: 32 MiB for 16 TiB of data
    clusters). Clusters never marked are left unallocated by `metadata`: they read as zeros.
    Marked by the restore threads, each for the segments it wrote."""

    def __init__(self, layout: Layout):
        self.per_segment = layout.segment_size // C
        self.bits = bytearray(-(-layout.data_clusters // 8))
        self.lock = threading.Lock()

    def mark(self, rank: int, runs: Sequence[Tuple[int, int]]) -> None:
        """The rank-th data segment holds data in `runs` ([start, end) byte offsets in it)."""
        first = rank * self.per_segment
        clusters = {first + k for s, e in runs for k in range(s // C, (e - 1) // C + 1)}
        with self.lock:
            for j in clusters:
                self.bits[j >> 3] |= 1 << (j & 7)

    def __contains__(self, j: int) -> bool:
        return bool(self.bits[j >> 3] >> (j & 7) & 1)

    def refcounts(self, first: int, end: int) -> bytes:
        """16-bit big-endian refcounts (0 or 1) of data clusters [first, end)."""
        expanded = b"".join(_EXPAND[b] for b in self.bits[first >> 3:(end + 7) >> 3])
        skip = (first & 7) * 2
        return expanded[skip:skip + (end - first) * 2]


# one byte of an Allocation -> the refcounts of its eight clusters (bit 0 first)
_EXPAND = [b"".join(b"\x00\x01" if x >> i & 1 else b"\x00\x00" for i in range(8)) for x in range(256)]


def can_write(segment_size: int) -> bool:
    return segment_size % C == 0


def _length(index: int, segment_size: int, virtual_size: int) -> int:
    return min(segment_size, virtual_size - index * segment_size)


def plan(virtual_size: int, segment_size: int, data_segments: Iterable[int]) -> Layout:
    """The layout for a disk of `virtual_size` whose data segments (indexes, ascending) are the
    given ones. Pure: no I/O."""
    if not can_write(segment_size):
        raise ValueError(f"segment size {segment_size} is not a multiple of the {C}-byte cluster")
    regions: Set[int] = set()
    data_clusters = 0
    for i in data_segments:
        o = i * segment_size
        n = _length(i, segment_size, virtual_size)
        regions.update(range(o // REGION, (o + n - 1) // REGION + 1))
        data_clusters += -(-n // C)      # only the disk's last segment can be shorter: it is last here too
    l1_entries = max(1, -(-virtual_size // REGION))
    l1_clusters = -(-l1_entries * 8 // C)
    fixed = 1 + l1_clusters + len(regions) + data_clusters
    blocks = table = 0
    while True:     # refcount blocks and table count themselves: iterate to the fixed point
        total = fixed + blocks + table
        need_blocks = -(-total // REFS_PER_BLOCK)
        need_table = -(-need_blocks * 8 // C)
        if (need_blocks, need_table) == (blocks, table):
            break
        blocks, table = need_blocks, need_table
    pos = C                                          # after the header cluster
    refcount_table, pos = pos, pos + table * C
    refcount_blocks, pos = pos, pos + blocks * C
    l1_table, pos = pos, pos + l1_clusters * C
    l2_tables: Dict[int, int] = {}
    for r in sorted(regions):
        l2_tables[r], pos = pos, pos + C
    return Layout(virtual_size, segment_size, refcount_table, table, refcount_blocks, blocks, l1_table,
                  l1_entries, l2_tables, pos, pos // C + data_clusters)


def metadata(layout: Layout, data_segments: Iterable[int],
             allocation: Optional[Allocation] = None) -> Iterator[Tuple[int, bytes]]:
    """(file offset, bytes) of every metadata structure of `layout`, the data segments (the same
    indexes, ascending, as for plan) mapped: every cluster of them, or with `allocation` the
    clusters it marks. Pure; memory: one L2 table and one refcount block."""
    yield 0, _header(layout)
    reftable = array.array("Q", (layout.refcount_blocks + b * C for b in range(layout.refcount_block_count)))
    yield layout.refcount_table, _be(reftable)
    full = b"\x00\x01" * REFS_PER_BLOCK          # every cluster used is used exactly once
    meta = layout.data // C                         # clusters before the data: all used
    for b in range(layout.refcount_block_count):
        start = b * REFS_PER_BLOCK
        used = min(REFS_PER_BLOCK, layout.clusters - start)
        if allocation is None or start + used <= meta:
            block = full if used == REFS_PER_BLOCK else full[:used * 2]
        else:
            head = max(0, meta - start)
            block = full[:head * 2] + allocation.refcounts(start + head - meta, start + used - meta)
        yield layout.refcount_blocks + b * C, block.ljust(C, b"\0")
    l1 = array.array("Q", bytes(layout.l1_entries * 8))
    for r, off in layout.l2_tables.items():
        l1[r] = off | COPIED
    yield layout.l1_table, _be(l1)
    region, l2 = -1, array.array("Q")              # the L2 table being filled (-1: none yet)
    per_segment = layout.segment_size // C
    for rank, i in enumerate(data_segments):
        host = layout.host_offset(rank)
        first = i * layout.segment_size // C                    # guest cluster number
        count = -(-_length(i, layout.segment_size, layout.virtual_size) // C)
        for k in range(count):
            if allocation is not None and rank * per_segment + k not in allocation:
                continue                                        # zeros: unallocated
            r = (first + k) // L2_ENTRIES
            if r != region:
                if region >= 0:
                    yield layout.l2_tables[region], _be(l2)
                region, l2 = r, array.array("Q", bytes(C))
            l2[(first + k) % L2_ENTRIES] = (host + k * C) | COPIED
    if region >= 0:
        yield layout.l2_tables[region], _be(l2)


def _be(a: array.array) -> bytes:
    a = array.array(a.typecode, a)
    if sys.byteorder == "little":
        a.byteswap()
    return a.tobytes()


def _header(layout: Layout) -> bytes:
    h = HEADER.pack(MAGIC, 3, 0, 0, CLUSTER_BITS, layout.virtual_size, 0, layout.l1_entries,
                    layout.l1_table, layout.refcount_table, layout.refcount_table_clusters, 0, 0,
                    0, 0, 0, REFCOUNT_ORDER, HEADER.size)
    return h + bytes(8)             # end of header extensions: type 0, length 0


def finish(fd: int, layout: Layout, data_segments: Iterable[int],
           allocation: Optional[Allocation] = None) -> None:
    """Write the metadata, set the file's length, and make it all durable."""
    os.ftruncate(fd, layout.file_size)
    for offset, data in metadata(layout, data_segments, allocation):
        pwrite_all(fd, data, offset)
    os.fsync(fd)


assert HEADER.size == 104, HEADER.size

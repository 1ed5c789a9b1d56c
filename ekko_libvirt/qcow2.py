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

Segments whose digest is all zeros are not written: unallocated clusters read as zeros.
"""

import array
import os
import struct
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Tuple

from .directio import pwrite_all

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


def can_write(segment_size: int) -> bool:
    return segment_size % C == 0


def _length(index: int, segment_size: int, virtual_size: int) -> int:
    return min(segment_size, virtual_size - index * segment_size)


def plan(virtual_size: int, segment_size: int, data_segments: Iterable[int]) -> Layout:
    """The layout for a disk of `virtual_size` whose data segments (indexes, ascending) are the
    given ones. Pure: no I/O."""
    if not can_write(segment_size):
        raise ValueError(f"segment size {segment_size} is not a multiple of the {C}-byte cluster")
    regions = set()
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
    l2_tables = {}
    for r in sorted(regions):
        l2_tables[r], pos = pos, pos + C
    return Layout(virtual_size, segment_size, refcount_table, table, refcount_blocks, blocks, l1_table,
                  l1_entries, l2_tables, pos, pos // C + data_clusters)


def metadata(layout: Layout, data_segments: Iterable[int]) -> Iterator[Tuple[int, bytes]]:
    """(file offset, bytes) of every metadata structure of `layout`, the data segments (the same
    indexes, ascending, as for plan) mapped. Pure; memory: one L2 table and one refcount block."""
    yield 0, _header(layout)
    reftable = array.array("Q", (layout.refcount_blocks + b * C for b in range(layout.refcount_block_count)))
    yield layout.refcount_table, _be(reftable)
    full = b"\x00\x01" * REFS_PER_BLOCK          # every cluster of the file is used exactly once
    for b in range(layout.refcount_block_count):
        used = min(REFS_PER_BLOCK, layout.clusters - b * REFS_PER_BLOCK)
        yield layout.refcount_blocks + b * C, full if used == REFS_PER_BLOCK else full[:used * 2].ljust(C, b"\0")
    l1 = array.array("Q", bytes(layout.l1_entries * 8))
    for r, off in layout.l2_tables.items():
        l1[r] = off | COPIED
    yield layout.l1_table, _be(l1)
    region, l2 = None, None
    for rank, i in enumerate(data_segments):
        host = layout.host_offset(rank)
        first = i * layout.segment_size // C                    # guest cluster number
        count = -(-_length(i, layout.segment_size, layout.virtual_size) // C)
        for k in range(count):
            r = (first + k) // L2_ENTRIES
            if r != region:
                if l2 is not None:
                    yield layout.l2_tables[region], _be(l2)
                region, l2 = r, array.array("Q", bytes(C))
            l2[(first + k) % L2_ENTRIES] = (host + k * C) | COPIED
    if l2 is not None:
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


def finish(fd: int, layout: Layout, data_segments: Iterable[int]) -> None:
    """Write the metadata, set the file's length, and make it all durable."""
    os.ftruncate(fd, layout.file_size)
    for offset, data in metadata(layout, data_segments):
        pwrite_all(fd, data, offset)
    os.fsync(fd)


assert HEADER.size == 104, HEADER.size

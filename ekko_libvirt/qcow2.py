"""Write a fresh qcow2 image (version 3, 64 KiB clusters, no backing file) whose data is known in
advance: the restore of one manifest.

Why our own writer: a restore through qemu-nbd waited on its single thread allocating clusters one
write at a time (36% of the restore both cores idle; bench/, README "Benchmark"). Here the whole
layout is computed from the manifest before a byte is written, so the restore threads write
each segment straight to its final place in the file, in any order, and the metadata is written
once at the end. The image is what `qemu-img check` calls clean.

Repeated segments share clusters. A segment whose digest equals one placed shortly before (among
the last SHARE_WINDOW distinct ones) is not written again: its L2 entries point at the first
copy's clusters, whose refcount counts every reference, and without the COPIED flag, which qcow2
reserves for refcount 1. QEMU reads such clusters like any other and copies one on the first
guest write to it (the same mechanism as clusters shared with an internal snapshot). The backup
stored the segment once; the restore writes it once: on the benchmark's W, 1 GiB of a repeated
4 MiB block became 4 MiB on disk and a third less to write. `qemu-img convert` of the image makes
a copy in which nothing is shared. A cluster takes at most MAX_REFS references (16-bit refcounts);
the next repeat starts a new copy.

Layout (all numbers big-endian, per QEMU's docs/interop/qcow2.txt):

    cluster 0               header (104 bytes) + end-of-extensions marker
    refcount table          ceil(refcount blocks * 8 / C) clusters
    refcount blocks         16-bit refcounts, C / 2 clusters covered by each
    L1 table                8 bytes per 512 MiB of virtual size (C * C / 8)
    L2 tables               one per 512 MiB region that holds data
    data                    one slot per distinct placed segment, in disk order of its first
                            use, ceil(length / C) clusters each

Zero segments (not data entries of the manifest) are not written: unallocated clusters read as
zeros.
"""

import array
import bisect
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, Iterator, Tuple

from .directio import pwrite_all

CLUSTER_BITS = 16
C = 1 << CLUSTER_BITS
L2_ENTRIES = C // 8                 # 8-byte entries per L2 table
REGION = C * L2_ENTRIES             # virtual bytes one L2 table maps: 512 MiB
REFCOUNT_ORDER = 4                  # 16-bit refcounts
REFS_PER_BLOCK = C * 8 // (1 << REFCOUNT_ORDER)
MAX_REFS = (1 << (1 << REFCOUNT_ORDER)) - 1
COPIED = 1 << 63                    # refcount is exactly 1
SHARE_WINDOW = 1 << 16              # distinct digests remembered for sharing (~100 bytes each)
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Layout:
    """Where everything of the image lives, in bytes of the file. Data segments are numbered by
    rank (the k-th data entry, in disk order); each goes to a slot of segment_size bytes at
    data + slot * segment_size. A segment that shares its slot with an earlier one is listed in
    shared_ranks (ascending) with its slot in shared_slots; every other rank takes the next free
    slot, so slot = rank - (shared ranks before it). Memory: 16 bytes per shared segment, nothing
    per other segment, whatever the disk size."""
    virtual_size: int
    segment_size: int
    refcount_table: int
    refcount_table_clusters: int
    refcount_blocks: int            # offset of the first; they follow each other
    refcount_block_count: int
    l1_table: int
    l1_entries: int
    l2_tables: Dict[int, int]       # region number -> offset of its L2 table
    data: int                       # offset of the first slot
    clusters: int                   # the file's length in clusters
    shared_ranks: array.array = field(default_factory=lambda: array.array("Q"))
    shared_slots: array.array = field(default_factory=lambda: array.array("Q"))
    refs: Dict[int, int] = field(default_factory=dict)     # slot -> references, where more than 1

    @property
    def file_size(self) -> int:
        return self.clusters * C

    def slot(self, rank: int) -> int:
        j = bisect.bisect_left(self.shared_ranks, rank)
        if j < len(self.shared_ranks) and self.shared_ranks[j] == rank:
            return self.shared_slots[j]
        return rank - j

    def shared(self, slot: int) -> bool:
        """Whether more than one data segment is placed in `slot`."""
        return slot in self.refs

    def slot_offset(self, slot: int) -> int:
        return self.data + slot * self.segment_size

    def host_offset(self, rank: int) -> int:
        """Where the data segment that is the `rank`-th (from 0) in disk order is."""
        return self.slot_offset(self.slot(rank))


def can_write(segment_size: int) -> bool:
    return segment_size % C == 0


def _length(index: int, segment_size: int, virtual_size: int) -> int:
    return min(segment_size, virtual_size - index * segment_size)


def plan(virtual_size: int, segment_size: int, data_entries: Iterable[Tuple[int, Hashable]],
         share: bool = True, window: int = SHARE_WINDOW) -> Layout:
    """The layout for a disk of `virtual_size` whose data segments are the given (index, digest)
    pairs, indexes ascending. Equal digests mean equal content (the store relies on it too): with
    `share`, a whole segment whose digest is among the last `window` distinct ones placed takes
    that slot instead of a new one. Pure: no I/O."""
    if not can_write(segment_size):
        raise ValueError(f"segment size {segment_size} is not a multiple of the {C}-byte cluster")
    regions = set()
    data_clusters = slots = 0
    shared_ranks, shared_slots = array.array("Q"), array.array("Q")
    refs: Dict[int, int] = {}
    recent: Dict[Hashable, int] = {}         # digest -> slot, oldest first
    for rank, (i, digest) in enumerate(data_entries):
        o = i * segment_size
        n = _length(i, segment_size, virtual_size)
        regions.update(range(o // REGION, (o + n - 1) // REGION + 1))
        whole = share and n == segment_size     # a short last segment has no equal
        slot = recent.pop(digest, None) if whole else None
        if slot is not None and refs.get(slot, 1) < MAX_REFS:
            shared_ranks.append(rank)
            shared_slots.append(slot)
            refs[slot] = refs.get(slot, 1) + 1
        else:
            slot, slots = slots, slots + 1
            data_clusters += -(-n // C)      # only the disk's last segment can be shorter: it is last here too
        if whole:
            recent[digest] = slot            # (re)inserted newest
            if len(recent) > window:
                del recent[next(iter(recent))]
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
                  l1_entries, l2_tables, pos, pos // C + data_clusters, shared_ranks, shared_slots, refs)


def metadata(layout: Layout, data_segments: Iterable[int]) -> Iterator[Tuple[int, bytes]]:
    """(file offset, bytes) of every metadata structure of `layout`, the data segments (the same
    indexes, ascending, as for plan) mapped. Pure; memory: one L2 table and one refcount block."""
    yield 0, _header(layout)
    reftable = array.array("Q", (layout.refcount_blocks + b * C for b in range(layout.refcount_block_count)))
    yield layout.refcount_table, _be(reftable)
    yield from _refcount_blocks(layout)
    l1 = array.array("Q", bytes(layout.l1_entries * 8))
    for r, off in layout.l2_tables.items():
        l1[r] = off | COPIED
    yield layout.l1_table, _be(l1)
    region, l2 = None, None
    j, shared = 0, layout.shared_ranks          # ranks ascending: walk the shared ones alongside
    for rank, i in enumerate(data_segments):
        if j < len(shared) and shared[j] == rank:
            slot, j = layout.shared_slots[j], j + 1
        else:
            slot = rank - j
        host = layout.slot_offset(slot)
        flag = 0 if layout.shared(slot) else COPIED
        first = i * layout.segment_size // C                    # guest cluster number
        count = -(-_length(i, layout.segment_size, layout.virtual_size) // C)
        for k in range(count):
            r = (first + k) // L2_ENTRIES
            if r != region:
                if l2 is not None:
                    yield layout.l2_tables[region], _be(l2)
                region, l2 = r, array.array("Q", bytes(C))
            l2[(first + k) % L2_ENTRIES] = (host + k * C) | flag
    if l2 is not None:
        yield layout.l2_tables[region], _be(l2)


def _refcount_blocks(layout: Layout) -> Iterator[Tuple[int, bytes]]:
    """Every cluster of the file is used once, but a shared slot's clusters once per reference."""
    per_slot = layout.segment_size // C
    first_data = layout.data // C
    runs = sorted((first_data + s * per_slot, n) for s, n in layout.refs.items())
    full = b"\x00\x01" * REFS_PER_BLOCK
    j = 0
    for b in range(layout.refcount_block_count):
        lo = b * REFS_PER_BLOCK
        used = min(REFS_PER_BLOCK, layout.clusters - lo)
        if j >= len(runs) or runs[j][0] >= lo + used:
            yield layout.refcount_blocks + b * C, full if used == REFS_PER_BLOCK else full[:used * 2].ljust(C, b"\0")
            continue
        counts = array.array("H", [1]) * used + array.array("H", bytes(2 * (REFS_PER_BLOCK - used)))
        while j < len(runs) and runs[j][0] < lo + used:
            start, n = runs[j]
            for c in range(max(start, lo), min(start + per_slot, lo + used)):
                counts[c - lo] = n
            if start + per_slot > lo + used:
                break           # the run goes on in the next block
            j += 1
        yield layout.refcount_blocks + b * C, _be(counts)


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

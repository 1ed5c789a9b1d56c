"""The manifest: one per backup, listing every segment of the disk (a synthetic full).

It is written last, under a name no other backup uses, and it is the only commit point: a
backup exists if and only if its manifest is in the store. Byte layout in docs/format.md:

    'EKKOMAN1' | u32 header length | header JSON | u64 table length | zstd(table) | xxh3-128

The table is flags[n] followed by digests[n * 16], n = ceil(virtual_size / segment_size).
flags[i] is ZERO (segment i reads as zeros; digest all-zero) or DATA (segment i is the object
named by digest i). Storing the full-width table and letting zstd squeeze the zero runs keeps
load and save free of per-entry Python loops (16 TiB at 4 MiB = 4 Mi entries, see bench).

In an encrypted store the digests are the segments' keyed names (header `hash`:
hmac-sha256-128), the header says which key (`encryption`), and the store seals the whole
manifest (crypto.py). A plain manifest has no `encryption` key: its bytes are as before.
"""

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import xxhash
import zstandard

from ..errors import ManifestError
from .segment import DIGEST_SIZE, ZERO_DIGEST, digest, frame_size

MAGIC = b"EKKOMAN1"
FORMAT_VERSION = 1
FLAG_ZERO = 0
FLAG_DATA = 1
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
MAX_HEADER = 1 << 20
# What the table's digests are: xxh3-128 of the raw segment (plain), or its keyed name (encrypted)
HASHES = ("xxh3-128", "hmac-sha256-128")


def segment_count(virtual_size: int, segment_size: int) -> int:
    return -(-virtual_size // segment_size)


class SegmentTable:
    """flags + digests of every segment of a disk, in two flat buffers."""

    __slots__ = ("count", "flags", "digests")

    def __init__(self, count: int, flags: Optional[bytearray] = None, digests: Optional[bytearray] = None):
        self.count = count
        self.flags = flags if flags is not None else bytearray(count)
        self.digests = digests if digests is not None else bytearray(count * DIGEST_SIZE)
        if len(self.flags) != count or len(self.digests) != count * DIGEST_SIZE:
            raise ManifestError(f"segment table sizes disagree with count {count}")

    def copy(self) -> "SegmentTable":
        return SegmentTable(self.count, bytearray(self.flags), bytearray(self.digests))

    def set_zero(self, index: int) -> None:
        self.flags[index] = FLAG_ZERO
        self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = ZERO_DIGEST

    def set_data(self, index: int, d: bytes) -> None:
        self.flags[index] = FLAG_DATA
        self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = d

    def get(self, index: int) -> Optional[bytes]:
        """The digest of segment `index`, or None when it is a zero segment."""
        if self.flags[index] == FLAG_ZERO:
            return None
        return bytes(self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE])

    def data_entries(self) -> Iterator[Tuple[int, bytes]]:
        """(index, digest) of every DATA segment, in disk order."""
        start = 0
        flags = self.flags
        while True:
            i = flags.find(FLAG_DATA, start)
            if i < 0:
                return
            yield i, bytes(self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE])
            start = i + 1

    def zero_runs(self) -> Iterator[Tuple[int, int]]:
        """(first index, count) of every run of zero segments, in disk order."""
        start = 0
        flags = self.flags
        while True:
            i = flags.find(FLAG_ZERO, start)
            if i < 0:
                return
            j = flags.find(FLAG_DATA, i)
            j = self.count if j < 0 else j
            yield i, j - i
            start = j

    def data_count(self) -> int:
        return self.count - self.flags.count(FLAG_ZERO)

    def unique_digests(self) -> set:
        return {d for _, d in self.data_entries()}


@dataclass
class Manifest:
    backup_id: str
    target: str
    virtual_size: int
    segment_size: int
    table: SegmentTable
    kind: str = "full"                  # "full" | "incremental"
    reason: str = ""                    # why this kind was chosen
    parent: Optional[str] = None        # backup_id of the parent (incremental only)
    generation: Optional[Dict[str, Any]] = None   # bitmap that tracks changes since this backup
    disk: Dict[str, Any] = field(default_factory=dict)
    created: str = ""
    timings: Dict[str, float] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)
    labels: Dict[str, Any] = field(default_factory=dict)
    hash: str = "xxh3-128"
    compression: str = "zstd"
    encryption: Optional[Dict[str, Any]] = None   # {cipher, key_fingerprint, naming}; None: plain
    # {level: filesystem, mountpoints, freeze_ms} | {level: crash, reason}; None: written before
    # ekko recorded it (docs/format.md "Consistency")
    consistency: Optional[Dict[str, Any]] = None

    def header(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "backup_id": self.backup_id, "target": self.target,
            "virtual_size": self.virtual_size, "segment_size": self.segment_size,
            "segment_count": self.table.count, "kind": self.kind, "reason": self.reason,
            "parent": self.parent, "generation": self.generation, "disk": self.disk,
            "created": self.created, "timings": self.timings, "counts": self.counts,
            "labels": self.labels, "hash": self.hash, "compression": self.compression,
            **({"encryption": self.encryption} if self.encryption is not None else {}),
            **({"consistency": self.consistency} if self.consistency is not None else {}),
        }


def encode(m: Manifest) -> bytes:
    if m.table.count != segment_count(m.virtual_size, m.segment_size):
        raise ManifestError(f"manifest {m.backup_id}: table has {m.table.count} entries, "
                            f"disk needs {segment_count(m.virtual_size, m.segment_size)}")
    header = json.dumps(m.header(), sort_keys=True, separators=(",", ":")).encode()
    # Streamed, so the two tables are not concatenated first, and the checksum is computed
    # over the parts: one copy of the table into the result (16 TiB at 1 MiB segments is a
    # 272 MiB table when every segment holds distinct data; see the bench).
    z = zstandard.ZstdCompressor(level=3).compressobj(size=len(m.table.flags) + len(m.table.digests))
    table = b"".join((z.compress(m.table.flags), z.compress(m.table.digests), z.flush()))
    parts = (MAGIC, _U32.pack(len(header)), header, _U64.pack(len(table)), table)
    check = xxhash.xxh3_128()
    for part in parts:
        check.update(part)
    return b"".join(parts + (check.digest(),))


def _read_header(blob: bytes, where: str) -> Tuple[Dict[str, Any], int]:
    if len(blob) < len(MAGIC) + _U32.size + DIGEST_SIZE or blob[:len(MAGIC)] != MAGIC:
        raise ManifestError(f"manifest {where}: not an ekko manifest (bad magic)")
    body, checksum = memoryview(blob)[:-DIGEST_SIZE], blob[-DIGEST_SIZE:]
    if digest(body) != checksum:
        raise ManifestError(f"manifest {where}: checksum mismatch (damaged or truncated)")
    pos = len(MAGIC)
    (hlen,) = _U32.unpack_from(blob, pos)
    pos += _U32.size
    if hlen > MAX_HEADER or pos + hlen > len(body):
        raise ManifestError(f"manifest {where}: header length {hlen} out of range")
    try:
        header = json.loads(blob[pos:pos + hlen])
    except ValueError as e:
        raise ManifestError(f"manifest {where}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise ManifestError(f"manifest {where}: header is not a JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise ManifestError(f"manifest {where}: unsupported format {header.get('format')!r}")
    return header, pos + hlen


def decode_header(blob: bytes, where: str = "") -> Dict[str, Any]:
    """Only the header (cheap: no table decompression). The whole checksum is still verified."""
    return _read_header(blob, where)[0]


def _read_table(frame, n: int) -> Tuple[bytearray, bytearray]:
    """Decompress straight into the two tables (no intermediate copy); exactly n * 17 bytes."""
    flags, digests = bytearray(n), bytearray(n * DIGEST_SIZE)
    with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as r:
        for buf in (flags, digests):
            _fill(r, buf, n)
        if r.read(1):
            raise ValueError(f"table is longer than {n} entries")
    return flags, digests


def _count(header: Dict[str, Any], key: str, minimum: int, where: str) -> int:
    v = header.get(key)
    if type(v) is not int or v < minimum:
        raise ManifestError(f"manifest {where}: {key} {v!r} is not an integer >= {minimum}")
    return v


# A zstd block holds at most 128 KiB and takes at least 4 bytes: a frame that does not declare its
# size still cannot decompress to more than this many times its own size.
_MAX_RATIO = 32768


def _consistency(val: Any) -> Optional[Dict[str, Any]]:
    """The header's `consistency`, kept only when it is an object with a string `level`: it is
    information for the operator, never a reason to refuse a manifest."""
    return val if isinstance(val, dict) and isinstance(val.get("level"), str) else None


def _table_frame(blob: bytes, where: str) -> Tuple[Dict[str, Any], int, int, int, memoryview]:
    """The header (checksum verified), virtual size, segment size, entry count and the table's zstd
    frame, every size checked against the others before anything is allocated for the table."""
    header, pos = _read_header(blob, where)
    (tlen,) = _U64.unpack_from(blob, pos)
    pos += _U64.size
    if pos + tlen != len(blob) - DIGEST_SIZE:
        raise ManifestError(f"manifest {where}: table length {tlen} does not fit the file")
    # The sizes are checked before the table is allocated: a header is not trusted with memory.
    size = _count(header, "virtual_size", 0, where)
    seg = _count(header, "segment_size", 1, where)
    n = _count(header, "segment_count", 0, where)
    if n != segment_count(size, seg):
        raise ManifestError(f"manifest {where}: segment count {n} does not match the disk size")
    frame = memoryview(blob)[pos:pos + tlen]
    try:
        declared = zstandard.frame_content_size(frame)
        end = frame_size(frame)
    except (zstandard.ZstdError, ValueError) as e:
        raise ManifestError(f"manifest {where}: the table is not a zstd frame: {e}") from e
    if end != tlen:
        raise ManifestError(f"manifest {where}: the table's zstd frame is {end} bytes, the table length {tlen}")
    want = n * (1 + DIGEST_SIZE)
    if declared != want and (declared != -1 or want > tlen * _MAX_RATIO):
        held = f"holds {declared} bytes" if declared != -1 else f"of {tlen} bytes cannot hold them"
        raise ManifestError(f"manifest {where}: {n} entries need {want} table bytes; the table {held}")
    return header, size, seg, n, frame


def _fields(header: Dict[str, Any]) -> Dict[str, Any]:
    """The Manifest's fields from its header, but the sizes and the table (KeyError: one missing)."""
    return dict(
        backup_id=header["backup_id"], target=header["target"], kind=header["kind"],
        reason=header.get("reason", ""), parent=header.get("parent"), generation=header.get("generation"),
        disk=header.get("disk") or {}, created=header.get("created", ""),
        timings=header.get("timings") or {}, counts=header.get("counts") or {},
        labels=header.get("labels") or {}, hash=header["hash"], compression=header["compression"],
        encryption=header.get("encryption"), consistency=_consistency(header.get("consistency")))


def decode(blob: bytes, where: str = "") -> Manifest:
    header, size, seg, n, frame = _table_frame(blob, where)
    try:
        table = SegmentTable(n, *_read_table(frame, n))
        m = Manifest(virtual_size=size, segment_size=seg, table=table, **_fields(header))
    except (KeyError, TypeError, ValueError, zstandard.ZstdError) as e:
        raise ManifestError(f"manifest {where}: bad content: {e}") from e
    if m.hash not in HASHES:
        raise ManifestError(f"manifest {where}: unknown hash {m.hash!r}")
    if table.flags.count(FLAG_ZERO) + table.flags.count(FLAG_DATA) != n:
        raise ManifestError(f"manifest {where}: the table has flag values other than ZERO and DATA (reserved)")
    return m


@dataclass
class TableStream:
    """A manifest's identity and its table, the digests read a block at a time from the
    compressed table (gc and verify: a 16 Mi-entry table is 256 MiB of digests decompressed, and
    those walk it once). Checked as decode() checks, the flags included, before the first block,
    but for one thing: a table whose frame does not declare its size and whose digests are fewer
    or more than its entries raises ManifestError when blocks() reaches that point. blocks() can
    be walked more than once."""
    backup_id: str
    hash: str
    encryption: Optional[Dict[str, Any]]
    count: int
    flags: bytes
    frame: memoryview = field(repr=False)
    where: str = ""

    def blocks(self, size: int) -> Iterator[Tuple[bytes, bytes]]:
        """(flags, packed digests) of `size` entries at a time, in disk order."""
        n = self.count
        try:
            with zstandard.ZstdDecompressor().stream_reader(self.frame, read_across_frames=False) as r:
                _fill(r, bytearray(n), n)             # the flags, kept since the check
                for start in range(0, n, size):
                    end = min(start + size, n)
                    yield self.flags[start:end], bytes(_fill(r, bytearray((end - start) * DIGEST_SIZE), n))
                if r.read(1):
                    raise ValueError(f"table is longer than {n} entries")
        except (ValueError, zstandard.ZstdError) as e:
            raise ManifestError(f"manifest {self.where}: bad content: {e}") from e


def _fill(r, buf: bytearray, n: int) -> bytearray:
    """buf filled from the decompressing reader r (a table of n entries)."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        k = r.readinto(view[got:])
        if not k:
            raise ValueError(f"table is shorter than {n} entries")
        got += k
    return buf


def decode_stream(blob: bytes, where: str = "") -> TableStream:
    """The manifest's identity and a TableStream of its table: memory for the flags (1 byte an
    entry) instead of the whole table (17)."""
    header, _, _, n, frame = _table_frame(blob, where)
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as r:
            flags = bytes(_fill(r, bytearray(n), n))
        f = _fields(header)              # a header decode() refuses is refused here too
        ts = TableStream(backup_id=f["backup_id"], hash=f["hash"], encryption=f["encryption"], count=n,
                         flags=flags, frame=frame, where=where)
    except (KeyError, TypeError, ValueError, zstandard.ZstdError) as e:
        raise ManifestError(f"manifest {where}: bad content: {e}") from e
    if ts.hash not in HASHES:
        raise ManifestError(f"manifest {where}: unknown hash {ts.hash!r}")
    if flags.count(FLAG_ZERO) + flags.count(FLAG_DATA) != n:
        raise ManifestError(f"manifest {where}: the table has flag values other than ZERO and DATA (reserved)")
    return ts

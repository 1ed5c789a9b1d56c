"""Segments: hash, compress, and verify-before-store of one fixed-size slice of a disk.

A segment object in the store (format in docs/format.md):

    magic 'EKS1' | u8 compression | u8 hash | u16 reserved | u32 raw length | 16-byte digest | payload

The digest is xxh3-128 of the raw (uncompressed) bytes, and it names the object, so identical
segments are stored once per store namespace. xxh3 is not a cryptographic hash: it detects
accidental damage, not a forged collision, so deduplication is scoped to one namespace (one
project), where every writer is already trusted with every reader's data.

In an encrypted store (codec.py, crypto.py) the object is the same, but its name is a keyed
hash of the raw bytes (the codec's `name`) while the header keeps the xxh3-128 of the raw bytes;
the store seals the object in an envelope that authenticates it together with its name.

Two implementations of the same bytes:

    native   _segcore.c: hash, zero test, encode and decode in C with the GIL released for the
             whole segment, so the backup's workers use every core (issue 15). Used when the
             extension is built (`make`, scripts/install-deps.sh) and EKKO_NATIVE is not "0".
    python   the functions named _py_* below: the reference. python-xxhash holds the GIL while it
             hashes, so this path runs on about one core whatever the host has.

Both write byte-identical objects and refuse damaged ones with the same IntegrityError messages
(tests/unit/test_segment_native.py). That needs one zstd library under both: Debian's libzstd,
which its python3-zstandard links and the extension links (scripts/install-deps.sh sees to it).
`BACKEND` says which one this process uses.
"""

import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, Optional

import xxhash
import zstandard

from .codec import PLAIN, Codec
from ..errors import EncodeMismatch, IntegrityError

MAGIC = b"EKS1"
HEADER = struct.Struct("<4sBBHI16s")
COMP_NONE = 0
COMP_ZSTD = 1
HASH_XXH3_128 = 1
DIGEST_SIZE = 16
ZERO_DIGEST = bytes(DIGEST_SIZE)
# Compression must save at least this fraction to be kept: decompressing costs time on restore.
MIN_SAVING = 1 / 32


def _py_digest(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


def segment_key(d: bytes) -> str:
    h = d.hex()
    return f"segments/{h[:3]}/{h}"


def digest_from_key(key: str) -> bytes:
    return bytes.fromhex(key.rsplit("/", 1)[1])


_zero_cache: Dict[int, bytes] = {}


def _py_is_zero(data) -> bool:
    n = len(data)
    zeros = _zero_cache.get(n)
    if zeros is None:
        zeros = _zero_cache.setdefault(n, bytes(n))
    return data == zeros


class _Codecs(threading.local):
    """zstd contexts are not thread-safe; one per thread, reused across segments."""

    def __init__(self):
        self.level = None
        self.cctx = None
        self.dctx = zstandard.ZstdDecompressor()

    def compressor(self, level: int):
        if self.level != level:
            self.cctx = zstandard.ZstdCompressor(level=level)
            self.level = level
        return self.cctx


_codecs = _Codecs()


@dataclass(frozen=True)
class EncodedSegment:
    digest: bytes
    blob: bytes          # the object as stored
    raw_length: int

    @property
    def key(self) -> str:
        return segment_key(self.digest)


SAMPLE = 16 * 1024


def _compressible(raw, level: int) -> bool:
    """Whether zstd is worth trying: three 16 KiB samples (start, middle, end) compressed
    together must save MIN_SAVING. Incompressible data (random, already compressed or
    encrypted guest data) then costs 5% of a compression instead of a whole one: 0.85 CPU s
    per GiB on the benchmark machine. A segment whose three samples all fail to compress but
    which would compress elsewhere is stored as is: a little space for a lot of CPU."""
    n = len(raw)
    if n < 8 * SAMPLE:
        return True
    view = memoryview(raw)
    mid = (n // 2) & ~(SAMPLE - 1)
    sample = b"".join((view[:SAMPLE], view[mid:mid + SAMPLE], view[n - SAMPLE:]))
    return len(_codecs.compressor(level).compress(sample)) <= len(sample) * (1 - MIN_SAVING)


def _py_encode(raw, level: int = 1, compress: bool = True, known_digest: "bytes | None" = None,
               codec: Codec = PLAIN) -> EncodedSegment:
    """raw bytes -> verified object. Decodes what it built and re-hashes it before returning,
    so a compressor bug can never reach the store (verify before upload). `known_digest` is the
    segment's name under `codec` when the caller has it already."""
    name = known_digest or codec.name(raw)
    d = _py_digest(raw) if codec.encrypted else name
    comp, payload = COMP_NONE, raw
    if compress and _compressible(raw, level):
        packed = _codecs.compressor(level).compress(raw)
        if len(packed) <= len(raw) * (1 - MIN_SAVING):
            comp, payload = COMP_ZSTD, packed
    # One copy of the payload into the object (header + bytes(payload) made two: profiled).
    blob = b"".join((HEADER.pack(MAGIC, comp, HASH_XXH3_128, 0, len(raw), d), payload))
    if comp == COMP_ZSTD:
        try:
            _py_decode(blob, name, codec=codec)
        except IntegrityError as e:
            raise EncodeMismatch(segment_key(name), str(e)) from e
    elif len(blob) != HEADER.size + len(raw) or _py_digest(memoryview(blob)[HEADER.size:]) != d:
        # Stored as is: decoding is taking the payload, so re-hash it in place (no copy).
        raise EncodeMismatch(segment_key(name), "object does not match its digest after encoding")
    return EncodedSegment(name, blob, len(raw))


def frame_size(frame) -> int:
    """Bytes of the zstd frame that starts `frame` (RFC 8878: header, blocks of 3-byte headers,
    optional 4-byte checksum); ValueError when it is cut short. The decompressor stops at the
    frame's end, so this is what tells bytes after it apart from the frame."""
    pos = zstandard.frame_header_size(frame)
    while True:
        if pos + 3 > len(frame):
            raise ValueError("the zstd frame is cut short")
        block = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        pos += 3
        kind = (block >> 1) & 3
        if kind == 3:
            raise ValueError("reserved zstd block type")
        if kind == 2 and _reserved_modes(frame, pos, block >> 3):
            raise ValueError("reserved bits of a zstd sequences header are set")
        pos += 1 if kind == 1 else block >> 3          # RLE: one byte; raw and compressed: the size
        if block & 1:                                  # the last block
            return pos + (4 if frame[4] & 4 else 0)


def _reserved_modes(frame, start: int, size: int) -> bool:
    """Whether the compressed block frame[start:start + size] sets the two reserved bits of its
    Symbol_Compression_Modes (RFC 8878 3.1.1.3.2.1: "must be all-zeroes"). zstd 1.5.4 (Debian 12)
    decodes such a block as if they were clear (1.5.5 refuses it), so a flipped bit there would go
    unseen, like the frame descriptor's unused bit (_check_frame). Finds the byte by skipping the
    literals section by its header's sizes; whatever is cut short is zstd's to refuse."""
    end = min(start + size, len(frame))
    if start >= end:
        return False
    b0 = frame[start]
    kind, size_format = b0 & 3, (b0 >> 2) & 3
    if kind < 2:                                       # raw or RLE literals: a 1, 2 or 3-byte header
        hdr = (1, 2, 1, 3)[size_format]
        if start + hdr > end:
            return False
        v = int.from_bytes(frame[start:start + hdr], "little")
        regenerated = v >> 3 if hdr == 1 else v >> 4
        literals = hdr + (regenerated if kind == 0 else 1)
    else:                                              # compressed or treeless: 3, 3, 4 or 5 bytes
        hdr, bits = ((3, 10), (3, 10), (4, 14), (5, 18))[size_format]
        if start + hdr > end:
            return False
        v = int.from_bytes(frame[start:start + hdr], "little")
        literals = hdr + ((v >> (4 + bits)) & ((1 << bits) - 1))
    p = start + literals
    if p >= end or frame[p] == 0:                      # no sequences: no modes byte
        return False
    p += 1 if frame[p] < 128 else 2 if frame[p] < 255 else 3
    return p < end and frame[p] & 3 != 0


def _check_frame(payload, length: int, name: str) -> None:
    """The zstd frame as encode() writes it, exactly: it declares the raw length (a damaged header
    could declare terabytes, which zstandard would allocate), leaves the descriptor's unused bit
    clear (zstd ignores it: damage there would go unseen), and fills the payload to its end."""
    try:
        declared = zstandard.frame_content_size(payload)
        end = frame_size(payload)
    except (zstandard.ZstdError, ValueError, IndexError) as e:
        raise IntegrityError(f"segment {name}: not a zstd frame: {e}") from e
    if declared != length or payload[4] & 0x10:
        raise IntegrityError(f"segment {name}: zstd frame header does not match the segment (damaged)")
    if end != len(payload):
        raise IntegrityError(f"segment {name}: {len(payload) - end} byte(s) after the zstd frame (damaged)")


def _py_decode(blob: bytes, expected: bytes, where: str = "", codec: Codec = PLAIN) -> bytes:
    """Object bytes -> raw bytes, or IntegrityError if anything does not match `expected` (the
    segment's name). Under an encrypting codec `blob` is what the store opened (the envelope
    already proved it is the object stored under that name): the header's xxh3-128 is checked
    against the content, not against the keyed name."""
    name = where or segment_key(expected)
    if len(blob) < HEADER.size:
        raise IntegrityError(f"segment {name}: truncated ({len(blob)} bytes)")
    magic, comp, hash_id, reserved, length, stored = HEADER.unpack_from(blob)
    if magic != MAGIC or hash_id != HASH_XXH3_128:
        raise IntegrityError(f"segment {name}: not an ekko segment (bad magic or hash id)")
    if reserved:
        raise IntegrityError(f"segment {name}: reserved header field is {reserved}, not 0 (damaged)")
    if codec.encrypted:
        expected = stored
    elif stored != expected:
        raise IntegrityError(f"segment {name}: header digest {stored.hex()} does not match its name")
    payload = memoryview(blob)[HEADER.size:]
    if comp == COMP_ZSTD:
        _check_frame(payload, length, name)
        try:
            raw = _codecs.dctx.decompress(payload, max_output_size=length)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"segment {name}: cannot decompress: {e}") from e
    elif comp == COMP_NONE:
        raw = bytes(payload)
    else:
        raise IntegrityError(f"segment {name}: unknown compression id {comp}")
    if len(raw) != length or _py_digest(raw) != expected:
        raise IntegrityError(f"segment {name}: content does not match its digest")
    return raw


# -- the native path (_segcore.c) --------------------------------------------------------------
# _segcore's decode/verify codes, in the order _py_decode checks (keep in sync with _segcore.c).
E_OK, E_TRUNCATED, E_MAGIC, E_RESERVED, E_NAME, E_FRAME, E_FRAME_HEADER, E_AFTER_FRAME, E_DECOMPRESS, \
    E_COMP, E_CONTENT, E_STORED = range(12)


def _native_error(code: int, blob, expected: bytes, name: str) -> IntegrityError:
    """The IntegrityError _py_decode raises for the check that _segcore reported failing, with the
    same message. The two whose text comes from python-zstandard (not a frame, cannot decompress)
    are re-derived by the same Python calls, on this error path only."""
    payload = memoryview(blob)[HEADER.size:]
    if code == E_TRUNCATED:
        return IntegrityError(f"segment {name}: truncated ({len(blob)} bytes)")
    if code == E_MAGIC:
        return IntegrityError(f"segment {name}: not an ekko segment (bad magic or hash id)")
    _, comp, _, reserved, length, stored = HEADER.unpack_from(blob)
    if code == E_RESERVED:
        return IntegrityError(f"segment {name}: reserved header field is {reserved}, not 0 (damaged)")
    if code == E_NAME:
        return IntegrityError(f"segment {name}: header digest {stored.hex()} does not match its name")
    if code in (E_FRAME, E_FRAME_HEADER, E_AFTER_FRAME):
        try:
            _check_frame(payload, length, name)
        except IntegrityError as e:
            return e
    if code == E_DECOMPRESS:
        try:
            _codecs.dctx.decompress(payload, max_output_size=length)
        except zstandard.ZstdError as e:
            err = IntegrityError(f"segment {name}: cannot decompress: {e}")
            err.__cause__ = e
            return err
    if code == E_COMP:
        return IntegrityError(f"segment {name}: unknown compression id {comp}")
    # E_CONTENT, or a frame check Python does not repeat (cannot happen with one libzstd: the
    # test of equal versions guards it)
    return IntegrityError(f"segment {name}: content does not match its digest")


def _native_decode(blob: bytes, expected: bytes, where: str = "", codec: Codec = PLAIN) -> bytes:
    got = _segcore.decode(blob, None if codec.encrypted else expected)
    if isinstance(got, int):
        raise _native_error(got, blob, expected, where or segment_key(expected))
    return got


def _native_encode(raw, level: int = 1, compress: bool = True, known_digest: "bytes | None" = None,
                   codec: Codec = PLAIN) -> EncodedSegment:
    if codec.encrypted:
        name: Optional[bytes] = known_digest or codec.name(raw)
        d, blob, code = _segcore.encode(raw, level, compress, None)
    else:
        name = known_digest
        d, blob, code = _segcore.encode(raw, level, compress, name)
    name = name or d
    if code == E_STORED:
        raise EncodeMismatch(segment_key(name), "object does not match its digest after encoding")
    if code != E_OK:
        e = _native_error(code, blob, name, segment_key(name))
        raise EncodeMismatch(segment_key(name), str(e)) from e
    return EncodedSegment(name, blob, len(raw))


try:
    from . import _segcore
    BUILT = True
except ImportError:          # not built (a checkout without `make`): the Python path
    BUILT = False

BACKEND = "native" if BUILT and os.environ.get("EKKO_NATIVE", "1") != "0" else "python"
if BACKEND == "native":
    digest, is_zero, encode, decode = _segcore.xxh3_128, _segcore.is_zero, _native_encode, _native_decode
else:
    digest, is_zero, encode, decode = _py_digest, _py_is_zero, _py_encode, _py_decode

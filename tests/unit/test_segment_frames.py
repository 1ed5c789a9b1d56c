"""Deliberate tests of segment._reserved_modes / frame_size: real zstd frames chosen so that every
kind of literals section header (RFC 8878 3.1.1.3.1) and of sequences count (3.1.1.3.2) occurs,
located by an independent reference parser written here (the oracle), plus hand-built block bodies
for the shapes zstd does not write on small inputs (RLE literals, a 3-byte sequences count,
blocks cut short). libzstd 1.5.4 ignores the two reserved bits of Symbol_Compression_Modes:
decode must refuse them itself.
"""

import random

import pytest
import xxhash
import zstandard

from ekko_libvirt.errors import IntegrityError
from ekko_libvirt.format import segment as S
from ekko_libvirt.format.codec import PLAIN


# -- the oracle: a plainly written RFC 8878 parser of the blocks of one frame -------------------
def ref_blocks(frame):
    """(body start, block type, block size, info) for each block; info (compressed blocks only)
    holds the literals type/size format, the sequences count and the offset of the modes byte."""
    fhd = frame[4]
    fcs_flag, single, did = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + [0, 1, 2, 4][did] + [1 if single else 0, 2, 4, 8][fcs_flag]
    out = []
    while True:
        bh = frame[pos] + (frame[pos + 1] << 8) + (frame[pos + 2] << 16)
        last, kind, size = bh & 1, (bh >> 1) & 3, bh >> 3
        body = pos + 3
        info = None
        if kind == 2:
            b0 = frame[body]
            lt, sf = b0 & 3, (b0 >> 2) & 3
            if lt in (0, 1):                                    # raw / RLE
                if sf in (0, 2):
                    lh = 1
                    regen = b0 >> 3
                elif sf == 1:
                    lh = 2
                    regen = (b0 >> 4) + (frame[body + 1] << 4)
                else:
                    lh = 3
                    regen = (b0 >> 4) + (frame[body + 1] << 4) + (frame[body + 2] << 12)
                csize = regen if lt == 0 else 1
            else:                                               # compressed / treeless
                lh = {0: 3, 1: 3, 2: 4, 3: 5}[sf]
                v = 0
                for k in range(lh):
                    v += frame[body + k] << (8 * k)
                nb = {3: 10, 4: 14, 5: 18}[lh]
                regen = (v >> 4) % (1 << nb)
                csize = (v >> (4 + nb)) % (1 << nb)
            s = body + lh + csize
            c0 = frame[s]
            if c0 < 128:
                nseq, cbytes = c0, 1
            elif c0 < 255:
                nseq, cbytes = ((c0 - 128) << 8) + frame[s + 1], 2
            else:
                nseq, cbytes = frame[s + 1] + (frame[s + 2] << 8) + 0x7F00, 3
            info = dict(lt=lt, sf=sf, regen=regen, nseq=nseq, cbytes=cbytes,
                        count=s, modes=None if nseq == 0 else s + cbytes)
        out.append((body, kind, size, info))
        pos = body + (1 if kind == 1 else size)
        if last:
            return out


# -- the frames ----------------------------------------------------------------------------------
_r = random.Random(20260)
_WORDS = [bytes(_r.choice(b"abcdefghijklmnop") for _ in range(_r.randint(2, 8))) for _ in range(300)]


def _text(n):
    out = bytearray()
    while len(out) < n:
        out += _r.choice(_WORDS) + b" "
    return bytes(out[:n])


def _twice(n):
    x = _r.randbytes(n)
    return x + x


def _blocked(n):
    """A raw first block, then a block of 'Q' + 40-byte pieces of it."""
    base = _r.randbytes(40 * n)
    offs = list(range(0, 40 * n, 40))
    _r.shuffle(offs)
    rest = b"".join(b"Q" + base[o:o + 40] for o in offs)
    c = zstandard.ZstdCompressor(level=1).compressobj(size=len(base) + len(rest))
    f = c.compress(base) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) + c.compress(rest) + c.flush()
    return base + rest, f


def _one(raw, level):
    return raw, zstandard.ZstdCompressor(level=level).compress(raw)


CASES = {
    "raw-lits-1byte-1seq": _one(_twice(20), 1),
    "raw-lits-2byte-1seq": _one(_twice(100), 1),
    "raw-lits-3byte-1seq": _one(_twice(5000), 1),        # modes byte in the block's last half
    "raw-lits-3byte-5seq": _one(_twice(5000), 19),
    "raw-lits-1byte-sf2": _one(bytes(18), 19),
    "raw-lits-1byte-zeros": _one(bytes(300), 1),
    "raw-lits-2byte-149seq": _one(b"".join(bytes([_r.randrange(4)]) + bytes(3) for _ in range(300)), 1),
    "huff-sf0-64seq": _one(b"".join(bytes([_r.randrange(4)]) + bytes(3) for _ in range(300)), 19),
    "huff-sf1": _one(_text(300), 1),
    "huff-sf1-0seq": _one(bytes(_r.choice(b"abcdefghijklmnop") for _ in range(300)), 1),
    "huff-sf2": _one(_text(2000), 1),
    "huff-sf2-2byte-count": _one(_text(20000), 1),
    "huff-sf3": _one(_text(120000), 1),
    "multi-block-treeless": _one(_text(120000), 19),
    "raw-block-then-raw-lits": _blocked(20),
    "raw-block-then-huff": _blocked(200),
}

DECODERS = [S._py_decode] + ([S._native_decode] if S.BUILT else [])
ENCODERS = [S._py_encode] + ([S._native_encode] if S.BUILT else [])


def wrap(raw, frame):
    d = xxhash.xxh3_128_digest(raw)
    return S.HEADER.pack(S.MAGIC, S.COMP_ZSTD, S.HASH_XXH3_128, 0, len(raw), d) + frame, d


def set_bits(b, i, mask):
    return b[:i] + bytes([b[i] | mask]) + b[i + 1:]


def flip(b, i, bit):
    return b[:i] + bytes([b[i] ^ (1 << bit)]) + b[i + 1:]


def test_the_frames_reach_every_header_shape():
    seen = set()
    for raw, frame in CASES.values():
        assert zstandard.ZstdDecompressor().decompress(frame) == raw
        for _, kind, _, info in ref_blocks(frame):
            seen.add(("block", kind))
            if info:
                seen.add(("lits", info["lt"] >= 2, info["sf"]))
                seen.add(("count", 0 if info["nseq"] == 0 else info["cbytes"]))
                seen.add(("treeless", info["lt"] == 3))
                if info["nseq"] == 1:
                    seen.add("one sequence")
                if info["cbytes"] == 2 and frame[info["count"]] == 128:
                    seen.add("count byte 128")
    want = {("block", 0), ("block", 2), ("count", 0), ("count", 1), ("count", 2), ("treeless", True),
            "one sequence", "count byte 128"}
    want |= {("lits", False, sf) for sf in range(4)} | {("lits", True, sf) for sf in range(4)}
    assert want <= seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_reserved_modes_bits_are_refused_where_the_oracle_finds_them(case):
    raw, frame = CASES[case]
    blocks = ref_blocks(frame)
    assert S.frame_size(frame) == len(frame)
    blob, d = wrap(raw, frame)
    for dec in DECODERS:
        assert dec(blob, d) == raw
    off = S.HEADER.size
    modes_found = 0
    for body, kind, size, info in blocks:
        if kind != 2:
            continue
        assert S._reserved_modes(frame, body, size) is False
        if info["modes"] is None:
            # no modes byte: setting the low bits of the byte after the count changes nothing here
            continue
        m = info["modes"]
        assert body < m < body + size
        modes_found += 1
        for mask in (1, 2, 3):
            bad = set_bits(frame, m, mask)
            assert bad != frame
            assert S._reserved_modes(bad, body, size) is True
            with pytest.raises(ValueError):
                S.frame_size(bad)
            badblob = set_bits(blob, off + m, mask)
            for dec in DECODERS:
                with pytest.raises(IntegrityError):
                    dec(badblob, d)
        # non-reserved bits of the modes byte, the count and the literals header: refused or equal
        for i in [m] + list(range(info["count"], m)) + [body]:
            for bit in range(8):
                if i == m and bit < 2:
                    continue
                damaged = flip(blob, off + i, bit)
                for dec in DECODERS:
                    try:
                        assert dec(damaged, d) == raw
                    except IntegrityError:
                        pass
    if case != "huff-sf1-0seq":
        assert modes_found


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_decode_round_trip_in_both_paths(case):
    raw = CASES[case][0]
    enc = S.encode(raw)
    assert S.decode(enc.blob, enc.digest) == raw
    blobs = set()
    for e in ENCODERS:
        got = e(raw, level=1)
        assert got.digest == PLAIN.name(raw)
        blobs.add(got.blob)
        for dec in DECODERS:
            assert dec(got.blob, got.digest) == raw
    assert len(blobs) == 1


# -- hand-built block bodies (the function alone) ------------------------------------------------
def test_an_empty_or_cut_short_block_has_no_modes_byte():
    assert S._reserved_modes(b"\x00\x01\x03", 3, 0) is False             # start == end
    assert S._reserved_modes(bytes([0x04, 0x00, 0x01, 0x03]), 0, 1) is False   # 2-byte raw header cut
    assert S._reserved_modes(bytes([0x0C, 0x00, 0x00, 0x01, 0x03]), 0, 2) is False  # 3-byte raw header cut
    assert S._reserved_modes(bytes([0x02, 0x00, 0x00, 0x01, 0x03]), 0, 2) is False  # compressed header cut
    assert S._reserved_modes(b"\x00", 0, 1) is False                      # literals fill the block
    assert S._reserved_modes(b"\x00\x01\x03", 0, 2) is False              # count ends the block
    assert S._reserved_modes(b"\x00\x01", 0, 2) is False


def test_rle_literals_take_one_byte_whatever_their_regenerated_size():
    assert S._reserved_modes(bytes([0x01 | 5 << 3, 0x41, 0x01, 0x03]), 0, 4) is True
    assert S._reserved_modes(bytes([0x01 | 5 << 3, 0x41, 0x01, 0x00]), 0, 4) is False
    # 2-byte and 3-byte RLE headers
    assert S._reserved_modes(bytes([0x05 | 0x30, 0x02, 0x41, 0x01, 0x02]), 0, 5) is True
    assert S._reserved_modes(bytes([0x0D | 0x30, 0x02, 0x00, 0x41, 0x01, 0x01]), 0, 6) is True


def test_raw_literals_headers():
    assert S._reserved_modes(bytes([0x00 | 2 << 3, 9, 9, 0x01, 0x03]), 0, 5) is True
    assert S._reserved_modes(bytes([0x04 | 2 << 4, 0x00, 9, 9, 0x01, 0x01]), 0, 6) is True
    assert S._reserved_modes(bytes([0x0C | 2 << 4, 0x00, 0x00, 9, 9, 0x01, 0x02]), 0, 7) is True


def test_compressed_literals_sizes_come_from_their_own_bits():
    # size format 0, 3-byte header: regenerated 7, compressed 2 (bits 14..23)
    v = 2 | 0 << 2 | 7 << 4 | 2 << 14
    body = v.to_bytes(3, "little") + b"\x99\x99" + b"\x01\x03"
    assert S._reserved_modes(body, 0, len(body)) is True
    assert S._reserved_modes(body[:-1] + b"\x00", 0, len(body)) is False
    # size format 2, 4-byte header, 14-bit sizes; size format 3, 5-byte header, 18-bit sizes
    for sf, hdr, bits in ((1, 3, 10), (2, 4, 14), (3, 5, 18)):
        for comp in (1, 3, 200):
            v = 2 | sf << 2 | ((1 << bits) - 1) << 4 | comp << (4 + bits)
            body = v.to_bytes(hdr, "little") + bytes([0x98]) * comp + b"\x01\x03"
            assert S._reserved_modes(body, 0, len(body)) is True
            assert S._reserved_modes(body[:-1] + b"\x04", 0, len(body)) is False


def test_sequence_counts_of_one_two_and_three_bytes():
    assert S._reserved_modes(b"\x00\x7f\x03", 0, 3) is True
    assert S._reserved_modes(b"\x00\x80\x05\x03", 0, 4) is True
    assert S._reserved_modes(b"\x00\x80\x05\x04", 0, 4) is False
    assert S._reserved_modes(b"\x00\xfe\xff\x02", 0, 4) is True
    assert S._reserved_modes(b"\x00\xff\x00\x00\x03\x00\x00", 0, 7) is True
    assert S._reserved_modes(b"\x00\xff\x00\x00\x00\x03\x03", 0, 7) is False
    assert S._reserved_modes(b"\x00\xff\x00\x03", 0, 4) is False          # the 3-byte count ends the block

"""Property tests of the segment object (ekko_libvirt/format/segment.py) and of the sealed envelope
(crypto.SealedCodec) around objects: random contents round trip, and every single-bit flip,
truncation or appended byte of a stored object is caught by decode (IntegrityError), never
another exception and never wrong bytes.
"""

import struct

import pytest
import xxhash
from hypothesis import example, given, settings, strategies as st

from ekko_libvirt.format import manifest as M
from ekko_libvirt.format import segment as S
from ekko_libvirt.format.codec import PLAIN
from ekko_libvirt.format.crypto import SealedCodec
from ekko_libvirt.errors import IntegrityError

# the sealed objects have every bit flipped under AES-GCM: a sixth of the profile's examples
FEW = settings(max_examples=max(10, settings.default.max_examples // 6))
SEALED = SealedCodec(bytes(range(32)))
codecs = st.sampled_from([PLAIN, SEALED])
RESERVED = range(6, 8)              # the u16 "reserved, 0" field of the header


@st.composite
def raws(draw, max_size=300):
    """Contents a disk has: random, all zeros, one repeated pattern, text: so that both
    compression 0 and 1 occur."""
    kind = draw(st.sampled_from(["random", "zeros", "pattern", "text"]))
    n = draw(st.integers(1, max_size))
    if kind == "random":
        return draw(st.binary(min_size=n, max_size=n))
    if kind == "zeros":
        return bytes(n)
    if kind == "pattern":
        p = draw(st.binary(min_size=1, max_size=8))
        return (p * n)[:n]
    return (draw(st.text("abc ef\n", min_size=1, max_size=40)).encode() * n)[:n]


def encode(raw, codec, level, compress):
    return S.encode(raw, level=level, compress=compress, codec=codec)


def check_object(enc, raw, codec):
    magic, comp, hash_id, reserved, length, stored = S.HEADER.unpack_from(enc.blob)
    assert (magic, hash_id, reserved, length) == (S.MAGIC, S.HASH_XXH3_128, 0, len(raw))
    assert stored == xxhash.xxh3_128_digest(raw)          # the header: xxh3-128 of the raw bytes, always
    assert enc.digest == codec.name(raw) and enc.raw_length == len(raw)
    payload = enc.blob[S.HEADER.size:]
    if comp == S.COMP_NONE:
        assert payload == raw
    else:
        assert comp == S.COMP_ZSTD and len(payload) <= len(raw) * (1 - S.MIN_SAVING)


@given(raw=raws(), codec=codecs, level=st.integers(1, 6), compress=st.booleans())
def test_round_trip(raw, codec, level, compress):
    enc = encode(raw, codec, level, compress)
    check_object(enc, raw, codec)
    assert S.decode(enc.blob, enc.digest, codec=codec) == raw
    if not compress:
        assert enc.blob[4] == S.COMP_NONE


@settings(max_examples=max(5, settings.default.max_examples // 12))
@given(raw=raws(max_size=64), codec=codecs, reps=st.integers(8 * S.SAMPLE // 64, 12 * S.SAMPLE // 64 + 3))
def test_round_trip_of_segments_large_enough_to_be_sampled(raw, codec, reps):
    """From 8 x 16 KiB on, three samples decide whether zstd is tried."""
    big = raw * reps
    enc = S.encode(big, codec=codec)
    check_object(enc, big, codec)
    assert S.decode(enc.blob, enc.digest, codec=codec) == big


def must_refuse(blob, name, codec, what):
    try:
        got = S.decode(blob, name, codec=codec)
    except IntegrityError:
        return
    except Exception as e:                               # noqa: BLE001  (the property: only IntegrityError)
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: a damaged object decoded ({'same' if got else 'other'} bytes)")


def flip(blob, i, bit):
    return blob[:i] + bytes([blob[i] ^ (1 << bit)]) + blob[i + 1:]


# The zstd frame header descriptor (the first byte after the zstd magic): its bit 7 can make the
# frame declare terabytes, and zstd ignores its bit 4; decode checks both (segment._check_frame).
FHD = S.HEADER.size + 4


@given(raw=raws(), codec=codecs, compress=st.booleans())
# libzstd 1.5.4 ignores the reserved bits of this block's sequences header: decode checks them (frame_size)
@example(raw=bytes(18), codec=PLAIN, compress=True)
def test_every_bit_flip_truncation_and_append_is_caught(raw, codec, compress):
    enc = encode(raw, codec, 1, compress)
    blob = enc.blob
    for i in range(len(blob)):
        for bit in range(8):
            must_refuse(flip(blob, i, bit), enc.digest, codec, f"bit {bit} of byte {i}")
    for n in range(len(blob)):
        must_refuse(blob[:n], enc.digest, codec, f"truncated to {n}")
    for tail in (b"\0", b"\x28\xb5\x2f\xfd", bytes(17)):
        must_refuse(blob + tail, enc.digest, codec, f"{tail!r} appended")


@given(raw=raws(), codec=codecs, tail=st.binary(min_size=1, max_size=20))
@example(raw=bytes(300), codec=PLAIN, tail=b"\0")
def test_bytes_appended_to_a_compressed_object_are_caught(raw, codec, tail):
    enc = encode(raw, codec, 1, True)
    if enc.blob[4] == S.COMP_ZSTD:
        must_refuse(enc.blob + tail, enc.digest, codec, f"{tail!r} appended")


@given(raw=raws(), codec=codecs, bit=st.integers(0, 15))
def test_a_flip_in_the_reserved_field_is_caught(raw, codec, bit):
    enc = encode(raw, codec, 1, True)
    must_refuse(flip(enc.blob, 6 + bit // 8, bit % 8), enc.digest, codec, f"reserved bit {bit}")


@given(raw=raws(), codec=codecs, bit=st.integers(0, 7))
@example(raw=bytes(300), codec=PLAIN, bit=7)
def test_a_flip_in_the_zstd_frame_header_is_caught_or_harmless(raw, codec, bit):
    """Caught, or (zstd ignores the descriptor's unused bit) the exact bytes: never wrong bytes,
    never another exception."""
    enc = encode(raw, codec, 1, True)
    if enc.blob[4] != S.COMP_ZSTD:
        return
    try:
        got = S.decode(flip(enc.blob, FHD, bit), enc.digest, codec=codec)
    except IntegrityError:
        return
    except Exception as e:                               # noqa: BLE001
        raise AssertionError(f"frame header bit {bit}: {type(e).__name__}: {e}") from e
    assert got == raw


@given(raw=raws(), other=raws(), codec=codecs)
def test_an_object_under_another_name_is_refused(raw, other, codec):
    """A plain object whose name is not its content's digest is refused (under a sealing codec
    the envelope's associated data binds an object to its name, see the next test)."""
    enc = encode(raw, codec, 1, True)
    name = codec.name(other)
    if name == enc.digest or codec is SEALED:
        return
    must_refuse(enc.blob, name, codec, "another name")


@FEW
@given(raw=raws(max_size=120), data=st.data())
def test_every_bit_flip_of_a_sealed_object_fails_its_tag(raw, data):
    """The envelope (docs/format.md, "Sealed object"): any altered bit, prefix included, and any
    other key (name) is an IntegrityError; the plaintext never comes back altered."""
    key = "segments/abc/" + SEALED.name(raw).hex()
    plain = S.encode(raw, codec=SEALED).blob
    sealed = SEALED.seal(key, plain)
    assert SEALED.open(key, sealed) == plain
    for i in range(len(sealed)):
        for bit in range(8):
            with pytest.raises(IntegrityError):
                SEALED.open(key, flip(sealed, i, bit))
    for n in range(len(sealed)):
        with pytest.raises(IntegrityError):
            SEALED.open(key, sealed[:n])
    with pytest.raises(IntegrityError):
        SEALED.open(key + "0", sealed)


@FEW
@given(count=st.integers(0, 12), data=st.data())
def test_a_sealed_manifest_round_trips_and_refuses_every_bit_flip(count, data):
    seg = 1 << 20
    t = M.SegmentTable(count)
    for i in range(count):
        if data.draw(st.booleans()):
            t.set_data(i, SEALED.name(struct.pack("<I", i)))
    m = M.Manifest("20260101T000000000Z-a1b2c3", "vm1.vda", count * seg, seg, t, hash="hmac-sha256-128",
                   encryption=SEALED.describe())
    key = "manifests/vm1.vda/" + m.backup_id
    sealed = SEALED.seal(key, M.encode(m))
    assert M.encode(M.decode(SEALED.open(key, sealed))) == M.encode(m)
    for i in range(len(sealed)):
        with pytest.raises(IntegrityError):
            SEALED.open(key, flip(sealed, i, data.draw(st.integers(0, 7), label="bit")))

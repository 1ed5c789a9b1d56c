import os
import random

import pytest

from ekko_libvirt.format import manifest as mf
from ekko_libvirt.format import segment
from ekko_libvirt.errors import IntegrityError, ManifestError


def make(n=10, seg=1 << 20):
    t = mf.SegmentTable(n)
    t.set_data(1, segment.digest(b"a"))
    t.set_data(7, segment.digest(b"b"))
    return mf.Manifest("20260101T000000000Z-abcdef", "t1", n * seg - 5, seg, t, kind="full",
                       reason="first backup of this disk", generation={"bitmap": "ekko-x", "granularity": 65536})


def test_manifest_roundtrip():
    m = make()
    back = mf.decode(mf.encode(m))
    assert back.header() == m.header()
    assert list(back.table.data_entries()) == list(m.table.data_entries())
    assert back.table.get(0) is None and back.table.get(7) == segment.digest(b"b")


def test_manifest_damage_detected():
    blob = bytearray(mf.encode(make()))
    for pos in (3, 20, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        why = r"not an ekko manifest \(bad magic\)" if pos < 4 else r"checksum mismatch \(damaged or truncated\)"
        with pytest.raises(ManifestError, match=f"^manifest k: {why}$"):
            mf.decode(bytes(bad), "k")
    with pytest.raises(ManifestError, match="truncated|checksum|magic"):
        mf.decode(bytes(blob[:-30]), "k")


def test_manifest_of_16tib_sparse_disk_is_small():
    n = mf.segment_count(16 << 40, 4 << 20)
    t = mf.SegmentTable(n)
    for i in range(0, n, 4096):
        t.set_data(i, segment.digest(str(i).encode()))
    blob = mf.encode(mf.Manifest("x", "t", 16 << 40, 4 << 20, t))
    assert len(blob) < 200_000
    assert mf.decode(blob).table.data_count() == len(range(0, n, 4096))


def test_segment_roundtrip_and_compression_choice():
    text = b"hello world\n" * 10000
    enc = segment.encode(text)
    assert enc.blob[4] == segment.COMP_ZSTD and len(enc.blob) < len(text) // 10
    assert segment.decode(enc.blob, enc.digest) == text
    rnd = os.urandom(100000)
    enc = segment.encode(rnd)
    assert enc.blob[4] == segment.COMP_NONE
    assert segment.decode(enc.blob, enc.digest) == rnd
    assert segment.encode(text, compress=False).blob[4] == segment.COMP_NONE


def test_segment_damage_detected():
    enc = segment.encode(b"x" * 5000 + random.Random(1).randbytes(5000))
    assert enc.blob[4] == segment.COMP_ZSTD
    for pos, why in ((0, "not an ekko segment"), (5, "not an ekko segment"), (12, "header digest .* does not match"),
                     (39, "cannot decompress"), (40, "not a zstd frame: reserved bits of a zstd sequences header are set"),
                     (len(enc.blob) - 1, "content does not match its digest")):
        bad = bytearray(enc.blob)
        bad[pos] ^= 1
        with pytest.raises(IntegrityError, match=f"^segment {segment.segment_key(enc.digest)}: {why}"):
            segment.decode(bytes(bad), enc.digest)
    with pytest.raises(IntegrityError, match="does not match its name"):
        segment.decode(enc.blob, segment.digest(b"other"))


def test_zero_detection():
    assert segment.is_zero(bytearray(4096)) and not segment.is_zero(b"\0" * 4095 + b"\1")


def test_zero_runs_are_the_gaps_between_data_segments():
    t = mf.SegmentTable(10)
    for i in (2, 3, 6, 8):
        t.set_data(i, bytes(range(16)))
    assert list(t.zero_runs()) == [(0, 2), (4, 2), (7, 1), (9, 1)]
    full = mf.SegmentTable(3)
    for i in range(3):
        full.set_data(i, bytes(range(16)))
    assert list(full.zero_runs()) == [] and list(mf.SegmentTable(4).zero_runs()) == [(0, 4)]


def test_a_table_larger_than_one_decompressor_read_round_trips():
    """The table is decompressed straight into its two arrays: 100,000 random digests (1.6 MB,
    many zstd blocks) come back exactly, in place."""
    rnd = random.Random(7)
    n = 100_000
    t = mf.SegmentTable(n)
    for i in range(n):
        if rnd.random() < 0.9:
            t.set_data(i, rnd.randbytes(16))
    m = mf.Manifest("20260101T000000000Z-abcdef", "t1", n * (64 << 10), 64 << 10, t, kind="full")
    back = mf.decode(mf.encode(m))
    assert bytes(back.table.flags) == bytes(t.flags) and bytes(back.table.digests) == bytes(t.digests)

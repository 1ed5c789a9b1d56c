"""The pure parts of the tuned data path: reusable read buffers, the compressibility sample,
and the streamed manifest codec (byte-compatible with the format: checksum over every byte)."""

import random

import nbd

from ekko_libvirt.format import manifest as mf, segment
from ekko_libvirt.nbd.extents import SegmentPlan
from ekko_libvirt.nbd.reader import SegmentBuffer

KiB, MiB = 1024, 1024 * 1024


def test_segment_buffer_zero_fills_only_the_holes_and_splits_requests():
    b = SegmentBuffer(1 * MiB)
    b.buf[:] = b"\xff" * MiB                          # what the previous segment left
    base = 7 * MiB
    plan = SegmentPlan(7, base, MiB, ((base + 64 * KiB, 192 * KiB), (base + 512 * KiB, 64 * KiB)))
    reqs = b.requests(plan, 128 * KiB)
    assert [off for _v, off in reqs] == [base + 64 * KiB, base + 192 * KiB, base + 512 * KiB]
    assert [len(v) for v, _off in reqs] == [128 * KiB, 64 * KiB, 64 * KiB]
    assert all(isinstance(v, nbd.Buffer) for v, _off in reqs)
    data = bytes(b.data)
    assert data[:64 * KiB] == bytes(64 * KiB)                             # hole
    assert data[64 * KiB:256 * KiB] == b"\xff" * (192 * KiB)              # to be read: untouched
    assert data[256 * KiB:512 * KiB] == bytes(256 * KiB)                  # hole
    assert data[576 * KiB:] == bytes(MiB - 576 * KiB)                     # tail hole


def test_segment_buffer_reuses_views_and_copies_only_a_short_last_segment():
    b = SegmentBuffer(MiB)
    plan = SegmentPlan(0, 0, MiB, ((0, MiB),))
    first = [v for v, _ in b.requests(plan, 256 * KiB)]
    again = [v for v, _ in b.requests(plan, 256 * KiB)]
    assert all(x is y for x, y in zip(first, again))   # leaked libnbd references stay bounded
    assert b.data is b.buf
    short = SegmentPlan(3, 3 * MiB, 300 * KiB, ((3 * MiB, 300 * KiB),))
    b.requests(short, 256 * KiB)
    assert len(b.data) == 300 * KiB and b.data is not b.buf


def test_compressibility_sample():
    rnd = random.Random(5)
    assert not segment._compressible(rnd.randbytes(MiB), 1)
    assert segment._compressible(b"log line 42\n" * (MiB // 12), 1)
    assert segment._compressible(rnd.randbytes(64 * KiB), 1)          # small: always tried
    half = rnd.randbytes(MiB // 2) + bytes(MiB // 2)                  # the end sample is zeros
    assert segment._compressible(half, 1)
    enc = segment.encode(rnd.randbytes(MiB))
    assert enc.blob[4] == segment.COMP_NONE and segment.decode(enc.blob, enc.digest)


def test_streamed_manifest_is_the_documented_byte_layout():
    n = 50_000
    rnd = random.Random(9)
    flags = bytearray(rnd.choice((0, 1)) for _ in range(n))
    digests = bytearray(rnd.randbytes(n * 16))
    m = mf.Manifest(backup_id="20260101T000000000Z-abcdef", target="t", virtual_size=n * MiB,
                    segment_size=MiB, table=mf.SegmentTable(n, flags, digests))
    blob = mf.encode(m)
    assert blob[-16:] == segment.digest(blob[:-16])
    back = mf.decode(blob)
    assert back.table.flags == flags and back.table.digests == digests

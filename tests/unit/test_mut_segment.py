"""Segment objects: what the mutation run of format/segment.py showed no test pinned down
(docs/mutation.md): is_zero on a size it has not seen, the empty object, a frame with zstd's optional
checksum, which samples decide compression, and the message of each refusal."""

import random
import re

import pytest
import zstandard

from ekko_libvirt.errors import EncodeMismatch, IntegrityError
from ekko_libvirt.format import segment as S

RAW = b"log line 42\n" * 400                # compresses: a one-frame, one-block zstd payload


def blob_with(raw, payload, comp=S.COMP_ZSTD, length=None, reserved=0):
    return S.HEADER.pack(S.MAGIC, comp, S.HASH_XXH3_128, reserved, len(raw) if length is None else length,
                         S.digest(raw)) + payload


def refused(blob, raw, message):
    """decode refuses `blob` with exactly `message` after 'segment <key>: '."""
    d = S.digest(raw)
    with pytest.raises(IntegrityError, match="^" + re.escape(f"segment {S.segment_key(d)}: {message}") + "$"):
        S.decode(blob, d)


def test_is_zero_answers_right_the_first_time_it_sees_a_size(monkeypatch):
    """The buffer of zeros per size is made on first use: that first answer counts too."""
    monkeypatch.setattr(S, "_zero_cache", {})
    assert S.is_zero(bytes(4096))
    assert S.is_zero(bytes(512))                         # another size right after the first
    monkeypatch.setattr(S, "_zero_cache", {})
    assert not S.is_zero(bytes(4095) + b"\1")
    assert S.is_zero(bytes(4096))


def test_the_empty_object_round_trips():
    enc = S.encode(b"")
    assert len(enc.blob) == S.HEADER.size and S.decode(enc.blob, enc.digest) == b""


def test_a_zstd_frame_with_its_optional_checksum_is_one_zstd_frame_too():
    """format.md: compression 1 is one zstd frame; the frame may end in a 4-byte content checksum."""
    payload = zstandard.ZstdCompressor(write_checksum=True).compress(RAW)
    assert payload[4] & 4
    assert S.decode(blob_with(RAW, payload), S.digest(RAW)) == RAW
    refused(blob_with(RAW, payload + b"\0"), RAW, "1 byte(s) after the zstd frame (damaged)")


def test_each_refusal_says_what_is_wrong_and_names_the_object():
    enc = S.encode(RAW)
    payload = enc.blob[S.HEADER.size:]
    assert enc.blob[4] == S.COMP_ZSTD
    fhs = zstandard.frame_header_size(payload)
    refused(enc.blob[:10], RAW, "truncated (10 bytes)")
    refused(blob_with(RAW, payload, reserved=256), RAW, "reserved header field is 256, not 0 (damaged)")
    refused(blob_with(RAW, payload, comp=7), RAW, "unknown compression id 7")
    refused(blob_with(RAW, payload, length=len(RAW) + 1), RAW,
            "zstd frame header does not match the segment (damaged)")
    refused(blob_with(RAW, payload[:fhs + 2]), RAW, "not a zstd frame: the zstd frame is cut short")
    reserved_block = bytearray(payload)
    reserved_block[fhs] |= 0b110                          # block type 3: reserved
    refused(blob_with(RAW, bytes(reserved_block)), RAW, "not a zstd frame: reserved zstd block type")
    refused(enc.blob + b"abc", RAW, "3 byte(s) after the zstd frame (damaged)")
    with pytest.raises(IntegrityError, match=r"^segment disk0 segment 7: truncated \(3 bytes\)$"):
        S.decode(b"EKS", S.digest(RAW), where="disk0 segment 7")


@pytest.mark.parametrize("raw, problem", [
    (random.Random(1).randbytes(64 * 1024), "object does not match its digest after encoding"),
    (RAW, "segment segments/{}: content does not match its digest"),
], ids=["stored as is", "compressed"])
def test_an_encode_mismatch_says_which_check_failed(raw, problem):
    stale = S.digest(raw[:-1] + b"\x00")
    with pytest.raises(EncodeMismatch) as e:
        S.encode(raw, known_digest=stale)
    key = S.segment_key(stale)
    assert f"({problem.format(key[len('segments/'):])})" in str(e.value)


def test_three_samples_start_middle_end_decide_whether_zstd_is_tried():
    """segment._compressible: from 8 x 16 KiB on, only the first, middle and last 16 KiB are tried.
    Data that compresses only outside them is stored as is (the documented trade-off); data that
    compresses in any one of them is compressed."""
    q = S.SAMPLE
    n = 8 * q + 2 * 4096                                  # not a multiple of 32 KiB: the middle is rounded down
    mid = (n // 2) // q * q
    rnd = random.Random(7)
    noise = rnd.randbytes(n)
    samples = [(0, q), (mid, mid + q), (n - q, n)]
    only_outside = bytearray(n)
    for a, b in samples:
        only_outside[a:b] = noise[a:b]
    assert S.encode(bytes(only_outside)).blob[4] == S.COMP_NONE
    exactly_8 = bytearray(8 * q)
    for a, b in [(0, q), (4 * q, 5 * q), (7 * q, 8 * q)]:
        exactly_8[a:b] = noise[a:b]
    assert S.encode(bytes(exactly_8)).blob[4] == S.COMP_NONE
    for a, b in samples:
        one_zero_sample = bytearray(noise)
        one_zero_sample[a:b] = bytes(q)
        enc = S.encode(bytes(one_zero_sample))
        assert enc.blob[4] == S.COMP_ZSTD, (a, b)
        assert S.decode(enc.blob, enc.digest) == one_zero_sample

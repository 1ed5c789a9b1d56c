"""Manifests: what the mutation run of format/manifest.py showed no test pinned down
(docs/mutation.md): every header field read back, a header with only the required keys, the
boundaries (a header of exactly MAX_HEADER bytes, 1-byte segments, a table frame that does not
declare its size) and the message of each refusal, on blobs crafted with a valid checksum."""

import json
import re
import struct

import pytest
import xxhash
import zstandard

from ekko_libvirt.errors import ManifestError
from ekko_libvirt.format import manifest as mf
from ekko_libvirt.format.segment import digest

BID = "20260101T000000000Z-abcdef"
REQUIRED = {"format": 1, "backup_id": BID, "target": "t1", "virtual_size": 3 * 4096 - 5, "segment_size": 4096,
            "segment_count": 3, "kind": "full", "hash": "xxh3-128", "compression": "zstd"}


def table_bytes(n=3, data=(1,)):
    flags, digests = bytearray(n), bytearray(16 * n)
    for i in data:
        flags[i] = mf.FLAG_DATA
        digests[16 * i:16 * i + 16] = digest(str(i).encode())
    return bytes(flags) + bytes(digests)


def frame(raw, sized=True):
    return zstandard.ZstdCompressor(write_content_size=sized).compress(raw)


def blob(header, table, tlen=None):
    """A manifest file with a valid checksum around whatever it is given."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = b"".join((mf.MAGIC, struct.pack("<I", len(h)), h, struct.pack("<Q", len(table) if tlen is None else tlen),
                     table))
    return body + xxhash.xxh3_128_digest(body)


def refused(b, message, prefix=False):
    pattern = "^" + re.escape(f"manifest k: {message}") + ("" if prefix else "$")
    with pytest.raises(ManifestError, match=pattern):
        mf.decode(b, "k")


def test_every_header_field_is_read_back_as_written():
    t = mf.SegmentTable(3)
    t.set_data(2, digest(b"x"))
    m = mf.Manifest(BID, "web1-vda", 3 * 4096, 4096, t, kind="incremental", reason="changes since A (bitmap b)",
                    parent="20251231T000000000Z-000000", generation={"bitmap": "ekko-" + BID, "granularity": 65536},
                    disk={"node": "n", "filename": "/x.qcow2", "format": "qcow2"}, created="2026-01-01T00:00:00Z",
                    timings={"started": 1.5, "finished": 2.5, "seconds": 1.0},
                    counts={"segments": 3, "new_segments": 1},
                    labels={"domain_xml": "<domain/>"}, hash="hmac-sha256-128", compression="none",
                    encryption={"cipher": "aes-256-gcm", "key_fingerprint": "ff", "naming": "hmac"})
    back = mf.decode(mf.encode(m), "k")
    assert back.header() == m.header()
    assert (back.table.flags, back.table.digests) == (m.table.flags, m.table.digests)
    assert mf.decode_header(mf.encode(m), "k") == m.header()


def test_a_header_with_only_the_required_keys_reads_with_empty_defaults():
    m = mf.decode(blob(REQUIRED, frame(table_bytes())), "k")
    assert (m.reason, m.parent, m.generation, m.disk, m.created, m.timings, m.counts, m.labels, m.encryption) == \
        ("", None, None, {}, "", {}, {}, {}, None)
    assert list(m.table.data_entries()) == [(1, digest(b"1"))]


def test_a_header_of_exactly_max_header_bytes_is_read_one_more_is_refused():
    m = mf.Manifest(BID, "t1", 4096, 4096, mf.SegmentTable(1), labels={"pad": ""})
    base = len(json.dumps(m.header(), sort_keys=True, separators=(",", ":")))
    m.labels["pad"] = "x" * (mf.MAX_HEADER - base)
    assert mf.decode(mf.encode(m), "k").labels == m.labels
    m.labels["pad"] += "x"
    refused(mf.encode(m), f"header length {mf.MAX_HEADER + 1} out of range")


def test_one_byte_segments_are_a_valid_table():
    m = mf.decode(blob(dict(REQUIRED, virtual_size=3, segment_size=1), frame(table_bytes())), "k")
    assert (m.segment_size, m.table.count) == (1, 3)


def test_a_table_frame_that_does_not_declare_its_size_is_read():
    """format.md: the table is one zstd frame; its content size field is optional."""
    m = mf.decode(blob(REQUIRED, frame(table_bytes(), sized=False)), "k")
    assert list(m.table.data_entries()) == [(1, digest(b"1"))]


def test_each_refusal_says_what_is_wrong():
    good = frame(table_bytes())
    short = mf.MAGIC + b"\0\0\0"
    refused(short + xxhash.xxh3_128_digest(short), "not an ekko manifest (bad magic)")      # 27 bytes
    empty = mf.MAGIC + bytes(4)
    refused(empty + xxhash.xxh3_128_digest(empty), "header is not JSON: ", prefix=True)   # 28 bytes
    h = json.dumps(REQUIRED).encode()
    past = mf.MAGIC + struct.pack("<I", len(h) + 1000) + h
    refused(past + xxhash.xxh3_128_digest(past), f"header length {len(h) + 1000} out of range")
    refused(blob(b"[1, 2]", good), "header is not a JSON object")
    refused(blob(dict(REQUIRED, format=2), good), "unsupported format 2")
    refused(blob(REQUIRED, good, tlen=len(good) + 1), f"table length {len(good) + 1} does not fit the file")
    refused(blob(dict(REQUIRED, segment_size=0), good), "segment_size 0 is not an integer >= 1")
    refused(blob(dict(REQUIRED, virtual_size=-1), good), "virtual_size -1 is not an integer >= 0")
    refused(blob(dict(REQUIRED, segment_count="3"), good), "segment_count '3' is not an integer >= 0")
    refused(blob(dict(REQUIRED, segment_count=4), good), "segment count 4 does not match the disk size")
    refused(blob(REQUIRED, b"\0" * 12), "the table is not a zstd frame: ", prefix=True)
    refused(blob(REQUIRED, frame(table_bytes(2, ()))), "3 entries need 51 table bytes; the table holds 34 bytes")
    many = dict(REQUIRED, virtual_size=20000 * 4096, segment_count=20000)
    tiny = frame(b"", sized=False)
    refused(blob(many, tiny), f"20000 entries need 340000 table bytes; the table of {len(tiny)} bytes cannot hold them")
    refused(blob(REQUIRED, frame(table_bytes()[:-1], sized=False)), "bad content: table is shorter than 3 entries")
    refused(blob(REQUIRED, frame(table_bytes() + b"\0", sized=False)), "bad content: table is longer than 3 entries")
    refused(blob({k: v for k, v in REQUIRED.items() if k != "kind"}, good), "bad content: 'kind'")
    refused(blob(dict(REQUIRED, hash="sha1"), good), "unknown hash 'sha1'")
    with pytest.raises(ManifestError, match=r"^manifest k: checksum mismatch \(damaged or truncated\)$"):
        mf.decode_header(blob(REQUIRED, good)[:-1], "k")


def test_encode_refuses_a_table_that_does_not_fit_the_disk():
    m = mf.Manifest(BID, "t1", 3 * 4096, 4096, mf.SegmentTable(4))
    with pytest.raises(ManifestError, match=f"^manifest {BID}: table has 4 entries, disk needs 3$"):
        mf.encode(m)
    with pytest.raises(ManifestError, match="^segment table sizes disagree with count 3$"):
        mf.SegmentTable(3, bytearray(3), bytearray(47))

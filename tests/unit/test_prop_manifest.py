"""Property tests of the manifest (ekko_libvirt/format/manifest.py): the SegmentTable against a list
model, and the codec: random manifests round trip byte for byte, and every damaged variant
(each byte flipped, each truncation, bytes appended, lengths changed) is refused with
ManifestError, never another exception and never a different manifest. Variants whose checksum
is recomputed (what a buggy writer or a crafted file gives) must also be refused or decode to a
consistent manifest, with ManifestError as the only exception.
"""

import json
import struct

import pytest
import xxhash
import zstandard
from hypothesis import given, settings, strategies as st

from ekko_libvirt.format import manifest as M
from ekko_libvirt.errors import ManifestError
from ekko_libvirt.format.segment import DIGEST_SIZE, ZERO_DIGEST

# the expensive properties decode a manifest once per byte: a tenth of the profile's examples
FEW = settings(max_examples=max(10, settings.default.max_examples // 6))

digests = st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)
# entries: None = ZERO, else a digest (drawn from a small pool, so some repeat, ZERO_DIGEST included)
entries = st.lists(st.one_of(st.none(), st.sampled_from([b"\x01" * 16, ZERO_DIGEST, b"\xff" * 16]), digests),
                   max_size=40)


# -- SegmentTable against a list ------------------------------------------------------------------
def table_of(model):
    t = M.SegmentTable(len(model))
    for i, d in enumerate(model):
        if d is None:
            t.set_zero(i)
        else:
            t.set_data(i, d)
    return t


def check_table(t, model):
    assert t.count == len(model)
    assert [t.get(i) for i in range(len(model))] == model
    assert list(t.data_entries()) == [(i, d) for i, d in enumerate(model) if d is not None]
    runs, i = [], 0
    while i < len(model):
        if model[i] is None:
            j = i
            while j < len(model) and model[j] is None:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    assert list(t.zero_runs()) == runs
    assert t.data_count() == sum(d is not None for d in model)
    assert t.unique_digests() == {d for d in model if d is not None}
    assert bytes(t.flags) == bytes(0 if d is None else 1 for d in model)
    assert bytes(t.digests) == b"".join(ZERO_DIGEST if d is None else d for d in model)


@given(start=entries, ops=st.lists(st.tuples(st.integers(0, 39), st.one_of(st.none(), digests)), max_size=30))
def test_segment_table_behaves_like_a_list(start, ops):
    model = list(start)
    t = table_of(model)
    check_table(t, model)
    for i, d in ops:
        if i >= len(model):
            continue
        before = list(model)
        copy = t.copy()
        model[i] = d
        if d is None:
            t.set_zero(i)
        else:
            t.set_data(i, d)
        check_table(t, model)
        check_table(copy, before)          # a copy does not follow the original


@given(n=st.integers(0, 20), df=st.integers(-2, 2), dd=st.integers(-17, 17))
def test_segment_table_refuses_buffers_of_the_wrong_size(n, df, dd):
    flags, digs = bytearray(max(0, n + df)), bytearray(max(0, (n * DIGEST_SIZE) + dd))
    if len(flags) == n and len(digs) == n * DIGEST_SIZE:
        M.SegmentTable(n, flags, digs)
    else:
        with pytest.raises(ManifestError):
            M.SegmentTable(n, flags, digs)


# -- random manifests -----------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
names = st.text(min_size=1, max_size=24)


@st.composite
def manifests(draw):
    model = draw(entries)
    n = len(model)
    seg = draw(st.one_of(st.sampled_from([512, 1 << 20, 4 << 20]), st.integers(1, 1 << 40)))
    size = 0 if n == 0 else draw(st.integers((n - 1) * seg + 1, n * seg))
    encrypted = draw(st.booleans())
    m = M.Manifest(
        backup_id=draw(names), target=draw(names), virtual_size=size, segment_size=seg, table=table_of(model),
        kind=draw(st.sampled_from(["full", "incremental"])), reason=draw(st.text(max_size=40)),
        parent=draw(st.one_of(st.none(), names)),
        generation=draw(st.one_of(st.none(), st.fixed_dictionaries(
            {"bitmap": names, "granularity": st.integers(512, 1 << 26)}))),
        disk=draw(st.dictionaries(st.sampled_from(["node", "filename", "format"]), st.text(max_size=20))),
        created=draw(st.text(max_size=30)),
        timings=draw(st.dictionaries(st.sampled_from(["started", "finished", "seconds"]),
                                     st.floats(allow_nan=False, allow_infinity=False))),
        counts=draw(st.dictionaries(st.text(max_size=20), st.integers(0, 2**63))),
        labels=draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4)),
        hash="hmac-sha256-128" if encrypted else "xxh3-128",
        encryption={"cipher": "aes-256-gcm", "key_fingerprint": draw(digests).hex(),
                    "naming": "hmac-sha256-128"} if encrypted else None)
    return m, model


def same_manifest(a, b):
    for f in ("backup_id", "target", "virtual_size", "segment_size", "kind", "reason", "parent", "generation",
              "disk", "created", "timings", "counts", "labels", "hash", "compression", "encryption"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.table.count == b.table.count
    assert bytes(a.table.flags) == bytes(b.table.flags) and bytes(a.table.digests) == bytes(b.table.digests)


@given(mm=manifests())
def test_round_trip(mm):
    m, model = mm
    blob = M.encode(m)
    back = M.decode(blob, "x")
    same_manifest(back, m)
    assert streamed(blob, "round trip") == (m.backup_id, m.hash, m.encryption, bytes(m.table.flags),
                                            bytes(m.table.digests))
    check_table(back.table, model)
    assert M.decode_header(blob) == json.loads(json.dumps(m.header()))
    assert ("encryption" in M.decode_header(blob)) == (m.encryption is not None)
    assert M.encode(back) == blob                       # deterministic: byte for byte


def streamed(blob, what):
    """decode_stream's reading of blob: None when refused (at once or while its blocks are read),
    else (backup_id, hash, encryption, flags, digests) from its blocks. Only ManifestError."""
    try:
        ts = M.decode_stream(blob, "x")
        blocks = list(ts.blocks(3))
    except ManifestError:
        return None
    except Exception as e:                              # noqa: BLE001
        raise AssertionError(f"{what}: decode_stream raised {type(e).__name__}: {e}") from e
    assert all(len(f) * DIGEST_SIZE == len(d) and 0 < len(f) <= 3 for f, d in blocks), what
    return (ts.backup_id, ts.hash, ts.encryption, b"".join(f for f, _ in blocks), b"".join(d for _, d in blocks))


def must_refuse(blob, what):
    assert streamed(blob, what) is None, f"{what}: decode_stream read a manifest decode must refuse"
    try:
        M.decode(blob, "x")
    except ManifestError:
        return
    except Exception as e:                              # noqa: BLE001  (the property is "only ManifestError")
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: a damaged manifest decoded")


@FEW
@given(mm=manifests(), data=st.data())
def test_every_flipped_byte_and_every_truncation_is_refused(mm, data):
    blob = M.encode(mm[0])
    for i in range(len(blob)):
        mask = data.draw(st.integers(1, 255), label="mask")
        must_refuse(blob[:i] + bytes([blob[i] ^ mask]) + blob[i + 1:], f"byte {i} ^ {mask:#x}")
    for n in range(len(blob)):
        must_refuse(blob[:n], f"truncated to {n}")


@given(mm=manifests(), tail=st.binary(min_size=1, max_size=40), where=st.integers(0, 1 << 20))
def test_bytes_appended_or_inserted_are_refused(mm, tail, where):
    blob = M.encode(mm[0])
    must_refuse(blob + tail, "appended")
    i = where % (len(blob) + 1)
    must_refuse(blob[:i] + tail + blob[i:], f"inserted at {i}")


def parts(blob):
    """(header length, header, table length, table) of a well-formed manifest."""
    (hlen,) = struct.unpack_from("<I", blob, 8)
    header = blob[12:12 + hlen]
    (tlen,) = struct.unpack_from("<Q", blob, 12 + hlen)
    return hlen, header, tlen, blob[20 + hlen:20 + hlen + tlen]


def sealed(hlen, header, tlen, table):
    """A manifest with the given parts and a correct checksum (lengths need not agree)."""
    body = M.MAGIC + struct.pack("<I", hlen) + header + struct.pack("<Q", tlen) + table
    return body + xxhash.xxh3_128_digest(body)


def decodes_consistently_or_refuses(blob, what):
    s = streamed(blob, what)
    try:
        m = M.decode(blob, "x")
    except ManifestError:
        assert s is None, f"{what}: decode_stream read a manifest decode refused"
        return None
    except Exception as e:                              # noqa: BLE001
        raise AssertionError(f"{what}: {type(e).__name__} instead of ManifestError: {e}") from e
    assert s == (m.backup_id, m.hash, m.encryption, bytes(m.table.flags), bytes(m.table.digests)), what
    assert m.table.count == M.segment_count(m.virtual_size, m.segment_size), what
    assert m.segment_size > 0 and m.virtual_size >= 0, what
    assert set(m.table.flags) <= {M.FLAG_ZERO, M.FLAG_DATA}, f"{what}: reserved flag values accepted"
    assert M.decode(M.encode(m)).table.count == m.table.count
    return m


@given(mm=manifests(), dh=st.integers(-3, 3), dt=st.integers(-20, 20))
def test_wrong_lengths_are_refused_with_or_without_a_matching_checksum(mm, dh, dt):
    blob = M.encode(mm[0])
    hlen, header, tlen, table = parts(blob)
    if (dh, dt) == (0, 0):
        return
    h, t = max(0, hlen + dh), max(0, tlen + dt)
    # the old checksum: damage
    body = M.MAGIC + struct.pack("<I", h) + header + struct.pack("<Q", t) + table
    must_refuse(body + blob[-DIGEST_SIZE:], f"header length {hlen}->{h}, table length {tlen}->{t}")
    # a fresh checksum: the structure itself must be refused
    must_refuse(sealed(h, header, t, table), f"re-checksummed: header length {hlen}->{h}, table {tlen}->{t}")


@given(mm=manifests(), junk=st.binary(min_size=1, max_size=20))
def test_bytes_between_the_table_and_the_checksum_are_refused(mm, junk):
    """The table length says where the table ends: bytes after it, even under a fresh checksum
    and whatever the table length says, are refused."""
    hlen, header, tlen, table = parts(M.encode(mm[0]))
    must_refuse(sealed(hlen, header, tlen, table + junk), "junk after the table, table length unchanged")
    must_refuse(sealed(hlen, header, tlen + len(junk), table + junk), "junk inside the table length")


def table_frame(flags, digests_, sized=True):
    """One zstd frame; `sized` False: without the content size in its header (zstd allows it)."""
    return zstandard.ZstdCompressor(write_content_size=sized).compress(bytes(flags) + bytes(digests_))


@given(mm=manifests(), data=st.data())
def test_crafted_content_with_a_valid_checksum_raises_only_manifest_error(mm, data):
    """A checksum only proves the writer's bytes arrived: whatever the writer put in the header
    and the table, decode refuses it with ManifestError or returns a self-consistent manifest."""
    m = mm[0]
    header = json.loads(json.dumps(m.header()))
    key = data.draw(st.sampled_from(sorted(header) + ["<whole>"]), label="key")
    value = data.draw(st.one_of(json_values, st.integers(-5, 5), st.sampled_from([0, -1, 2**64, 1.5, True, "1"])),
                      label="value")
    flags, digs = bytearray(m.table.flags), bytearray(m.table.digests)
    if key == "<whole>":
        header = value
    elif data.draw(st.booleans(), label="delete"):
        del header[key]
    else:
        header[key] = value
    if flags and data.draw(st.booleans(), label="bad flag"):
        flags[data.draw(st.integers(0, len(flags) - 1))] = data.draw(st.integers(2, 255), label="flag")
    frame = table_frame(flags, digs, sized=data.draw(st.booleans(), label="content size in the frame"))
    h = json.dumps(header).encode()
    decodes_consistently_or_refuses(sealed(len(h), h, len(frame), frame), f"{key} = {value!r}")


@given(mm=manifests(), sized=st.booleans(), longer=st.booleans(), data=st.data())
def test_a_table_of_the_wrong_size_is_refused(mm, sized, longer, data):
    """Under a fresh checksum, a table frame that decompresses to more or fewer than 17 bytes per
    segment is refused, whether or not the frame says its size."""
    m = mm[0]
    raw = bytes(m.table.flags) + bytes(m.table.digests)
    if longer:
        raw += data.draw(st.binary(min_size=1, max_size=40), label="extra")
    elif raw:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        return
    h = json.dumps(m.header()).encode()
    frame = zstandard.ZstdCompressor(write_content_size=sized).compress(raw)
    must_refuse(sealed(len(h), h, len(frame), frame), f"table of {len(raw)} bytes for {m.table.count} entries")


@pytest.mark.parametrize("change, why", [
    (lambda h: [h], "a header that is a JSON list"),
    (lambda h: "manifest", "a header that is a JSON string"),
    (lambda h: dict(h, segment_size=0), "segment size 0"),
    (lambda h: dict(h, virtual_size=-10, segment_size=-3, segment_count=4), "negative sizes"),
    (lambda h: dict(h, segment_size=4.5), "a fractional segment size"),
    (lambda h: dict(h, segment_count=2**62, virtual_size=2**62, segment_size=1), "2**62 segments"),
])
def test_crafted_headers_found_by_the_properties(change, why):
    """Regressions of what the property above found on the first run: each raised
    AttributeError, ZeroDivisionError or MemoryError, or decoded a nonsensical manifest."""
    m = M.Manifest("b", "t", 10, 4, M.SegmentTable(3))
    h = json.dumps(change(json.loads(json.dumps(m.header())))).encode()
    frame = table_frame(bytes(3), bytes(48))
    with pytest.raises(ManifestError):
        M.decode(sealed(len(h), h, len(frame), frame), why)


def test_reserved_flag_values_are_refused():
    """docs/format.md: 'Other flag values are reserved; a reader must reject them.'"""
    m = M.Manifest("b", "t", 10, 4, M.SegmentTable(3))
    h = json.dumps(m.header()).encode()
    frame = table_frame(b"\x00\x02\x01", bytes(48))
    with pytest.raises(ManifestError, match="flag"):
        M.decode(sealed(len(h), h, len(frame), frame))


@pytest.mark.parametrize("count", [0, 3])
def test_bytes_after_the_table_frame_inside_the_table_length_are_refused(count):
    """Found by `make torture` (seed 4256872824): the decompressor stops at the frame's end, so
    bytes after it inside the table length decoded, under a fresh checksum."""
    m = M.Manifest("b", "t", count * 512, 512, M.SegmentTable(count))
    hlen, header, tlen, table = parts(M.encode(m))
    with pytest.raises(ManifestError, match="frame"):
        M.decode(sealed(hlen, header, tlen + 1, table + b"("))

"""The native segment path (format/_segcore.c) against the pure-Python one (segment._py_*): the same
objects byte for byte, the same raw bytes back, the same refusal (exception type and message) of
every damaged object; and the native calls run without the GIL.

Byte identity needs one zstd under both paths: the extension links the system libzstd, and so
must the zstandard module (Debian's python3-zstandard; scripts/install-deps.sh sees to it). The
first test says so when it is not the case, before the comparisons fail less clearly.
"""

import os
import random
import subprocess
import sys
import threading

import pytest

from tests.harness import in_ci
import xxhash
import zstandard
from hypothesis import example, given, settings, strategies as st

from ekko_libvirt.errors import EncodeMismatch, IntegrityError
from ekko_libvirt.format import codec as C
from ekko_libvirt.format import segment as S
from ekko_libvirt.format.codec import PLAIN
from ekko_libvirt.format.crypto import SealedCodec
from tests.unit.test_prop_segment import flip, raws

# Every test here compares with the C extension. `make` (scripts/install-deps.sh) builds it and fails
# when it cannot; a scratch copy without it (scripts/mutate.py: .so files are not copied) runs the
# Python path alone, which the other segment tests cover.
# Skipped where the extension is not built outside CI (scripts/mutate.py's scratch copy); in CI it fails.
pytestmark = pytest.mark.skipif(not S.BUILT and not in_ci(),
                                reason="the C extension format/_segcore.c is not built (make builds it)")
KiB, MiB = 1024, 1024 * 1024
SEALED = SealedCodec(bytes(range(32)))
codecs = st.sampled_from([PLAIN, SEALED])
FEW = settings(max_examples=max(5, settings.default.max_examples // 6))


def test_the_extension_is_used_unless_ekko_native_is_0():
    assert S.BACKEND == ("python" if os.environ.get("EKKO_NATIVE") == "0" else "native")


def test_both_paths_run_against_the_same_zstd():
    """Equal frames need equal zstd versions: Debian's python3-zstandard and the extension both link
    the system libzstd. pip's zstandard wheel bundles another zstd."""
    assert S._segcore.ZSTD_VERSION == zstandard.ZSTD_VERSION, (
        f"the C extension runs zstd {S._segcore.ZSTD_VERSION}, the zstandard module "
        f"({zstandard.__file__}) zstd {zstandard.ZSTD_VERSION}: the two paths may write different "
        f"frames. scripts/install-deps.sh (make deps) removes pip's zstandard from the venv so that "
        f"Debian's python3-zstandard (linked to the system libzstd) is used")


def test_ekko_native_0_selects_the_python_path():
    code = ("from ekko_libvirt.format import segment as S, codec as C; import xxhash; "
            "print(S.BACKEND, S.encode is S._py_encode, S.digest is S._py_digest, "
            "C.PLAIN.name is xxhash.xxh3_128_digest)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EKKO_NATIVE": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["python", "True", "True", "True"]


# -- xxh3-128 and the zero test -----------------------------------------------------------------

def buffers(raw: bytes):
    """The shapes segments come in: bytes, the reader's pooled bytearray, a memoryview of it
    (a short last segment: a slice)."""
    ba = bytearray(raw)
    return [raw, ba, memoryview(ba), memoryview(bytearray(raw + b"tail"))[:len(raw)]]


def test_xxh3_128_is_python_xxhash_for_every_length_up_to_4100_and_large_ones():
    rnd = random.Random(31)
    data = rnd.randbytes(4100)
    for n in range(len(data) + 1):          # every branch of XXH3 (0, 1-3, 4-8, 9-16, 17-128, 129-240, long)
        assert S._segcore.xxh3_128(data[:n]) == xxhash.xxh3_128_digest(data[:n]), n
    for n in (16 * KiB - 1, 16 * KiB, 16 * KiB + 1, MiB + 1536, 4 * MiB + 7):
        raw = rnd.randbytes(n)
        for b in buffers(raw):
            assert S._segcore.xxh3_128(b) == xxhash.xxh3_128_digest(raw), (n, type(b))


def test_is_zero_agrees_with_the_python_test():
    for n in (0, 1, 15, 16, 17, 33, 4096, 16 * KiB, MiB + 1536):
        zeros = bytes(n)
        for b in buffers(zeros):
            assert S._segcore.is_zero(b) and S._py_is_zero(b)
        for pos in sorted({0, n // 3, n // 2, n - 17, n - 16, n - 1} & set(range(n))):
            one = bytearray(n)
            one[pos] = 0x80
            for b in buffers(bytes(one)):
                assert not S._segcore.is_zero(b) and not S._py_is_zero(b), (n, pos)


# -- encode: the same objects -------------------------------------------------------------------

def both_encode(raw, level, compress, known, codec):
    """The object of each path, or the EncodeMismatch message of each."""
    out = []
    for fn in (S._py_encode, S._native_encode):
        try:
            enc = fn(raw, level, compress, known, codec=codec)
            out.append(("ok", enc.digest, enc.blob, enc.raw_length))
        except EncodeMismatch as e:
            out.append(("mismatch", str(e)))
    return out


def same_objects(raw, level=1, compress=True, known=None, codec=PLAIN, buffer_kinds=True):
    """Both paths encode `raw` (as each buffer shape) into the same bytes, and decode it back."""
    for b in buffers(raw) if buffer_kinds else [raw]:
        py, nat = both_encode(b, level, compress, known, codec)
        assert py[0] == "ok", py
        what = f"{len(raw)} bytes, level {level}, compress {compress}, known {known is not None}, {codec!r}"
        assert nat[1] == py[1], f"{what}: digests differ"
        assert nat[2] == py[2], f"{what}: objects differ (compression {py[2][4]} vs {nat[2][4]})"
        assert nat[3] == py[3] == len(raw)
    enc_blob, name = py[2], py[1]
    assert S._native_decode(enc_blob, name, codec=codec) == raw
    assert S._py_decode(enc_blob, name, codec=codec) == raw
    return py[2]


@given(raw=raws(), codec=codecs, level=st.integers(-3, 9), compress=st.booleans(), known=st.booleans())
def test_small_objects_are_byte_identical(raw, codec, level, compress, known):
    same_objects(raw, level, compress, codec.name(raw) if known else None, codec)


@st.composite
def sampled_raws(draw):
    """Segments large enough for the three samples to decide (>= 8 x 16 KiB), of odd sizes, built
    from runs of random, zero and text bytes: compressible, not, and in between."""
    n = draw(st.integers(8 * S.SAMPLE - 2, 20 * S.SAMPLE + 3))
    rnd = random.Random(draw(st.integers(0, 1 << 32)))
    weights = draw(st.tuples(*[st.integers(0, 4)] * 3).filter(any))
    out = bytearray()
    while len(out) < n:
        kind = rnd.choices(["random", "zeros", "text"], weights)[0]
        k = rnd.randrange(1, 24 * KiB)
        out += (rnd.randbytes(k) if kind == "random" else bytes(k) if kind == "zeros"
                else (b"GET /index.html 200 %d\n" % rnd.randrange(1000)) * (k // 22 + 1))[:k]
    return bytes(out[:n])


@FEW
@given(raw=sampled_raws(), codec=codecs, level=st.integers(1, 4), known=st.booleans())
def test_sampled_segments_are_byte_identical(raw, codec, level, known):
    same_objects(raw, level, True, codec.name(raw) if known else None, codec, buffer_kinds=False)


def borderline(rnd, n, zero_fraction):
    """Random bytes with zero_fraction of them in zero runs: zstd saves about that fraction, so
    around 1/32 both the sample's and the whole segment's decision are on the edge."""
    raw = bytearray(rnd.randbytes(n))
    run = 512
    for _ in range(int(n * zero_fraction) // run):
        at = rnd.randrange(0, max(1, n - run))
        raw[at:at + run] = bytes(run)
    return bytes(raw)


def kinds(rnd, n):
    text = b"".join(b"2026-12-05T04:%02d:%02d host ekko[%d]: segment %d stored\n"
                    % (i % 60, i % 60, rnd.randrange(1 << 16), i) for i in range(n // 40 + 1))[:n]
    rand = rnd.randbytes(n)
    mixed = bytes(b for pair in zip(rand[:n // 2], text[:n // 2]) for b in pair)[:n // 2] + rand[n // 2:]
    blocks = bytearray(rand)
    for at in range(0, n, 128 * KiB):
        if rnd.random() < 0.5:
            blocks[at:at + 64 * KiB] = bytes(len(blocks[at:at + 64 * KiB]))
    yield "random", rand
    yield "zeros", bytes(n)
    yield "text", text
    yield "mixed", mixed
    yield "random with zero blocks", bytes(blocks)
    for f in (0.025, 0.03, 0.031, 0.032, 0.033, 0.035, 0.04):
        yield f"borderline {f}", borderline(rnd, n, f)


SIZES = [0, 1, 28, 8 * S.SAMPLE - 1, 8 * S.SAMPLE, 8 * S.SAMPLE + 1, 256 * KiB + 3, MiB - 1, MiB,
         MiB + 1536, 3 * MiB + 512, 4 * MiB]


@pytest.mark.parametrize("n", SIZES)
def test_disk_like_segments_are_byte_identical(n):
    seed = 1500 + n % 997
    rnd = random.Random(seed)
    compressed = set()
    for kind, raw in kinds(rnd, n):
        for codec in (PLAIN, SEALED):
            for known in (False, True):
                level = rnd.choice([1, 1, 3, 6])
                blob = same_objects(raw, level, True, codec.name(raw) if known else None, codec,
                                    buffer_kinds=n <= MiB and kind == "mixed")
                compressed.add(blob[4] if len(blob) > S.HEADER.size else None)
        same_objects(raw, 1, False, None, PLAIN, buffer_kinds=False)
    if n >= 8 * S.SAMPLE:
        assert compressed >= {S.COMP_NONE, S.COMP_ZSTD}, f"seed {seed}: both outcomes occur"


def test_the_borderline_really_is_on_both_sides_of_the_decision():
    """The borderline kinds above put the whole segment on both sides of MIN_SAVING."""
    rnd = random.Random(77)
    sides = set()
    for f in (0.025, 0.03, 0.031, 0.032, 0.033, 0.035, 0.04):
        raw = borderline(rnd, MiB, f)
        packed = len(zstandard.ZstdCompressor(level=1).compress(raw))
        sides.add(packed <= len(raw) * (1 - S.MIN_SAVING))
        assert S._native_encode(raw).blob == S._py_encode(raw).blob, f
    assert sides == {True, False}


def test_a_wrong_known_digest_fails_both_paths_with_the_same_message():
    for raw in (random.Random(1).randbytes(64 * KiB), b"log line 42\n" * 400, b"", b"x"):
        stale = S._py_digest(raw + b"!")
        py, nat = both_encode(raw, 1, True, stale, PLAIN)
        assert py[0] == "mismatch" and nat == py


# -- decode: the same refusals ------------------------------------------------------------------

def outcome(fn, blob, expected, codec, where=""):
    try:
        return ("ok", fn(blob, expected, where, codec=codec))
    except IntegrityError as e:
        return ("refused", type(e), str(e), type(e.__cause__))
    except Exception as e:                               # noqa: BLE001  (compared, then reported)
        return ("other", type(e), str(e))


def same_refusal(blob, expected, codec, what, raw=None):
    py = outcome(S._py_decode, blob, expected, codec)
    nat = outcome(S._native_decode, blob, expected, codec)
    assert nat == py, f"{what}: python {py[:3]!r}, native {nat[:3]!r}"
    assert py[0] != "other", f"{what}: {py}"
    if py[0] == "ok" and raw is not None:
        assert py[1] == raw, f"{what}: wrong bytes"


@given(raw=raws(), codec=codecs, compress=st.booleans())
@example(raw=b"abc" * 100, codec=PLAIN, compress=True)
@example(raw=bytes(300), codec=SEALED, compress=True)
def test_every_bit_flip_truncation_and_append_is_refused_alike(raw, codec, compress):
    enc = S._py_encode(raw, 1, compress, codec=codec)
    blob = enc.blob
    same_refusal(blob, enc.digest, codec, "intact", raw)
    for i in range(len(blob)):
        for bit in range(8):
            same_refusal(flip(blob, i, bit), enc.digest, codec, f"bit {bit} of byte {i}", raw)
    for n in range(len(blob)):
        same_refusal(blob[:n], enc.digest, codec, f"truncated to {n}")
    for tail in (b"\0", b"\x28\xb5\x2f\xfd", bytes(17)):
        same_refusal(blob + tail, enc.digest, codec, f"{tail!r} appended")
    if codec is PLAIN:
        same_refusal(blob, S._py_digest(raw + b"?"), codec, "another name")


def crafted(raw, payload, comp=S.COMP_ZSTD, length=None, reserved=0, digest=None):
    return S.HEADER.pack(S.MAGIC, comp, S.HASH_XXH3_128, reserved, len(raw) if length is None else length,
                         digest or S._py_digest(raw)) + payload


def test_crafted_objects_are_refused_alike():
    """Frames ekko never writes: unknown size, checksum, skippable frame, two frames, a window too
    large, content size 0, and an empty payload: each refused (or read) the same way."""
    raw = b"log line 42\n" * 4000
    d = S._py_digest(raw)
    z = zstandard.ZstdCompressor
    frames = {
        "no content size": z(write_content_size=False).compress(raw),
        "checksum": z(write_checksum=True).compress(raw),
        "two frames": z().compress(raw[:100]) + z().compress(raw[100:]),
        "skippable": b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + z().compress(raw),
        "level 19, long window": z(level=19).compress(raw),
        "empty": b"",
        "magic only": b"\x28\xb5\x2f\xfd",
        "raw bytes": raw,
    }
    for what, payload in frames.items():
        for length in (len(raw), 0, len(raw) + 1, (1 << 32) - 1):
            for comp in (S.COMP_ZSTD, S.COMP_NONE, 2):
                blob = crafted(raw, payload, comp=comp, length=length, digest=d)
                same_refusal(blob, d, PLAIN, f"{what}, length {length}, compression {comp}", raw)
                same_refusal(blob, d, SEALED, f"sealed: {what}, length {length}, compression {comp}", raw)
    empty_frame = z().compress(b"")
    same_refusal(crafted(b"", empty_frame), S._py_digest(b""), PLAIN, "the empty frame", b"")
    same_refusal(crafted(b"x", empty_frame, length=0, digest=S._py_digest(b"x")), S._py_digest(b"x"), PLAIN,
                 "the empty frame under another digest")


@pytest.mark.parametrize("n", [MiB, MiB + 1536])
def test_flips_in_large_objects_are_refused_alike(n):
    rnd = random.Random(n)
    for kind, raw in kinds(rnd, n):
        if kind not in ("text", "mixed", "random"):
            continue
        enc = S._py_encode(raw)
        positions = sorted(set(range(0, min(64, len(enc.blob)))) | {rnd.randrange(len(enc.blob)) for _ in range(40)})
        for i in positions:
            same_refusal(flip(enc.blob, i, rnd.randrange(8)), enc.digest, PLAIN, f"{kind}: byte {i}", raw)
        same_refusal(enc.blob[:-1], enc.digest, PLAIN, f"{kind}: one byte short")
        same_refusal(enc.blob, enc.digest, PLAIN, f"{kind}: intact", raw)


def test_where_names_the_segment_in_both_paths():
    for fn in (S._py_decode, S._native_decode):
        with pytest.raises(IntegrityError, match=r"^segment disk0 segment 7: truncated \(3 bytes\)$"):
            fn(b"EKS", S._py_digest(b""), where="disk0 segment 7")


# -- the GIL ------------------------------------------------------------------------------------

BIG = 64 * MiB


@pytest.fixture(scope="module")
def big():
    rnd = random.Random(64)
    block = b"".join(b"%08d some log text that compresses\n" % i for i in range(MiB // 40))[:MiB]
    return b"".join(rnd.randbytes(MiB) if i % 2 else block for i in range(BIG // MiB))


def runs_beside(call):
    """Whether this thread ran Python code while one single `call` was running without the GIL in
    another thread: seen through _segcore.heavy() (calls in progress, calls started), which can only
    be read here while that thread lets go of the GIL. Retries the call until seen or 20 times (a
    call may end before this thread is scheduled); no time is measured."""
    seen = threading.Event()
    over = threading.Event()

    def worker():
        try:
            for _ in range(20):
                if seen.is_set():
                    return
                call()
        finally:
            over.set()

    t = threading.Thread(target=worker)
    t.start()
    counted = 0
    try:
        while not over.is_set():
            now, started = S._segcore.heavy()
            if now:
                for _ in range(1000):           # Python code of this thread, during that call
                    counted += 1
                now2, started2 = S._segcore.heavy()
                if now2 and started2 == started:
                    seen.set()
                    break
    finally:
        t.join()
    return seen.is_set() and counted > 0


def test_native_calls_release_the_gil(big):
    d = S._py_digest(big)
    blob = S._native_encode(big, known_digest=d).blob
    assert blob[4] == S.COMP_ZSTD
    assert runs_beside(lambda: S._native_encode(big, known_digest=d)), "encode held the GIL"
    assert runs_beside(lambda: S._native_encode(big, compress=False, known_digest=d)), "encode (no zstd) held it"
    assert runs_beside(lambda: S._native_decode(blob, d)), "decode held the GIL"
    assert runs_beside(lambda: S._segcore.xxh3_128(big)), "xxh3_128 held the GIL"
    assert runs_beside(lambda: S._segcore.is_zero(bytes(BIG))), "is_zero held the GIL"


def test_the_readers_of_segments_get_the_native_decode():
    """Restore and verify call segment.decode (the module's attribute, at call time)."""
    import inspect

    from ekko_libvirt.lifecycle import verify
    from ekko_libvirt.restore import disk
    for mod in (disk, verify):
        assert "segment.decode(" in inspect.getsource(mod), mod.__name__
    if S.BACKEND == "native":
        assert S.decode is S._native_decode and S.encode is S._native_encode
        assert S.digest is S._segcore.xxh3_128 and C.PLAIN.name is S._segcore.xxh3_128

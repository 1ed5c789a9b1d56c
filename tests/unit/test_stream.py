"""restore/stream.py: a backup's disk as one stream of bytes (what the Glance upload sends).

Randomized over sparse disks (zero segments, data segments of zeros, lone bytes, short last
segments), plain and encrypted stores: the raw stream is the disk byte for byte; the qcow2 stream
is a clean qcow2 (`qemu-img check`) with the disk's content (`qemu-img compare`) and the same
content as the file restore of the same backup (restore/disk.py, what `ekko restore` runs);
stream_size() is the number of bytes yielded. A damaged or missing segment stops the stream with
an IntegrityError naming the segment and its disk offset, and not one byte of that segment (or
after it) has been yielded.

A failure prints the seed: EKKO_STREAM_SEED=<seed> EKKO_STREAM_ROUNDS=1 runs just that one.
"""

import hashlib
import os
import random
import subprocess
import threading

import pytest

from ekko_libvirt.errors import IntegrityError, StoreError, UsageError
from ekko_libvirt.format import crypto, segment
from ekko_libvirt.format import manifest as mf
from ekko_libvirt.restore import qcow2
from ekko_libvirt.restore.disk import restore
from ekko_libvirt.restore.stream import disk_stream, stream_size
from ekko_libvirt.store.memory import MemoryStore
from ekko_libvirt.store.sealed import SealedStore

from .test_restore_random import disk_bytes, first_difference, random_disk

KiB = 1024
ROUNDS = int(os.environ.get("EKKO_STREAM_ROUNDS") or 10)
KEY = bytes(range(32))


def sealed_store() -> SealedStore:
    return SealedStore(MemoryStore(), lambda: crypto.SealedCodec(KEY, "/k/test.key"))


def backup_of(store, segs, seg: int, size: int) -> mf.Manifest:
    """A full backup's manifest of `segs` (None: a zero segment), its segments put in `store`
    named and sealed by the store's codec (as the backup pipeline does)."""
    codec = store.codec
    t = mf.SegmentTable(len(segs))
    for i, raw in enumerate(segs):
        if raw is None:
            t.set_zero(i)
            continue
        enc = segment.encode(raw, codec=codec)
        store.put(enc.key, enc.blob)
        t.set_data(i, enc.digest)
    return mf.Manifest("20260101T000000000Z-abcdef", "t1", size, seg, t, hash=codec.naming,
                       encryption=codec.describe())


def collect(it) -> bytes:
    return b"".join(it)


def qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def check_qcow2(path: str, raw_path: str, where: str) -> None:
    p = qemu_img("check", path)
    assert p.returncode == 0, f"{where}: qemu-img check: {p.stdout}{p.stderr}"
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw_path)
    assert p.returncode == 0, f"{where}: qemu-img compare with the disk: {p.stdout}{p.stderr}"


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_random_sparse_disks_stream_exactly(workdir):
    base = int(os.environ.get("EKKO_STREAM_SEED") or random.randrange(1 << 32))
    for r in range(ROUNDS):
        seed = base + r
        where = f"EKKO_STREAM_SEED={seed} EKKO_STREAM_ROUNDS=1"
        print(where)
        rnd = random.Random(seed)
        aligned = rnd.random() < 0.7            # a qcow2's virtual size is whole sectors
        sizes = [64 * KiB, 128 * KiB, 256 * KiB] + ([96 * KiB] if not aligned else [])
        segs, seg, size = random_disk(rnd, sizes, aligned)
        store = sealed_store() if r % 3 == 1 else MemoryStore()
        m = backup_of(store, segs, seg, size)
        disk = disk_bytes(segs, seg, size)
        what = f"{where}: segment size {seg}, disk {size} bytes, {'sealed' if r % 3 == 1 else 'plain'} store"
        workers = rnd.choice([1, 2, 5])

        got = collect(disk_stream(store, m, "raw", workers))
        assert first_difference(got, disk) is None, f"{what}: raw: {first_difference(got, disk)}"
        assert stream_size(m, "raw") == len(got) == size, what
        if not (aligned and qcow2.can_write(seg)):
            continue
        image = collect(disk_stream(store, m, "qcow2", workers))
        assert stream_size(m, "qcow2") == len(image), f"{what}: qcow2 of {len(image)} bytes"
        streamed = write(os.path.join(workdir, f"s{r}.qcow2"), image)
        raw_disk = write(os.path.join(workdir, f"d{r}.raw"), disk)
        check_qcow2(streamed, raw_disk, what)
        # differential: the file restore (`ekko restore`) of the same backup, qcow2 and raw
        restored = os.path.join(workdir, f"r{r}.qcow2")
        restore(store, m, restored, "qcow2", workers=2)
        p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", streamed, restored)
        assert p.returncode == 0, f"{what}: stream vs file restore: {p.stdout}{p.stderr}"
        for p_ in (streamed, raw_disk, restored):
            os.unlink(p_)


def test_odd_sizes_and_a_last_partial_segment(workdir):
    """Disks of one sector, a cluster and a sector, a segment and a sector ending in data or in a
    zero segment, all zero segments, and data after a hole longer than one L2 table maps."""
    seg = 128 * KiB
    rnd = random.Random(5)
    cases = {       # name: (segments (None: zeros), virtual size)
        "one sector": ([rnd.randbytes(512)], 512),
        "cluster+sector": ([rnd.randbytes(64 * KiB + 512)], 64 * KiB + 512),
        "segment+sector of data": ([rnd.randbytes(seg), b"\x01" + bytes(511)], seg + 512),
        "segment+sector of zeros": ([rnd.randbytes(seg), None], seg + 512),
        "all zero segments": ([None, None, None], 3 * seg),
        "data after a 512 MiB hole": ([None] * 4097 + [bytes(seg - 1) + b"\x09"], 4098 * seg),
    }
    for name, (segs, size) in cases.items():
        store = MemoryStore()
        m = backup_of(store, segs, seg, size)
        raw_disk = os.path.join(workdir, "d.raw")
        with open(raw_disk, "wb") as f:         # sparse: only the data segments written
            f.truncate(size)
            for i, s in enumerate(segs):
                if s is not None:
                    f.seek(i * seg)
                    f.write(s)
        raw_len, raw_hash = stream_to(os.path.join(workdir, "s.raw"), disk_stream(store, m, "raw"))
        assert raw_len == stream_size(m, "raw") == size, name
        assert raw_hash == file_hash(raw_disk), name
        image = os.path.join(workdir, "s.qcow2")
        n, _ = stream_to(image, disk_stream(store, m, "qcow2"))
        assert n == stream_size(m, "qcow2") == os.path.getsize(image), name
        check_qcow2(image, raw_disk, name)
        info = qemu_img("info", "--output=json", image)
        assert f'"virtual-size": {size},' in info.stdout, (name, info.stdout)


def stream_to(path: str, pieces):
    """Write the stream to `path` (zero pieces as holes) -> (bytes, sha256 of them)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "wb") as f:
        for piece in pieces:
            h.update(piece)
            if piece.count(0) != len(piece):
                f.seek(n)
                f.write(piece)
            n += len(piece)
        f.truncate(n)
    return n, h.hexdigest()


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def _damage(store, m: mf.Manifest, index: int, how: str) -> str:
    key = segment.segment_key(m.table.get(index))
    inner = store.inner if isinstance(store, SealedStore) else store
    if how == "missing":
        inner.delete(key)
    else:
        blob = bytearray(inner.get(key))
        blob[len(blob) // 2] ^= 0x10
        inner.put(key, bytes(blob))
    return key


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("how", ["flipped bit", "missing"])
@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_damaged_segment_stops_the_stream_before_its_first_byte(fmt, how, sealed):
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    seg = 64 * KiB
    segs = [rnd.randbytes(seg) if rnd.random() < 0.7 else None for _ in range(40)]
    data = [i for i, s in enumerate(segs) if s is not None]
    store = sealed_store() if sealed else MemoryStore()
    m = backup_of(store, segs, seg, len(segs) * seg)
    bad = rnd.choice(data)
    key = _damage(store, m, bad, how)
    disk = disk_bytes(segs, seg, len(segs) * seg)
    out = bytearray()
    with pytest.raises(IntegrityError) as e:
        for piece in disk_stream(store, m, fmt, workers=rnd.choice([1, 3, 8])):
            out += piece
    msg = str(e.value)
    assert f"segment {bad} at disk offset {bad * seg} ({key})" in msg and m.backup_id in msg, (seed, msg)
    if fmt == "raw":
        assert len(out) <= bad * seg and out == disk[:len(out)], (seed, len(out))
    else:       # the metadata, then the data segments before the bad one: never the bad one's
        layout = qcow2.plan(m.virtual_size, seg, data)
        rank = data.index(bad)
        assert len(out) <= layout.host_offset(rank), (seed, len(out), layout.host_offset(rank))
        for k, i in enumerate(data[:rank]):
            o = layout.host_offset(k)
            if o + seg <= len(out):
                assert out[o:o + seg] == segs[i], (seed, i)


def test_a_segment_of_the_wrong_length_is_damage():
    """A manifest whose last (short) segment's object holds a whole segment: the stream would be
    longer than its size."""
    seg = 64 * KiB
    store = MemoryStore()
    m = backup_of(store, [b"\x01" * seg, b"\x02" * seg], seg, seg + 512)
    with pytest.raises(IntegrityError, match=rf"segment 1 at disk offset {seg} .*: {seg} bytes where the disk "
                                             r"needs 512"):
        collect(disk_stream(store, m, "raw"))


class FlakyStore(MemoryStore):
    """Gets fail from the n-th on: StoreError (the store does not answer) or a bug's RuntimeError."""

    def __init__(self, fail_at: int, error: Exception):
        super().__init__()
        self.fail_at, self.error, self.gets = fail_at, error, 0
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self.lock:
            self.gets += 1
            n = self.gets
        if key.startswith("segments/") and n >= self.fail_at:
            raise self.error
        return super().get(key)


@pytest.mark.parametrize("error", [StoreError("swift: 503 Service Unavailable (test)"), RuntimeError("bug (test)")],
                         ids=["store", "other"])
def test_a_store_that_fails_at_a_random_point_is_not_damage_and_yields_a_prefix(error):
    """The store's own failure stays what it is (an IntegrityError would say the backup is
    damaged); whatever was yielded before it is the disk's beginning."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    seg = 64 * KiB
    segs = [rnd.randbytes(seg) if rnd.random() < 0.8 else None for _ in range(30)]
    store = FlakyStore(0, error)
    m = backup_of(store, segs, seg, len(segs) * seg)
    store.fail_at = rnd.randrange(1, sum(s is not None for s in segs) + 1)
    disk = disk_bytes(segs, seg, len(segs) * seg)
    out = bytearray()
    with pytest.raises(type(error)) as e:
        for piece in disk_stream(store, m, "raw", workers=rnd.choice([1, 4])):
            out += piece
    assert e.value is error and not isinstance(e.value, IntegrityError), seed
    assert out == disk[:len(out)] and len(out) < len(disk), seed


def test_a_consumer_that_stops_stops_the_fetching():
    """An upload that fails after a few pieces closes the generator: no thread keeps fetching."""
    seg = 64 * KiB
    rnd = random.Random(9)
    store = FlakyStore(1 << 30, RuntimeError("unused"))
    m = backup_of(store, [rnd.randbytes(seg) for _ in range(200)], seg, 200 * seg)
    before = {t for t in threading.enumerate() if t.name.startswith("ekko-stream")}
    it = disk_stream(store, m, "raw", workers=4)
    for _ in range(3):
        next(it)
    it.close()
    assert store.gets <= 3 + 4 + 1 + 4, store.gets         # a window of workers + 1 ahead, not the disk
    left = {t for t in threading.enumerate() if t.name.startswith("ekko-stream")} - before
    assert not left, left


def test_bad_requests_are_refused_before_any_fetch():
    store = FlakyStore(1, RuntimeError("fetched (test)"))
    seg = 96 * KiB
    m = backup_of(MemoryStore(), [b"\x01" * seg], seg, seg)
    with pytest.raises(UsageError, match="segment size 98304 is not a whole number of 65536-byte clusters"):
        disk_stream(store, m, "qcow2")
    with pytest.raises(UsageError, match=r"disk format must be one of raw, qcow2, not 'vmdk'"):
        disk_stream(store, m, "vmdk")
    assert store.gets == 0


def test_the_upload_recuts_the_stream_into_small_http_chunks():
    """api/glance.py sends the stream in chunks of at most PIECE bytes (Glance's worker spends
    less on them), the same bytes in the same order, without copying a segment, and never an
    empty chunk (HTTP's last-chunk: Glance would store a truncated image)."""
    from ekko_libvirt.api.glance import PIECE, _pieces
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    body = [b""] + [rnd.randbytes(rnd.choice([0, 1, PIECE - 1, PIECE, PIECE + 1, 4 * PIECE, rnd.randrange(10 * PIECE)]))
            for _ in range(30)]
    pieces = list(_pieces(iter(body)))
    assert b"".join(bytes(p) for p in pieces) == b"".join(body), seed
    assert all(0 < len(p) <= PIECE for p in pieces), seed
    assert all(any(p is b for b in body) or isinstance(p, memoryview) for p in pieces), seed
    assert len(pieces) == sum(-(-len(b) // PIECE) for b in body), seed

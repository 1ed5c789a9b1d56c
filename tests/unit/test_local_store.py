"""LocalStore's direct I/O path: objects of DIRECT_MIN bytes or more go around the page cache
in ALIGN-sized blocks through a CHUNK-sized bounce buffer; the edges of those sizes are where a
padding or truncation mistake would show."""

import ctypes
import errno
import os
import time

import pytest

from ekko_libvirt.store.sealed import SealedStore
from ekko_libvirt.errors import ObjectNotFound
from ekko_libvirt.store import local
from ekko_libvirt.directio import ALIGN, CHUNK
from ekko_libvirt.store.local import DIRECT_MIN, TMP_MARK, LocalStore

SIZES = [0, 1, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, CHUNK - 1, CHUNK, CHUNK + 1,
         2 * CHUNK + ALIGN + 17]


def _data(n: int) -> bytes:
    # not zeros: a block of padding read back in place of data would show
    return (bytes(range(1, 256)) * (n // 255 + 1))[:n]


@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_at_block_and_chunk_edges(tmp_path, n):
    store = LocalStore(str(tmp_path))
    data = _data(n)
    store.put("segments/abc/x", data)
    assert os.path.getsize(tmp_path / "segments" / "abc" / "x") == n
    assert store.get("segments/abc/x") == data
    assert store.stat("segments/abc/x").size == n
    assert not [f for f in os.listdir(tmp_path / "segments" / "abc") if TMP_MARK in f]


def test_direct_io_is_used_for_large_objects(tmp_path, monkeypatch):
    """Which objects go around the page cache is the store's decision (directio's two
    implementations then keep it: tests/unit/test_directio_native.py checks the page cache)."""
    writes, reads = [], []
    real_write, real_read = local.write_new_file, local.read_direct

    def write(path, data, direct=False, sync=True):
        writes.append((os.path.basename(path).split(TMP_MARK)[0], direct))
        return real_write(path, data, direct=direct, sync=sync)

    monkeypatch.setattr(local, "write_new_file", write)
    monkeypatch.setattr(local, "read_direct", lambda p, n: reads.append(os.path.basename(p)) or real_read(p, n))
    store = LocalStore(str(tmp_path))
    store.put("big", _data(DIRECT_MIN))
    store.put("small", _data(DIRECT_MIN - 1))
    store.put("huge", _data(CHUNK + 1))
    assert {name for name, direct in writes if direct} == {"big", "huge"}, writes
    assert store.get("big") == _data(DIRECT_MIN)
    assert store.get("small") == _data(DIRECT_MIN - 1)
    assert store.get("huge") == _data(CHUNK + 1)     # a segment bigger than the bounce buffer: direct too
    assert reads == ["big", "huge"], reads


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    """tmpfs before Linux 6.6 and some FUSE file systems refuse O_DIRECT with EINVAL."""
    real_write = local.write_new_file

    def refusing(path, data, direct=False, sync=True):
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(path, data, direct=direct, sync=sync)

    monkeypatch.setattr(local, "write_new_file", refusing)
    store = LocalStore(str(tmp_path))
    data = _data(CHUNK + 5)
    store.put("segments/abc/x", data)
    assert store.direct is False
    assert store.get("segments/abc/x") == data
    assert sorted(os.listdir(tmp_path / "segments" / "abc")) == ["x"]     # no temp file left


def test_real_tmpfs_roundtrip():
    """/dev/shm is tmpfs: O_DIRECT is refused before Linux 6.6 and accepted after; both work."""
    import tempfile
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        store = LocalStore(d)
        data = _data(CHUNK + ALIGN + 3)
        store.put("segments/abc/x", data)
        assert store.get("segments/abc/x") == data


def test_other_write_errors_are_store_errors_and_leave_no_temp_file(tmp_path):
    """A real write failure half-way (EFBIG: the file size limit is below the object, so the
    first blocks are written and the next write fails), in a child process that set the limit:
    whichever directio implementation runs, no temp file stays and no silent fallback follows."""
    import subprocess
    import sys
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({DIRECT_MIN}, {DIRECT_MIN}))
from ekko_libvirt.errors import StoreError
from ekko_libvirt.store.local import LocalStore
store = LocalStore(sys.argv[1])
try:
    store.put("segments/abc/x", bytes(range(1, 256)) * 1000)
except StoreError as e:
    print("refused:", e, "direct:", store.direct)
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused: cannot write segments/abc/x" in r.stdout and "File too large" in r.stdout, r.stdout
    assert r.stdout.strip().endswith("direct: True")         # not a refusal of direct I/O: no silent fallback
    assert os.listdir(tmp_path / "segments" / "abc") == []
    with pytest.raises(ObjectNotFound, match="object not found in store: segments/abc/x"):
        LocalStore(str(tmp_path)).get("segments/abc/x")


# -- batches: the segments of one backup, durable together -----------------------------------------
def test_batch_objects_are_invisible_until_flushed_then_whole(tmp_path):
    store = LocalStore(str(tmp_path))
    b = store.batch()
    objs = {f"segments/{i:03x}/s{i}": _data(DIRECT_MIN + i) for i in range(5)}
    for k, v in objs.items():
        b.put(k, v)
    for k in objs:
        assert not store.exists(k)
        with pytest.raises(ObjectNotFound, match=f"object not found in store: {k}$"):
            store.get(k)
    assert list(store.list("segments/")) == []
    b.flush()
    assert sorted(store.list("segments/")) == sorted(objs)
    for k, v in objs.items():
        assert store.get(k) == v
    temps = [f for _, _, fs in os.walk(tmp_path) for f in fs if TMP_MARK in f]
    assert temps == []


def test_batch_flushes_by_itself_every_so_many_objects(tmp_path, monkeypatch):
    monkeypatch.setattr(local.LocalBatch, "FLUSH_EVERY", 3)
    store = LocalStore(str(tmp_path))
    b = store.batch()
    for i in range(7):
        b.put(f"o{i}", _data(10))
    assert sorted(store.list()) == [f"o{i}" for i in range(6)]
    b.flush()
    assert len(list(store.list())) == 7


def test_batch_abort_and_a_crash_leave_nothing_visible(tmp_path):
    store = LocalStore(str(tmp_path))
    b = store.batch()
    b.put("segments/abc/a", _data(DIRECT_MIN))
    b.abort()
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []
    # a crash before the flush: the temp file stays, invisible, and gc's clean_temp removes it
    crashed = store.batch()
    crashed.put("segments/abc/b", _data(100))
    assert list(store.list()) == []
    assert store.clean_temp(older_than=time.time() + 1) == 1
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []


def test_batch_without_syncfs_fsyncs_each_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(local, "_syncfs", None)
    monkeypatch.setattr(local.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    store = LocalStore(str(tmp_path))
    b = store.batch()
    b.put("segments/abc/a", _data(DIRECT_MIN))
    b.put("segments/abd/b", _data(10))
    b.flush()
    assert len(synced) == 4          # two files, then their two directories
    assert store.get("segments/abd/b") == _data(10)


def test_a_failed_sync_fails_the_flush_and_leaves_no_object(tmp_path, monkeypatch):
    from ekko_libvirt.errors import StoreError

    def broken(fd):
        ctypes.set_errno(errno.EIO)
        return -1
    monkeypatch.setattr(local, "_syncfs", broken)
    store = LocalStore(str(tmp_path))
    b = store.batch()
    b.put("segments/abc/a", _data(DIRECT_MIN))
    with pytest.raises(StoreError, match="durable"):
        b.flush()
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []


def test_sealed_store_batches_seal_what_they_store(tmp_path):
    from ekko_libvirt.format import crypto
    inner = LocalStore(str(tmp_path))
    store = SealedStore(inner, lambda: crypto.SealedCodec(bytes(range(32)), "/k/test.key"))
    b = store.batch()
    plain = _data(DIRECT_MIN)
    b.put("segments/abc/a", plain)
    b.flush()
    assert inner.get("segments/abc/a")[:4] == b"EKE1"
    assert plain not in inner.get("segments/abc/a")
    assert store.get("segments/abc/a") == plain


def test_segment_objects_of_every_allowed_size_are_read_around_the_page_cache(tmp_path, monkeypatch):
    """directio.CHUNK (2 MiB) once decided which objects were read with O_DIRECT: with 4 MiB
    segments every restore read went through the page cache. Now every segment size is."""
    from ekko_libvirt import units
    from ekko_libvirt.store import local
    store = local.LocalStore(str(tmp_path / "s"))
    seen = []
    real = local.read_direct
    monkeypatch.setattr(local, "read_direct", lambda path, size: seen.append(size) or real(path, size))
    for size in (64 << 10, 4 << 20, (8 << 20) + 32):
        data = os.urandom(size)
        store.put(f"segments/abc/{size}", data)
        assert store.get(f"segments/abc/{size}") == data
    assert seen == [64 << 10, 4 << 20, (8 << 20) + 32]
    assert local.DIRECT_MAX >= units.MAX_SEGMENT_SIZE

"""LocalStore's direct I/O path: objects of DIRECT_MIN bytes or more go around the page cache
in ALIGN-sized blocks through a CHUNK-sized bounce buffer; the edges of those sizes are where a
padding or truncation mistake would show."""

import errno
import os

import pytest

from ekko_libvirt.errors import ObjectNotFound
from ekko_libvirt.store import local
from ekko_libvirt.store.local import ALIGN, CHUNK, DIRECT_MIN, TMP_MARK, LocalStore

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
    flags = []
    real_open = os.open
    monkeypatch.setattr(local.os, "open", lambda p, f, *a: flags.append((os.path.basename(p), f)) or real_open(p, f, *a))
    store = LocalStore(str(tmp_path))
    store.put("big", _data(DIRECT_MIN))
    store.put("small", _data(DIRECT_MIN - 1))
    assert store.get("big") == _data(DIRECT_MIN)
    direct = {name.split(TMP_MARK)[0] for name, f in flags if f & os.O_DIRECT}
    assert direct == {"big"}, flags


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    """tmpfs before Linux 6.6 and some FUSE file systems refuse O_DIRECT with EINVAL."""
    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(local.os, "open", refusing_open)
    store = LocalStore(str(tmp_path))
    data = _data(CHUNK + 5)
    store.put("segments/abc/x", data)
    assert store.direct is False
    assert store.get("segments/abc/x") == data
    assert sorted(os.listdir(tmp_path / "segments" / "abc")) == ["x"]     # no temp file left


def test_real_tmpfs_roundtrip():
    """/dev/shm is tmpfs: O_DIRECT is refused before Linux 6.6 and accepted after; both work."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    import tempfile
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        store = LocalStore(d)
        data = _data(CHUNK + ALIGN + 3)
        store.put("segments/abc/x", data)
        assert store.get("segments/abc/x") == data


def test_other_write_errors_are_store_errors_and_leave_no_temp_file(tmp_path, monkeypatch):
    from ekko_libvirt.errors import StoreError
    monkeypatch.setattr(local.os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    store = LocalStore(str(tmp_path))
    with pytest.raises(StoreError, match="No space left"):
        store.put("segments/abc/x", _data(DIRECT_MIN + 1))
    assert store.direct is True          # not a refusal of direct I/O: no silent fallback
    assert os.listdir(tmp_path / "segments" / "abc") == []
    with pytest.raises(ObjectNotFound):
        store.get("segments/abc/x")

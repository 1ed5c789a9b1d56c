"""directio's native implementation (_directio.c) against its Python one (directio._py_*): the same
files byte for byte and mode, the same bytes read back, the same padding of an O_DIRECT write, and
what the native one does differently (a direct file's tail through the page cache instead of a
padded block cut back) leaves the same file. Failures half-way leave no file; a direct write
really goes around the page cache (fincore).

Sizes: the edges of ALIGN and CHUNK, then random ones (seed printed; EKKO_DIRECTIO_SEED=N replays).
"""

import errno
import os
import random
import shutil
import subprocess
import sys

import pytest

from ekko_libvirt import directio as D
from tests.harness import in_ci

pytestmark = pytest.mark.skipif(not D.BUILT and not in_ci(),
                                reason="the C extension ekko_libvirt/_directio.c is not built (make builds it)")

if D.BUILT:
    from ekko_libvirt import _directio as N

A, C = D.ALIGN, D.CHUNK
EDGES = [0, 1, A - 1, A, A + 1, 64 << 10, C - 1, C, C + 1, 2 * C + A + 17, (1 << 20) + 28]
SEED = int(os.environ.get("EKKO_DIRECTIO_SEED") or random.SystemRandom().randrange(1 << 32))


def _sizes():
    rnd = random.Random(SEED)
    return EDGES + [rnd.randrange(1, 5 * C) for _ in range(12)]


def _data(n: int, salt: int = 0) -> bytes:
    return random.Random(n * 7919 + salt).randbytes(n)


def test_the_native_module_is_what_directio_uses():
    assert D.BUILT
    native = os.environ.get("EKKO_NATIVE") != "0"
    assert (D.write_new_file is D._py_write_new_file) is not native
    assert N.ALIGN == D.ALIGN


@pytest.mark.parametrize("direct", [False, True])
def test_write_new_writes_the_same_file_as_the_python_path(tmp_path, direct):
    print(f"EKKO_DIRECTIO_SEED={SEED}")
    for n in _sizes():
        data = _data(n)
        a, b = tmp_path / f"native-{n}", tmp_path / f"python-{n}"
        N.write_new(str(a), data, direct, True)
        D._py_write_new_file(str(b), data, direct=direct, sync=True)
        assert a.read_bytes() == b.read_bytes() == data, n
        assert os.stat(a).st_mode & 0o777 == os.stat(b).st_mode & 0o777 == 0o600
        # and both read back alike, around the page cache
        assert N.read_direct(str(a), n) == D._py_read_direct(str(a), n) == data, n
        os.unlink(a)
        os.unlink(b)


def test_write_new_takes_any_buffer(tmp_path):
    data = _data(3 * A + 5)
    for i, buf in enumerate([bytearray(data), memoryview(data), memoryview(bytearray(data))[0:]]):
        N.write_new(str(tmp_path / str(i)), buf, True, False)
        assert (tmp_path / str(i)).read_bytes() == data


def test_write_new_never_replaces_a_file(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"keep me")
    for direct in (False, True):
        with pytest.raises(FileExistsError) as e:
            N.write_new(str(p), _data(C + 3), direct, True)
        assert e.value.filename == str(p)
    assert p.read_bytes() == b"keep me"


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        N.write_new(str(tmp_path / "no" / "x"), b"abc", True, True)
    assert e.value.filename == str(tmp_path / "no" / "x")


@pytest.mark.parametrize("impl", ["native", "python"])
@pytest.mark.parametrize("direct", [False, True])
def test_a_write_that_fails_half_way_leaves_no_file(tmp_path, impl, direct):
    """EFBIG after the first blocks (a file size limit under the object's size, set in a child)."""
    limit = 3 * A
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from ekko_libvirt import directio as D
write = D._directio.write_new if {impl!r} == "native" else (lambda p, d, direct, sync: D._py_write_new_file(p, d, direct, sync))
try:
    write(sys.argv[1], b"x" * {C + A + 9}, {direct}, True)
except OSError as e:
    print("errno", e.errno)
"""
    target = tmp_path / "obj"
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"errno {errno.EFBIG}", r.stdout
    assert not target.exists()


def test_pwrite_direct_pads_like_the_python_path(tmp_path):
    """The restore's writes: at aligned offsets of an O_DIRECT file, the last block zero-padded."""
    print(f"EKKO_DIRECTIO_SEED={SEED}")
    rnd = random.Random(SEED ^ 0x5A5A)
    files = {}
    for name in ("native", "python"):
        path = tmp_path / name
        files[name] = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        files[name] = (path, fd)
    try:
        for i, n in enumerate(_sizes()):
            offset = rnd.randrange(0, 64) * A + i * 6 * C
            data = _data(n, i)
            N.pwrite_direct(files["native"][1], data, offset)
            D._py_pwrite_direct(files["python"][1], data, offset)
    finally:
        for _path, fd in files.values():
            os.close(fd)
    assert files["native"][0].read_bytes() == files["python"][0].read_bytes()


def test_pwrite_direct_refuses_an_unaligned_offset(tmp_path):
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            N.pwrite_direct(fd, b"a" * A, 512)
        with pytest.raises(OSError):        # a bad descriptor: the system's error, not a crash
            N.pwrite_direct(-1, b"a" * A, 0)
    finally:
        os.close(fd)


def test_read_direct_of_a_short_or_missing_file_fails(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(_data(A + 10))
    with pytest.raises(OSError) as e:
        N.read_direct(str(p), A + 11)
    assert e.value.errno == errno.EIO
    with pytest.raises(FileNotFoundError):
        N.read_direct(str(tmp_path / "nothing"), 10)
    with pytest.raises(ValueError):
        N.read_direct(str(p), -1)
    assert N.read_direct(str(p), 0) == b""


@pytest.mark.skipif(shutil.which("fincore") is None and not in_ci(), reason="fincore (util-linux) missing")
def test_a_direct_write_goes_around_the_page_cache(tmp_path):
    """What the store's O_DIRECT writes are for: a backup's objects do not evict the guests' pages.
    The native write leaves at most the tail block cached (written through the cache), the
    buffered one every page."""
    n = 4 * C + 100

    def cached(path) -> int:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True,
                             check=True).stdout
        return int(out.split()[0])

    N.write_new(str(tmp_path / "direct"), _data(n), True, False)
    N.write_new(str(tmp_path / "buffered"), _data(n), False, False)
    assert cached(tmp_path / "direct") <= A
    assert cached(tmp_path / "buffered") >= n - A

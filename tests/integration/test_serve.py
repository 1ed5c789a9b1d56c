"""`ekko serve` through the real CLI, real nbdkit (ekko's Python plugin) and real NBD clients
(qemu-img, nbdcopy, python3-libnbd): a served backup reads exactly as the disk did at that
backup's instant (a full and an incremental, on a local, a Swift and an encrypted store, a disk
that ends in a short segment), block status reports the zero segments, a damaged or missing
segment fails the reads of its range with EIO and the log names it, clients come and go and
read at once, and the nbdkit process never outlives ekko."""

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import nbd
import pytest

from conftest import ROOT, Ekko, make_config, swift_section
from ekko_libvirt import config as ekko_config
from ekko_libvirt.format import segment
from ekko_libvirt.procs import process_running, process_start_ticks
from ekko_libvirt.serve import server
from ekko_libvirt.store import catalog
from harness.qemu import QemuDisk

KiB, MiB = 1024, 1024 * 1024
SIZE = 8 * MiB + 1536             # 33 segments of 256 KiB, the last one 1.5 KiB
SEG = 256 * KiB


def write_first(disk, rnd):
    disk.write(0, rnd.randbytes(MiB + 300 * KiB))               # data, ending inside a segment
    disk.write(2 * MiB, b"log line 42 of ekko serve\n" * 20000)  # compressible
    disk.write(SIZE - 3000, rnd.randbytes(3000))                 # into the short last segment
    # [3 MiB, 8 MiB - 3000) never written: zero segments


def write_second(disk, rnd):
    disk.write(600 * KiB, rnd.randbytes(100 * KiB))
    disk.write(5 * MiB + 17, rnd.randbytes(70000))               # unaligned, across two segments
    disk.write(SIZE - 512, b"\x5a" * 512)
    disk.write_zeroes(2 * MiB, 256 * KiB)


def wait_for(pred, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Serve:
    """`ekko serve BACKUP --json ...` running; .info is its JSON, .stderr what it logged so far."""

    def __init__(self, ekko, backup, *args, env=None):
        self.err_path = os.path.join(ekko.workdir, f"serve-{os.urandom(3).hex()}.err")
        cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", ekko.path, "serve", backup, "--json", *args]
        e = dict(os.environ, **(env or {}))
        e["PYTHONPATH"] = ROOT
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=e, text=True)
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if line == "}\n":
                break
        self.info = json.loads("".join(lines)) if lines else None
        if not self.info or not self.info.get("ok"):
            self.proc.wait(30)
            raise AssertionError(f"ekko serve did not start: {lines} {self.stderr}")
        self.pid = self.info["pid"]
        self.ticks = process_start_ticks(self.pid)

    @property
    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    @property
    def uri(self) -> str:
        return self.info["uri"]

    def nbdkit_running(self) -> bool:
        return self.ticks is not None and process_running(self.pid, self.ticks)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(60)
        self.proc.stdout.close()
        return rc


@contextlib.contextmanager
def serving(ekko, backup, *args, **kw):
    s = Serve(ekko, backup, *args, **kw)
    try:
        yield s
    finally:
        rc = s.stop()
        assert rc == 0, s.stderr
        assert not s.nbdkit_running(), "nbdkit outlived ekko serve"
        if s.info.get("socket"):
            assert not os.path.exists(s.info["socket"])


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def read_all(h, size):
    out = bytearray()
    for off in range(0, size, MiB):
        out += h.pread(min(MiB, size - off), off)
    return bytes(out)


def zero_map(h, size):
    """Per 256 KiB segment: whether block status (base:allocation) calls all of it zero."""
    zero = [True] * (-(-size // SEG))
    off = 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err, got=got):
            if metacontext == "base:allocation":
                pos = offset
                for k in range(0, len(entries), 2):
                    got.append((pos, entries[k], bool(entries[k + 1] & nbd.STATE_ZERO)))
                    pos += entries[k]
            return 0
        h.block_status(size - off, off, cb)
        assert got and got[0][0] == off, (off, got)
        for o, n, z in got:
            if not z:
                for i in range(o // SEG, (o + n - 1) // SEG + 1):
                    zero[i] = False
        off = got[-1][0] + got[-1][1]
    return zero


def compare(uri, expected, workdir):
    path = os.path.join(workdir, f"expected-{os.urandom(3).hex()}.raw")
    with open(path, "wb") as f:
        f.write(expected)
    try:
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", path, uri],
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr
    finally:
        os.unlink(path)


# -- stores ---------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "swift", "encrypted"])
def served_store(request):
    return request.param


def make_ekko(workdir, disk, kind, request):
    cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}}, "256KiB")
    if kind == "swift":
        cfg["store"] = swift_section(request.getfixturevalue("swift_server"))
    ekko = Ekko(workdir, cfg)
    if kind == "encrypted":
        cfg["encryption"] = {"enabled": True, "key_file": os.path.join(workdir, "keys", "{project}.key")}
        ekko.write_config()
        ekko.run("key", "create")
    return ekko


def test_serve_reads_full_and_incremental_exactly(served_store, qdisk, workdir, request):
    rnd = random.Random(16)
    disk = qdisk(SIZE)
    ekko = make_ekko(workdir, disk, served_store, request)
    write_first(disk, rnd)
    full, full_at = ekko.backup(), disk.snapshot()
    write_second(disk, rnd)
    inc, inc_at = ekko.backup(), disk.snapshot()
    assert (full["kind"], inc["kind"]) == ("full", "incremental")
    for b, expected in ((full, full_at), (inc, inc_at)):
        with serving(ekko, b["backup_id"]) as s:
            assert s.info["virtual_size"] == SIZE and s.info["backup_id"] == b["backup_id"]
            assert oct(os.stat(s.info["socket"]).st_mode & 0o777) == "0o600"
            rc, out = compare(s.uri, expected, workdir)
            assert rc == 0, out
            h = connect(s.uri)
            assert h.get_size() == SIZE and h.is_read_only()
            assert read_all(h, SIZE) == expected
            # block status: exactly the all-zero segments the manifest has as ZERO
            m = catalog.load(ekko.store(), b["key"])
            assert zero_map(h, SIZE) == [m.table.get(i) is None for i in range(m.table.count)]
            for i, z in enumerate(zero_map(h, SIZE)):
                if z:
                    assert expected[i * SEG:(i + 1) * SEG] == bytes(len(expected[i * SEG:(i + 1) * SEG]))
            h.shutdown()
    # the incremental's zero region shows in block status as zeros, and the client skipped it:
    # nbdcopy of the whole disk to a file equals the disk
    with serving(ekko, inc["backup_id"]) as s:
        out = os.path.join(workdir, "copy.raw")
        subprocess.run(["nbdcopy", s.uri, out], check=True, timeout=120)
        with open(out, "rb") as f:
            assert f.read() == inc_at


@pytest.fixture(scope="module")
def chain():
    """One disk, a full and an incremental on a local store, with the disk at each instant
    (shared by the tests below: none of them changes the store)."""
    rnd = random.Random(61)
    workdir = tempfile.mkdtemp(prefix="eks", dir="/tmp")
    disk = QemuDisk(workdir, SIZE, "qcow2", "disk").start()
    try:
        ekko = make_ekko(workdir, disk, "local", None)
        write_first(disk, rnd)
        full, full_at = ekko.backup(), disk.snapshot()
        write_second(disk, rnd)
        inc, inc_at = ekko.backup(), disk.snapshot()
    finally:
        disk.stop()
    yield ekko, [(full, full_at), (inc, inc_at)]
    shutil.rmtree(workdir, ignore_errors=True)


def test_random_reads_through_nbdkit_equal_the_disk(chain):
    """Differential: random offsets and lengths (unaligned, spanning segments, the short last
    segment), two connections at once, a cache of four segments (1MiB, the smallest serve.cache
    takes: most reads evict) and the read-ahead racing the reads."""
    ekko, backups = chain
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rnd = random.Random(seed)
    (b, expected) = backups[1]
    with serving(ekko, b["backup_id"], "--cache", "1MiB") as s:
        hs = [connect(s.uri), connect(s.uri)]
        pos = 0
        for k in range(600):
            h = hs[k % 2]
            r = rnd.random()
            if r < 0.4:                     # sequential
                n = rnd.choice((4096, 65536, 200000, SEG))
            elif r < 0.6:                   # the end of the disk
                pos = rnd.randrange(SIZE - SEG - 4096, SIZE - 1)
                n = rnd.randrange(1, SIZE - pos + 1)
            else:                           # anywhere, any length
                pos = rnd.randrange(0, SIZE - 1)
                n = rnd.randrange(1, 3 * SEG)
            n = min(n, SIZE - pos)
            assert h.pread(n, pos) == expected[pos:pos + n], f"seed {seed}: read {n} at {pos}"
            pos = (pos + n) % SIZE
        for h in hs:
            h.shutdown()


def test_clients_disconnect_reconnect_and_read_at_once(chain):
    ekko, backups = chain
    (b, expected) = backups[0]
    with serving(ekko, b["backup_id"]) as s:
        first = connect(s.uri)
        assert first.pread(SEG, 0) == expected[:SEG]
        first.shutdown()
        # reconnect; two clients interleaving
        a, c = connect(s.uri), connect(s.uri)
        for off in range(0, SIZE, SEG):
            n = min(SEG, SIZE - off)
            assert a.pread(n, off) == expected[off:off + n]
            back = SIZE - off - n
            assert c.pread(n, back) == expected[back:back + n]
        a.shutdown()
        # one client gone, the other still reads
        assert c.pread(1536, SIZE - 1536) == expected[-1536:]
        c.shutdown()
        d = connect(s.uri)
        assert read_all(d, SIZE) == expected
        d.shutdown()


def damaged_copy(ekko, workdir):
    """A copy of the chain's store, so damage stays in this test."""
    cfg = json.loads(json.dumps(ekko.cfg))
    cfg["store"]["path"] = os.path.join(workdir, "store-damaged")
    shutil.copytree(ekko.cfg["store"]["path"], cfg["store"]["path"])
    copy = Ekko(workdir, cfg)
    copy.path = os.path.join(workdir, "damaged.yaml")
    copy.write_config()
    return copy


def test_damaged_and_missing_segments_fail_their_reads_with_eio(chain, workdir):
    ekko, backups = chain
    (b, expected) = backups[1]
    ekko = damaged_copy(ekko, workdir)
    m = catalog.load(ekko.store(), b["key"])
    data = [i for i, _ in m.table.data_entries()]
    seen, bad = set(), []
    for i in data:                                   # two segments whose digest appears once
        d = m.table.get(i)
        if d not in seen and sum(1 for _, x in m.table.data_entries() if x == d) == 1:
            bad.append(i)
        seen.add(d)
    flipped, lost = bad[1], bad[-1]                  # the last: the short one at the end
    ekko.corrupt(segment.segment_key(m.table.get(flipped)))
    ekko.lose(segment.segment_key(m.table.get(lost)))
    with serving(ekko, b["backup_id"]) as s:
        h = connect(s.uri)
        for i in range(m.table.count):
            lo, hi = i * SEG, min((i + 1) * SEG, SIZE)
            if i in (flipped, lost):
                with pytest.raises(nbd.Error) as e:
                    h.pread(hi - lo, lo)
                assert e.value.errnum == errno.EIO
            else:
                assert h.pread(hi - lo, lo) == expected[lo:hi], i
        # a read that spans an intact segment and the damaged one fails whole
        with pytest.raises(nbd.Error) as e:
            h.pread(2 * SEG, (flipped - 1) * SEG)
        assert e.value.errnum == errno.EIO
        # unaligned, just the first byte of the damaged one
        with pytest.raises(nbd.Error):
            h.pread(1, flipped * SEG)
        assert h.pread(10, flipped * SEG - 10) == expected[flipped * SEG - 10:flipped * SEG]
        h.shutdown()
        log = s.stderr
    for i in (flipped, lost):
        key = segment.segment_key(m.table.get(i))
        assert f"segment {i} at disk offset {i * SEG} ({key})" in log, log
    assert "content does not match its digest" in log and "missing from the store" in log


def test_idle_timeout_ends_it_and_nbdkit_with_it(chain):
    ekko, backups = chain
    (b, expected) = backups[0]
    s = Serve(ekko, b["backup_id"], "--idle-timeout", "1")
    h = connect(s.uri)
    assert h.pread(4096, 0) == expected[:4096]
    h.shutdown()
    assert s.proc.wait(60) == 0
    assert "no client for 1 s (--idle-timeout)" in s.stderr
    wait_for(lambda: not s.nbdkit_running(), "nbdkit to end")
    assert not os.path.exists(s.info["socket"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_ekko_stops_nbdkit(chain, sig):
    ekko, backups = chain
    (b, expected) = backups[0]
    s = Serve(ekko, b["backup_id"])
    h = connect(s.uri)                               # a client connected does not keep it alive
    assert h.pread(4096, 0) == expected[:4096]
    assert s.nbdkit_running()
    s.proc.send_signal(sig)
    rc = s.proc.wait(60)
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0), s.stderr
    wait_for(lambda: not s.nbdkit_running(), f"nbdkit (pid {s.pid}) to end after {sig.name} of ekko")
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    if sig != signal.SIGKILL:
        assert "ekko serve: stopped" in s.stderr
        assert not os.path.exists(s.info["socket"])
        assert "parent of this server" not in s.stderr, s.stderr     # a stop is not a lost parent (plugin.py)


def _nbdkit_cache(pid):
    """The cache= parameter ekko gave its nbdkit (its command line: what the plugin receives)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    return [a for a in args if a.startswith("cache=")]


def test_cache_from_the_config_and_cache_overriding_it(chain, workdir):
    """serve.cache of the config reaches the plugin; --cache wins over it; a 1 MiB cache (4
    segments) still serves every byte right; a --cache out of bounds is exit 2 naming it."""
    ekko, backups = chain
    (b, expected) = backups[1]
    cfg = json.loads(json.dumps(ekko.cfg))
    cfg["serve"] = {"cache": "1MiB"}
    small = Ekko(workdir, cfg)
    small.path = os.path.join(workdir, "small-cache.yaml")
    small.write_config()
    with serving(small, b["backup_id"]) as s:
        assert _nbdkit_cache(s.pid) == [f"cache={MiB}"]
        h = connect(s.uri)
        assert read_all(h, len(expected)) == expected
        h.shutdown()
    with serving(small, b["backup_id"], "--cache", "5MiB") as s:
        assert _nbdkit_cache(s.pid) == [f"cache={5 * MiB}"]
    with serving(ekko, b["backup_id"]) as s:           # no serve: section -> the default
        assert _nbdkit_cache(s.pid) == [f"cache={64 * MiB}"]
    p = small.run("serve", b["backup_id"], "--cache", "1000", check=False)
    assert p.returncode == 2 and "--cache: must be from 1.0 MiB to 64.0 GiB" in p.stderr, p.stderr
    cfg["serve"] = {"cache": "lots"}
    small.write_config()
    p = small.run("serve", b["backup_id"], check=False)
    assert p.returncode == 2 and "config: serve.cache: not a size: 'lots'" in p.stderr, p.stderr


def test_tcp_and_a_given_socket(chain, workdir):
    ekko, backups = chain
    (b, expected) = backups[1]
    port = 20000 + int.from_bytes(os.urandom(2), "little") % 20000
    with serving(ekko, b["backup_id"], "--tcp", f"127.0.0.1:{port}") as s:
        assert s.uri == f"nbd://127.0.0.1:{port}/" and s.info["socket"] is None
        h = connect(s.uri)
        assert read_all(h, SIZE) == expected
        h.shutdown()
    path = os.path.join(workdir, "my.sock")
    with serving(ekko, b["backup_id"], "--socket", path) as s:
        assert s.info["socket"] == path
        # the same socket again: in use, refused, and the first keeps serving
        p = ekko.run("serve", b["backup_id"], "--socket", path, check=False)
        assert p.returncode == 2 and f"socket {path} is in use" in p.stderr
        h = connect(s.uri)
        assert h.pread(SEG, 0) == expected[:SEG]
        h.shutdown()


def test_serve_errors(chain, workdir, request):
    ekko, backups = chain
    (b, _) = backups[0]
    p = ekko.run("serve", "nosuchbackup", check=False)
    assert p.returncode == 2 and "no backup 'nosuchbackup' in the store" in p.stderr
    p = ekko.run("serve", b["backup_id"], "--disk", "vdz", check=False)
    assert p.returncode == 2 and "no backup" in p.stderr and "of disk vdz" in p.stderr
    p = ekko.run("serve", b["backup_id"], "--tcp", "127.0.0.1:0", check=False)
    assert p.returncode == 2 and "port in 1..65535" in p.stderr
    # nbdkit not installed (not on PATH)
    p = ekko.run("serve", b["backup_id"], env={"PATH": "/nonexistent"}, check=False)
    assert p.returncode == 1 and "nbdkit is not installed" in p.stderr and "apt install nbdkit" in p.stderr
    # a store that does not answer: exit 1, and the password is not in the output
    cfg = json.loads(json.dumps(ekko.cfg))
    secret = "s3cr3t-" + os.urandom(6).hex()
    cfg["store"] = {"type": "swift", "auth_url": "http://127.0.0.1:9/auth/v1.0", "auth_version": "1",
                    "user": "test:tester", "key": secret, "retries": 0, "timeout": 2}
    down = Ekko(workdir, cfg)
    down.path = os.path.join(workdir, "down.yaml")
    down.write_config()
    p = down.run("serve", b["backup_id"], check=False)
    assert p.returncode == 1, p.stderr
    assert secret not in p.stderr + p.stdout


def test_api_with_debian_python_packages_only(chain):
    """The plugin with nothing but the package on its path: Debian's python3-* modules (what a
    host without ekko's venv has) are enough, _segcore included when built."""
    ekko, backups = chain
    (b, expected) = backups[1]
    cfg = ekko_config.load(ekko.path)
    with open(os.devnull, "w") as quiet:
        with server.serving(cfg, None, b["key"], pythonpath=[ROOT], verbose=1, log=quiet) as srv:
            assert srv.uri.startswith("nbd+unix:///?socket=") and process_running(srv.pid, srv.start_ticks)
            h = connect(srv.uri)
            assert read_all(h, SIZE) == expected
            h.shutdown()
            pid, ticks = srv.pid, srv.start_ticks
        assert not process_running(pid, ticks)
        # started again, stopped by PID alone (as an owner that restarted would)
        srv = server.start(cfg, None, b["key"], log=quiet)
        assert server.stop_pid(srv.pid, srv.start_ticks) is True
        srv.wait(30)
        assert not process_running(srv.pid, srv.start_ticks)
        assert server.stop_pid(srv.pid, srv.start_ticks) is False


# -- ekko mount / umount ----------------------------------------------------------------------------
def test_mount_read_umount(chain, workdir):
    from ekko_libvirt.serve.mount import is_mounted
    ekko, backups = chain
    (b, expected) = backups[1]
    mnt = os.path.join(workdir, "mnt")
    os.mkdir(mnt)
    info = ekko.run("mount", b["backup_id"], mnt, json_out=True).data
    assert info["file"] == os.path.join(mnt, "disk.raw") and is_mounted(mnt)
    with open(info["file"], "rb") as f:
        assert f.read() == expected
    with open(info["file"], "rb") as f:            # unaligned read inside the short last segment
        f.seek(SIZE - 1000)
        assert f.read(600) == expected[SIZE - 1000:SIZE - 400]
    with pytest.raises(OSError):
        open(info["file"], "r+b")
    assert process_running(info["nbdkit_pid"], info["nbdkit_ticks"])
    # mounting on it again, or on a directory that is not empty, is refused
    p = ekko.run("mount", b["backup_id"], mnt, check=False)
    assert p.returncode == 2 and "is a mount point already" in p.stderr
    p = ekko.run("umount", workdir, check=False)
    assert p.returncode == 2 and "is not mounted by ekko" in p.stderr
    ekko.run("umount", mnt)
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    assert not process_running(info["pid"], info["start_ticks"])
    assert not process_running(info["nbdkit_pid"], info["nbdkit_ticks"])
    p = ekko.run("umount", mnt, check=False)
    assert p.returncode == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_mounting_ekko_unmounts(chain, workdir, sig):
    from ekko_libvirt.serve.mount import is_mounted
    ekko, backups = chain
    (b, expected) = backups[0]
    mnt = os.path.join(workdir, f"mnt-{sig.name}")
    os.mkdir(mnt)
    info = ekko.run("mount", b["backup_id"], mnt, json_out=True).data
    with open(info["file"], "rb") as f:
        assert f.read(SEG) == expected[:SEG]
    os.kill(info["pid"], sig)
    wait_for(lambda: not is_mounted(mnt), f"{mnt} to be unmounted after {sig.name} of ekko")
    wait_for(lambda: not process_running(info["nbdkit_pid"], info["nbdkit_ticks"]), "nbdkit to end")
    wait_for(lambda: not process_running(info["pid"], info["start_ticks"]), "the mounting ekko to end")
    assert os.listdir(mnt) == []
    if sig == signal.SIGKILL:      # its record is left: umount tidies it up
        ekko.run("umount", mnt)
    p = ekko.run("umount", mnt, check=False)
    assert p.returncode == 2 and "is not mounted by ekko" in p.stderr

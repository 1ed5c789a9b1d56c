"""Restore onto a block device (an LVM volume, a mapped RBD image): in place, on real loop
devices; what the device held before never shows through, and a device in use is refused."""

import contextlib
import os
import random
import subprocess
import threading
import time

import pytest

from conftest import manifest_of
from harness import in_ci
from ekko_libvirt.restore import blockdev
from ekko_libvirt.store import catalog
from ekko_libvirt.format import segment
from ekko_libvirt.errors import IntegrityError, UsageError
from ekko_libvirt.restore.disk import DEVICE_MIN_UNMAP, data_runs, device_plan, restore
from ekko_libvirt.store.memory import MemoryStore

KiB, MiB = 1024, 1024 * 1024
SEG = 256 * KiB
OLD = b"\xa5"           # what the device held before the restore


@contextlib.contextmanager
def loop_device(workdir, size, fill=OLD):
    """A loop device over a file of `size` bytes of `fill`; detached (that device only) at the end."""
    backing = os.path.join(workdir, f"loop-{os.urandom(3).hex()}.img")
    with open(backing, "wb") as f:
        f.write(fill * size)
    p = subprocess.run(["losetup", "--find", "--show", backing], capture_output=True, text=True)
    if p.returncode != 0:
        os.unlink(backing)
        msg = f"cannot attach a loop device: {p.stderr.strip()}"
        # A kernel without loop devices (no /dev/loop-control) is like one without /dev/kvm, not
        # a package `make test` can install: skipped, with the reason. Where the kernel has them,
        # a failure to attach one fails in CI.
        if in_ci() and os.path.exists("/dev/loop-control"):
            pytest.fail(msg)
        pytest.skip(msg)
    dev = p.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
        os.unlink(backing)


def differs(got, want):
    """None when equal, else where they first differ (pytest's diff of megabytes takes minutes)."""
    if got == want:
        return None
    i = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return f"first difference at byte {i} (segment {i // SEG}); lengths {len(got)}, {len(want)}"


def _device_bytes(dev, n):
    with open(dev, "rb") as f:
        return f.read(n)


def _backup(store, contents, size=None):
    return manifest_of(store, contents, SEG, size)


def _disk(rnd, pattern):
    """Segments for a pattern string: D data, Z zeros."""
    return [rnd.randbytes(SEG) if c == "D" else None for c in pattern]


@pytest.mark.parametrize("zeroing", ["unmap", "write-zeroes"])
def test_restore_onto_a_device_replaces_everything_and_keeps_its_tail(workdir, zeroing, monkeypatch):
    if zeroing == "write-zeroes":       # a device that cannot promise zeros after an unmap
        monkeypatch.setattr(blockdev.Device, "_punch", lambda self, offset, n: False)
    rnd = random.Random(3)
    contents = _disk(rnd, "ZDDZZZDZDZ")     # zero runs at the start, middle and end
    store = MemoryStore()
    m = _backup(store, contents)
    with loop_device(workdir, m.virtual_size + 1 * MiB) as (dev, _):
        res = restore(store, m, dev, overwrite=True, workers=3)
        got = _device_bytes(dev, m.virtual_size + 1 * MiB)
    assert differs(got[:m.virtual_size], b"".join(c or bytes(SEG) for c in contents)) is None
    assert differs(got[m.virtual_size:], OLD * MiB) is None        # beyond the disk: left as it was
    assert res.segments == 4 and not res.holes


def test_zero_runs_keep_a_thin_device_thin(workdir):
    """Zeroing unmaps where the device can promise zeros (a loop device's backing file, a thin
    LV): the old content's blocks are given back, not overwritten with zeros."""
    rnd = random.Random(9)
    contents = _disk(rnd, "D" + "Z" * 30 + "D")
    store = MemoryStore()
    m = _backup(store, contents)
    with loop_device(workdir, m.virtual_size) as (dev, backing):
        before = os.stat(backing).st_blocks * 512
        restore(store, m, dev, overwrite=True)
        got = _device_bytes(dev, m.virtual_size)
        after = os.stat(backing).st_blocks * 512
    assert differs(got, b"".join(c or bytes(SEG) for c in contents)) is None
    assert before >= m.virtual_size and after <= 4 * SEG, (before, after)


def test_a_disk_size_that_is_not_a_whole_block(workdir):
    """The last segment is short (not a multiple of 4 KiB): written without O_DIRECT."""
    rnd = random.Random(4)
    contents = _disk(rnd, "DZD")
    size = 2 * SEG + 3 * 512
    contents[-1] = contents[-1][:3 * 512]
    store = MemoryStore()
    m = _backup(store, contents, size)
    with loop_device(workdir, 1 * MiB) as (dev, _):
        restore(store, m, dev, "raw", overwrite=True)
        got = _device_bytes(dev, 1 * MiB)
    assert differs(got[:size], contents[0] + bytes(SEG) + contents[2]) is None
    assert differs(got[size:], OLD * (1 * MiB - size)) is None


def test_refusals_write_nothing(workdir):
    rnd = random.Random(5)
    store = MemoryStore()
    m = _backup(store, _disk(rnd, "DDDD"))
    with loop_device(workdir, m.virtual_size - 4096) as (small, _), loop_device(workdir, m.virtual_size) as (dev, _):
        for target, kw, msg in (
                (dev, {}, "is a block device: --force replaces everything on it"),
                (dev, {"fmt": "qcow2", "overwrite": True}, "gets the disk as raw data, not qcow2"),
                (small, {"overwrite": True}, "the device is too small")):
            with pytest.raises(UsageError, match=msg):
                restore(store, m, target, **kw)
        # held open exclusively (as a mounted file system or device-mapper holds its device)
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
        try:
            with pytest.raises(UsageError, match="is in use .*nothing was written"):
                restore(store, m, dev, overwrite=True)
        finally:
            os.close(fd)
        assert differs(_device_bytes(dev, m.virtual_size), OLD * m.virtual_size) is None
        assert differs(_device_bytes(small, m.virtual_size - 4096), OLD * (m.virtual_size - 4096)) is None


def test_a_device_qemu_has_open_is_refused(workdir):
    """QEMU locks the disks it has open: a restore over a running domain's volume is refused."""
    contents = _disk(random.Random(6), "DD")
    store = MemoryStore()
    m = _backup(store, contents)
    with loop_device(workdir, m.virtual_size) as (dev, _):
        sock = os.path.join(workdir, "qsd.nbd")
        qsd = subprocess.Popen(["qemu-storage-daemon", "--blockdev", f"driver=host_device,node-name=d0,filename={dev}",
                                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                "--export", "type=nbd,id=e0,node-name=d0,writable=on"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                assert qsd.poll() is None and time.monotonic() < deadline, qsd.stderr.read()
                time.sleep(0.02)
            with pytest.raises(UsageError, match="is in use: another process holds a lock on it"):
                restore(store, m, dev, overwrite=True)
        finally:
            qsd.terminate()
            qsd.wait(timeout=30)
        assert differs(_device_bytes(dev, m.virtual_size), OLD * m.virtual_size) is None
        restore(store, m, dev, overwrite=True)          # free again
        assert differs(_device_bytes(dev, m.virtual_size), b"".join(contents)) is None


def test_qemu_cannot_open_a_device_while_it_is_restored(workdir, monkeypatch):
    """The restore holds a write lock over the whole device: a domain started on it meanwhile
    (here a qemu-storage-daemon) fails to open it instead of running on a half-written disk."""
    contents = _disk(random.Random(10), "DDD")
    store = MemoryStore()
    m = _backup(store, contents)
    fifo = os.path.join(workdir, "pause.fifo")
    os.mkfifo(fifo)
    monkeypatch.setenv("EKKO_TEST_PAUSE", f"restore-write:{fifo}")
    with loop_device(workdir, m.virtual_size) as (dev, _):
        result = {}

        def run():
            try:
                result["r"] = restore(store, m, dev, overwrite=True, workers=1)
            except BaseException as e:  # noqa: BLE001 - shown by the assertion below
                result["error"] = e
        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            with open(fifo, "wb"):          # the restore waits at its first write
                # a guest's disk: the node with a writer attached (a writable export here)
                qsd = subprocess.Popen(["qemu-storage-daemon",
                                        "--blockdev", f"driver=host_device,node-name=d0,filename={dev}",
                                        "--nbd-server", f"addr.type=unix,addr.path={workdir}/q.nbd",
                                        "--export", "type=nbd,id=e0,node-name=d0,writable=on"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                try:
                    rc = qsd.wait(timeout=20)
                except subprocess.TimeoutExpired:   # it opened the device: the lock did not stop it
                    qsd.kill()
                    rc = qsd.wait()
                err = qsd.stderr.read()
        finally:
            deadline = time.monotonic() + 60
            while t.is_alive() and time.monotonic() < deadline:    # let the other writes pass
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:         # ENXIO: nobody waits at the moment
                    time.sleep(0.01)
            t.join(timeout=1)
        assert rc == 1 and "lock" in err, (rc, err)
        assert "r" in result and result["r"].segments == 3, result
        assert differs(_device_bytes(dev, m.virtual_size), b"".join(contents)) is None


def test_damage_stops_the_restore_and_says_the_device_is_partial(workdir):
    rnd = random.Random(7)
    contents = _disk(rnd, "DDZD")
    store = MemoryStore()
    m = _backup(store, contents)
    key = segment.segment_key(segment.digest(contents[1]))
    blob = bytearray(store.get(key))
    blob[-1] ^= 1
    store.put(key, bytes(blob))
    with loop_device(workdir, m.virtual_size) as (dev, _):
        with pytest.raises(IntegrityError, match="the device holds a partial restore"):
            restore(store, m, dev, overwrite=True, workers=1)
        res = restore(store, m, dev, overwrite=True, allow_damaged=True)
        got = _device_bytes(dev, m.virtual_size)
    assert [h.index for h in res.holes] == [1]
    assert differs(got, contents[0] + bytes(SEG) + bytes(SEG) + contents[3]) is None    # the hole: zeros, not old data


def test_cli_backup_of_a_live_disk_restored_onto_a_device(qdisk, ekko_for, workdir):
    rnd = random.Random(8)
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, rnd.randbytes(1 * MiB))
    disk.write(5 * MiB, rnd.randbytes(300 * KiB))
    expected = disk.snapshot()
    b = ekko.backup()
    with loop_device(workdir, 8 * MiB) as (dev, _):
        p = ekko.run("restore", b["backup_id"], "--to", dev, check=False)
        assert p.returncode == 2 and "--force replaces everything" in p.stderr, p.stderr
        ekko.run("restore", b["backup_id"], "--to", dev, "--force")
        assert differs(_device_bytes(dev, 8 * MiB), expected) is None
    m = catalog.load(ekko.store(), catalog.find(ekko.store(), b["backup_id"]))
    assert m.table.data_count() < m.table.count       # it had zero runs: zeroed on the device, not skipped


def test_zero_blocks_inside_data_segments_keep_a_thin_device_thin(workdir):
    """A data segment holding one 4 KiB block of data: its long zero runs are unmapped (a loop
    device's backing file gets its blocks back), the short ones written with the data."""
    rnd = random.Random(11)
    contents = []
    for _ in range(16):
        s = bytearray(SEG)
        o = rnd.randrange(SEG // 4096) * 4096
        s[o:o + 4096] = rnd.randbytes(4096)
        contents.append(bytes(s))
    store = MemoryStore()
    m = _backup(store, contents)
    written = sum(e - s for c in contents
                  for kind, s, e in device_plan(data_runs(c), SEG, DEVICE_MIN_UNMAP) if kind == "write")
    with loop_device(workdir, m.virtual_size) as (dev, backing):
        restore(store, m, dev, overwrite=True, workers=3)
        got = _device_bytes(dev, m.virtual_size)
        after = os.stat(backing).st_blocks * 512
    assert differs(got, b"".join(contents)) is None
    # before: every data segment written whole (4 MiB here)
    assert after <= written + 64 * KiB and after < m.virtual_size // 4, (after, written)


@pytest.mark.parametrize("zeroing", ["unmap", "write-zeroes", "no-unmap"])
def test_random_sparse_segments_onto_a_device(workdir, zeroing, monkeypatch):
    """Zero blocks inside data segments, at every granularity, onto a device full of old bytes:
    none of the old bytes shows through, whichever way the device zeroes (unmap; BLKZEROOUT
    after a refused unmap; a device that cannot unmap at all: segments written whole)."""
    from tests.unit.test_restore_random import disk_bytes, random_disk
    if zeroing == "write-zeroes":
        monkeypatch.setattr(blockdev.Device, "_punch", lambda self, offset, n: False)
    elif zeroing == "no-unmap":
        def refuse(self, offset, n):
            self.punch = False
            return False
        monkeypatch.setattr(blockdev.Device, "_punch", refuse)
    base = int(os.environ.get("EKKO_RESTORE_SEED") or random.randrange(1 << 32))
    for r in range(int(os.environ.get("EKKO_RESTORE_ROUNDS") or 3)):
        seed = base + r
        where = f"EKKO_RESTORE_SEED={seed} EKKO_RESTORE_ROUNDS=1 ({zeroing})"
        print(where)
        rnd = random.Random(seed)
        segs, seg, size = random_disk(rnd, [64 * KiB, 128 * KiB, 256 * KiB], sector_aligned=True)
        store = MemoryStore()
        m = manifest_of(store, segs, seg, size)
        disk = disk_bytes(segs, seg, size)
        dev_size = -(-size // MiB) * MiB + 1 * MiB
        with loop_device(workdir, dev_size) as (dev, _):
            restore(store, m, dev, overwrite=True, workers=rnd.choice([1, 3]))
            got = _device_bytes(dev, dev_size)
        assert differs(got[:size], disk) is None, f"{where}: {differs(got[:size], disk)}"
        assert got[size:] == OLD * (dev_size - size), where

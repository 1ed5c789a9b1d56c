"""The reader against QEMU's NBD server (qemu-nbd), on its own: every byte a backup hashes is the
disk's byte at that offset, through reused buffers.

The read connections run on simple replies with libnbd's buffer zeroing off (nbd/reader.py,
_connect): a read that left any byte unwritten would leave the previous segment's bytes in the
reused buffer, so the disk here is random data, holes and repeated blocks at random places (seed
printed; EKKO_READER_SEED=N replays), read through 2 buffers with requests that do not divide the
segment, and every segment compared with the file.
"""

import os
import random
import subprocess

import pytest

from ekko_libvirt.engine.base import Export
from ekko_libvirt.nbd.reader import ExportReader

KiB, MiB = 1024, 1024 * 1024
SEED = int(os.environ.get("EKKO_READER_SEED") or random.SystemRandom().randrange(1 << 32))


@pytest.fixture
def exported(tmp_path):
    """A raw disk of random content, exported read-only by qemu-nbd on a unix socket."""
    print(f"EKKO_READER_SEED={SEED}")
    rnd = random.Random(SEED)
    size = 24 * MiB + rnd.randrange(1, 128) * 512      # qemu-nbd exports whole sectors
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(size - pos, rnd.choice([4 * KiB, 60 * KiB, 1 * MiB, 3 * MiB + 512]))
            kind = rnd.choice(["data", "hole", "repeat"])
            if kind == "data":
                f.seek(pos)
                f.write(rnd.randbytes(n))
            elif kind == "repeat":
                f.seek(pos)
                f.write(bytes([rnd.randrange(1, 256)]) * n)
            pos += n
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(["qemu-nbd", "--read-only", "--format=raw", "--persistent", "--shared=8",
                             "--export-name=disk", f"--socket={sock}", str(path)])
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            if proc.poll() is not None:
                pytest.fail(f"qemu-nbd exited with {proc.returncode}")
            subprocess.run(["sleep", "0.05"])
        yield Export(sock, "disk", None), path.read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("segment,request_size,buffers", [(1 * MiB, 192 * KiB, 2), (64 * KiB, 48 * KiB, 1),
                                                          (4 * MiB, 512 * KiB, 3)])
def test_every_segment_read_is_the_disk(exported, segment, request_size, buffers):
    export, disk = exported
    reader = ExportReader(export, request_size, 4)
    try:
        assert len(disk) == reader.size
        stream = reader.stream(reader.plans(segment), buffers=buffers)
        seen = 0
        try:
            for plan, buf in stream:
                want = disk[plan.offset:plan.offset + plan.length]
                if buf is None:             # planned as zeros (a hole): the disk must be zeros there
                    assert want == bytes(len(want)), plan
                else:
                    try:
                        assert bytes(buf.data[:plan.length]) == want, (plan, SEED)
                    finally:
                        buf.release()       # else the stream waits for it, and close() with it
                seen += plan.length
        finally:
            stream.close()
        assert seen == len(disk)
    finally:
        reader.close()


def test_read_connections_use_simple_replies_and_no_zeroing(exported):
    """What makes skipping libnbd's zeroing safe: reads on simple replies (every byte sent or the
    connection fails); the control connection keeps structured replies for block status."""
    export, disk = exported
    reader = ExportReader(export, 256 * KiB, 4)
    w = reader.worker()
    try:
        assert reader.h.get_structured_replies_negotiated()
        assert not w.h.get_structured_replies_negotiated()
        assert not w.h.get_pread_initialize()
        plan = next(p for p in reader.plans(1 * MiB) if not p.is_zero)
        assert bytes(w.read(plan)) == disk[plan.offset:plan.offset + plan.length]
    finally:
        w.close()
        reader.close()

"""Crash consistency of the local store itself: power cuts on a file system that forgets what
was not made durable (tests/harness/crashfs.py: the weakest rules POSIX allows).

What must hold after any cut (docs/format.md, invariants 2, 4 and 7):
  - a backup that ekko reported committed (exit 0) is still there;
  - every manifest present restores byte-exact what the disk held at that backup's instant,
    so no manifest names a segment the cut lost; `ekko verify --deep` is OK;
  - a manifest that prune deleted may come back only if it still restores.

Seeds: EKKO_CRASH_SEED fixes the run (printed on failure); EKKO_CRASH_CUTS sets how many power
cuts the random test makes (default 4, for `make test`; the torture target makes many more) and
makes test_local_store_at_random_cut_points try every cut point.
"""

import os
import random
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, Ekko, make_config
from harness import in_ci
from harness.crashfs import CrashFS, syncfs_shim

KiB, MiB = 1024, 1024 * 1024

# A kernel without FUSE is like one without /dev/kvm: skipped, except in CI, where it fails.
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") and not in_ci(), reason="this kernel has no FUSE (/dev/fuse)")


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    return syncfs_shim(str(tmp_path_factory.mktemp("crashfs")))


class Power:
    """The store's file system, across power cuts: `fs` is the mounted crashfs, `cut()` turns
    the power off and on again (the durable state becomes the new backing directory)."""

    def __init__(self, workdir: str, shim: str):
        self.workdir = workdir
        self.shim = shim
        self.mnt = os.path.join(workdir, "store")
        self.generation = 0
        self.fs = CrashFS(self._backing(), self.mnt, os.path.join(workdir, "crashfs.log")).mount()

    def _backing(self) -> str:
        return os.path.join(self.workdir, f"disk{self.generation}")

    def cut(self, seed: int, mode: str = "strict", keep_dirs=()) -> dict:
        old = self._backing()
        self.generation += 1
        report = self.fs.crash(self._backing(), seed, mode, keep_dirs)
        assert not report["errors"], report["errors"]
        self.fs.unmount()
        shutil.rmtree(old, ignore_errors=True)
        self.fs = CrashFS(self._backing(), self.mnt, self.fs.log_path).mount()
        return report

    def run(self, *argv, check=True):
        """A process on this file system, its syncfs seen by crashfs."""
        env = dict(os.environ, LD_PRELOAD=self.shim, PYTHONPATH=ROOT)
        p = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120)
        if check and p.returncode:
            raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr}")
        return p

    def close(self) -> None:
        self.fs.unmount()


@pytest.fixture
def power(workdir, shim):
    p = Power(workdir, shim)
    yield p
    p.close()


def tree(root: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# -- the file system keeps exactly what its rules promise ----------------------------------------
def test_crashfs_keeps_what_was_synced_and_nothing_else(power):
    m = power.mnt
    os.makedirs(f"{m}/d")
    _sync(m)                                    # d itself is durable
    _write(f"{m}/d/synced", b"a" * 5000, fsync=True)
    _write(f"{m}/d/data-unsynced", b"b" * 5000, fsync=False)
    _sync(f"{m}/d")                             # both names durable; only one file's data
    _write(f"{m}/d/old", b"old", fsync=True)
    _sync(f"{m}/d")
    _write(f"{m}/d/name-unsynced", b"c", fsync=True)
    _write(f"{m}/d/new.tmp", b"new", fsync=True)
    os.rename(f"{m}/d/new.tmp", f"{m}/d/old")  # the rename is not synced
    os.makedirs(f"{m}/e/f")                     # names never synced: the subtree goes
    _write(f"{m}/e/f/x", b"x", fsync=True)
    _sync(f"{m}/e/f")
    power.cut(seed=1)
    assert tree(m) == {"d/synced": b"a" * 5000, "d/data-unsynced": b"", "d/old": b"old"}


def test_crashfs_syncfs_through_the_shim_makes_everything_durable(power):
    m = power.mnt
    os.makedirs(f"{m}/a/b")
    _write(f"{m}/a/b/f", b"f" * 70000, fsync=False)
    power.run("-c", f"import ctypes, os; fd = os.open({m!r}, os.O_RDONLY); assert ctypes.CDLL(None).syncfs(fd) == 0")
    _write(f"{m}/a/later", b"later", fsync=True)
    power.cut(seed=2)
    assert tree(m) == {"a/b/f": b"f" * 70000}


def test_crashfs_cut_kills_the_writer_and_nothing_after_it_happens(power):
    m = power.mnt
    power.fs.arm(4)         # mkdir, create, write done; the 4th, the fsync, is cut
    p = power.run("-c", f"import os; os.mkdir('{m}/d'); f = open('{m}/d/x', 'wb'); f.write(b'x'); f.flush(); "
                  f"os.fsync(f.fileno()); print('survived')", check=False)
    assert p.returncode == -9 and "survived" not in p.stdout
    st = power.fs.status()
    assert st["frozen"] and st["cut"].startswith("#4 fsync")
    with pytest.raises(OSError):
        os.listdir(m)       # the power is off
    power.cut(seed=3)
    assert tree(m) == {} and os.listdir(m) == []


def test_crashfs_torn_writes_mix_old_and_new_pages(power):
    m = power.mnt
    old, new = b"o" * (8 * 4096), b"n" * (12 * 4096)
    _write(f"{m}/f", old, fsync=True)
    _sync(m)
    seen_pages, seen_sizes = set(), set()
    for seed in range(12):
        with open(f"{m}/f", "r+b") as f:
            f.write(new)
        power.cut(seed=seed, mode="torn")
        with open(f"{m}/f", "rb") as f:
            got = f.read()
        assert len(got) in (len(old), len(new))
        seen_sizes.add(len(got))
        for off in range(0, len(got), 4096):
            page = got[off:off + 4096]
            assert page in (old[off:off + 4096], new[off:off + 4096], bytes(len(page))), off
            seen_pages.add(page[:1])
        with open(f"{m}/f", "wb") as f:     # back to `old`, durably, for the next round
            f.write(old)
            os.fsync(f.fileno())
    assert seen_sizes == {len(old), len(new)} and {b"o", b"n"} <= seen_pages


def _write(path: str, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _sync(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the local store's own writes -----------------------------------------------------------------
STORE_SCRIPT = """
import sys
from ekko_libvirt.store.local import LocalStore
s = LocalStore(sys.argv[1])
b = s.batch()
for i in range(3):
    b.put(f"segments/{i:03x}/{i:032x}", bytes([i + 1]) * (70000 + i))
b.flush()
print("flushed", flush=True)
s.put("manifests/t1/20260101T000000000Z-aaaaaa", b"manifest")
print("committed", flush=True)
"""

STORE_OBJECTS = {f"segments/{i:03x}/{i:032x}": bytes([i + 1]) * (70000 + i) for i in range(3)}
STORE_OBJECTS["manifests/t1/20260101T000000000Z-aaaaaa"] = b"manifest"


def test_a_put_into_a_fresh_store_survives_a_power_cut_right_after_it(power):
    """put() is durable when it returns (store/base.py), also when it had to create the
    directories of its key: each new directory's name is synced in its parent."""
    power.run("-c", "import sys; from ekko_libvirt.store.local import LocalStore; "
              "LocalStore(sys.argv[1]).put('manifests/t1/x', b'm')", power.mnt)
    power.cut(seed=4)
    assert tree(power.mnt) == {"manifests/t1/x": b"m"}


def test_local_store_at_random_cut_points(power):
    """A batch of segments, then a manifest, cut before a random state-changing operation (or
    after the last one), again and again: what survives is visible whole or not at all; once
    flush() returned every segment is there, once put() returned the manifest is. Every cut
    point with EKKO_CRASH_CUTS set."""
    power.run("-c", STORE_SCRIPT, power.mnt)
    total = power.fs.status()["ops"]
    power.cut(seed=0)
    _empty(power.mnt)
    seed = int(os.environ.get("EKKO_CRASH_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    points = list(range(1, total + 2))
    if not os.environ.get("EKKO_CRASH_CUTS"):
        points = sorted(rng.sample(points[:-1], 5)) + [total + 1]
    for at in points:
        power.fs.arm(at)
        p = power.run("-c", STORE_SCRIPT, power.mnt, check=False)
        st = power.fs.status()
        if at > total:
            assert not st["frozen"] and p.returncode == 0, (st, p.stderr)      # the cut comes after
        else:
            assert st["frozen"] and p.returncode == -9, (at, st, p.stderr)
        # after the end: strict, the mode that loses every unsynced name, so a put that returned
        # without syncing one of its names is caught every time
        mode = "strict" if at > total else rng.choice(("strict", "torn"))
        power.cut(seed=rng.randrange(1 << 30), mode=mode)
        got = {k: v for k, v in tree(power.mnt).items() if ".tmp-" not in k}
        where = f"cut {st['cut'] or 'after the end'} of {total} ops (EKKO_CRASH_SEED={seed}, mode {mode})"
        for key, data in got.items():
            assert STORE_OBJECTS.get(key) == data, f"{key} is visible but not whole after {where}"
        if "flushed" in p.stdout:
            assert {k for k in STORE_OBJECTS if k.startswith("segments/")} <= set(got), where
        if "committed" in p.stdout:
            assert set(got) == set(STORE_OBJECTS), where
        _empty(power.mnt)


def _empty(root: str) -> None:
    """Remove everything under root, durably."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    _sync(root)


# -- real backups, gc and prune, with the power cut at random points ------------------------------
class Scenario:
    """One QEMU disk backed up to a store on crashfs; the acknowledged state, and the checks."""

    def __init__(self, power: Power, disk, workdir: str, seed: int, encrypted=None):
        self.power = power
        self.disk = disk
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        cfg = make_config(workdir, {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}},
                          "64KiB")
        cfg["store"]["path"] = power.mnt
        # the same local store under SealedStore: chosen by the seed unless the test says
        self.encrypted = self.rng.random() < 0.5 if encrypted is None else encrypted
        if self.encrypted:
            cfg["encryption"] = {"enabled": True, "key_file": os.path.join(workdir, "keys", "{project}.key")}
        self.ekko = Ekko(workdir, cfg)
        if self.encrypted:
            self.ekko.run("key", "create")
        self.acked = {}         # backup id -> disk content: committed, exit 0, never pruned
        self.pruned = {}        # deleted by a prune that returned: may come back, if whole
        self.log = []

    def where(self) -> str:
        return (f"EKKO_CRASH_SEED={self.seed} ({'encrypted' if self.encrypted else 'plain'} store); steps: "
                + "; ".join(self.log))

    def run(self, *args, check=True):
        p = self.ekko.run(*args, env={"LD_PRELOAD": self.power.shim}, check=False, json_out=True)
        if check and p.returncode:
            raise AssertionError(f"ekko {' '.join(args)} exited {p.returncode}: {p.stderr}\n{self.where()}")
        return p

    def guest_writes(self) -> None:
        size, rng = self.disk.size, self.rng
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(0, size, 4 * KiB)
            n = min(size - off, rng.choice((4 * KiB, 64 * KiB, 150 * KiB)))
            kind = rng.random()
            if kind < 0.2:
                self.disk.write_zeroes(off, n)
            elif kind < 0.4:
                line = b"ekko %d\n" % rng.randrange(100)
                self.disk.write(off, (line * (n // len(line) + 1))[:n])
            else:
                self.disk.write(off, rng.randbytes(n))

    def manifests(self) -> list:
        p = self.run("list")
        return [row["backup_id"] for row in p.data["backups"]]

    def check(self, pending=None) -> None:
        """After a cut: what was acknowledged is there, and everything there restores exactly.
        `pending`: the disk content of the operation that was cut (a backup that may have committed)."""
        present = self.manifests()
        lost = sorted(set(self.acked) - set(present))
        assert not lost, f"committed backups lost at the power cut: {lost}\n{self.where()}"
        new = [b for b in present if b not in self.acked and b not in self.pruned]
        assert len(new) <= (1 if pending is not None else 0), f"unknown backups {new}\n{self.where()}"
        expected = dict(self.acked)
        expected.update({b: self.pruned[b] for b in present if b in self.pruned})
        expected.update({b: pending for b in new})
        for backup_id, content in expected.items():
            out = os.path.join(self.workdir, "restored.raw")
            p = self.run("restore", backup_id, "--to", out, check=False)
            assert p.returncode == 0, f"backup {backup_id} does not restore: {p.stderr}\n{self.where()}"
            with open(out, "rb") as f:
                got = f.read()
            os.unlink(out)
            assert got == content, f"backup {backup_id} restores other bytes\n{self.where()}"
        p = self.run("verify", "--deep", check=False)
        assert p.returncode == 0, f"verify --deep: {p.stdout}{p.stderr}\n{self.where()}"
        self.acked, self.pruned = expected, {}


ACTIONS = {"backup": ("backup", "t1"), "prune": ("prune", "t1", "--keep-last"), "gc": ("gc", "--grace-hours", "0")}


def test_power_cuts_during_backup_gc_and_prune(power, qdisk, workdir):
    """Random guest writes, backups, prunes and gcs; each armed with a power cut at a random
    state-changing operation (seeded). An operation that ends before its cut is acknowledged;
    one that is cut is followed by a reboot of the store and the checks of Scenario.check."""
    seed = int(os.environ.get("EKKO_CRASH_SEED") or random.SystemRandom().randrange(1 << 30))
    want = int(os.environ.get("EKKO_CRASH_CUTS") or 4)
    print(f"EKKO_CRASH_SEED={seed}")
    disk = qdisk(1376 * KiB)            # 21.5 segments of 64 KiB: the last one is half a segment
    s = Scenario(power, disk, workdir, seed)
    rng = s.rng
    ops = {"backup": 40, "prune": 2, "gc": 4}      # learnt from the runs that were not cut
    cuts, cycle, action = {}, 0, None
    while sum(cuts.values()) < want:
        assert cycle < 6 * want + 10, f"only {cuts} power cuts in {cycle} operations: {s.where()}"
        if cycle == 0:
            action = "backup"
        elif action == "prune" and s.pruned:
            action = "gc"               # the segments only pruned backups named are garbage now
        else:
            action = rng.choice(("backup", "backup", "backup", "prune", "gc"))
            if action == "prune" and len(s.acked) < 2:
                action = "backup"       # nothing to prune yet
        args, content = ACTIONS[action], None
        if action == "backup":
            s.guest_writes()
            content = disk.snapshot()
        elif action == "prune":
            keep = rng.choice((1, 2))
            args += (str(keep),)
        # about a third of the operations end before their cut: chains grow, and what they
        # acknowledged is checked at a later cut; the first full always commits
        at = rng.randint(1, ops[action] * 3 // 2 + 1) if cycle else 10 ** 9
        cycle += 1
        start = power.fs.status()["ops"]
        power.fs.arm(at)
        p = s.run(*args, check=False)
        st = power.fs.status()
        if not st["frozen"]:
            power.fs.disarm()
            s.log.append(f"{' '.join(args)} (done, {st['ops'] - start} ops)")
            assert p.returncode == 0, f"{action} exited {p.returncode}: {p.stderr}\n{s.where()}"
            ops[action] = max(ops[action], st["ops"] - start)
            if action == "backup":
                s.acked[p.data["backup"]["backup_id"]] = content
            elif action == "prune":
                for row in p.data["backups"]:
                    if row["deleted"]:
                        s.pruned[row["backup_id"]] = s.acked.pop(row["backup_id"])
            continue
        cuts[action] = cuts.get(action, 0) + 1
        assert p.returncode == -9, f"{action} cut at {st['cut']} but exited {p.returncode}: {p.stderr}"
        if action == "prune":           # any but the newest `keep` may be gone, or not
            for b in sorted(s.acked)[:-keep]:
                s.pruned[b] = s.acked.pop(b)
        mode = rng.choice(("strict", "torn"))
        report = power.cut(rng.randrange(1 << 30), mode)
        s.log.append(f"{' '.join(args)} CUT at {st['cut']} ({mode}: {report['counts']})")
        s.check(pending=content)
    print(f"power cuts {cuts} in {cycle} operations: {s.where()}")


def test_a_pruned_backup_stays_deleted_when_gc_has_freed_its_segments(power, qdisk, workdir):
    """prune deletes a manifest, gc then deletes the segments only it named, and the power goes.
    The weakest file system may keep gc's unsynced deletions and lose prune's (they are in other
    directories): the manifest would come back naming segments that are gone. The deletion of
    a manifest must be durable before prune returns."""
    disk = qdisk(1 * MiB)
    s = Scenario(power, disk, workdir, seed=5, encrypted=False)
    first_data = os.urandom(256 * KiB)
    disk.write(0, first_data)
    first = s.run("backup", "t1").data["backup"]["backup_id"]
    disk.write(0, os.urandom(256 * KiB))            # the first backup's segments are its alone now
    second = s.run("backup", "t1").data["backup"]["backup_id"]
    s.acked[second] = disk.snapshot()
    pruned = s.run(*ACTIONS["prune"], "1").data["backups"]
    assert [r["backup_id"] for r in pruned if r["deleted"]] == [first]
    s.pruned[first] = first_data + bytes(disk.size - len(first_data))     # may come back only whole
    gc = s.run(*ACTIONS["gc"]).data["stores"][0]
    assert gc["deleted"] == 4, gc                  # the first backup's four segments
    power.cut(seed=6, keep_dirs=["segments"])      # gc's deletions survived, nothing else unsynced
    s.log.append("backup, backup, prune --keep-last 1, gc, cut keeping segments/")
    s.check()
    assert s.manifests() == [second]


def test_a_segment_reused_from_a_concurrent_backup_is_durable_before_the_manifest(power, qdisk, workdir):
    """Two disks with equal content (two VMs of one image) backed up at the same time: one
    backup renames a segment into place, the other finds it with exists() and commits a
    manifest naming it before the first backup's batch has synced the rename. A power cut then
    must not leave that manifest naming a segment that is not there."""
    from ekko_libvirt.format import segment
    disk = qdisk(256 * KiB)
    s = Scenario(power, disk, workdir, seed=7, encrypted=False)     # it writes a plain segment
    data = os.urandom(64 * KiB)
    disk.write(64 * KiB, data)
    # what the other backup's batch has done so far: the segment written, its file synced
    # (syncfs), renamed into place; its second syncfs has not run yet
    enc = segment.encode(data)
    d = os.path.join(power.mnt, "segments", enc.key.split("/")[1])
    os.makedirs(d)
    _sync(power.mnt)
    _sync(os.path.join(power.mnt, "segments"))
    tmp = os.path.join(d, enc.key.rsplit("/", 1)[1] + ".tmp-000000000000")
    _write(tmp, enc.blob, fsync=True)
    os.rename(tmp, os.path.join(power.mnt, enc.key))
    b = s.run("backup", "t1").data["backup"]
    assert b["stored_bytes"] == 0           # the segment was reused, nothing was stored
    s.acked[b["backup_id"]] = disk.snapshot()
    power.cut(seed=8)
    s.log.append("segment renamed by another backup, unsynced; backup reusing it; cut")
    s.check()

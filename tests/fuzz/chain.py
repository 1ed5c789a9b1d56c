"""One fuzzed chain: a real QEMU disk with a byte model, the real `ekko` CLI, random events, and
the checks that make ekko's answers differential against the model.

The reference is deliberately dumb: `disk.model` is every byte the guest wrote, a backup's
expected image is `disk.snapshot()` taken just before the backup starts (nothing writes between
that instant and its transaction; writes made while it is paused come after), and every
committed backup is restored through the CLI and compared byte for byte. What ekko may answer
besides exact bytes is narrow and stated where it is checked:

- `ekko backup` exits 0 and commits exactly one new backup; a run that SIGKILLs itself
  (EKKO_TEST_CRASH) exits -9 and commits nothing, except at after-commit (one backup, exact);
- a full is required (and its reason must say why) after kill -9 of QEMU, a disabled or removed
  generation, a resize, or a damaged newest manifest; otherwise the next backup is an
  incremental whose parent is the newest backup;
- after a backup exactly one generation of ekko's is on the disk, and every foreign bitmap is
  still there;
- a restore exits 0 with exact bytes, or 3 when (and only when) the backup's manifest is damaged
  or it names a segment object that is still flipped; a backup committed after `verify --deep`
  marked a segment must not name it;
- `verify --deep` exits 3 when (and only when) something is damaged.

Failures are collected as findings (round, what, details) and the chain goes on (a failed
backup must lose nothing: the next one is checked against the model too), up to MAX_FINDINGS.
"""

import errno
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from conftest import ROOT, read_raw, release_pauses
from ekko_libvirt.store import catalog
from ekko_libvirt import config
from ekko_libvirt.format import segment
from ekko_libvirt.store.factory import open_raw_store

from . import diff, plan

TARGET = "t1"
PREFIX = "ekko-"
MAX_FINDINGS = 4
PAUSE_DEADLINE = 120        # seconds a backup may take to reach its pause point (or exit)
REAPER_DEADLINE = 60        # seconds a killed run's reaper may take to clean up QEMU

# Words one of which the reason of the full that an event forces must contain.
FULL_REASONS = {
    "kill_qemu": ("inconsistent", "missing", "uncleanly"),
    "disable_bitmap": ("disabled", "not recording"),
    "remove_bitmap": ("missing", "removed"),
    "resize": ("size changed",),
    "corrupt_manifest": ("manifest", "damaged"),
}


@dataclass
class Backup:
    n: int                      # commit order in this chain
    backup_id: str
    key: str                    # manifest key in the store
    kind: str
    reason: str
    generation: Optional[str]
    image: bytes                # the model at the backup's instant
    segment_size: int
    bad_manifest: bool = False


@dataclass
class Run:
    rc: int
    out: str
    err: str
    data: Optional[dict] = None


@dataclass
class Result:
    setup: plan.Setup
    events: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    crashed: int = 0
    restores: int = 0
    findings: List[str] = field(default_factory=list)
    trace: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        ev = ", ".join(f"{k}={v}" for k, v in sorted(self.events.items())) or "none"
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items())) or "none"
        return (f"chain-fuzz seed={self.setup.seed}: {self.setup.describe()} | committed backups: {kinds}; "
                f"killed runs {self.crashed}; restores {self.restores}; events {ev}; "
                f"findings {len(self.findings)}; {self.seconds:.0f} s")

    def report(self) -> str:
        return "\n".join([self.summary(), "", "FINDINGS:"] + [f"  {f}" for f in self.findings]
                         + ["", "EVENT SEQUENCE:"] + [f"  {t}" for t in self.trace]
                         + ["", f"replay: EKKO_FUZZ_SEED={self.setup.seed} make torture  (or pytest "
                                f"tests/integration/test_chain_fuzz.py with that variable)"])


class StopChain(Exception):
    pass


class Chain:
    def __init__(self, setup: plan.Setup, rnd: random.Random, events, ekko, disk, workdir: str):
        self.setup, self.rnd, self.ekko, self.disk, self.workdir = setup, rnd, ekko, disk, workdir
        self.enabled = set(events)
        self.res = Result(setup)
        self.round = 0
        self.backups: List[Backup] = []            # every committed backup, in commit order
        self.pending_full: List[str] = []          # events since the newest commit that force a full
        self.foreign: Dict[str, bool] = {}         # foreign bitmap that must exist -> persistent
        self.foreign_names: Set[str] = set()       # every foreign bitmap ever added (never ekko's)
        self.flipped: Dict[str, bytes] = {}        # segment key -> the damaged object we wrote
        self.marked: Set[str] = set()              # flipped keys that `verify --deep` reported
        self.manifest_keys: Dict[str, Set[str]] = {}
        self.store = ekko.store()
        self.raw = open_raw_store(config.build(ekko.cfg))
        self.fifo_n = 0
        self.wrong: Set[int] = set()               # backups whose restore was found wrong

    # -- bookkeeping ---------------------------------------------------------------------------
    def log(self, text: str) -> None:
        self.res.trace.append(f"r{self.round}: {text}")

    def find(self, text: str) -> None:
        self.res.findings.append(f"r{self.round}: {text}")
        self.log(f"FINDING: {text.splitlines()[0]}")
        if len(self.res.findings) >= MAX_FINDINGS:
            raise StopChain()

    @property
    def head(self) -> Optional[Backup]:
        return self.backups[-1] if self.backups else None

    def committed_ids(self) -> List[str]:
        return [k.rsplit("/", 1)[1] for k in catalog.keys(self.store, TARGET)]

    # -- the chain -----------------------------------------------------------------------------
    def run(self) -> Result:
        t0 = time.monotonic()
        try:
            self.apply_writes(plan.initial_writes(self.rnd, self.disk.size, self.setup.segment_size), "initial")
            for self.round in range(self.setup.backups):
                if self.round and "writes" in self.enabled:
                    self.guest_writes(self.rnd.randint(1, 4))
                pause = None
                for kind in plan.draw_events(self.rnd, self.enabled):
                    self.res.events[kind] += 1
                    if kind == "pause_writes":
                        pause = self.rnd.choice(plan.PAUSE_POINTS)
                    else:
                        getattr(self, "ev_" + kind)()
                self.backup(pause)
            self.round = "end"
            self.final_checks()
        except StopChain:
            self.log(f"stopped after {MAX_FINDINGS} findings")
        finally:
            self.res.seconds = time.monotonic() - t0
        return self.res

    # -- guest writes ----------------------------------------------------------------------------
    def guest_writes(self, count: int, why: str = "writes") -> None:
        ops = plan.draw_writes(self.rnd, self.disk.size, self.setup.segment_size, self.disk.model, count)
        self.apply_writes(ops, why)

    def apply_writes(self, ops, why: str) -> None:
        for op in ops:
            if op.kind == "zero":
                self.disk.write_zeroes(op.offset, op.length)
            else:
                self.disk.write(op.offset, op.data)
        self.log(f"{why}: " + ", ".join(op.label for op in ops))

    # -- backups -------------------------------------------------------------------------------
    def ekko_backup(self, env=None) -> Run:
        p = self.ekko.run("backup", TARGET, env=env, check=False, json_out=True)
        return Run(p.returncode, p.stdout, p.stderr, getattr(p, "data", None))

    def paused_backup(self, point: str) -> Run:
        """The backup stops at `point`; meanwhile the guest writes; then it goes on. The FIFO
        handshake of faults.pause_point: our open() returns once a thread waits there."""
        self.fifo_n += 1
        fifo = os.path.join(self.workdir, f"pause{self.fifo_n}.fifo")
        os.mkfifo(fifo)
        env = dict(os.environ, PYTHONPATH=ROOT, EKKO_TEST_PAUSE=f"{point}:{fifo}")
        proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", self.ekko.path, "backup", TARGET,
                                 "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            fd = self._wait_for_pause(fifo, proc)
            if fd is not None:
                try:
                    self.guest_writes(self.rnd.randint(1, 3), f"writes while paused at {point}")
                finally:
                    os.close(fd)
                release_pauses(fifo, proc)
            else:
                self.log(f"the backup never reached {point} (nothing to read?)")
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        data = None
        if out.strip():
            try:
                data = json.loads(out)
            except ValueError:
                pass
        return Run(proc.returncode, out, err, data)

    @staticmethod
    def _wait_for_pause(fifo: str, proc) -> Optional[int]:
        """A write end of the FIFO once a reader (the paused thread) has it open; None if the
        process ends first. Opening non-blocking fails with ENXIO while nobody reads: that is
        the readiness signal, polled with a deadline."""
        deadline = time.monotonic() + PAUSE_DEADLINE
        while True:
            try:
                return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
            if proc.poll() is not None:
                return None
            if time.monotonic() > deadline:
                raise AssertionError(f"backup neither reached its pause point nor ended in {PAUSE_DEADLINE} s")
            time.sleep(0.01)

    def backup(self, pause: Optional[str]) -> None:
        before = self.committed_ids()
        image = self.disk.snapshot()
        run = self.paused_backup(pause) if pause else self.ekko_backup()
        what = f"backup{' paused at ' + pause if pause else ''}"
        new = [b for b in self.committed_ids() if b not in before]
        if run.rc != 0:
            self.find(f"{what} exited {run.rc} (expected 0); stderr: {tail(run.err)}")
            if new:
                self.find(f"{what} exited {run.rc} but committed {new}")
            self.check_bitmaps(after_commit=False)
            return
        b = run.data["backup"] if run.data else None
        if b is None or new != [b["backup_id"]]:
            self.find(f"{what} exited 0 reporting {b and b['backup_id']} but the store gained {new}")
            return
        self.committed(b, image, what)

    def committed(self, b: dict, image: bytes, what: str, settled: bool = True) -> None:
        """Every check of a newly committed backup (b: `backup --json`'s summary, or the same
        fields read back from the store for a run that was killed after its commit: `settled`
        False, its previous generation is retired by the next run, not by this one)."""
        head = self.head
        rec = Backup(len(self.backups), b["backup_id"], b["key"], b["kind"], b["reason"],
                     (b.get("generation") or {}).get("bitmap"), image, b["segment_size"])
        self.log(f"{what} -> {rec.kind} #{rec.n} {rec.backup_id} ({rec.reason})")
        self.res.kinds[rec.kind] += 1
        if b["virtual_size"] != len(image):
            self.find(f"backup #{rec.n} has virtual_size {b['virtual_size']}, the disk {len(image)}")
        if self.pending_full:
            if rec.kind != "full":
                self.find(f"backup #{rec.n} is {rec.kind} (parent {b['parent']}) after {', '.join(self.pending_full)}"
                          f": a full was required; reason given: {rec.reason!r}")
            elif head is not None and not any(w in rec.reason for ev in self.pending_full for w in FULL_REASONS[ev]):
                self.find(f"backup #{rec.n} is a full after {', '.join(self.pending_full)}, but its reason "
                          f"does not say so: {rec.reason!r}")
        elif head is None:
            if rec.kind != "full":
                self.find(f"first backup #{rec.n} is {rec.kind}")
        elif rec.kind != "incremental" or b["parent"] != head.backup_id:
            self.find(f"backup #{rec.n} is {rec.kind} (parent {b['parent']}) with nothing to break the chain "
                      f"since #{head.n} {head.backup_id}: reason {rec.reason!r}")
        self.pending_full = []
        self.backups.append(rec)
        self.check_bitmaps(after_commit=settled)
        stale = self.damaged_keys(rec) & self.marked
        if stale:
            self.find(f"backup #{rec.n} names segment(s) that verify --deep reported damaged before it ran "
                      f"(not healed): {sorted(stale)}")
        self.check_restore(rec)
        if len(self.backups) > 1 and self.rnd.random() < 0.5:
            self.check_restore(self.rnd.choice(self.backups[:-1]))

    # -- checks --------------------------------------------------------------------------------
    def check_bitmaps(self, after_commit: bool) -> None:
        names = {bm.get("name") for bm in self.disk.bitmaps()}
        gone = sorted(set(self.foreign) - names)
        if gone:
            self.find(f"foreign bitmap(s) {gone} were removed (bitmaps now: {sorted(names)})")
            for n in gone:
                del self.foreign[n]
        ours = sorted(n for n in names if n.startswith(PREFIX) and n not in self.foreign_names)
        if after_commit and self.head.generation and ours != [self.head.generation]:
            self.find(f"after backup #{self.head.n} ekko's generations on the disk are {ours}, "
                      f"expected [{self.head.generation}]")

    def manifest_segments(self, b: Backup) -> Set[str]:
        if b.backup_id not in self.manifest_keys:
            m = catalog.load(self.store, b.key)
            self.manifest_keys[b.backup_id] = {segment.segment_key(d) for _, d in m.table.data_entries()}
        return self.manifest_keys[b.backup_id]

    def still_flipped(self) -> Set[str]:
        out = set()
        for key, blob in self.flipped.items():
            try:
                if self.raw.get(key) == blob:
                    out.add(key)
            except Exception:   # noqa: BLE001 - gone counts as healed away
                pass
        return out

    def damaged_keys(self, b: Backup) -> Set[str]:
        if not self.flipped or b.bad_manifest:
            return set()
        return self.manifest_segments(b) & self.still_flipped()

    def check_restore(self, b: Backup) -> None:
        if b.n in self.wrong:
            return      # reported once; the same wrong backup again says nothing new
        self.res.restores += 1
        ext = "qcow2" if self.rnd.random() < 0.25 else "raw"
        out = os.path.join(self.workdir, f"restore-{b.n}.{ext}")
        damaged = self.damaged_keys(b)
        p = self.ekko.run("restore", b.backup_id, "--to", out, check=False)
        try:
            ok = False
            if b.bad_manifest or damaged:
                why = "its manifest is damaged" if b.bad_manifest else f"it names damaged {sorted(damaged)}"
                if p.returncode != 3:
                    self.find(f"restore of #{b.n} {b.backup_id} exited {p.returncode}, expected 3 ({why}); "
                              f"stderr: {tail(p.stderr)}")
                if os.path.exists(out):
                    got = read_raw(out)
                    self.find(f"restore of #{b.n} ({why}) left an image: "
                              + ("EXACT bytes" if got == b.image else "WRONG bytes"))
                ok = p.returncode == 3 and not os.path.exists(out)
                return
            if p.returncode != 0:
                self.find(f"restore of #{b.n} {b.backup_id} ({b.kind}) exited {p.returncode}; "
                          f"stderr: {tail(p.stderr)}")
                return
            got = read_raw(out)
            ok = got == b.image
            if not ok:
                others = [(f"backup #{o.n}'s instant", o.image) for o in self.backups if o is not b]
                others.append(("the disk now", self.disk.snapshot()))
                self.find(f"restore of #{b.n} {b.backup_id} ({b.kind}, {b.reason}) exited 0 with WRONG BYTES "
                          f"({ext}; {self.other_format(b, ext)}):\n"
                          + indent(diff.describe(got, b.image, b.segment_size, others)))
        finally:
            if not ok:
                self.wrong.add(b.n)
            for path in (out, out + ".raw"):
                if os.path.exists(path):
                    os.unlink(path)

    def other_format(self, b: Backup, ext: str) -> str:
        """Diagnosis of wrong bytes: the same backup restored to the other format tells a wrong
        backup (both wrong) from a wrong image writer (one exact)."""
        other = "raw" if ext == "qcow2" else "qcow2"
        out = os.path.join(self.workdir, f"again-{b.n}.{other}")
        try:
            p = self.ekko.run("restore", b.backup_id, "--to", out, check=False)
            if p.returncode:
                return f"restored as {other}: exit {p.returncode}"
            return f"restored as {other}: {'EXACT' if read_raw(out) == b.image else 'also wrong'}"
        finally:
            for path in (out, out + ".raw"):
                if os.path.exists(path):
                    os.unlink(path)

    def check_verify(self, why: str) -> dict:
        flipped = set()
        for b in self.backups:
            flipped |= self.damaged_keys(b)
        bad = [b.key for b in self.backups if b.bad_manifest]
        p = self.ekko.run("verify", "--deep", check=False, json_out=True)
        data = getattr(p, "data", None) or {}
        want = 3 if flipped or bad else 0
        if p.returncode != want:
            self.find(f"verify --deep ({why}) exited {p.returncode}, expected {want} (flipped segments in use: "
                      f"{sorted(flipped)}, damaged manifests: {bad}); stderr: {tail(p.stderr)}")
        reported = {x["key"] for x in data.get("damaged_segments", ())}
        if flipped - reported:
            self.find(f"verify --deep ({why}) did not report damaged segment(s) {sorted(flipped - reported)}")
        if set(bad) - set(data.get("bad_manifests", {})):
            self.find(f"verify --deep ({why}) did not report damaged manifest(s) "
                      f"{sorted(set(bad) - set(data.get('bad_manifests', {})))}")
        self.marked |= reported & set(self.flipped)
        return data

    def final_checks(self) -> None:
        self.log(f"restore all {len(self.backups)} committed backups, verify --deep")
        self.check_bitmaps(after_commit=False)
        for b in self.backups:
            self.check_restore(b)
        self.check_verify("end of chain")

    # -- events --------------------------------------------------------------------------------
    def ev_kill_ekko(self) -> None:
        point = self.rnd.choice(plan.CRASH_POINTS)
        before = self.committed_ids()
        image = self.disk.snapshot()
        run = self.ekko_backup(env={"EKKO_TEST_CRASH": point})
        new = [b for b in self.committed_ids() if b not in before]
        self.log(f"kill_ekko at {point}: exit {run.rc}, new backups {new}")
        if run.rc == 0:     # the point was never reached (nothing to read or store): a normal backup
            b = run.data["backup"]
            if new != [b["backup_id"]]:
                self.find(f"backup (crash point {point} not reached) reported {b['backup_id']}, the store gained {new}")
                return
            self.committed(b, image, f"backup (crash point {point} not reached)")
        elif run.rc != -9:
            self.find(f"backup with EKKO_TEST_CRASH={point} exited {run.rc}; stderr: {tail(run.err)}")
        else:
            self.res.crashed += 1
            if self.rnd.random() < 0.5:
                self.wait_reaped()      # else what follows races the reaper, as in production
            if new and (point != "after-commit" or len(new) > 1):
                self.find(f"backup killed at {point} committed {new}")
            elif new:
                m = catalog.load(self.store, catalog.find(self.store, new[0]))
                h = dict(m.header(), key=catalog.find(self.store, new[0]))
                self.committed(h, image, "backup killed after its commit", settled=False)
        if "writes" in self.enabled:
            self.guest_writes(self.rnd.randint(1, 2), "writes after the kill")

    def wait_reaped(self) -> None:
        """Until the killed run's reaper has removed its export and job from QEMU (README: "within
        seconds"); a generous deadline makes a reaper that never finishes a finding."""
        deadline = time.monotonic() + REAPER_DEADLINE
        while self.disk.admin.execute("query-block-exports") or self.disk.admin.execute("query-block-jobs"):
            if time.monotonic() > deadline:
                self.find(f"a killed run's export or job was still in QEMU after {REAPER_DEADLINE} s")
                return
            time.sleep(0.05)
        self.log("the killed run's reaper has cleaned up QEMU")

    def ev_kill_qemu(self) -> None:
        self.disk.kill9()
        self.disk.start()
        self.foreign.clear()        # transient ones are gone; persistent ones missing or inconsistent now
        self.pending_full.append("kill_qemu")
        self.log("kill -9 QEMU, started again")

    def ev_restart_qemu(self) -> None:
        self.disk.stop()
        self.disk.start()
        self.foreign = {n: p for n, p in self.foreign.items() if p}
        self.log("QEMU stopped cleanly, started again")

    def _head_generation(self) -> Optional[dict]:
        gen = self.head.generation if self.head else None
        # A running backup's copy-before-write filter puts an anonymous bitmap on the node: no "name"
        return next((bm for bm in self.disk.bitmaps() if bm.get("name") == gen), None) if gen else None

    def ev_disable_bitmap(self) -> None:
        bm = self._head_generation()
        if bm is None or not bm.get("recording", True) or bm.get("inconsistent"):
            self.log(f"disable_bitmap: skipped (generation {bm and bm['name']} absent, disabled or inconsistent)")
            return
        if not self._admin("block-dirty-bitmap-disable", {"node": "disk0", "name": bm["name"]}):
            return
        self.pending_full.append("disable_bitmap")
        self.log(f"disabled {bm['name']} outside ekko")
        self.guest_writes(self.rnd.randint(1, 3), "writes while it is disabled")

    def ev_remove_bitmap(self) -> None:
        bm = self._head_generation()
        if bm is None:
            self.log("remove_bitmap: skipped (no generation)")
            return
        if not self._admin("block-dirty-bitmap-remove", {"node": "disk0", "name": bm["name"]}):
            return
        self.pending_full.append("remove_bitmap")
        self.log(f"removed {bm['name']} outside ekko")
        self.guest_writes(self.rnd.randint(1, 2), "writes after the removal")

    def _admin(self, command: str, args: dict) -> bool:
        """The reaper of a run killed just before may still hold the export and the
        copy-before-write filter for a moment: QEMU then refuses to touch the generation ("in
        use") or to resize ("Permission conflict"), and the event does not happen."""
        try:
            self.disk.admin.execute(command, args)
            return True
        except Exception as e:  # noqa: BLE001 - only those two refusals are expected; others are raised
            if "in use" not in str(e) and "Permission conflict" not in str(e):
                raise
            self.log(f"{command}: refused while a killed run's export is still there ({e})")
            return False

    def ev_foreign_bitmap(self) -> None:
        name = self.rnd.choice(("ekko-foo", "other"))
        if name in {bm.get("name") for bm in self.disk.bitmaps()}:
            self.log(f"foreign_bitmap: {name} exists already")
            return
        persistent = self.rnd.random() < 0.5
        gran = self.setup.granularity if name.startswith(PREFIX) else self.rnd.choice((4096, 65536, 1 << 20))
        self.disk.admin.execute("block-dirty-bitmap-add", {"node": "disk0", "name": name, "persistent": persistent,
                                                           "granularity": gran})
        if self.rnd.random() < 0.3:
            self.disk.admin.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": name})
        self.foreign[name] = persistent
        self.foreign_names.add(name)
        self.log(f"added foreign bitmap {name} (persistent={persistent}, granularity {gran})")

    def ev_resize(self) -> None:
        seg = self.setup.segment_size
        grow = self.rnd.choice((512, 1536, 64 * 1024 + 512, seg, seg + 1536, 1 << 20))
        if self.disk.size + grow > self.setup.max_size:
            self.log("resize: skipped (at the size limit)")
            return
        old = self.disk.size
        try:
            self.disk.resize(old + grow)
        except Exception as e:  # noqa: BLE001 - the copy-before-write filter may outlive the export briefly
            if "Permission conflict" not in str(e):
                raise
            self.log(f"resize: refused while a killed run's filter is still there ({e})")
            return
        self.pending_full.append("resize")
        self.log(f"block_resize {old} -> {self.disk.size}")
        if "writes" in self.enabled:
            n = self.rnd.randint(1, grow)
            self.apply_writes([plan.Op("write", self.disk.size - n, n, self.rnd.randbytes(n),
                                       f"new-tail {n}@{self.disk.size - n}")], "writes into the new space")

    def ev_corrupt_segment(self) -> None:
        usable = [b for b in self.backups if not b.bad_manifest and self.manifest_segments(b)]
        if not usable:
            self.log("corrupt_segment: skipped (no backup with data)")
            return
        b = self.rnd.choice(usable)
        key = self.rnd.choice(sorted(self.manifest_segments(b)))
        if self.setup.encryption and self.rnd.random() < 0.5 and key not in self.flipped:
            # (a segment flipped before has an envelope that no longer opens: flip its bytes instead)
            # through the sealed store (conftest's Ekko.corrupt): an authentic envelope around a
            # segment object with one byte changed, caught by the segment's own digest
            plain = self.store.get(key)
            at = self.rnd.randrange(len(plain) // 2, len(plain))
            self.ekko.corrupt(key, at)
            how = f"byte {at} of the sealed object, re-sealed,"
        else:
            # bit rot of the stored bytes; in the second half: the payload, not a header flag
            blob = bytearray(self.raw.get(key))
            at = self.rnd.randrange(len(blob) // 2, len(blob))
            blob[at] ^= 1 << self.rnd.randrange(8)
            self.raw.put(key, bytes(blob))
            how = f"a bit of byte {at},"
        self.flipped[key] = self.raw.get(key)
        self.log(f"flipped {how} of {key} (named by #{b.n})")
        data = self.check_verify(f"after flipping {key}")
        if key not in {x["key"] for x in data.get("damaged_segments", ())} or b.n in self.wrong:
            return
        # --allow-damaged: exactly the damaged segments are holes (zeros); every other byte exact
        out = os.path.join(self.workdir, f"holes-{b.n}.raw")
        p = self.ekko.run("restore", b.backup_id, "--to", out, "--allow-damaged", check=False, json_out=True)
        try:
            m = catalog.load(self.store, b.key)
            damaged = self.still_flipped()
            holes = {i for i, d in m.table.data_entries() if segment.segment_key(d) in damaged}
            got_holes = {h["index"] for h in (getattr(p, "data", None) or {}).get("holes", ())}
            if p.returncode != 3 or got_holes != holes:
                self.find(f"restore --allow-damaged of #{b.n} exited {p.returncode} with holes {sorted(got_holes)}, "
                          f"expected 3 and {sorted(holes)}; stderr: {tail(p.stderr)}")
            elif os.path.exists(out):
                exp = bytearray(b.image)
                for i in holes:
                    end = min(len(exp), (i + 1) * b.segment_size)
                    exp[i * b.segment_size:end] = bytes(end - i * b.segment_size)
                got = read_raw(out)
                if got != bytes(exp):
                    self.find(f"restore --allow-damaged of #{b.n}: WRONG BYTES outside the holes:\n"
                              + indent(diff.describe(got, bytes(exp), b.segment_size)))
            else:
                self.find(f"restore --allow-damaged of #{b.n} wrote no image")
        finally:
            if os.path.exists(out):
                os.unlink(out)

    def ev_corrupt_manifest(self) -> None:
        candidates = [b for b in self.backups if not b.bad_manifest]
        if not candidates:
            self.log("corrupt_manifest: skipped (no backup)")
            return
        b = candidates[-1] if self.rnd.random() < 0.7 else self.rnd.choice(candidates)
        blob = bytearray(self.raw.get(b.key))
        at = self.rnd.randrange(len(blob))
        blob[at] ^= 1 << self.rnd.randrange(8)
        self.raw.put(b.key, bytes(blob))
        b.bad_manifest = True
        if b is self.head:
            self.pending_full.append("corrupt_manifest")
        self.log(f"flipped a bit at byte {at} of manifest #{b.n} {b.key}{' (the newest)' if b is self.head else ''}")
        listed = self.ekko.run("list", TARGET, check=False, json_out=True)
        rows = (getattr(listed, "data", None) or {}).get("backups", ())
        row = next((r for r in rows if r.get("key") == b.key), None)
        if listed.returncode != 0 or row is None or "damaged" not in row:
            self.find(f"`ekko list` after damaging manifest #{b.n}: exit {listed.returncode}, its row {row}")
        self.check_verify(f"after damaging manifest #{b.n}")


def tail(text: str, lines: int = 4) -> str:
    return " | ".join((text or "").strip().splitlines()[-lines:]) or "(empty)"


def indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())

"""Application-consistent backups on a real Linux guest (issue 17): the guest's file systems (ext4 and
XFS on virtio disks) are written continuously by a workload that fsyncs every file and journals its
checksum (tests/harness/guest_init.sh), while ekko backs them up through QEMU's QMP with the guest
frozen through the real qemu-ga around the transaction.

Oracles, none of them ekko's: e2fsck -fn, xfs_repair -n and dumpe2fs on each restored disk; the
guest itself booted on the restored disks read-only (a file system that needs journal replay does
not mount; every file the journal names must have its checksum); the guest console's workload
steps and fsfreeze hook lines; qemu-img map of the live image for what fstrim unmapped.

One guest for the whole module (booted once: ~3-10 s under TCG); the tests run in order on it.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import Ekko, make_config
from harness import guest as G
from harness import in_ci

SEG = 256 << 10
EXT4, XFS = "/mnt/vda", "/mnt/vdb"


@pytest.fixture(scope="module")
def gdir():
    d = tempfile.mkdtemp(prefix="ekg", dir="/tmp")      # short: unix socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(gdir):
    try:
        disks = [G.make_fs_disk(os.path.join(gdir, "vda.qcow2"), "ext4", 64 << 20),
                 G.make_fs_disk(os.path.join(gdir, "vdb.qcow2"), "xfs", 320 << 20)]
        g = G.Guest(gdir, disks)
    except (G.GuestUnavailable, FileNotFoundError, subprocess.CalledProcessError) as e:
        if in_ci():
            pytest.fail(f"the test guest cannot be built: {e}")
        pytest.skip(f"the test guest cannot be built: {e}")
    g.start()
    print(f"guest up under {g.accel}: {g.ready.group(0)}")
    g.wait_progress(3)
    yield g
    g.stop()


def ekko_for(gdir: str, g: G.Guest, name: str, **extra) -> Ekko:
    """An ekko config with targets <name>.vda / <name>.vdb on the guest's QEMU."""
    work = os.path.join(gdir, name)
    os.makedirs(work, exist_ok=True)
    targets = {f"{name}.vd{c}": {"engine": "qmp", "qmp_socket": g.qmp_socket, "node": g.node(i),
                                 "guest_agent_socket": g.agent_socket} for i, c in enumerate("ab")}
    cfg = make_config(work, targets)
    cfg.update(extra)
    return Ekko(work, cfg)


def restore(ek: Ekko, backup_id: str, out: str) -> str:
    ek.run("restore", backup_id, "--to", out)
    return out


def needs_recovery(raw: str) -> bool:
    p = subprocess.run(["dumpe2fs", "-h", raw], capture_output=True, text=True, check=True)
    return "needs_recovery" in p.stdout


def fsck(raw: str, fs: str) -> subprocess.CompletedProcess:
    cmd = ["e2fsck", "-fn", raw] if fs == "ext4" else ["xfs_repair", "-n", "-f", raw]
    return subprocess.run(cmd, capture_output=True, text=True)


# What xfs_repair -n says of an XFS frozen on Linux 6.1 and copied, whoever copies it (checked with
# qemu-img convert -U of the live image while frozen, no ekko involved): freeze forces and covers the log
# but leaves it to be replayed, and the lazy superblock counters are written only at unmount. Anything
# else it says is a finding.
_XFS_FROZEN = re.compile(r"^(|Phase \d.*|\s+- .*|Cannot get host filesystem geometry\.|Repair may fail if there is a "
                         r"sector size mismatch between|the image and the host filesystem\.|ALERT: The filesystem has "
                         r"valuable metadata changes in a log which is being|ignored because the -n option was used\.  "
                         r"Expect spurious inconsistencies|which may be resolved by first mounting the filesystem to "
                         r"replay the log\.|sb_(fdblocks|icount|ifree) \d+, counted \d+|No modify flag set, .*)$")


def xfs_findings(p: subprocess.CompletedProcess) -> list:
    return [ln for ln in (p.stderr + p.stdout).splitlines() if not _XFS_FROZEN.match(ln)]


def hook_lines(g: G.Guest, since: int):
    return [ln for ln in g.console.lines()[since:] if ln.startswith("EKKO-HOOK ")]


def test_frozen_chain_under_load_restores_clean(guest, gdir):
    """Chain of 5 backups of each disk while the workload runs: every one frozen through qemu-ga
    (its hooks ran), every restored disk passes fsck without journal replay, and the guest booted
    on all of them read-only finds every journaled file with its checksum."""
    ek = ekko_for(gdir, guest, "fz")
    mark = guest.console.mark()
    restored = []
    for rnd in range(5):
        guest.wait_progress(2)
        for dev, fs in (("vda", "ext4"), ("vdb", "xfs")):
            b = ek.backup(f"fz.{dev}")
            assert b["kind"] == ("full" if rnd == 0 else "incremental"), b
            c = b["consistency"]
            assert c["level"] == "filesystem", c
            assert c["mountpoints"] == [EXT4, XFS], c
            assert isinstance(c["freeze_ms"], int) and c["freeze_ms"] >= 0, c
            print(f"round {rnd} {dev}: {b['backup_id']} {b['kind']} frozen {c['freeze_ms']} ms")
            restored.append((b["backup_id"], fs, restore(ek, b["backup_id"], os.path.join(gdir, f"fz{rnd}{dev}.raw"))))
    hooks = hook_lines(guest, mark)
    assert hooks == ["EKKO-HOOK freeze", "EKKO-HOOK thaw"] * 10, hooks
    shown = ek.run("show", restored[-1][0]).stdout
    assert re.search(r"^consistency filesystem \(frozen \d+ ms: /mnt/vda, /mnt/vdb\)$", shown, re.M), shown
    listed = ek.run("list").stdout
    assert len(re.findall(r" filesystem\(\d+ms\) ", listed)) == 10, listed
    for bid, fs, raw in restored:
        p = fsck(raw, fs)
        if fs == "ext4":        # ext4's freeze leaves a clean journal: no replay, no finding
            assert not needs_recovery(raw), f"{bid}: the frozen ext4 needs journal recovery"
            assert p.returncode == 0, f"{bid} ({fs}): {p.stderr}{p.stdout[:1500]}"
        else:                   # XFS's: a log to replay (_XFS_FROZEN), nothing else
            assert not xfs_findings(p), f"{bid} ({fs}): {xfs_findings(p)}"
    # the guest booted once on all the restored disks: ext4 read-only (a journal to replay would
    # not mount), XFS with its log replayed on a throwaway overlay; every journaled file has its checksum
    found = G.check_disks(gdir, [raw for _, _, raw in restored], read_only=[fs == "ext4" for _, fs, _ in restored])
    for (bid, fs, _), res in zip(restored, found, strict=True):
        assert re.fullmatch(r"ok files=[1-9]\d* torn=0", res), f"{bid} ({fs}): {res}"
    for _, _, raw in restored:
        os.unlink(raw)


def test_crash_consistent_cost_reported(guest, gdir):
    """consistency: crash under the same load: what the frozen backups spare. Reported, not
    asserted (journal replay is legitimate here); after replay the journal must still hold: the
    workload fsyncs before it journals."""
    ek = ekko_for(gdir, guest, "cr", consistency="crash")
    report = []
    for rnd in range(1):
        guest.wait_progress(2)
        for dev, fs in (("vda", "ext4"), ("vdb", "xfs")):
            b = ek.backup(f"cr.{dev}")
            assert b["consistency"] == {"level": "crash", "reason": "consistency: crash (configured)"}, b
            raw = restore(ek, b["backup_id"], os.path.join(gdir, f"cr{rnd}{dev}.raw"))
            p = fsck(raw, fs)
            report.append((raw, fs, needs_recovery(raw) if fs == "ext4" else None, p.returncode))
    raws = [r[0] for r in report]
    found = G.check_disks(gdir, raws + raws, read_only=[True] * len(raws) + [False] * len(raws))
    for (raw, fs, rec, rc), res_ro, res_rw in zip(report, found[:len(raws)], found[len(raws):], strict=True):
        print(f"CRASH-CONSISTENT {os.path.basename(raw)} ({fs}): needs_recovery={rec} fsck -n rc={rc}; "
              f"read-only mount: {res_ro}; after replay: {res_rw}")
        assert res_rw.startswith("ok "), f"{raw}: after journal replay: {res_rw}"
        os.unlink(raw)


def test_sigkill_while_frozen_thaws_within_5s(guest, gdir):
    """ekko SIGKILLed with the guest frozen: its thaw reaper thaws within 5 s (the workload
    resumes on both file systems), and the next backup recovers and is frozen again."""
    ek = ekko_for(gdir, guest, "kill")
    ek.backup("kill.vda")
    fifo = os.path.join(gdir, "pause.fifo")
    os.mkfifo(fifo)
    mark = guest.console.mark()
    env = dict(os.environ, PYTHONPATH=G.ROOT, EKKO_TEST_PAUSE=f"while-frozen:{fifo}")
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ek.path, "backup", "kill.vda"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fd = os.open(fifo, os.O_WRONLY)          # blocks until ekko waits at the point: frozen
        guest.console.wait_for(r"^EKKO-HOOK freeze$", 30, since=mark)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.unlink(fifo)
    after = guest.console.mark()
    guest.console.wait_for(r"^EKKO-HOOK thaw$", 5, since=mark)
    for mnt in (EXT4, XFS):
        rx = rf"^EKKO-W {re.escape(mnt)} \d+ \d+$"
        guest.console.wait_for(rx, max(0.1, 5 - (time.monotonic() - killed)), since=after)
    print(f"thawed and writing again {time.monotonic() - killed:.2f} s after the SIGKILL")
    assert guest.agent_call("guest-fsfreeze-status") == "thawed"
    b = ek.backup("kill.vda")
    assert b["consistency"]["level"] == "filesystem", b


def test_no_agent_channel(guest, gdir):
    """No channel (the socket is not there) or none configured: crash-consistent with the reason
    under `auto`; `filesystem` fails before QEMU is touched."""
    ek = ekko_for(gdir, guest, "nochan")
    ek.cfg["targets"]["nochan.vda"]["guest_agent_socket"] = os.path.join(gdir, "no-such.qga")
    del ek.cfg["targets"]["nochan.vdb"]["guest_agent_socket"]
    ek.write_config()
    a = ek.backup("nochan.vda")
    assert a["consistency"] == {"level": "crash", "reason": f"guest agent socket {gdir}/no-such.qga does not "
                                "exist (no guest agent channel)"}, a
    b = ek.backup("nochan.vdb")
    assert b["consistency"] == {"level": "crash", "reason": "no guest agent socket configured for nochan.vdb "
                                "(targets.<name>.guest_agent_socket)"}, b
    ek.cfg["consistency"] = "filesystem"
    ek.write_config()
    p = ek.run("backup", "nochan.vdb", check=False)
    assert p.returncode == 1 and "cannot be frozen (no guest agent socket configured" in p.stderr, p.stderr
    assert not guest.admin.execute("query-block-jobs"), "a failed backup left a job in QEMU"


def _data_ranges(image: str):
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", image], capture_output=True, text=True,
                         check=True).stdout
    return [(e["start"], e["start"] + e["length"]) for e in json.loads(out) if e["data"] and not e.get("zero")]


def _subtract(a, b):
    """Ranges of `a` not covered by `b` (both sorted, disjoint)."""
    out = []
    for s, e in a:
        cur = s
        for bs, be in b:
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
        if cur < e:
            out.append((cur, e))
    return out


def test_fstrim_ranges_restore_as_zeros_and_are_not_stored(guest, gdir):
    """A file deleted and fstrim'ed in the guest between two backups: the ranges qemu-img map shows
    unmapped restore as zeros, and every segment inside them is a zero segment (nothing stored)."""
    from ekko_libvirt.store import catalog
    ek = ekko_for(gdir, guest, "trim")
    mark = guest.console.mark()
    guest.exec("touch /run/ekko-pause")
    guest.console.wait_for(rf"^EKKO-PAUSED {EXT4}$", 60, since=mark)
    try:
        guest.exec(f"dd if=/dev/urandom of={EXT4}/big bs=1M count=12 2>/dev/null; sync")
        a = ek.backup("trim.vda")
        before = _data_ranges(guest.disks[0])
        out = guest.exec(f"rm {EXT4}/big; sync; fstrim -v {EXT4}; sync")
        print("guest:", out.strip())
        trimmed = _subtract(before, _data_ranges(guest.disks[0]))
        b = ek.backup("trim.vda")
    finally:
        guest.exec("rm -f /run/ekko-pause")
    assert b["kind"] == "incremental" and b["parent"] == a["backup_id"], b
    assert b["consistency"]["level"] == "filesystem", b
    whole = [i for s, e in trimmed for i in range(-(-s // SEG), e // SEG)]
    assert len(whole) >= 16, f"fstrim unmapped too little to test: {trimmed}"
    store = ek.store()
    ma = catalog.load(store, a["key"])
    mb = catalog.load(store, b["key"])
    assert all(ma.table.get(i) is not None for i in whole), "the big file was not in the first backup"
    stored_in_b = [i for i in whole if mb.table.get(i) is not None]
    assert not stored_in_b, f"trimmed segments stored as data: {stored_in_b[:10]}"
    raw = restore(ek, b["backup_id"], os.path.join(gdir, "trim.raw"))
    with open(raw, "rb") as f:
        for s, e in trimmed:
            f.seek(s)
            assert f.read(e - s) == bytes(e - s), f"trimmed range [{s}, {e}) does not restore as zeros"
    assert fsck(raw, "ext4").returncode == 0
    os.unlink(raw)


def test_failing_fsfreeze_hook(guest, gdir):
    """The guest's fsfreeze hook fails (a database that could not flush): qemu-ga refuses the
    freeze; `auto` goes on crash-consistent saying so, `filesystem` fails and commits nothing."""
    from ekko_libvirt.store import catalog
    ek = ekko_for(gdir, guest, "hook")
    hook = "/etc/qemu/fsfreeze-hook"
    guest.exec(f"cp {hook} /run/hook.saved && printf '#!/bin/sh\\n[ \"$1\" = freeze ] && exit 3\\nexit 0\\n' > {hook}")
    try:
        b = ek.backup("hook.vda")
        assert b["consistency"]["level"] == "crash", b
        assert re.search(r"guest-fsfreeze-freeze failed: .*hook.* failed", b["consistency"]["reason"]), b
        ek.cfg["consistency"] = "filesystem"
        ek.write_config()
        keys = sorted(e.key for e in catalog.entries(ek.store()))
        p = ek.run("backup", "hook.vda", check=False)
        assert p.returncode == 1 and "consistency: filesystem, but the guest cannot be frozen" in p.stderr, p.stderr
        assert sorted(e.key for e in catalog.entries(ek.store())) == keys
    finally:
        guest.exec(f"cp /run/hook.saved {hook}")
    assert guest.agent_call("guest-fsfreeze-status") == "thawed"
    c = ek.backup("hook.vda")
    assert c["consistency"]["level"] == "filesystem" and c["parent"] == b["backup_id"], c


def stop_agent_for(g: G.Guest, seconds: int) -> None:
    """qemu-ga SIGSTOPped in the guest for `seconds` (a guest agent that never answers), by a
    shell the agent itself starts: it answers guest-exec first, then stops."""
    g.agent_call("guest-exec", {"path": "/bin/sh", "arg": ["-c", f"(sleep 1; kill -STOP $(pidof qemu-ga); "
                                                           f"sleep {seconds}; kill -CONT $(pidof qemu-ga)) "
                                                           ">/dev/null 2>&1 &"]})


def test_agent_that_never_answers(guest, gdir):
    """qemu-ga stopped: `auto` goes on crash-consistent and says why, `filesystem` fails with
    nothing committed, both within the agent timeout; the chain goes on from the last committed
    backup. The module's last test: its agent stays stopped until the guest is shut down."""
    from ekko_libvirt.store import catalog
    ek = ekko_for(gdir, guest, "hung", guest_agent_timeout=3)
    first = ek.backup("hung.vda")
    assert first["consistency"]["level"] == "filesystem"
    stop_agent_for(guest, 3600)
    deadline = time.monotonic() + 20         # silent once a probe of ours times out
    while True:
        try:
            guest.agent_call("guest-ping", timeout=2)
        except OSError:
            break
        assert time.monotonic() < deadline, "qemu-ga was never stopped"
    b = ek.backup("hung.vda")
    assert b["consistency"]["level"] == "crash", b
    assert "did not answer within 3 s" in b["consistency"]["reason"], b
    assert b["kind"] == "incremental" and b["parent"] == first["backup_id"], b
    ek.cfg["targets"]["hung.vda"]["consistency"] = "filesystem"
    ek.write_config()
    keys = sorted(e.key for e in catalog.entries(ek.store()))
    p = ek.run("backup", "hung.vda", check=False)
    assert p.returncode == 1, p.stderr
    assert "consistency: filesystem, but the guest cannot be frozen" in p.stderr, p.stderr
    assert "nothing was committed" in p.stderr, p.stderr
    assert sorted(e.key for e in catalog.entries(ek.store())) == keys
    assert not guest.admin.execute("query-block-jobs"), "a failed backup left a job in QEMU"
    ek.cfg["targets"]["hung.vda"]["consistency"] = "auto"
    ek.write_config()
    c = ek.backup("hung.vda")                # nothing lost: the chain goes on from b
    assert c["kind"] == "incremental" and c["parent"] == b["backup_id"], c
    assert c["consistency"]["level"] == "crash", c

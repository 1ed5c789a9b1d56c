"""Application-consistent backups through libvirt (issue 17): the real test guest (tests/harness/guest.py)
as a libvirt domain with the guest agent channel, backed up with checkpoints + pull backupBegin while
its workload writes, frozen with virDomainFSFreeze around backupBegin. A domain without the channel,
and one whose metadata asks for quiescing (Nova's os_require_quiesce) without being able to.

Run under `flock /tmp/ekko-libvirtd.lock` like every libvirtd test."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import Ekko
from harness import guest as G
from harness.libvirtd import destroy_and_undefine, make_workdir
from libvirt_fixtures import libvirt_conn, libvirtd, missing  # noqa: F401

def domain_xml(name: str, image: str, console: str, kernel: str, initrd: str, agent: bool, metadata: str = "",
               dom_type: str = "qemu") -> str:
    channel = ("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
               if agent else "")
    return f"""<domain type='{dom_type}'>
  <name>{name}</name>{metadata}
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
      <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
  <on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
    {channel}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
  </devices>
</domain>"""


class LvGuest:
    def __init__(self, conn, work: str, name: str, agent: bool, metadata: str = ""):
        kernel, initrd = G.build()
        self.image = G.make_fs_disk(os.path.join(work, f"{name}.qcow2"), "ext4", 64 << 20)
        self.console = G.Console(os.path.join(work, f"{name}.console"))
        # the cached kernel and initrd must be readable by libvirt-qemu; the cache is 0755 dirs, 0644 files
        self.dom = conn.defineXML(domain_xml(name, self.image, self.console.path, kernel, initrd, agent, metadata))
        self.dom.create()
        self.console.wait_for(r"^EKKO-READY", 120)

    def wait_progress(self, steps: int, timeout: float = 120) -> None:
        start = max((s for s, _ in self.console.progress("/mnt/vda")), default=0)
        deadline = time.monotonic() + timeout
        while max((s for s, _ in self.console.progress("/mnt/vda")), default=0) < start + steps:
            assert time.monotonic() < deadline, f"no workload progress: {self.console.tail()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def lvwork():
    d = make_workdir("ekko-lvfz-")
    yield d
    subprocess.run(["rm", "-rf", d])


@pytest.fixture
def lvguests(libvirtd, libvirt_conn, lvwork):
    made = []

    def make(suffix, agent=True, metadata=""):
        name = f"ekko-test-fz-{suffix}-{os.getpid()}"
        try:
            g = LvGuest(libvirt_conn, lvwork, name, agent, metadata)
        except G.GuestUnavailable as e:
            missing(f"the test guest cannot be built: {e}")
        made.append(name)
        return g
    yield make
    conn = libvirtd.connect()
    try:
        for name in made:
            destroy_and_undefine(conn, name)
    finally:
        conn.close()


def ekko_in(work: str, name: str, **extra) -> Ekko:
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    cfg = {"store": {"type": "local", "path": os.path.join(d, "store")}, "state_dir": os.path.join(d, "state"),
           "run_dir": os.path.join(d, "run"), "segment_size": "256KiB", "workers": 2, **extra}
    return Ekko(d, cfg)


def test_libvirt_chain_frozen_under_load(lvguests, lvwork):
    """Five backups through libvirt while the guest writes: each frozen by the domain's agent
    around backupBegin (its hook ran once each way), each restored disk clean without replay and
    every journaled file there with its checksum, checked by the guest booted on them read-only.
    Then ekko SIGKILLed with the guest frozen: thawed and writing again within 5 s."""
    g = lvguests("chain")
    ek = ekko_in(lvwork, "chain")
    dom = g.dom.name()
    mark = g.console.mark()
    restored = []
    for rnd in range(5):
        g.wait_progress(2)
        b = ek.backup(dom)
        assert b["kind"] == ("full" if rnd == 0 else "incremental"), b
        assert b["consistency"]["level"] == "filesystem", b
        assert b["consistency"]["mountpoints"] == ["/mnt/vda"], b
        print(f"round {rnd}: {b['backup_id']} frozen {b['consistency']['freeze_ms']} ms")
        raw = os.path.join(lvwork, f"chain{rnd}.raw")
        ek.run("restore", b["backup_id"], "--to", raw)
        restored.append(raw)
    hooks = [ln for ln in g.console.lines()[mark:] if ln.startswith("EKKO-HOOK ")]
    assert hooks == ["EKKO-HOOK freeze", "EKKO-HOOK thaw"] * 5, hooks
    for raw in restored:
        assert "needs_recovery" not in subprocess.run(["dumpe2fs", "-h", raw], capture_output=True,
                                                      text=True, check=True).stdout, raw
        p = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout
    for raw, res in zip(restored, G.check_disks(lvwork, restored), strict=True):
        assert re.fullmatch(r"ok files=[1-9]\d* torn=0", res), f"{raw}: {res}"
    for raw in restored:
        os.unlink(raw)
    # ekko SIGKILLed while libvirt holds the guest frozen: the thaw reaper thaws through libvirt
    fifo = os.path.join(lvwork, "pause.fifo")
    os.mkfifo(fifo)
    mark = g.console.mark()
    proc = subprocess.Popen([sys.executable, "-m", "ekko_libvirt.cli", "-c", ek.path, "backup", dom],
                            env=dict(os.environ, PYTHONPATH=G.ROOT, EKKO_TEST_PAUSE=f"while-frozen:{fifo}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fd = os.open(fifo, os.O_WRONLY)          # blocks until ekko waits there, the guest frozen
        g.console.wait_for(r"^EKKO-HOOK freeze$", 30, since=mark)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.unlink(fifo)
    after = g.console.mark()
    g.console.wait_for(r"^EKKO-HOOK thaw$", 5, since=mark)
    g.console.wait_for(r"^EKKO-W /mnt/vda \d+ \d+$", 5, since=after)
    c = ek.backup(dom)                  # the next run settles the killed one and freezes again
    assert c["consistency"]["level"] == "filesystem", c


def test_libvirt_without_channel_and_nova_quiesce(lvguests, lvwork):
    """No guest agent channel: `auto` says so in the manifest. The same domain then asks for
    quiescing (os_require_quiesce put into its metadata, as Nova would from the image): it cannot
    be frozen, so its backup fails and commits nothing."""
    import libvirt
    g = lvguests("nochan", agent=False)
    ek = ekko_in(lvwork, "nochan")
    name = g.dom.name()
    b = ek.backup(name)
    assert b["consistency"] == {"level": "crash",
                                "reason": "the domain has no guest agent channel (org.qemu.guest_agent.0)"}, b
    g.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<os_require_quiesce>yes</os_require_quiesce>",
                      "ekko", "urn:ekko:test", libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    before = ek.run("list", name, json_out=True).data["backups"]
    p = ek.run("backup", name, check=False)
    assert p.returncode == 1, p.stderr
    assert "consistency: filesystem, but the guest cannot be frozen (the domain has no guest agent channel" \
        in p.stderr, p.stderr
    assert ek.run("list", name, json_out=True).data["backups"] == before
    assert not g.dom.listAllCheckpoints(), "a refused backup left a checkpoint"
    g.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, "urn:ekko:test",
                      libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    c = ek.backup(name)                 # nothing lost: the chain goes on from the last committed backup
    assert c["kind"] == "incremental" and c["parent"] == b["backup_id"], c
    assert c["consistency"]["level"] == "crash", c

    # A Nova project's policy (projects.<id>.consistency) reaches the domains of that project: the
    # project is the one Nova's metadata in the domain names. Another project's policy does not.
    nova = ("<instance><owner><user uuid='u1'>alice</user>"
            "<project uuid='5b0c2f8e9d1a4c3b8e7f6a5d4c3b2a10'>db</project></owner></instance>")
    g.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, nova, "nova",
                      "http://openstack.org/xmlns/libvirt/nova/1.1", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    strict = ekko_in(lvwork, "nochan", projects={"5b0c2f8e9d1a4c3b8e7f6a5d4c3b2a10": {"consistency": "filesystem"}})
    p = strict.run("backup", name, check=False)
    assert p.returncode == 1, p.stderr
    assert "consistency: filesystem, but the guest cannot be frozen" in p.stderr, p.stderr
    assert not g.dom.listAllCheckpoints(), "a refused backup left a checkpoint"
    other = ekko_in(lvwork, "nochan", projects={"0000aaaa": {"consistency": "filesystem"}})
    d = other.backup(name)
    assert d["consistency"]["level"] == "crash", d

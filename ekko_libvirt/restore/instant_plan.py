"""Instant restore, the pure part: the new domain's XML, the job record, and what the supervisor
does next. No I/O here (instant.py starts things, supervisor.py watches them).

The new domain's disks are local qcow2 overlays whose backing is the backup's NBD export:

    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' error_policy='stop' rerror_policy='stop'/>
      <source file='DIR/vda.qcow2'/>
      <backingStore type='network'>
        <format type='raw'/>
        <source protocol='nbd'><host transport='unix' socket='DIR/vda.nbd.sock'/></source>
        <backingStore/>
      </backingStore>
      ...

The same backing is in the overlay's qcow2 header (nbd+unix://, backing format raw), so the file
alone says what it needs. error_policy/rerror_policy 'stop': an export that goes away pauses the
guest (reason I/O error) instead of showing it an error; QEMU retries the failed request on resume
and its NBD client reconnects to the socket then. libvirt's blockPull (QMP block-stream) copies
the backing into the overlay while the guest runs; once it completes, libvirt drops the
<backingStore> and QEMU rewrites the header: the domain no longer needs the export.

The supervisor's decision (decide) from one look at the world (World):

    domain gone (undefined)                    -> abandon: stop the servers
    every disk without its NBD backing         -> complete: stop the servers
    a disk still backed, its server dead       -> restart that server (same socket)
    paused on an I/O error, every server up    -> resume the guest (not twice within RESUME_GAP_S)
    running, a backed disk with no block job   -> start its pull (a failed pull, after the server
                                                  died, is started again: block-stream skips what
                                                  the overlay already holds)
    shut off                                   -> keep the servers; pull when it runs again
"""

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

RESUME_GAP_S = 1.0      # QEMU's NBD client reconnects on the first request after a resume, which may
                        # fail and pause the guest again: the next resume, a second later, finds it up
PHASES = ("starting", "streaming", "complete", "abandoned", "failed")


# --- the record of one instant restore (state_dir/instant/NAME.json) -----------------------------

@dataclass
class InstantDisk:
    dev: str
    namespace: Optional[str]
    key: str                        # the manifest served as this disk's backing
    overlay: str
    socket: str
    log: str                        # the server's log (nbdkit + plugin)
    virtual_size: int
    server_pid: Optional[int] = None
    server_ticks: Optional[int] = None
    cur: int = 0                    # the block job's progress, as libvirt last said
    end: int = 0
    done: bool = False              # the disk no longer has the NBD backing


@dataclass
class InstantJob:
    domain: str
    uuid: str
    backup_id: str
    directory: str
    config: str                     # the config file the supervisor and the servers read
    bandwidth: int                  # bytes/s for each pull; 0: unlimited
    started: float
    disks: List[InstantDisk] = field(default_factory=list)
    phase: str = "starting"
    finished: Optional[float] = None
    message: Optional[str] = None
    supervisor_pid: Optional[int] = None
    supervisor_ticks: Optional[int] = None
    server_restarts: int = 0
    guest_resumes: int = 0
    pulls_started: int = 0
    last_resume: Optional[float] = None
    timings: Dict[str, float] = field(default_factory=dict)     # step -> s since the command started

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "InstantJob":
        d = dict(d)
        disks = [InstantDisk(**x) for x in d.pop("disks", [])]
        return cls(disks=disks, **d)

    def progress(self) -> Tuple[int, int]:
        """(bytes pulled, bytes in all) over the disks; a finished disk counts whole."""
        total = sum(x.virtual_size for x in self.disks)
        done = sum(x.virtual_size if x.done else min(x.cur, x.virtual_size) for x in self.disks)
        return done, total


def check_name(name: str) -> None:
    """NEWNAME names files (the job record, logs): one plain path component, printable. ValueError."""
    if not name or name.startswith(".") or "/" in name or any(not c.isprintable() for c in name) \
            or len(name.encode()) > 200:
        raise ValueError(f"--define {name!r}: a domain name for an instant restore must be one printable path "
                         "component, not starting with '.', at most 200 bytes")


# --- the new domain's XML -----------------------------------------------------------------------

def overlay_name(dev: str) -> str:
    return f"{dev}.qcow2"


def socket_name(dev: str) -> str:
    return f"{dev}.nbd.sock"


def backing_uri(socket_path: str) -> str:
    return f"nbd+unix:///?socket={socket_path}"


def instant_domain_xml(xml: str, sockets: Dict[str, str]) -> str:
    """`xml` (restored_domain_xml's, its disks on the overlays as qcow2) with each disk in `sockets`
    backed by the NBD export on that socket, and I/O errors stopping the guest."""
    root = ET.fromstring(xml)
    seen = set()
    for d in root.findall("devices/disk"):
        target = d.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in sockets:
            continue
        seen.add(dev)
        drv = d.find("driver")
        if drv is None or drv.get("type") != "qcow2":
            raise ValueError(f"disk {dev}: an instant restore's overlay must be qcow2")
        drv.set("error_policy", "stop")
        drv.set("rerror_policy", "stop")
        for el in d.findall("backingStore"):
            d.remove(el)
        bs = ET.Element("backingStore", {"type": "network"})
        ET.SubElement(bs, "format", {"type": "raw"})
        src = ET.SubElement(bs, "source", {"protocol": "nbd"})
        ET.SubElement(src, "host", {"transport": "unix", "socket": sockets[dev]})
        ET.SubElement(bs, "backingStore")
        source = d.find("source")
        d.insert(list(d).index(source) + 1 if source is not None else len(d), bs)
    missing = sorted(set(sockets) - seen)
    if missing:
        raise ValueError(f"the domain XML has no disk {', '.join(missing)}")
    return ET.tostring(root, encoding="unicode")


def nbd_backed(xml: str, sockets: Dict[str, str]) -> Set[str]:
    """The devs whose disk in `xml` (a domain's live or inactive XML) still has our NBD export
    (the socket of that dev) anywhere in its backing chain."""
    root = ET.fromstring(xml)
    out = set()
    for d in root.findall("devices/disk"):
        target = d.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in sockets:
            continue
        for host in d.iter("host"):
            if host.get("socket") == sockets[dev]:
                out.add(dev)
    return out


# --- the supervisor's decision -------------------------------------------------------------------

@dataclass(frozen=True)
class DiskState:
    dev: str
    backed: bool                   # still depends on the export
    server_alive: bool
    job: Optional[Tuple[int, int]]  # (cur, end) of its block job, None: no job


@dataclass(frozen=True)
class World:
    domain_exists: bool
    active: bool
    paused_on_io_error: bool
    disks: Tuple[DiskState, ...]
    now: float
    last_resume: Optional[float]


@dataclass(frozen=True)
class Action:
    kind: str                      # restart_server, resume, start_pull, stop_server, complete, abandon
    dev: Optional[str] = None


def decide(w: World) -> List[Action]:
    """The next steps, in the order they are to be taken (servers before the guest's resume)."""
    if not w.domain_exists:
        return [Action("stop_server", d.dev) for d in w.disks if d.server_alive] + [Action("abandon")]
    backed = [d for d in w.disks if d.backed]
    if not backed:
        return [Action("stop_server", d.dev) for d in w.disks if d.server_alive] + [Action("complete")]
    out = [Action("stop_server", d.dev) for d in w.disks if not d.backed and d.server_alive]
    out += [Action("restart_server", d.dev) for d in backed if not d.server_alive]
    if not w.active:
        return out
    if w.paused_on_io_error and (w.last_resume is None or w.now - w.last_resume >= RESUME_GAP_S):
        out.append(Action("resume"))
    out += [Action("start_pull", d.dev) for d in backed if d.job is None]
    return out


def describe(job: InstantJob, supervisor_alive: bool, servers_alive: Sequence[bool]) -> str:
    """One line for `ekko status`."""
    done, total = job.progress()
    pct = 100.0 * done / total if total else 100.0
    parts = [f"instant restore {job.domain} from {job.backup_id}: {job.phase}"]
    if job.phase in ("starting", "streaming"):
        parts.append(f"{pct:.1f}% pulled")
        parts.append(f"supervisor {'pid ' + str(job.supervisor_pid) if supervisor_alive else 'NOT running'}")
        parts.append(f"servers {sum(servers_alive)}/{len(servers_alive)} up")
    if job.server_restarts or job.guest_resumes:
        parts.append(f"{job.server_restarts} server restart(s), {job.guest_resumes} guest resume(s)")
    if job.message:
        parts.append(job.message)
    return "; ".join(parts)

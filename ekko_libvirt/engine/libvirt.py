"""libvirt engine: checkpoints + virDomainBackupBegin in pull mode (NBD over a unix socket).

Generations are libvirt checkpoints named '<prefix><backup_id>', so their bitmaps carry the same
names the QMP engine uses: a chain moves between online (libvirt) and offline (qemu-storage-
daemon) backups unchanged. Nova compatibility: between backups no checkpoint metadata stays on
the domain (Nova's undefine does not pass the checkpoints flag); the agent keeps the checkpoint
XML in its state and redefines it, validated, right before the next backup.
"""

import contextlib
import logging
import os
import pwd
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import libvirt

from ..durable import read_json, write_json_atomic
from ..errors import EngineError, UsageError
from . import domain_xml as dx
from .base import BitmapInfo, ChainRefused, DiskInfo, Export, Recovered
from .bitmaps import INCREMENTAL, GenerationPlan, generation_name
from .freeze import AgentAccess, Quiescer
from .guest_agent import LibvirtAgent, channel_state
from .reaper import Reaper

log = logging.getLogger(__name__)

QEMU_USER = "libvirt-qemu"


def lookup_domain(conn, ref: str):
    """A domain by name or UUID, like virsh."""
    for finder in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return finder(ref)
        except libvirt.libvirtError:
            continue
    raise UsageError(f"no libvirt domain {ref!r} (name or UUID) on {conn.getURI()}")


def _err(e: libvirt.libvirtError) -> str:
    return e.get_error_message() or str(e)


def qemu_accessible_dir(path: str) -> str:
    """A directory QEMU (user libvirt-qemu under the DAC driver) can create sockets and files in."""
    os.makedirs(path, mode=0o711, exist_ok=True)
    try:
        pw = pwd.getpwnam(QEMU_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    except KeyError:
        pass
    os.chmod(path, 0o711)
    return path


@dataclass
class PullJobRecord:
    """Written before backupBegin; removed when the job is settled. A record found at start
    means an agent died mid-backup: abort the job, drop the new checkpoint, keep the old one."""
    domain_uuid: str
    new_checkpoint: str
    base_checkpoint: Optional[str]
    started: float
    reaper_pid: Optional[int] = None    # the process that ends the job should this run die (reaper.py)


class CheckpointState:
    """The checkpoint XML libvirt gave us, kept while no metadata is left on the domain."""

    def __init__(self, state_dir: str):
        self.dir = os.path.join(state_dir, "libvirt")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _path(self, uuid: str, kind: str) -> str:
        return os.path.join(self.dir, f"{uuid}.{kind}.json")

    def _write(self, path: str, data: dict) -> None:
        write_json_atomic(path, data)

    def _read(self, path: str) -> Optional[dict]:
        try:
            return read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring damaged state file %s", path)
            return None

    def save_checkpoint(self, uuid: str, name: str, xml: str) -> None:
        self._write(self._path(uuid, "checkpoint"), {"name": name, "xml": xml})

    def checkpoint_xml(self, uuid: str, name: str) -> Optional[str]:
        d = self._read(self._path(uuid, "checkpoint"))
        return d["xml"] if d and d.get("name") == name else None

    def save_job(self, job: PullJobRecord) -> None:
        self._write(self._path(job.domain_uuid, "job"), job.__dict__)

    def job(self, uuid: str) -> Optional[PullJobRecord]:
        d = self._read(self._path(uuid, "job"))
        return PullJobRecord(**d) if d else None

    def drop_job(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(uuid, "job"))

    def job_uuids(self) -> List[str]:
        """Domains with a job record: a backup runs, or its process died mid-way."""
        return sorted(n[:-len(".job.json")] for n in os.listdir(self.dir) if n.endswith(".job.json"))


class Checkpoints:
    """A domain's checkpoints as ekko uses them: redefined before a backup, forgotten (metadata
    only) after it, deleted with their bitmaps when retired; the job record of a running backup."""

    def __init__(self, dom, state: CheckpointState, prefix: str):
        self.dom = dom
        self.state = state
        self.prefix = prefix
        self.uuid = dom.UUIDString()

    # -- checkpoints ----------------------------------------------------------------------------
    def _checkpoint(self, name: str):
        try:
            return self.dom.checkpointLookupByName(name)
        except libvirt.libvirtError:
            return None

    def our_checkpoints(self) -> List[str]:
        return [c.getName() for c in self.dom.listAllCheckpoints() if c.getName().startswith(self.prefix)]

    def redefine(self, name: str, devs_with_bitmap: List[str], other_devs: List[str], created: float) -> Optional[str]:
        """Put checkpoint `name` back into libvirt's metadata, validated against the bitmaps in
        the images. -> None when the chain can be trusted, else the reason it cannot."""
        self.forget(name)
        saved = self.state.checkpoint_xml(self.uuid, name)
        xml = dx.without_parent(saved) if saved else dx.checkpoint_xml(name, devs_with_bitmap, other_devs,
                                                                       created=int(created))
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        try:
            self.dom.checkpointCreateXML(xml, flags)
            return None
        except libvirt.libvirtError as e:
            reason = f"checkpoint {name} cannot be trusted: {_err(e)}"
        self._discard_untrusted(name, xml)
        return reason

    def _discard_untrusted(self, name: str, xml: str) -> None:
        """Our generation failed validation (e.g. its bitmap is inconsistent after QEMU was
        killed): it can never be used again. Redefine it without validation and delete it with
        its bitmaps, so no dead bitmap of ours lingers in the images. Best effort: if libvirt
        refuses, the new chain still starts; the stale bitmap only costs space."""
        try:
            self.dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        except libvirt.libvirtError as e:
            log.warning("could not redefine untrusted checkpoint %s to delete it: %s", name, _err(e))
            return
        note = self.delete(name)
        if note:
            log.warning("%s", note)

    def forget(self, name: str) -> None:
        """Drop a checkpoint's metadata only: its bitmaps stay in the images (Nova-safe)."""
        cp = self._checkpoint(name)
        if cp is not None:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    def delete(self, name: str) -> Optional[str]:
        """Delete a checkpoint with its bitmaps. -> a note when only the metadata could go."""
        cp = self._checkpoint(name)
        if cp is None:
            return None
        try:
            cp.delete(0)
            return None
        except libvirt.libvirtError as e:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            return f"checkpoint {name}: only its metadata could be deleted ({_err(e)})"

    def save_and_forget(self, name: str) -> None:
        cp = self._checkpoint(name)
        if cp is None:
            return
        self.state.save_checkpoint(self.uuid, name, cp.getXMLDesc(0))
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    # -- the pull-mode job ---------------------------------------------------------------------
    def begin_job(self, backup_xml: str, checkpoint_xml: str) -> None:
        try:
            self.dom.backupBegin(backup_xml, checkpoint_xml, 0)
        except libvirt.libvirtError as e:
            raise BackupBeginFailed(self.dom.name(), e) from e

    def job_active(self) -> bool:
        return job_active(self.dom)

    def end_job(self, timeout: float = 60.0) -> None:
        """End the pull backup (libvirt removes export, socket and scratch files)."""
        if not self.job_active():
            return
        try:
            self.dom.abortJob()
        except libvirt.libvirtError as e:
            if self.job_active():
                raise EngineError(f"domain {self.dom.name()}: cannot end the backup job: {_err(e)}") from e
        deadline = time.monotonic() + timeout
        while self.job_active():
            if time.monotonic() > deadline:
                raise EngineError(f"domain {self.dom.name()}: backup job still active {timeout:.0f} s after abort")
            time.sleep(0.05)

    def recover_job(self) -> List[str]:
        """Settle what a dead agent left: its job is aborted, its new checkpoint deleted (its
        writes are in the old generation, which kept recording), the old one forgotten."""
        notes: List[str] = []
        job = self.state.job(self.uuid)
        if job is None:
            return notes
        self.end_job()
        notes.append(f"aborted the backup job of an interrupted run (checkpoint {job.new_checkpoint})")
        note = self.delete(job.new_checkpoint)
        if note:
            notes.append(note)
        if job.base_checkpoint:
            self.forget(job.base_checkpoint)
        self.state.drop_job(self.uuid)
        return notes


class BackupBeginFailed(EngineError):
    def __init__(self, domain: str, e: libvirt.libvirtError):
        self.code = e.get_error_code()
        self.inconsistent = self.code == getattr(libvirt, "VIR_ERR_CHECKPOINT_INCONSISTENT", -1)
        super().__init__(f"domain {domain}: backup could not start: {_err(e)}")


def job_active(dom) -> bool:
    """Whether the domain has a backup job (ours or anyone's)."""
    try:
        dom.backupGetXMLDesc(0)
        return True
    except libvirt.libvirtError:
        return False


def disk_sizes(dom, devs: List[str]) -> Dict[str, int]:
    return {d: int(dom.blockInfo(d)[0]) for d in devs}


class LibvirtEngine:
    """The engine of a running domain: checkpoints + one pull-mode backup job for all its disks
    (engine/base.py). `disks`: the domain's disks to back up; their store targets are
    <domain>.<dev> (domain_xml.target_name)."""

    def __init__(self, dom, disks: Sequence[dx.DomainDisk], state_dir: str, run_dir: str, prefix: str,
                 granularity: int):
        self.dom = dom
        self.uuid = dom.UUIDString()
        self.state = CheckpointState(state_dir)
        self.cps = Checkpoints(dom, self.state, prefix)
        self.prefix = prefix
        self.granularity = granularity
        self.disks = {dx.target_name(dom.name(), d.dev): d for d in disks}
        self.run_dir, self.state_dir = run_dir, state_dir
        self.base_cp: Optional[str] = None
        self.chains: Mapping = {}

    def close(self) -> None:
        pass

    @property
    def scratch_dir(self) -> str:
        return qemu_accessible_dir(os.path.join(self.state_dir, "scratch"))

    def _capable(self) -> List[str]:
        return [t for t, d in self.disks.items() if d.bitmap_capable]

    def guest_agent(self, timeout: float) -> AgentAccess:
        """The domain's guest agent, when its XML has the channel and libvirt sees it connected."""
        ok, why = channel_state(self.dom.XMLDesc(0))
        return AgentAccess(LibvirtAgent(self.dom, timeout)) if ok else AgentAccess(None, why)

    def recover(self, chains: Mapping) -> Recovered:
        """Settle a dead run's job (job record), then redefine and validate the checkpoint every
        qcow2 disk's chain ends in: one checkpoint for all, or no incremental for any."""
        self.chains = chains
        notes = self.cps.recover_job()
        capable = [t for t in self._capable() if chains[t].head is not None]
        heads = {chains[t].head.bitmap for t in capable if chains[t].head.bitmap}
        self.base_cp, reason = None, None
        if len(heads) > 1:
            reason = f"the disks' chains end in different checkpoints ({', '.join(sorted(heads))})"
        elif heads:
            name = heads.pop()
            created = min(chains[t].entry.header.get("timings", {}).get("started", 0) for t in capable
                          if chains[t].head.bitmap == name)
            reason = self.cps.redefine(name, [self.disks[t].dev for t in self._capable()],
                                       [d.dev for t, d in self.disks.items() if not d.bitmap_capable], created)
            self.base_cp = None if reason else name
        return Recovered(notes, {t: reason for t in capable})

    def inspect(self) -> Dict[str, DiskInfo]:
        """What libvirt lets us see: size and format per disk; the validated base checkpoint
        stands for the bitmap of every qcow2 disk whose chain ends in it (libvirt keeps it
        recording and consistent, or refuses it at redefinition or at begin)."""
        sizes = disk_sizes(self.dom, [d.dev for d in self.disks.values()])
        out: Dict[str, DiskInfo] = {}
        for t, d in self.disks.items():
            head = self.chains[t].head if t in self.chains else None
            bitmaps: Tuple[BitmapInfo, ...] = ()
            if self.base_cp and head is not None and head.bitmap == self.base_cp and d.bitmap_capable:
                bitmaps = (BitmapInfo(self.base_cp, head.granularity or self.granularity, recording=True, busy=False,
                                      inconsistent=False, persistent=True),)
            out[t] = DiskInfo(node=d.dev, filename=d.source, format=d.format if d.bitmap_capable else d.format or "raw",
                              virtual_size=sizes[d.dev], bitmaps=bitmaps)
        return out

    def abandon(self) -> None:
        """The base checkpoint recover() redefined goes again (metadata only: its bitmaps stay and
        the next run redefines it); left defined, it is what Nova's undefine of the domain trips on."""
        if self.base_cp:
            self.cps.forget(self.base_cp)
            self.base_cp = None

    def begin(self, plans: Mapping[str, GenerationPlan], sizes: Mapping[str, int], backup_id: str,
              quiesce: Optional[Quiescer] = None) -> "LibvirtSession":
        new_cp = generation_name(self.prefix, backup_id)
        base_cp = self.base_cp if any(p.kind == INCREMENTAL for p in plans.values()) else None
        bitmap_devs = [self.disks[t].dev for t in self._capable()]
        other_devs = [d.dev for d in self.disks.values() if not d.bitmap_capable]
        sock_dir = qemu_accessible_dir(os.path.join(self.run_dir, f"lv-{self.uuid[:8]}"))
        socket = os.path.join(sock_dir, "backup.sock")
        specs = [dx.DiskBackupSpec(d.dev, incremental_from=base_cp if plans[t].kind == INCREMENTAL else None,
                                   scratch=os.path.join(self.scratch_dir, f"{self.uuid}.{d.dev}.scratch.qcow2"),
                                   checkpoint=d.bitmap_capable) for t, d in self.disks.items()]
        # should this process die (SIGKILL, the OOM killer), the reaper ends libvirt's job at once:
        # its copy-before-write must not go on filling the scratch until the next run
        reaper = Reaper({"kind": "libvirt", "name": self.dom.name(), "uri": self.dom.connect().getURI(),
                         "uuid": self.uuid}, os.path.join(self.state.dir, f"{self.uuid}.reaper.log")).start()
        try:
            self.state.save_job(PullJobRecord(self.uuid, new_cp, base_cp, time.time(), reaper.pid))
            # frozen for backupBegin only (new checkpoint + view); a failure thaws before the undo below
            with quiesce.window() if quiesce is not None else contextlib.nullcontext():
                self.cps.begin_job(dx.backup_xml(specs, socket), dx.checkpoint_xml(new_cp, bitmap_devs, other_devs))
        except BaseException as e:
            self.state.drop_job(self.uuid)
            if base_cp:
                self.cps.forget(base_cp)
            reaper.done()
            if isinstance(e, BackupBeginFailed) and e.inconsistent:
                raise ChainRefused(str(e)) from e
            raise
        exports = {t: Export(socket, d.dev, dx.dirty_context(d.dev) if plans[t].kind == INCREMENTAL else None)
                   for t, d in self.disks.items()}
        known = frozenset().union(*(c.known for c in self.chains.values())) if self.chains else frozenset()
        return LibvirtSession(self, exports, new_cp, base_cp, known, reaper)


class LibvirtSession:
    def __init__(self, engine: LibvirtEngine, exports: Dict[str, Export], new_cp: str, base_cp: Optional[str],
                 known: frozenset, reaper: Reaper):
        self.engine, self.exports = engine, exports
        self.new_cp, self.base_cp, self.known = new_cp, base_cp, known
        self.reaper: Optional[Reaper] = reaper

    def close_exports(self) -> None:
        """End the pull job: libvirt removes export, socket and scratch files."""
        self.engine.cps.end_job()

    def commit(self) -> List[str]:
        """Every manifest is committed: retire the base checkpoint with its bitmaps, and older
        generations of ours; keep the new checkpoint's XML and drop its metadata (Nova)."""
        cps, notes = self.engine.cps, []
        try:
            if self.base_cp:
                note = cps.delete(self.base_cp)
                if note:
                    notes.append(note)
            for name in cps.our_checkpoints():
                # only names ekko created for these disks: a user's ekko-foo stays
                if name != self.new_cp and name in self.known:
                    notes.append(cps.delete(name) or f"deleted stale checkpoint {name}")
            cps.save_and_forget(self.new_cp)
            self.engine.state.drop_job(self.engine.uuid)
        finally:
            self._settle()
        return notes

    def abort(self) -> None:
        """The new checkpoint goes; the old one recorded every write too. The job record stays
        when the undo fails: the next run's recover finishes it."""
        cps = self.engine.cps
        try:
            try:
                cps.end_job()
            finally:
                cps.delete(self.new_cp)
                if self.base_cp:
                    cps.forget(self.base_cp)
            self.engine.state.drop_job(self.engine.uuid)
        finally:
            self._settle()

    def _settle(self) -> None:
        if self.reaper is not None:
            self.reaper.done()
            self.reaper = None

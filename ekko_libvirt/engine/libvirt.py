"""libvirt engine: checkpoints + virDomainBackupBegin in pull mode (NBD over a unix socket).

Generations are libvirt checkpoints named '<prefix><backup_id>', so their bitmaps carry the same
names the QMP engine uses: a chain moves between online (libvirt) and offline (qemu-storage-
daemon) backups unchanged. Nova compatibility: between backups no checkpoint metadata stays on
the domain (Nova's undefine does not pass the checkpoints flag); the agent keeps the checkpoint
XML in its state and redefines it, validated, right before the next backup.
"""

import contextlib
import json
import logging
import os
import pwd
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import libvirt

from ..errors import EngineError, UsageError
from . import domain_xml as dx

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
class JobRecord:
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
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _read(self, path: str) -> Optional[dict]:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring damaged state file %s", path)
            return None

    def save_checkpoint(self, uuid: str, name: str, xml: str) -> None:
        self._write(self._path(uuid, "checkpoint"), {"name": name, "xml": xml})

    def checkpoint_xml(self, uuid: str, name: str) -> Optional[str]:
        d = self._read(self._path(uuid, "checkpoint"))
        return d["xml"] if d and d.get("name") == name else None

    def save_job(self, job: JobRecord) -> None:
        self._write(self._path(job.domain_uuid, "job"), job.__dict__)

    def job(self, uuid: str) -> Optional[JobRecord]:
        d = self._read(self._path(uuid, "job"))
        return JobRecord(**d) if d else None

    def drop_job(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(uuid, "job"))

    def job_uuids(self) -> List[str]:
        """Domains with a job record: a backup runs, or its process died mid-way."""
        return sorted(n[:-len(".job.json")] for n in os.listdir(self.dir) if n.endswith(".job.json"))


class LibvirtDomainEngine:
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
    def begin(self, backup_xml: str, checkpoint_xml: str) -> None:
        try:
            self.dom.backupBegin(backup_xml, checkpoint_xml, 0)
        except libvirt.libvirtError as e:
            raise BackupBeginFailed(self.dom.name(), e) from e

    def job_active(self) -> bool:
        try:
            self.dom.backupGetXMLDesc(0)
            return True
        except libvirt.libvirtError:
            return False

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

    def recover(self) -> List[str]:
        """Settle what a dead agent left: its job is aborted, its new checkpoint deleted (its
        writes are in the old generation, which kept recording), the old one forgotten."""
        notes = []
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


def disk_sizes(dom, devs: List[str]) -> Dict[str, int]:
    return {d: int(dom.blockInfo(d)[0]) for d in devs}

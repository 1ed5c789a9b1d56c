"""QMP engine: a disk of a plain QEMU or qemu-storage-daemon, reached over its QMP socket.

Point-in-time view (QEMU >= 7.1): copy-before-write through a sync=none backup job into a
sparse fleece file, read back through a snapshot-access node, exported over NBD with the
previous generation's bitmap. The generation switch and the start of the view are one
transaction, so no write can fall between them.

Every resource has a deterministic name derived from the target, and the set we created is
journaled on disk before it is created: a killed ekko leaves a journal, and the next run's
recover() tears down exactly that and merges bitmap generations back.
"""

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import xxhash

from ..errors import DiskNotFound, EngineError
from .base import BitmapInfo, DiskInfo, Export
from .bitmaps import GenerationPlan, Interrupted, plan_recovery
from .qmp_client import QMPCommandError, QMPConnection, QMPDisconnected
from .reaper import Reaper

log = logging.getLogger(__name__)
EXPORT_NAME = "ekko"


@dataclass(frozen=True)
class QMPTarget:
    name: str                 # the config's target name
    socket: str               # QMP socket path
    node: str                 # format node name of the disk
    scratch_dir: str          # fleece files
    run_dir: str              # NBD sockets and journals
    bitmap_prefix: str = "ekko-"
    timeout: float = 30.0


@dataclass(frozen=True)
class Names:
    fleece_node: str
    cbw_node: str
    snap_node: str
    job: str
    export_id: str
    fleece_file: str
    socket: str
    journal: str

    @classmethod
    def for_target(cls, t: QMPTarget) -> "Names":
        tag = xxhash.xxh64_hexdigest(f"{t.socket}|{t.node}")[:10]
        return cls(f"ekfl{tag}", f"ekcbw{tag}", f"eksnap{tag}", f"ekjob{tag}", f"ekexp{tag}",
                   os.path.join(t.scratch_dir, f"{tag}.fleece"), os.path.join(t.run_dir, f"{tag}.nbd"),
                   os.path.join(t.run_dir, f"{tag}.journal.json"))


def switch_actions(plan: GenerationPlan, node: str, names: Names) -> List[dict]:
    """The one transaction: new generation + freeze of the old one + point-in-time view."""
    actions = []
    if plan.new_bitmap:
        actions.append({"type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": plan.new_bitmap, "persistent": True, "granularity": plan.granularity}})
    if plan.base_bitmap:
        actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": plan.base_bitmap}})
    actions.append({"type": "blockdev-backup", "data": {
        "job-id": names.job, "device": node, "target": names.fleece_node, "sync": "none",
        "filter-node-name": names.cbw_node, "auto-dismiss": True}})
    return actions


def merge_back_actions(plan: GenerationPlan, node: str) -> List[dict]:
    """Undo the switch: the old generation records again and absorbs what the new one saw."""
    actions = []
    if plan.base_bitmap:
        actions.append({"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": plan.base_bitmap}})
        if plan.new_bitmap:
            actions.append({"type": "block-dirty-bitmap-merge", "data": {
                "node": node, "target": plan.base_bitmap, "bitmaps": [plan.new_bitmap]}})
    if plan.new_bitmap:
        actions.append({"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": plan.new_bitmap}})
    return actions


def retire_actions(plan: GenerationPlan, node: str) -> List[dict]:
    return [{"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}} for name in plan.retire]


class QMPEngine:
    def __init__(self, target: QMPTarget, reaper: bool = True):
        """`reaper`: start one per backup (reaper.py). Off where a reaper of the whole QEMU ends
        the view anyway: an offline backup's qemu-storage-daemon (offline.py)."""
        self.t = target
        self.use_reaper = reaper
        self.names = Names.for_target(target)
        self.qmp = QMPConnection(target.socket, target.timeout).connect(timeout=min(10.0, target.timeout))

    def close(self) -> None:
        self.qmp.close()

    # -- inspection -------------------------------------------------------------------------
    def inspect(self) -> DiskInfo:
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True})
        for n in nodes:
            if n.get("node-name") == self.t.node:
                return _disk_info(n)
        names = sorted(n.get("node-name", "") for n in nodes if not n.get("node-name", "").startswith("ek"))
        raise DiskNotFound(f"target {self.t.name}: no block node {self.t.node!r} in QEMU at {self.t.socket} "
                           f"(nodes there: {', '.join(names) or 'none'})")

    # -- crash recovery ---------------------------------------------------------------------
    def recover(self, committed_generation: Optional[str], known: frozenset = frozenset()):
        """Tear down what a killed run left (by journal and by our deterministic names), then
        settle the bitmaps (bitmaps.plan_recovery): `known` are the generation names of this
        target's backups (bitmaps.known_generations); the journal adds what the killed run
        created and disabled. Returns (notes, broken_reason)."""
        notes = []
        journal = self._read_journal()
        if journal is not None or self._leftovers():
            self._teardown(started_server=bool(journal and journal.get("started_server")), quiet=True)
            notes.append("removed the NBD export and fleecing nodes of an interrupted backup")
        rec = plan_recovery(self.inspect(), committed_generation, self.t.bitmap_prefix,
                            interrupted=_interrupted(journal), known=known)
        if rec.actions:
            self.qmp.execute("transaction", {"actions": list(rec.actions)})
        notes.extend(rec.notes)
        self._drop_journal()
        return notes, rec.broken_reason

    def release_view(self) -> None:
        """What the reaper (reaper.py) does for a killed run: remove the export, nodes, job and
        fleece the journal names. The generations and the journal stay for recover()."""
        journal = self._read_journal()
        if journal is None and not self._leftovers():
            return
        self._teardown(started_server=bool(journal and journal.get("started_server")), quiet=True)

    def _leftovers(self) -> bool:
        node_names = {n.get("node-name") for n in self.qmp.execute("query-named-block-nodes", {"flat": True})}
        jobs = {j.get("device") for j in self.qmp.execute("query-block-jobs")}
        exports = {e.get("id") for e in self.qmp.execute("query-block-exports")}
        n = self.names
        return bool({n.fleece_node, n.snap_node, n.cbw_node} & node_names or n.job in jobs
                    or n.export_id in exports or os.path.exists(n.fleece_file))

    def _read_journal(self) -> Optional[dict]:
        try:
            with open(self.names.journal) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable journal %s: %s", self.names.journal, e)
            return {}

    def _write_journal(self, data: dict) -> None:
        tmp = self.names.journal + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.names.journal)

    def _drop_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.names.journal)

    @property
    def scratch_dir(self) -> str:
        """Where the fleece file grows (scratch.ScratchGuard watches its file system)."""
        return self.t.scratch_dir

    # -- the backup session -----------------------------------------------------------------
    def begin(self, plan: GenerationPlan, virtual_size: int) -> "QMPSession":
        os.makedirs(self.t.scratch_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.t.run_dir, mode=0o700, exist_ok=True)
        journal = {"target": self.t.name, "plan": plan.__dict__, "started_server": False}
        self._write_journal(journal)
        session = QMPSession(self, plan)
        if self.use_reaper:
            session.reaper = Reaper({"kind": "qmp", "name": self.t.name, "target": dataclasses.asdict(self.t)},
                                    self.names.journal + ".reaper.log").start()
            journal["reaper_pid"] = session.reaper.pid
        try:
            self._create_fleece(virtual_size)
            self.qmp.drain_events()
            self.qmp.execute("transaction", {"actions": switch_actions(plan, self.t.node, self.names)})
            session.switched = True
            self.qmp.execute("blockdev-add", {"driver": "snapshot-access", "node-name": self.names.snap_node,
                                              "file": self.names.cbw_node})
            journal["started_server"] = self._start_nbd_server()
            self._write_journal(journal)
            session.started_server = journal["started_server"]
            self._add_export(plan)
        except BaseException:
            session.abort()
            raise
        return session

    def _create_fleece(self, size: int) -> None:
        # Sparse: it only grows by the clusters the guest overwrites while the backup runs.
        fd = os.open(self.names.fleece_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self.qmp.execute("blockdev-add", {"driver": "file", "node-name": self.names.fleece_node,
                                          "filename": self.names.fleece_file})

    def _start_nbd_server(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.names.socket)
        try:
            self.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.names.socket}}})
            return True
        except QMPCommandError as e:
            raise EngineError(f"target {self.t.name}: cannot start an NBD server in QEMU ({e.desc}). "
                              "QEMU allows one NBD server: if libvirt or another tool runs one, "
                              "use the libvirt engine for this disk.") from e

    def _add_export(self, plan: GenerationPlan) -> None:
        args = {"type": "nbd", "id": self.names.export_id, "node-name": self.names.snap_node,
                "name": EXPORT_NAME, "writable": False}
        if plan.export_bitmap:
            args["bitmaps"] = [{"node": self.t.node, "name": plan.export_bitmap}]
        self.qmp.execute("block-export-add", args)

    def _teardown(self, started_server: bool, quiet: bool = False) -> None:
        """Remove export, snapshot node, job, fleece node, NBD server, fleece file; each step
        only if present, so it is safe after any partial begin() and after a crash."""
        n = self.names
        steps = [self._del_export, lambda: self._blockdev_del(n.snap_node), self._cancel_job,
                 lambda: self._blockdev_del(n.fleece_node)]
        if started_server:
            steps.append(self._stop_nbd_server)
        errors = []
        for step in steps:
            try:
                step()
            except QMPDisconnected as e:
                errors.append(e)
                log.warning("cannot tear down the backup in QEMU, its QMP connection is gone (did QEMU exit?): %s", e)
                break           # every later step would fail the same way
            except EngineError as e:
                errors.append(e)
                log.warning("teardown step failed: %s", e)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(n.fleece_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(n.socket)
        if errors and not quiet:
            raise errors[0]

    def _del_export(self) -> None:
        if not any(e.get("id") == self.names.export_id for e in self.qmp.execute("query-block-exports")):
            return
        self.qmp.execute("block-export-del", {"id": self.names.export_id, "mode": "hard"})
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == self.names.export_id)

    def _blockdev_del(self, node: str) -> None:
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True})
        if any(x.get("node-name") == node for x in nodes):
            self.qmp.execute("blockdev-del", {"node-name": node})

    def _cancel_job(self) -> None:
        if not any(j.get("device") == self.names.job for j in self.qmp.execute("query-block-jobs")):
            return
        self.qmp.execute("block-job-cancel", {"device": self.names.job, "force": True})
        self.qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d.get("device") == self.names.job)

    def _stop_nbd_server(self) -> None:
        with contextlib.suppress(QMPCommandError):
            self.qmp.execute("nbd-server-stop")

    def transaction(self, actions: List[dict]) -> None:
        if actions:
            self.qmp.execute("transaction", {"actions": actions})


class QMPSession:
    def __init__(self, engine: QMPEngine, plan: GenerationPlan):
        self.engine = engine
        self.plan = plan
        self.switched = False
        self.started_server = False
        self.export_closed = False
        self.done = False
        self.reaper = None
        self.export = Export(engine.names.socket, EXPORT_NAME,
                             f"qemu:dirty-bitmap:{plan.export_bitmap}" if plan.export_bitmap else None)

    def close_export(self) -> None:
        if not self.export_closed:
            self.engine._teardown(self.started_server)
            self.export_closed = True

    def commit(self) -> None:
        """Called only after the manifest is durable in the store."""
        self.close_export()
        self.engine.transaction(retire_actions(self.plan, self.engine.t.node))
        self.engine._drop_journal()
        self.done = True
        self._release_reaper()

    def abort(self) -> None:
        if self.done:
            return
        try:
            self.engine._teardown(self.started_server, quiet=True)
            self.export_closed = True
            if self.switched:
                self.engine.transaction(merge_back_actions(self.plan, self.engine.t.node))
            self.engine._drop_journal()
        finally:
            self.done = True
            self._release_reaper()

    def _release_reaper(self) -> None:
        """Settled (committed, or undone as far as QEMU lets us): the reaper has nothing to do."""
        if self.reaper is not None:
            self.reaper.done()
            self.reaper = None


def _interrupted(journal: Optional[dict]) -> Optional[Interrupted]:
    """The generation switch a killed run journaled (None: no run was interrupted, or its
    journal is unreadable: then nothing is re-enabled, and a disabled head means a full)."""
    plan = (journal or {}).get("plan")
    if not isinstance(plan, dict):
        return None
    base, new = plan.get("base_bitmap"), plan.get("new_bitmap")
    return Interrupted(base if isinstance(base, str) else None, new if isinstance(new, str) else None)


def _disk_info(n: dict) -> DiskInfo:
    image = n.get("image", {})
    bitmaps = tuple(
        BitmapInfo(name=b["name"], granularity=int(b.get("granularity", 0)), recording=bool(b.get("recording")),
                   busy=bool(b.get("busy")), inconsistent=bool(b.get("inconsistent")),
                   persistent=bool(b.get("persistent")))
        for b in n.get("dirty-bitmaps", []) or [])
    return DiskInfo(node=n["node-name"], filename=n.get("file") or image.get("filename", ""),
                    format=n.get("drv", image.get("format", "")), virtual_size=int(image.get("virtual-size", 0)),
                    bitmaps=bitmaps)

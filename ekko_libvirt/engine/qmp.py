"""QMP engine: disks of a plain QEMU or of a qemu-storage-daemon, reached over its QMP socket.

Point-in-time view: for each disk, a scratch qcow2 whose backing is the live disk node, filled by
copy-before-write (a sync=none backup job targeting it) before any guest write lands, and
exported over NBD with the previous generation's bitmap: what libvirt's pull backup does. The
generation switches and the starts of the views of ALL disks are one transaction, so no write
can fall between them, on any disk.

Not snapshot-access over copy-before-write (QEMU 7.2's other fleecing): a range the guest zeroes
with write-zeroes after the instant reads as zeros through it, and its block status says ZERO,
while the fleece file holds the old data (found by the chain fuzzer, tests/fuzz; reproduced by
tests/integration/test_silent_loss.py). The scratch qcow2 answers from the clusters it holds.

Every resource has a deterministic name derived from the QMP socket and the node, and what we
create is journaled on disk (one journal per disk) before it is created: a killed ekko leaves the
journals, and the next run's recover() tears down exactly that and merges the generations back.
"""

import contextlib
import dataclasses
import functools
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import xxhash

from ..durable import read_json, write_json_atomic
from ..errors import DiskNotFound, EngineError, UsageError
from .base import DiskInfo, Export, Recovered
from .bitmaps import GenerationPlan, Interrupted, plan_recovery
from .freeze import AgentAccess, Quiescer
from .guest_agent import SocketAgent
from .qmp_client import QMPCommandError, QMPConnection, QMPDisconnected
from .reaper import Reaper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QMPTarget:
    """One disk: a format node of the QEMU at `socket`, backed up as store target `name`."""
    name: str                 # the store target (config target name, or <domain>.<disk>)
    socket: str               # QMP socket path
    node: str                 # format node name of the disk
    scratch_dir: str          # fleece files
    run_dir: str              # NBD sockets and journals
    bitmap_prefix: str = "ekko-"
    timeout: float = 30.0
    guest_agent_socket: str = ""    # the host end of the guest's org.qemu.guest_agent.0 ("": none)


@dataclass(frozen=True)
class Names:
    """What one disk's view is made of, named after the QMP socket and the node."""
    fleece_node: str
    cbw_node: str
    snap_node: str
    job: str
    export_id: str
    export_name: str
    fleece_file: str
    journal: str

    @classmethod
    def for_target(cls, t: QMPTarget) -> "Names":
        tag = xxhash.xxh64_hexdigest(f"{t.socket}|{t.node}")[:10]
        return cls(f"ekfl{tag}", f"ekcbw{tag}", f"eksnap{tag}", f"ekjob{tag}", f"ekexp{tag}", f"ekko-{tag}",
                   os.path.join(t.scratch_dir, f"{tag}.fleece.qcow2"),
                   os.path.join(t.run_dir, f"{tag}.journal.json"))


def server_socket(t: QMPTarget) -> str:
    """The NBD server's socket: one server per QEMU, serving every disk's export."""
    return os.path.join(t.run_dir, f"{xxhash.xxh64_hexdigest(t.socket)[:10]}.nbd")


def switch_actions(plan: GenerationPlan, node: str, names: Names) -> List[dict]:
    """One disk's part of the transaction: new generation + freeze of the old one + view."""
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
    """The disks of one QEMU (one QMP socket), backed up together in one transaction."""

    def __init__(self, targets: Sequence[QMPTarget], reaper: bool = True, no_guest: str = ""):
        """`reaper`: start one per backup (reaper.py). Off where a reaper of the whole QEMU ends
        the view anyway: an offline backup's qemu-storage-daemon (backup/offline.py). `no_guest`:
        why no guest runs on these disks (that same qemu-storage-daemon): nothing to freeze."""
        self.no_guest = no_guest
        if not targets or len({t.socket for t in targets}) != 1:
            raise UsageError("a QMP engine backs up disks of one QEMU: give it one QMP socket")
        self.targets = {t.name: t for t in targets}
        self.first = targets[0]
        self.use_reaper = reaper
        self.names = {t.name: Names.for_target(t) for t in targets}
        self.socket = server_socket(self.first)
        self.qmp = QMPConnection(self.first.socket, self.first.timeout).connect(
            timeout=min(10.0, self.first.timeout))

    def close(self) -> None:
        self.qmp.close()

    @property
    def scratch_dir(self) -> str:
        """Where the fleece files grow (scratch.ScratchGuard watches its file system)."""
        return self.first.scratch_dir

    # -- inspection -------------------------------------------------------------------------
    def inspect(self) -> Dict[str, DiskInfo]:
        nodes = {n.get("node-name"): n for n in self.qmp.execute("query-named-block-nodes", {"flat": True})}
        out: Dict[str, DiskInfo] = {}
        for name, t in self.targets.items():
            n = nodes.get(t.node)
            if n is None:
                others = sorted(k for k in nodes if k and not k.startswith("ek"))
                raise DiskNotFound(f"target {name}: no block node {t.node!r} in QEMU at {t.socket} "
                                   f"(nodes there: {', '.join(others) or 'none'})")
            out[name] = _disk_info(n)
        return out

    def guest_agent(self, timeout: float) -> AgentAccess:
        """The guest agent socket of the targets (one QEMU: one guest, one socket)."""
        if self.no_guest:
            return AgentAccess(None, self.no_guest, guest_running=False)
        sockets = sorted({t.guest_agent_socket for t in self.targets.values() if t.guest_agent_socket})
        if not sockets:
            return AgentAccess(None, f"no guest agent socket configured for {', '.join(self.targets)} "
                               "(targets.<name>.guest_agent_socket)")
        if len(sockets) > 1:
            raise UsageError(f"{', '.join(self.targets)}: disks of one QEMU name different guest agent sockets "
                             f"({', '.join(sockets)})")
        return AgentAccess(SocketAgent(sockets[0], timeout))

    def abandon(self) -> None:
        """recover() only settles (bitmaps and nodes of a dead run): nothing waits for begin()."""

    # -- crash recovery ---------------------------------------------------------------------
    def recover(self, chains: Mapping) -> Recovered:
        """Tear down what a killed run left (by journal and by our deterministic names), then
        settle each disk's bitmaps (bitmaps.plan_recovery) in one transaction. `chains`: the
        transaction's ChainView of each target (its committed generation and known names)."""
        notes: List[str] = []
        journals = {name: self._read_journal(name) for name in self.targets}
        if any(j is not None for j in journals.values()) or self._leftovers():
            self._teardown(stop_server=any((j or {}).get("started_server") for j in journals.values()), quiet=True)
            notes.append("removed the NBD export and fleecing nodes of an interrupted backup")
        infos = self.inspect()
        actions: List[dict] = []
        broken: Dict[str, Optional[str]] = {}
        for name, t in self.targets.items():
            view = chains[name]
            rec = plan_recovery(infos[name], view.committed_generation, t.bitmap_prefix,
                                interrupted=_interrupted(journals[name]), known=view.known)
            actions += rec.actions
            notes += [f"{name}: {n}" if len(self.targets) > 1 else n for n in rec.notes]
            broken[name] = rec.broken_reason
        if actions:
            self.qmp.execute("transaction", {"actions": actions})
        for name in self.targets:
            self._drop_journal(name)
        return Recovered(notes, broken)

    def release_view(self) -> None:
        """What the reaper (reaper_main.py) does for a killed run: remove the exports, nodes,
        jobs and fleece files. The generations and the journals stay for recover()."""
        journals = [self._read_journal(name) for name in self.targets]
        if all(j is None for j in journals) and not self._leftovers():
            return
        self._teardown(stop_server=any((j or {}).get("started_server") for j in journals), quiet=True)

    def _leftovers(self) -> bool:
        node_names = {n.get("node-name") for n in self.qmp.execute("query-named-block-nodes", {"flat": True})}
        jobs = {j.get("device") for j in self.qmp.execute("query-block-jobs")}
        exports = {e.get("id") for e in self.qmp.execute("query-block-exports")}
        # snap_node: the snapshot-access node of releases before the scratch qcow2, should one be left
        return any({n.fleece_node, n.snap_node, n.cbw_node} & node_names or n.job in jobs
                   or n.export_id in exports or os.path.exists(n.fleece_file) for n in self.names.values())

    def _read_journal(self, name: str) -> Optional[dict]:
        path = self.names[name].journal
        try:
            return read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable journal %s: %s", path, e)
            return {}

    def _write_journal(self, name: str, data: dict) -> None:
        write_json_atomic(self.names[name].journal, data)

    def _drop_journal(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.names[name].journal)

    # -- the backup session -----------------------------------------------------------------
    def begin(self, plans: Mapping[str, GenerationPlan], sizes: Mapping[str, int], backup_id: str = "",
              quiesce: Optional[Quiescer] = None) -> "QMPSession":
        os.makedirs(self.first.scratch_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.first.run_dir, mode=0o700, exist_ok=True)
        journal = {name: {"target": name, "plan": dataclasses.asdict(plans[name]), "started_server": False}
                   for name in self.targets}
        for name in self.targets:
            self._write_journal(name, journal[name])
        session = QMPSession(self, dict(plans))
        if self.use_reaper:
            session.reaper = Reaper({"kind": "qmp", "name": ", ".join(self.targets),
                                     "targets": [dataclasses.asdict(t) for t in self.targets.values()]},
                                    self.names[self.first.name].journal + ".reaper.log").start()
            for name in self.targets:
                journal[name]["reaper_pid"] = session.reaper.pid
        try:
            actions: List[dict] = []
            for name, t in self.targets.items():
                self._create_fleece(name, sizes[name])
                actions += switch_actions(plans[name], t.node, self.names[name])
            self.qmp.drain_events()
            # frozen for the transaction only; a failed one leaves the window (thaw) before the undo below
            with quiesce.window() if quiesce is not None else contextlib.nullcontext():
                self.qmp.execute("transaction", {"actions": actions})
                session.switched = True
            started = self._start_nbd_server()
            for name in self.targets:
                journal[name]["started_server"] = started
                self._write_journal(name, journal[name])
            session.started_server = started
            for name in self.targets:
                self._add_export(name, plans[name])
        except BaseException:
            session.abort()
            raise
        return session

    def _create_fleece(self, name: str, size: int) -> None:
        """The scratch qcow2 over the live node: it only grows by the clusters the guest
        overwrites while the backup runs; the rest reads through to the disk."""
        n = self.names[name]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(n.fleece_file)
        p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", n.fleece_file, str(size)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise EngineError(f"{name}: cannot create the scratch image {n.fleece_file}: {p.stderr.strip()}")
        os.chmod(n.fleece_file, 0o600)
        self.qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": n.fleece_node,
                                          "backing": self.targets[name].node,
                                          "file": {"driver": "file", "filename": n.fleece_file}})

    def _start_nbd_server(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        try:
            self.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.socket}}})
            return True
        except QMPCommandError as e:
            raise EngineError(f"{', '.join(self.targets)}: cannot start an NBD server in QEMU ({e.desc}). "
                              "QEMU allows one NBD server: if libvirt or another tool runs one, "
                              "use the libvirt engine for this disk.") from e

    def export_args(self, name: str, plan: GenerationPlan) -> dict:
        n, t = self.names[name], self.targets[name]
        args = {"type": "nbd", "id": n.export_id, "node-name": n.fleece_node, "name": n.export_name, "writable": False}
        if plan.export_bitmap:
            args["bitmaps"] = [{"node": t.node, "name": plan.export_bitmap}]
        return args

    def _add_export(self, name: str, plan: GenerationPlan) -> None:
        self.qmp.execute("block-export-add", self.export_args(name, plan))

    def _teardown(self, stop_server: bool, quiet: bool = False) -> None:
        """Remove every disk's export, snapshot node, job and fleece node, then the NBD server
        and the files; each step only if present, so it is safe after any partial begin() and
        after a crash."""
        steps: List[Callable[[], None]] = []
        for n in self.names.values():
            steps += [functools.partial(self._del_export, n), functools.partial(self._blockdev_del, n.snap_node),
                      functools.partial(self._cancel_job, n), functools.partial(self._blockdev_del, n.fleece_node)]
        if stop_server:
            steps.append(self._stop_nbd_server)
        errors: List[EngineError] = []
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
        for path in [n.fleece_file for n in self.names.values()] + [self.socket]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if errors and not quiet:
            raise errors[0]

    def _del_export(self, n: Names) -> None:
        if not any(e.get("id") == n.export_id for e in self.qmp.execute("query-block-exports")):
            return
        self.qmp.execute("block-export-del", {"id": n.export_id, "mode": "hard"})
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == n.export_id)

    def _blockdev_del(self, node: str) -> None:
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True})
        if any(x.get("node-name") == node for x in nodes):
            self.qmp.execute("blockdev-del", {"node-name": node})

    def _cancel_job(self, n: Names) -> None:
        if not any(j.get("device") == n.job for j in self.qmp.execute("query-block-jobs")):
            return
        self.qmp.execute("block-job-cancel", {"device": n.job, "force": True})
        self.qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d.get("device") == n.job)

    def _stop_nbd_server(self) -> None:
        with contextlib.suppress(QMPCommandError):
            self.qmp.execute("nbd-server-stop")

    def transaction(self, actions: List[dict]) -> None:
        if actions:
            self.qmp.execute("transaction", {"actions": actions})


class QMPSession:
    """One transaction's views; settled once: commit() or abort()."""

    def __init__(self, engine: QMPEngine, plans: Dict[str, GenerationPlan]):
        self.engine = engine
        self.plans = plans
        self.switched = False
        self.started_server = False
        self.exports_closed = False
        self.settled = False
        self.reaper: Optional[Reaper] = None
        self.exports = {name: Export(engine.socket, engine.names[name].export_name,
                                     f"qemu:dirty-bitmap:{p.export_bitmap}" if p.export_bitmap else None)
                        for name, p in plans.items()}

    def close_exports(self) -> None:
        if not self.exports_closed:
            self.engine._teardown(self.started_server)
            self.exports_closed = True

    def commit(self) -> List[str]:
        """Called only after every manifest is durable in the store: retire old generations."""
        self.close_exports()
        self.engine.transaction([a for name, p in self.plans.items()
                                 for a in retire_actions(p, self.engine.targets[name].node)])
        for name in self.plans:
            self.engine._drop_journal(name)
        self._settle()
        return []

    def abort(self) -> None:
        if self.settled:
            return
        try:
            self.engine._teardown(self.started_server, quiet=True)
            self.exports_closed = True
            if self.switched:
                self.engine.transaction([a for name, p in self.plans.items()
                                         for a in merge_back_actions(p, self.engine.targets[name].node)])
            for name in self.plans:
                self.engine._drop_journal(name)
        finally:
            self._settle()

    def _settle(self) -> None:
        """Committed, or undone as far as QEMU lets us: the reaper has nothing to do."""
        self.settled = True
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
    from .base import BitmapInfo
    image = n.get("image", {})
    bitmaps = tuple(
        BitmapInfo(name=b["name"], granularity=int(b.get("granularity", 0)), recording=bool(b.get("recording")),
                   busy=bool(b.get("busy")), inconsistent=bool(b.get("inconsistent")),
                   persistent=bool(b.get("persistent")))
        for b in n.get("dirty-bitmaps", []) or [])
    return DiskInfo(node=n["node-name"], filename=n.get("file") or image.get("filename", ""),
                    format=n.get("drv", image.get("format", "")), virtual_size=int(image.get("virtual-size", 0)),
                    bitmaps=bitmaps)

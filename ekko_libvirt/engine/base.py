"""What every engine (QMP, libvirt) gives the backup transaction (backup/transaction.py): ONE
point-in-time view of N disks, the dirty-bitmap context of each to read changes from, and the
generation switch to finish or undo for all of them at once.

Lifecycle of one backup, whatever the engine; disks are keyed by their store target name:

    rec = engine.recover(chains)            # undo what a killed run left; why a chain is broken
    infos = engine.inspect()                # size, format, our bitmaps; changes nothing
    plans = {t: bitmaps.plan_generation(...)}   # pure: full or incremental, and why, per disk
    q = Quiescer(policy, engine.guest_agent(timeout), ...); q.prepare()   # freeze.py: freeze or not
    session = engine.begin(plans, sizes, id, q)  # ONE transaction (inside q's freeze window):
                                            # new generations + views of all disks
    ... read session.exports[t], store segments, for every disk ...
    session.close_exports()                 # exports and fleecing gone; bitmaps untouched
    <every manifest committed in the store>
    notes = session.commit()                # only now: retire the old generations
  or, on any failure before the last commit:
    session.abort()                         # merge every new generation back into the old one

begin() raises ChainRefused when the engine finds, only then, that an incremental's base
cannot be used (libvirt: the checkpoint's bitmap is inconsistent): nothing is changed, and the
transaction starts over as a full with that reason.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Protocol, Tuple, Type

from ..errors import EngineError

if TYPE_CHECKING:
    from .bitmaps import GenerationPlan
    from .freeze import AgentAccess, Quiescer


@dataclass(frozen=True)
class BitmapInfo:
    name: str
    granularity: int
    recording: bool
    busy: bool
    inconsistent: bool
    persistent: bool


@dataclass(frozen=True)
class DiskInfo:
    node: str                 # block node name (QMP) or disk target (libvirt)
    filename: str
    format: str               # "qcow2", "raw", ...
    virtual_size: int
    bitmaps: Tuple[BitmapInfo, ...] = ()

    def bitmap(self, name: str) -> Optional[BitmapInfo]:
        return next((b for b in self.bitmaps if b.name == name), None)


@dataclass(frozen=True)
class Export:
    socket_path: str
    export_name: str
    # "qemu:dirty-bitmap:NAME" for an incremental; None for a full. The reader must refuse an
    # export where this context was not negotiated: a missing context reads as "nothing dirty".
    dirty_context: Optional[str]


@dataclass(frozen=True)
class Recovered:
    notes: List[str] = field(default_factory=list)
    broken: Dict[str, Optional[str]] = field(default_factory=dict)   # target -> why its chain is broken


class ChainRefused(EngineError):
    """begin() found an incremental's base unusable; nothing was changed."""


class BackupSession(Protocol):
    exports: Dict[str, Export]

    def close_exports(self) -> None: ...

    def commit(self) -> List[str]: ...

    def abort(self) -> None: ...


class Engine(Protocol):
    @property
    def scratch_dir(self) -> Optional[str]: ...

    def recover(self, chains: Mapping) -> Recovered: ...

    def abandon(self) -> None:
        """begin() will not come (a check between recover() and begin() failed): undo what
        recover() set up for it and nothing else (what it settled of a dead run stays settled)."""

    def inspect(self) -> Dict[str, DiskInfo]: ...

    def guest_agent(self, timeout: float) -> "AgentAccess": ...

    def begin(self, plans: Mapping[str, "GenerationPlan"], sizes: Mapping[str, int], backup_id: str,
              quiesce: Optional["Quiescer"] = None) -> BackupSession: ...

    def close(self) -> None: ...


if TYPE_CHECKING:
    # `make lint` (mypy) checks here that both engines and their sessions keep the protocols above.
    from .libvirt import LibvirtEngine, LibvirtSession
    from .qmp import QMPEngine, QMPSession

    _ENGINES: Tuple[Type[Engine], ...] = (QMPEngine, LibvirtEngine)
    _SESSIONS: Tuple[Type[BackupSession], ...] = (QMPSession, LibvirtSession)

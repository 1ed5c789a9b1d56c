"""What every engine (QMP, libvirt) gives the pipeline: a point-in-time NBD export of one disk,
the dirty-bitmap context to read changes from, and the generation switch to finish or undo.

Lifecycle of one backup, whatever the engine:

    info = engine.inspect()                 # size, format, our bitmaps; changes nothing
    engine.recover(committed_generation)    # undo what a killed ekko left behind
    plan = bitmaps.plan_generation(...)     # pure: full or incremental, and why
    session = engine.begin(plan)            # ONE transaction: new generation + point-in-time view
    ... read session.export, store segments ...
    session.close_export()                  # export and fleecing gone; bitmaps untouched
    <manifest committed in the store>
    session.commit()                        # only now: retire the old generation
  or, on any failure before the commit:
    session.abort()                         # merge the new generation back into the old one
"""

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple


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


class BackupSession(Protocol):
    export: Export

    def close_export(self) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Engine(Protocol):
    def inspect(self) -> DiskInfo: ...

    def recover(self, committed_generation: Optional[str]) -> list: ...

    def begin(self, plan) -> BackupSession: ...

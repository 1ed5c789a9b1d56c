"""Pure decisions about dirty-bitmap generations: names, full vs incremental and why,
and what to merge back or remove after a crash. No I/O here: engines apply the results.

A generation is one persistent dirty bitmap named '<prefix><backup_id>'. It is created in the
same transaction that starts the point-in-time view of backup <backup_id>, so it records exactly
the writes made after that backup's instant. The manifest of <backup_id> names it; the next
incremental exports it and, only after its own manifest is committed, removes it.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..errors import EngineError, IncrementalImpossible
from .base import DiskInfo

FULL = "full"
INCREMENTAL = "incremental"


def generation_name(prefix: str, backup_id: str) -> str:
    return f"{prefix}{backup_id}"


@dataclass(frozen=True)
class ChainHead:
    """What the last committed backup of this disk recorded (from its manifest header)."""
    backup_id: str
    bitmap: Optional[str]
    granularity: Optional[int]
    virtual_size: int
    segment_size: int


@dataclass(frozen=True)
class GenerationPlan:
    kind: str                      # FULL or INCREMENTAL
    reason: str                    # shown by `ekko show`, stored in the manifest
    parent: Optional[str]          # backup id the incremental is based on
    new_bitmap: Optional[str]      # created in the transaction; None when the format has none
    granularity: int
    base_bitmap: Optional[str]     # the committed generation: disabled now, retired after commit
    export_bitmap: Optional[str]   # the bitmap the NBD export carries (incremental only)
    segment_size: int


@dataclass(frozen=True)
class RecoveryPlan:
    """Undo a killed run's generation switch: merge our stray generations into the committed one."""
    actions: Tuple[dict, ...] = ()       # one QMP transaction
    broken_reason: Optional[str] = None  # set when the chain cannot be trusted any more
    notes: Tuple[str, ...] = field(default_factory=tuple)


def ours(info: DiskInfo, prefix: str):
    return [b for b in info.bitmaps if b.name.startswith(prefix)]


def plan_recovery(info: DiskInfo, committed: Optional[str], prefix: str) -> RecoveryPlan:
    """After a crash between the transaction and the commit, the disk holds the committed
    generation (disabled) plus a newer one of ours that recorded every write since. Merge every
    stray generation of ours back into the committed one and re-enable it; foreign bitmaps are
    never touched. If a stray one is inconsistent its writes are unknown: the chain is broken."""
    head = info.bitmap(committed) if committed else None
    strays = [b for b in ours(info, prefix) if b.name != committed]
    actions: List[dict] = []
    notes: List[str] = []
    broken = None
    if head is not None and not head.inconsistent:
        mergeable = [b for b in strays if not b.inconsistent and b.granularity == head.granularity]
        if len(mergeable) != len(strays):
            broken = "a bitmap generation left by an interrupted backup is inconsistent or mismatched"
        if mergeable and broken is None:
            actions.append(_act("block-dirty-bitmap-merge", node=info.node, target=head.name,
                                bitmaps=[b.name for b in mergeable]))
            notes.append(f"merged {', '.join(b.name for b in mergeable)} back into {head.name}")
        if not head.recording and broken is None:
            actions.append(_act("block-dirty-bitmap-enable", node=info.node, name=head.name))
            notes.append(f"re-enabled {head.name}")
    if head is not None and head.inconsistent:
        # Unusable for ever (QEMU refuses to export, merge or clear it): drop it, start anew.
        broken = (f"bitmap {head.name} is inconsistent: QEMU exited uncleanly "
                  "(kill, crash or power loss) since the last backup")
        strays.append(head)
    for b in strays:
        actions.append(_act("block-dirty-bitmap-remove", node=info.node, name=b.name))
        notes.append(f"removed {'inconsistent' if b.inconsistent else 'stray'} generation {b.name}")
    return RecoveryPlan(tuple(actions), broken, tuple(notes))


def _act(kind: str, **data) -> dict:
    return {"type": kind, "data": data}


def plan_generation(info: DiskInfo, head: Optional[ChainHead], *, backup_id: str, prefix: str,
                    granularity: int, segment_size: int, force_full: bool = False,
                    require_incremental: bool = False,
                    broken_reason: Optional[str] = None,
                    key_mismatch_reason: Optional[str] = None) -> GenerationPlan:
    """Full or incremental, and why. Raises IncrementalImpossible when an incremental was
    demanded and the chain check fails. `key_mismatch_reason`: the newest backup was sealed with
    another key, or encrypted while this one is not (or the reverse): codec.chain_key_reason."""
    bitmap_capable = info.format == "qcow2"
    new = generation_name(prefix, backup_id) if bitmap_capable else None
    base = _healthy_head_bitmap(info, head)
    gran = base.granularity if base is not None else granularity

    reason = _why_full(info, head, force_full, broken_reason, bitmap_capable, key_mismatch_reason)
    if reason is None:
        return GenerationPlan(INCREMENTAL, f"changes since {head.backup_id} (bitmap {head.bitmap})",
                              head.backup_id, new, gran, base.name, base.name,
                              head.segment_size)
    if require_incremental:
        raise IncrementalImpossible(f"disk {info.node}: incremental impossible: {reason}")
    # A full starts a new chain: it takes the configured segment size.
    return GenerationPlan(FULL, reason, None, new, gran, base.name if base else None, None,
                          segment_size)


def _healthy_head_bitmap(info: DiskInfo, head: Optional[ChainHead]):
    if head is None or not head.bitmap:
        return None
    b = info.bitmap(head.bitmap)
    if b is None or b.inconsistent or not b.recording:
        return None
    if b.busy:
        raise EngineError(f"disk {info.node}: bitmap {b.name} is in use by another operation "
                          "(another backup running?); nothing was changed")
    return b


def _why_full(info: DiskInfo, head: Optional[ChainHead], force_full: bool,
              broken_reason: Optional[str], bitmap_capable: bool,
              key_mismatch_reason: Optional[str] = None) -> Optional[str]:
    if not bitmap_capable:
        return (f"disk format {info.format} cannot hold a persistent dirty bitmap "
                "(qcow2 v3 needed): every backup of it is a full")
    if key_mismatch_reason:
        # A chain never mixes keys, nor encrypted and plain segments.
        return key_mismatch_reason
    if force_full:
        return "full backup requested (--full)"
    if head is None:
        return "first backup of this disk"
    if broken_reason:
        return f"chain broken: {broken_reason}"
    if not head.bitmap:
        return f"previous backup {head.backup_id} recorded no bitmap"
    b = info.bitmap(head.bitmap)
    if b is None:
        return (f"bitmap {head.bitmap} of backup {head.backup_id} is missing on the disk "
                "(image replaced, or the bitmap was removed)")
    if b.inconsistent:
        return (f"bitmap {head.bitmap} is inconsistent: QEMU exited uncleanly "
                f"(kill, crash or power loss) after backup {head.backup_id}")
    if not b.recording:
        return f"bitmap {head.bitmap} is not recording (disabled outside ekko)"
    if head.granularity and b.granularity != head.granularity:
        return f"bitmap granularity changed from {head.granularity} to {b.granularity}"
    if info.virtual_size != head.virtual_size:
        return f"disk size changed from {head.virtual_size} to {info.virtual_size} bytes"
    return None

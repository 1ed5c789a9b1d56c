"""Pure decisions about dirty-bitmap generations: names, full vs incremental and why,
and what to merge back or remove after a crash. No I/O here: engines apply the results.

A generation is one persistent dirty bitmap named '<prefix><backup_id>'. It is created in the
same transaction that starts the point-in-time view of backup <backup_id>, so it records exactly
the writes made after that backup's instant. The manifest of <backup_id> names it; the next
incremental exports it and, only after its own manifest is committed, removes it.
"""

import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

from ..errors import EngineError, IncrementalImpossible
from .base import BitmapInfo, DiskInfo

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
    # removed after the commit: the base, or a head generation that can no longer be used (a
    # full because it was disabled behind our back, say): no bitmap of ours outlives its chain
    retire: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Interrupted:
    """What an interrupted run of ekko did to this disk's bitmaps, from its journal: it disabled
    `base` (the committed generation) and added `new` in the transaction of its view."""
    base: Optional[str]
    new: Optional[str]


@dataclass(frozen=True)
class RecoveryPlan:
    """Settle the bitmaps before a backup plans: what a killed run left, what is of no use."""
    actions: Tuple[dict, ...] = ()       # one QMP transaction
    broken_reason: Optional[str] = None  # set when the chain cannot be trusted any more
    notes: Tuple[str, ...] = field(default_factory=tuple)


ID_PATTERN = re.compile(r"\d{8}T\d{9}Z-[0-9a-f]{6}")


def is_generation_name(name: str, prefix: str) -> bool:
    """Whether `name` has the exact form of a generation ekko names: <prefix><backup id>."""
    return name.startswith(prefix) and ID_PATTERN.fullmatch(name[len(prefix):]) is not None


def known_generations(prefix: str, backup_ids: Iterable[str], header_bitmaps: Iterable[Optional[str]] = (),
                      interrupted: Optional[Interrupted] = None) -> frozenset:
    """The generation names ekko created for one target: one per backup of it in the store (a
    generation is named after its backup, and the header says so too), and what an interrupted
    run created or disabled. Only these are ever removed or merged; every other bitmap, with
    our prefix or not, belongs to someone else (a user, another config sharing the node)."""
    names = {generation_name(prefix, b) for b in backup_ids}
    names.update(b for b in header_bitmaps if b)
    if interrupted is not None:
        names.update(b for b in (interrupted.base, interrupted.new) if b)
    return frozenset(n for n in names if is_generation_name(n, prefix))


def ours(info: DiskInfo, prefix: str, known: frozenset = frozenset()) -> List[BitmapInfo]:
    """Our generations on the disk: created by ekko for this target (see known_generations)."""
    return [b for b in info.bitmaps if b.name in known and is_generation_name(b.name, prefix)]


def plan_recovery(info: DiskInfo, committed: Optional[str], prefix: str, *,
                  interrupted: Optional[Interrupted] = None, known: frozenset = frozenset()) -> RecoveryPlan:
    """Before planning: undo what an interrupted run left, drop generations of no further use.

    `committed`: the generation the newest backup names. `interrupted`: the journal of a run
    that switched generations and never settled. `known`: known_generations() of the target.

    - The interrupted run's new generation recorded every write since it disabled the committed
      one: merge it back and re-enable the committed one. ONLY then is a disabled committed
      generation re-enabled: disabled by anyone else, it missed writes, and the next backup
      must be a full (plan_generation says why).
    - Other known generations are older than the committed one (a retire that did not happen):
      everything they recorded is in a committed backup. Removed.
    - An inconsistent committed generation (QEMU exited uncleanly) is unusable: removed, and
      the chain is broken. So is it when the interrupted run's new generation is inconsistent
      or cannot be merged.
    - Bitmaps that are not known generations of this target are never touched, whatever their
      name; ours-looking ones are reported."""
    known = known | known_generations(prefix, (), (), interrupted)
    head = info.bitmap(committed) if committed else None
    new = interrupted.new if interrupted is not None else None
    disabled_by_us = interrupted is not None and committed is not None and interrupted.base == committed
    strays = [b for b in ours(info, prefix, known) if b.name != committed]
    actions: List[dict] = []
    notes: List[str] = []
    broken = None
    if head is not None and head.inconsistent:
        # Unusable for ever (QEMU refuses to export, merge or clear it): drop it, start anew.
        broken = (f"bitmap {head.name} is inconsistent: QEMU exited uncleanly "
                  "(kill, crash or power loss) since the last backup")
        strays.append(head)
    elif head is not None and disabled_by_us:
        pending = [b for b in strays if b.name == new]
        if any(b.inconsistent or b.granularity != head.granularity for b in pending):
            broken = f"bitmap generation {new} left by an interrupted backup is inconsistent or mismatched"
        elif pending:
            actions.append(_act("block-dirty-bitmap-merge", node=info.node, target=head.name, bitmaps=[new]))
            notes.append(f"merged {new} back into {head.name}")
        if broken is None and not head.recording:
            actions.append(_act("block-dirty-bitmap-enable", node=info.node, name=head.name))
            notes.append(f"re-enabled {head.name}, which an interrupted backup had disabled")
    for b in strays:
        actions.append(_act("block-dirty-bitmap-remove", node=info.node, name=b.name))
        what = ("inconsistent" if b.inconsistent else
                "interrupted backup's" if b.name == new else "retired")
        notes.append(f"removed {what} generation {b.name}")
    for b in info.bitmaps:
        if b.name.startswith(prefix) and b.name not in known and b.name != committed:
            notes.append(f"left bitmap {b.name} alone: ekko did not create it for this disk")
    return RecoveryPlan(tuple(actions), broken, tuple(notes))


def _act(kind: str, **data) -> dict:
    return {"type": kind, "data": data}


def plan_generation(info: DiskInfo, head: Optional[ChainHead], *, backup_id: str, prefix: str,
                    granularity: int, segment_size: int, force_full: bool = False,
                    require_incremental: bool = False,
                    broken_reason: Optional[str] = None,
                    key_mismatch_reason: Optional[str] = None,
                    known: frozenset = frozenset()) -> GenerationPlan:
    """Full or incremental, and why. Raises IncrementalImpossible when an incremental was
    demanded and the chain check fails. `key_mismatch_reason`: the newest backup was sealed with
    another key, or encrypted while this one is not (or the reverse): codec.chain_key_reason.
    `known`: known_generations() of the target; a full retires every one of them on the disk
    once it is committed (the chain they belonged to ends there)."""
    bitmap_capable = info.format == "qcow2"
    new = generation_name(prefix, backup_id) if bitmap_capable else None
    base = _healthy_head_bitmap(info, head)
    gran = base.granularity if base is not None else granularity

    reason = _why_full(info, head, force_full, broken_reason, bitmap_capable, key_mismatch_reason)
    if reason is None:
        # _why_full gives a reason whenever there is no head or its bitmap is not healthy
        assert head is not None and base is not None
        return GenerationPlan(INCREMENTAL, f"changes since {head.backup_id} (bitmap {head.bitmap})",
                              parent=head.backup_id, new_bitmap=new, granularity=gran, base_bitmap=base.name,
                              export_bitmap=base.name, segment_size=head.segment_size, retire=(base.name,))
    if require_incremental:
        raise IncrementalImpossible(f"disk {info.node}: incremental impossible: {reason}")
    # A full starts a new chain: it takes the configured segment size.
    retire = tuple(sorted({b.name for b in info.bitmaps if b.name in known or (base and b.name == base.name)}
                          - {new})) if new else ()
    return GenerationPlan(FULL, reason, parent=None, new_bitmap=new, granularity=gran,
                          base_bitmap=base.name if base else None, export_bitmap=None,
                          segment_size=segment_size, retire=retire)


def _healthy_head_bitmap(info: DiskInfo, head: Optional[ChainHead]) -> Optional[BitmapInfo]:
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
    if broken_reason:
        return f"chain broken: {broken_reason}"
    if head is None:
        return "first backup of this disk"
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

"""The backup transaction: ONE point-in-time view of every disk asked for, one backup id, one
commit order. Every backup goes through run_transaction(): a QMP target from the CLI, a libvirt
domain from the CLI or the agent, a shut-off domain through its qemu-storage-daemon.

    chains   every disk's manifests and this host's ledger (chain.look_at_chain)
    recover  the engine settles what a killed run left, and says which chains it found broken
    plans    full or incremental per disk, and why (engine.bitmaps.plan_generation: pure)
    quiesce  freeze or not (engine/freeze.py: the policy, the guest agent's answer); `filesystem`
             and a guest that cannot be frozen stop here, before the engine changes anything
    begin    ONE engine transaction: new generations + views of all disks, inside the freeze
             window (frozen just before it, thawed just after; a failed one thaws, then undoes)
    copy     every disk's segments (copy.copy_segments: durable, rechecked, read back)
    commit   every manifest, each under a name no other backup uses
    retire   only now the old generations go (session.commit)

The order is the safety argument:
  1. every segment is durable in the store before the manifest that names it is written, and
     still there just before (the commit-time check); the view reads back as the table says;
  2. a manifest is a disk's commit point;
  3. the old generations are retired only after the last manifest is committed; any failure
     before that merges every new generation back, so no dirty block is ever forgotten. A disk
     whose manifest was committed before another disk failed keeps its backup; the next one of
     it finds its generation merged away and is a full that says so.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from ..store import catalog
from ..store.base import Store
from ..format.codec import PLAIN, Codec, chain_key_reason
from ..engine.base import BackupSession, ChainRefused, DiskInfo, Engine
from ..engine.bitmaps import INCREMENTAL, GenerationPlan, plan_generation
from ..engine.freeze import Consistency, Quiescer
from ..errors import IncrementalImpossible, LockBusy
from ..faults import crash_point, pause_point
from ..format.manifest import Manifest, SegmentTable
from . import scratch
from .chain import ChainView, look_at_chain, record_commit, record_failure
from .copy import Stats, copy_segments
from .ledger import Ledger
from .options import BackupOptions, BackupResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskJob:
    """One disk of a transaction: its store target (also the engine's key for it) and labels."""
    target: str
    labels: Dict = field(default_factory=dict)


class TargetLock:
    """One backup per target (or domain) at a time, across processes (flock dies with its holder)."""

    def __init__(self, lock_dir: str, target: str):
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(lock_dir, f"{target}.lock")
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LockBusy(f"another ekko job is working on {os.path.basename(self.path)[:-5]}") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def run_transaction(engine: Engine, store: Store, disks: Sequence[DiskJob], opts: BackupOptions,
                    progress: Optional[Callable[[int, int], None]] = None, lock: Optional[str] = None,
                    broken: Optional[str] = None) -> List[BackupResult]:
    """Back up `disks` (all of one engine) as one transaction. `lock`: the name serialising
    jobs (a domain's); default the target of a one-disk transaction. `broken`: a reason known
    outside the store and the engine (the agent saw QEMU die) that no chain can go on. Retried
    once, as a full, when the engine finds only at begin() that a base cannot be used."""
    with TargetLock(opts.lock_dir, lock or disks[0].target):
        try:
            return _transaction(engine, store, disks, opts, progress, broken)
        except ChainRefused as e:
            if opts.require_incremental:
                raise IncrementalImpossible(f"incremental impossible: {e}") from e
            log.warning("%s; starting a new chain with a full backup", e)
            return _transaction(engine, store, disks, opts, progress, str(e))


def _transaction(engine: Engine, store: Store, disks: Sequence[DiskJob], opts: BackupOptions,
                 progress: Optional[Callable[[int, int], None]], broken: Optional[str]) -> List[BackupResult]:
    codec = store.codec     # an encrypted store reads its key file here, before anything changes
    ledger = Ledger(opts.state_dir) if opts.state_dir else None
    chains = {d.target: look_at_chain(store, d.target, opts.bitmap_prefix, ledger) for d in disks}
    # a chain sealed with a key we do not hold stops the backup here (KeyMismatch), before the engine changes anything
    key_reasons = {t: chain_key_reason(c.entry.key, c.entry.key_fingerprint, codec.fingerprint, opts.force_full)
                   if c.entry is not None else None for t, c in chains.items()}
    # before recover(): a guest that must be frozen and cannot be stops the backup here, before the
    # engine changes anything (libvirt's recover redefines the base checkpoint on the domain)
    quiescer = Quiescer(opts.consistency, engine.guest_agent(opts.agent_timeout), opts.target,
                        os.path.join(opts.state_dir or opts.lock_dir, "thaw-reaper.log"))
    with contextlib.closing(quiescer):         # the agent's connection, whatever happens
        quiescer.prepare()
        recovered = engine.recover(chains)
        try:
            infos = engine.inspect()
            backup_id = catalog.new_backup_id()
            plans = {d.target: _plan(infos[d.target], chains[d.target], key_reasons[d.target], opts, backup_id,
                                     (broken if chains[d.target].head is not None else None)
                                     or recovered.broken.get(d.target)) for d in disks}
            for d in disks:
                log.info("%s: %s backup %s: %s", d.target, plans[d.target].kind, backup_id, plans[d.target].reason)
            parents = {d.target: _parent(store, chains[d.target], plans[d.target]) for d in disks}
            guard = scratch.guard_for(engine.scratch_dir, opts.scratch_reserve)
            if guard:
                guard.check_start()
            started = time.time()
            session = engine.begin(plans, {t: i.virtual_size for t, i in infos.items()}, backup_id, quiescer)
        except BaseException:
            engine.abandon()        # e.g. the scratch check: libvirt's redefined base checkpoint goes
            raise
    consistency = quiescer.result
    try:
        crash_point("after-transaction")
        pause_point("after-transaction")
        total, before, manifests = sum(i.virtual_size for i in infos.values()), 0, []
        for d in disks:
            info, plan = infos[d.target], plans[d.target]
            disk_opts = dataclasses.replace(opts, target=d.target, labels=dict(opts.labels, **d.labels))
            table, stats = copy_segments(session.exports[d.target], store, plan, info.virtual_size, parents[d.target],
                                         disk_opts, _whole_job(progress, before, total),
                                         watch=guard.watcher(session.close_exports) if guard else None)
            before += info.virtual_size
            manifests.append(build_manifest(disk_opts, info, plan, backup_id, table, stats, started, codec,
                                            consistency))
        session.close_exports()
        crash_point("before-commit")
        keys = [catalog.commit(store, m) for m in manifests]
    except BaseException as e:
        _abort(session, ", ".join(d.target for d in disks))
        for d in disks:
            record_failure(ledger, d.target, e, store)
        raise
    crash_point("after-commit")
    notes = recovered.notes + session.commit()
    for m in manifests:
        record_commit(ledger, m, store)
    return [BackupResult(m, k, notes) for m, k in zip(manifests, keys, strict=True)]


def _plan(info: DiskInfo, chain: ChainView, key_reason: Optional[str], opts: BackupOptions, backup_id: str,
          broken: Optional[str]) -> GenerationPlan:
    return plan_generation(info, chain.head, backup_id=backup_id, prefix=opts.bitmap_prefix,
                           granularity=opts.granularity, segment_size=opts.segment_size,
                           force_full=opts.force_full, require_incremental=opts.require_incremental,
                           broken_reason=broken or chain.broken, key_mismatch_reason=key_reason, known=chain.known)


def _parent(store: Store, chain: ChainView, plan: GenerationPlan) -> Optional[Manifest]:
    """An incremental's parent: the manifest of its chain's head (an incremental has one)."""
    if plan.kind != INCREMENTAL:
        return None
    assert chain.entry is not None      # plan_generation plans an incremental only on a head
    return catalog.load(store, chain.entry.key)


def _whole_job(progress: Optional[Callable[[int, int], None]], before: int, total: int
               ) -> Optional[Callable[[int, int], None]]:
    """Progress of one disk -> progress of the whole transaction (its disks one after the other)."""
    if progress is None:
        return None
    return lambda done, _size: progress(before + done, total)


def _abort(session: BackupSession, target: str) -> None:
    """Undo the backup in QEMU after a failure, without hiding that failure: when the undo fails
    too (QEMU gone, say), the error that stopped the backup is the one reported. The engine's
    journal stays until an undo succeeds: the next run finishes it before it decides anything."""
    try:
        session.abort()
    except Exception as e:  # noqa: BLE001 - the original error is re-raised by the caller
        log.warning("%s: could not undo the backup in QEMU: %s (the next run finishes the undo)", target, e)



def build_manifest(opts: BackupOptions, info: DiskInfo, plan: GenerationPlan, backup_id: str, table: SegmentTable,
                   stats: Stats, started: float, codec: Codec = PLAIN,
                   consistency: Optional[Consistency] = None) -> Manifest:
    """`codec`: the store's (store.codec), which named the table's segments. `consistency`: what
    the freeze achieved (engine/freeze.py)."""
    finished = time.time()
    counts = stats.as_dict()
    counts.update(segments=table.count, data_segments=table.data_count())
    return Manifest(
        backup_id=backup_id, target=opts.target, virtual_size=info.virtual_size,
        segment_size=plan.segment_size, table=table, kind=plan.kind, reason=plan.reason,
        parent=plan.parent,
        generation={"bitmap": plan.new_bitmap, "granularity": plan.granularity} if plan.new_bitmap else None,
        disk={"node": info.node, "filename": info.filename, "format": info.format},
        created=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        timings={"started": started, "finished": finished, "seconds": round(finished - started, 3),
                 "read_back_seconds": round(stats.read_back_seconds, 3)},
        counts=counts, labels=dict(opts.labels), hash=codec.naming, encryption=codec.describe(),
        consistency=consistency.as_dict() if consistency is not None else None)



"""Back up a libvirt domain: every disk in one pull-mode job, one manifest per disk.

qcow2 disks are incremental through the domain's checkpoint chain; raw and other disks are
full in the same job (deduplicated by the store). All manifests are committed before the old
checkpoint is retired; any failure before that deletes the new checkpoint, whose writes the old
one recorded too, so nothing is forgotten.
"""

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import libvirt

from . import catalog, scratch
from .engine import domain_xml as dx
from .engine.base import BitmapInfo, DiskInfo, Export
from .engine.reaper import Reaper
from .engine.bitmaps import INCREMENTAL, generation_name, plan_generation
from .engine.libvirt import (BackupBeginFailed, CheckpointState, JobRecord, LibvirtDomainEngine, disk_sizes,
                             lookup_domain, qemu_accessible_dir)
from .codec import chain_key_reason, codec_of
from .errors import UsageError
from .faults import crash_point, pause_point
from .ledger import Ledger
from .pipeline import (BackupOptions, BackupResult, TargetLock, build_manifest, copy_segments, look_at_chain,
                       record_commit)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainBackupRequest:
    domain: str                          # name or UUID
    disks: Sequence[str] = ()            # only these target devs; empty = all
    force_full: bool = False
    require_incremental: bool = False
    chain_broken: Optional[str] = None   # set by the retry after libvirt found the bitmaps inconsistent


@dataclass
class _Disk:
    spec: dx.DomainDisk
    target: str
    size: int
    head: Optional[object] = None
    head_entry: Optional[object] = None
    plan: Optional[object] = None
    parent: Optional[object] = None
    manifest: Optional[object] = None
    notes: List[str] = field(default_factory=list)
    key_reason: Optional[str] = None     # codec.chain_key_reason: the head was sealed with another key
    chain_broken: Optional[str] = None   # pipeline.ChainView.broken: damaged newest manifest, vanished backups
    known: frozenset = frozenset()       # generation (checkpoint) names ekko created for this disk


def select_disks(all_disks: List[dx.DomainDisk], wanted: Sequence[str], domain: str) -> List[dx.DomainDisk]:
    if not wanted:
        return all_disks
    known = {d.dev: d for d in all_disks}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise UsageError(f"domain {domain} has no disk {unknown[0]!r} (disks: {', '.join(known) or 'none'})")
    return [known[w] for w in wanted]


def backup_domain(conn, req: DomainBackupRequest, open_store: Callable, base: BackupOptions, state_dir: str,
                  run_dir: str, progress=None) -> List[BackupResult]:
    dom = lookup_domain(conn, req.domain)
    xml = dom.XMLDesc(0)
    disks = select_disks(dx.parse_disks(xml), req.disks, dom.name())
    if not disks:
        raise UsageError(f"domain {dom.name()} has no disk to back up")
    nova = dx.parse_nova(xml)
    store = open_store(dx.project_namespace(nova))
    # The domain's definition goes with every disk's manifest: `ekko restore --define` builds a
    # new domain from it. Inactive XML (what is defined, not runtime state), no secret values.
    labels = dict(base.labels, **nova, domain_xml=dx.storable_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
    if not dom.isActive():
        from .offline import backup_offline
        return backup_offline(dom, disks, req, store, base, labels, state_dir, run_dir, progress)
    with TargetLock(base.lock_dir, f"domain-{dom.UUIDString()}"):
        return _backup_running(dom, disks, req, store, base, labels, state_dir, run_dir, progress)


def _backup_running(dom, specs, req, store, base: BackupOptions, labels, state_dir, run_dir, progress):
    state = CheckpointState(state_dir)
    engine = LibvirtDomainEngine(dom, state, base.bitmap_prefix)
    notes = engine.recover()
    sizes = disk_sizes(dom, [d.dev for d in specs])
    disks = [_Disk(d, dx.target_name(dom.name(), d.dev), sizes[d.dev]) for d in specs]
    codec = codec_of(store)     # an encrypted store reads its key file here, before the job starts
    ledger = Ledger(base.state_dir) if base.state_dir else None
    for d in disks:
        view = look_at_chain(store, d.target, base.bitmap_prefix, ledger)
        d.head, d.head_entry, d.chain_broken, d.known = view.head, view.entry, view.broken, view.known
        if d.head_entry is not None:
            d.key_reason = chain_key_reason(d.head_entry.key, d.head_entry.key_fingerprint,
                                            codec.fingerprint, req.force_full)
    backup_id = catalog.new_backup_id()
    new_cp = generation_name(base.bitmap_prefix, backup_id)
    bitmap_devs = [d.spec.dev for d in disks if d.spec.bitmap_capable]
    other_devs = [d.spec.dev for d in disks if not d.spec.bitmap_capable]
    base_cp, broken = (None, req.chain_broken) if req.chain_broken else \
        _base_checkpoint(engine, disks, bitmap_devs, other_devs)
    _plan(disks, base_cp, broken, backup_id, base, req)
    for d in disks:
        if d.plan.kind == INCREMENTAL:
            d.parent = catalog.load(store, d.head_entry.key)
    sock_dir = qemu_accessible_dir(os.path.join(run_dir, f"lv-{dom.UUIDString()[:8]}"))
    scratch_dir = qemu_accessible_dir(os.path.join(state_dir, "scratch"))
    socket = os.path.join(sock_dir, "backup.sock")
    specs_xml = [dx.DiskBackupSpec(d.spec.dev, base_cp if d.plan.kind == INCREMENTAL else None,
                                   os.path.join(scratch_dir, f"{dom.UUIDString()}.{d.spec.dev}.scratch.qcow2"),
                                   d.spec.bitmap_capable) for d in disks]
    guard = scratch.guard_for(scratch_dir, base.scratch_reserve)
    if guard:
        guard.check_start()
    # should this process die (SIGKILL, the OOM killer), the reaper ends libvirt's job at once:
    # its copy-before-write must not go on filling the scratch until the next run
    reaper = Reaper({"kind": "libvirt", "name": dom.name(), "uri": dom.connect().getURI(),
                     "uuid": dom.UUIDString()}, os.path.join(state_dir, "libvirt", f"{dom.UUIDString()}.reaper.log"))
    reaper.start()
    try:
        state.save_job(JobRecord(dom.UUIDString(), new_cp, base_cp, time.time(), reaper.pid))
        try:
            engine.begin(dx.backup_xml(specs_xml, socket), dx.checkpoint_xml(new_cp, bitmap_devs, other_devs))
        except BackupBeginFailed as e:
            state.drop_job(dom.UUIDString())
            if base_cp:
                engine.forget(base_cp)
            if e.inconsistent and not req.require_incremental:
                raise _Retry(str(e)) from e
            raise
        started = time.time()
        try:
            crash_point("after-transaction")
            pause_point("after-transaction")
            total, before = sum(d.size for d in disks), 0
            for d in disks:
                export = Export(socket, d.spec.dev, dx.dirty_context(d.spec.dev) if d.plan.kind == INCREMENTAL else None)
                opts = _opts(base, d.target, labels, new_cp if d.spec.bitmap_capable else None)
                table, stats = copy_segments(export, store, d.plan, d.size, d.parent, opts,
                                             _whole_job(progress, before, total),
                                             watch=guard.watcher(engine.end_job) if guard else None)
                before += d.size
                info = DiskInfo(d.spec.dev, d.spec.source, d.spec.format, d.size)
                d.manifest = build_manifest(opts, info, d.plan, backup_id, table, stats, started, codec_of(store))
            engine.end_job()
            crash_point("before-commit")
            keys = [catalog.commit(store, d.manifest) for d in disks]
        except BaseException:
            try:
                _undo(engine, new_cp, base_cp)
            except Exception as e:  # noqa: BLE001 - the error that stopped the backup is re-raised below
                # the job record stays: the next run's engine.recover() finishes the undo
                log.warning("domain %s: could not undo the backup job: %s (the next run finishes the undo)",
                            dom.name(), e)
            else:
                state.drop_job(dom.UUIDString())
            raise
        crash_point("after-commit")
        if base_cp:
            note = engine.delete(base_cp)
            if note:
                notes.append(note)
        _drop_stale_generations(engine, new_cp, frozenset().union(*(d.known for d in disks)), notes)
        engine.save_and_forget(new_cp)
        state.drop_job(dom.UUIDString())
        for d in disks:
            record_commit(ledger, d.manifest, store)
        return [BackupResult(d.manifest, k, notes) for d, k in zip(disks, keys)]
    finally:
        reaper.done()


def _whole_job(progress, before: int, total: int):
    """Progress of one disk -> progress of the whole job (all disks, one after the other)."""
    if progress is None:
        return None
    return lambda done, _size: progress(before + done, total)


class _Retry(Exception):
    """backupBegin found the base checkpoint inconsistent: run again as a full chain."""


def _undo(engine: LibvirtDomainEngine, new_cp: str, base_cp: Optional[str]) -> None:
    try:
        engine.end_job()
    finally:
        engine.delete(new_cp)
        if base_cp:
            engine.forget(base_cp)


def _drop_stale_generations(engine: LibvirtDomainEngine, keep: str, known: frozenset, notes: List[str]) -> None:
    """Delete the checkpoints of older generations of this domain's disks. Only names ekko
    created for them (bitmaps.known_generations): a user's `ekko-foo`, or another config's
    generations on the same domain, are never touched."""
    for name in engine.our_checkpoints():
        if name != keep and name in known:
            note = engine.delete(name)
            notes.append(note or f"deleted stale checkpoint {name}")


def _base_checkpoint(engine, disks: List[_Disk], bitmap_devs, other_devs):
    """The checkpoint every qcow2 disk's chain ends in, redefined and validated; or why not."""
    heads = {d.head.bitmap for d in disks if d.spec.bitmap_capable and d.head is not None and d.head.bitmap}
    if not heads:
        return None, None
    if len(heads) > 1:
        return None, f"the disks' chains end in different checkpoints ({', '.join(sorted(heads))})"
    name = heads.pop()
    created = min(d.head_entry.header.get("timings", {}).get("started", 0) for d in disks
                  if d.head is not None and d.head.bitmap == name)
    reason = engine.redefine(name, bitmap_devs, other_devs, created)
    return (None, reason) if reason else (name, None)


def _plan(disks: List[_Disk], base_cp, broken, backup_id, base: BackupOptions, req) -> None:
    for d in disks:
        bitmaps = ()
        if base_cp and d.head is not None and d.head.bitmap == base_cp:
            bitmaps = (BitmapInfo(base_cp, d.head.granularity or base.granularity, True, False, False, True),)
        info = DiskInfo(d.spec.dev, d.spec.source, d.spec.format if d.spec.bitmap_capable else d.spec.format or "raw",
                        d.size, bitmaps)
        plan = plan_generation(info, d.head, backup_id=backup_id, prefix=base.bitmap_prefix,
                               granularity=base.granularity, segment_size=base.segment_size,
                               force_full=req.force_full, require_incremental=req.require_incremental,
                               broken_reason=(broken if d.spec.bitmap_capable and d.head is not None else None)
                               or d.chain_broken,
                               key_mismatch_reason=d.key_reason)
        d.plan = plan


def _opts(base: BackupOptions, target: str, labels: Dict, checkpoint: Optional[str]) -> BackupOptions:
    from dataclasses import replace
    return replace(base, target=target, labels=dict(labels, checkpoint=checkpoint) if checkpoint else dict(labels))


def run_domain_backup(conn, req, open_store, base, state_dir, run_dir, progress=None) -> List[BackupResult]:
    """backup_domain, retried once as a full when libvirt finds the chain's bitmaps inconsistent
    only at backupBegin (e.g. QEMU was killed and restarted since the checkpoint was validated)."""
    try:
        return backup_domain(conn, req, open_store, base, state_dir, run_dir, progress)
    except _Retry as e:
        log.warning("%s; starting a new chain with a full backup", e)
        from dataclasses import replace
        return backup_domain(conn, replace(req, chain_broken=str(e)), open_store, base, state_dir, run_dir, progress)

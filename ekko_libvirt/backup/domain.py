"""Back up a libvirt domain: choose its disks and labels, pick the engine (a running domain:
libvirt's pull-mode backup; a shut-off one: its images through a qemu-storage-daemon), and run
the one backup transaction (transaction.py) over all of them.

qcow2 disks are incremental through the chain's checkpoints; raw and other disks are full in the
same transaction (deduplicated by the store). Every disk of the backup has the same backup id.
"""

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

import libvirt

from ..engine import domain_xml as dx
from ..engine.libvirt import LibvirtEngine, lookup_domain
from ..errors import UsageError
from ..store.base import Store
from .options import BackupOptions, BackupResult
from .transaction import DiskJob, run_transaction

if TYPE_CHECKING:
    from .offline import HoldStart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainBackupRequest:
    domain: str                          # name or UUID
    disks: Sequence[str] = ()            # only these target devs; empty = all
    force_full: bool = False
    require_incremental: bool = False
    chain_broken: Optional[str] = None   # the agent knows the chain is broken (QEMU died, ...): a full


def select_disks(all_disks: List[dx.DomainDisk], wanted: Sequence[str], domain: str) -> List[dx.DomainDisk]:
    if not wanted:
        return all_disks
    known = {d.dev: d for d in all_disks}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise UsageError(f"domain {domain} has no disk {unknown[0]!r} (disks: {', '.join(known) or 'none'})")
    return [known[w] for w in wanted]


def consistency_policy(base: BackupOptions, name: str, uuid: str, xml: str, project_id: str = "") -> str:
    """domains.<UUID>.consistency, else domains.<name>.consistency, else the Nova project's
    (projects.<id>.consistency), else the default; a domain that asks for quiescing (Nova's
    os_require_quiesce) gets `filesystem` whatever they say."""
    if dx.requires_quiesce(xml):
        return "filesystem"
    by_key = dict(base.consistency_by_domain)
    by_project = dict(base.consistency_by_project)
    return (by_key.get(uuid.lower()) or by_key.get(name) or (by_project.get(project_id) if project_id else None)
            or base.consistency)


def run_domain_backup(conn, req: DomainBackupRequest, open_store: Callable[[Optional[str]], Store], base: BackupOptions,
                      state_dir: str, run_dir: str, progress: Optional[Callable[[int, int], None]] = None,
                      hold_offline_start: Optional["HoldStart"] = None) -> List[BackupResult]:
    """`hold_offline_start(uuid, name)`: what keeps the domain from starting while its images are
    backed up offline (the agent's marker, which the libvirt hook honours)."""
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
    opts = BackupOptions(**{**base.__dict__, "target": dom.name(), "labels": labels,
                            "consistency": consistency_policy(base, dom.name(), dom.UUIDString(), xml,
                                                              nova.get("project_id", "")),
                            "force_full": req.force_full or base.force_full,
                            "require_incremental": req.require_incremental or base.require_incremental})
    jobs = [DiskJob(dx.target_name(dom.name(), d.dev)) for d in disks]
    lock = f"domain-{dom.UUIDString()}"
    if not dom.isActive():
        from .offline import backup_offline
        if hold_offline_start is None:
            raise UsageError(f"domain {dom.name()} is shut off: its offline backup needs the agent's state "
                             "directory to keep it from starting meanwhile")
        return backup_offline(dom, disks, jobs, store, opts, lock, state_dir, run_dir, progress, hold_offline_start,
                              req.chain_broken)
    engine = LibvirtEngine(dom, disks, state_dir, run_dir, opts.bitmap_prefix, opts.granularity)
    return run_transaction(engine, store, jobs, opts, progress, lock=lock, broken=req.chain_broken)

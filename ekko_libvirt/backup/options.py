"""What one backup transaction is asked to do (BackupOptions, built from the config once) and
what it gives back (BackupResult)."""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from .. import units
from ..format.manifest import Manifest


@dataclass(frozen=True)
class BackupOptions:
    target: str
    force_full: bool = False
    require_incremental: bool = False
    segment_size: int = units.DEFAULT_SEGMENT_SIZE
    granularity: int = units.DEFAULT_GRANULARITY
    bitmap_prefix: str = units.DEFAULT_BITMAP_PREFIX
    compress: bool = True
    compression_level: int = units.DEFAULT_COMPRESSION_LEVEL
    workers: int = units.DEFAULT_WORKERS
    request_size: int = units.DEFAULT_REQUEST_SIZE
    in_flight: int = units.DEFAULT_IN_FLIGHT
    lock_dir: str = units.DEFAULT_STATE_DIR + "/locks"
    labels: Dict = field(default_factory=dict)
    scratch_reserve: int = units.DEFAULT_SCRATCH_RESERVE     # free room kept for copy-before-write
    state_dir: str = ""                 # this host's ledger of commits (ledger.py); "": no ledger
    read_back: int = units.DEFAULT_READ_BACK    # segments re-read before the commit; READ_BACK_ALL: all
    consistency: str = "auto"           # engine/freeze.py: auto | filesystem | crash
    agent_timeout: float = 10.0         # seconds, every guest agent call
    consistency_by_domain: Tuple[Tuple[str, str], ...] = ()   # domains.<UUID or name>.consistency
    consistency_by_project: Tuple[Tuple[str, str], ...] = ()  # projects.<Nova project id>.consistency



@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest
    key: str
    notes: List[str]


def options_from_config(cfg, target: str, prefix: str = units.DEFAULT_BITMAP_PREFIX, **kw) -> BackupOptions:
    """BackupOptions from the config: the CLI's, the agent's and offline backups take the same."""
    return BackupOptions(target=target, segment_size=cfg.segment_size, granularity=cfg.granularity,
                         bitmap_prefix=prefix, compress=cfg.compress, compression_level=cfg.compression_level,
                         workers=cfg.workers, request_size=cfg.request_size, in_flight=cfg.in_flight,
                         lock_dir=os.path.join(cfg.state_dir, "locks"), scratch_reserve=cfg.scratch_reserve,
                         state_dir=cfg.state_dir, read_back=cfg.read_back,
                         **{"consistency": cfg.consistency, "agent_timeout": cfg.guest_agent_timeout,
                            "consistency_by_domain": cfg.domain_consistency,
                            "consistency_by_project": cfg.project_consistency, **kw})

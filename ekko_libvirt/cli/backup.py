"""`ekko backup TARGET`: a configured QMP target, or a libvirt domain (a configured target with
engine: libvirt, or a domain's name or UUID), through the one backup transaction."""

from .. import units
from ..agent.jobs import run_recorded_backup
from ..agent.state import StateDir
from ..backup.options import options_from_config
from ..backup.transaction import DiskJob, run_transaction
from ..engine.qmp import QMPEngine, QMPTarget
from ..errors import UsageError
from ..store.factory import open_store
from .lookup import libvirt_connect
from .render import EXIT_OK, emit, progress_bar, summary


def cmd_backup(cfg, args) -> int:
    target = cfg.target(args.target)
    bar = progress_bar(f"backup {args.target}", args.json)
    try:
        if target is not None and target.engine == "qmp":
            results = _backup_qmp(cfg, target, args, bar)
        else:
            results = _backup_libvirt(cfg, target, args, bar)
    finally:
        bar.finish()
    if args.json:
        backups = [summary(r.manifest.header(), r.key) for r in results]
        emit({"ok": True, "backup": backups[0] if len(backups) == 1 else None, "backups": backups,
              "notes": results[0].notes if results else []})
        return EXIT_OK
    for n in (results[0].notes if results else []):
        print(f"recovered: {n}")
    for r in results:
        m, c = r.manifest, r.manifest.counts
        print(f"{m.backup_id}  {m.kind}  {m.target}: {m.reason}")
        print(f"  read {units.human(c['read_bytes'])} in {c['segments_backed_up']} segment(s), "
              f"stored {c['new_segments']} new ({units.human(c['stored_bytes'])}), "
              f"reused {c['reused_segments']}, zero {c['zero_segments']}; {m.timings['seconds']:.1f} s")
    return EXIT_OK


def _backup_qmp(cfg, target, args, bar):
    if args.disk:
        raise UsageError(f"target {target.name} is one disk: --disk applies to libvirt domains")
    store = open_store(cfg)
    engine = QMPEngine([QMPTarget(target.name, target.qmp_socket, target.node, cfg.scratch_dir, cfg.run_dir,
                                  target.bitmap_prefix, cfg.qmp_timeout, target.guest_agent_socket)])
    try:
        opts = options_from_config(cfg, target.name, target.bitmap_prefix, force_full=args.full,
                                   require_incremental=args.incremental,
                                   consistency=cfg.consistency_for(target.name, target=target))
        return run_transaction(engine, store, [DiskJob(target.name)], opts, progress=bar)
    finally:
        engine.close()


def _backup_libvirt(cfg, target, args, bar):
    """A libvirt domain: by a configured target (engine: libvirt) or directly by name/UUID. Recorded
    as a job in the agent's state directory, like the agent's own: `ekko status` shows it, and it
    never runs on a domain at the same time as another job."""
    domain = target.domain if target is not None else args.target
    disks = tuple(args.disk or (target.disks if target is not None else ()))
    prefix = target.bitmap_prefix if target is not None else units.DEFAULT_BITMAP_PREFIX
    # connect first: without libvirt-python it says so (libvirt_connect), not an ImportError below
    conn = libvirt_connect(cfg, args.target)
    # Imported here: both import libvirt-python, which a QMP target's backup does without (and
    # ~40 ms less to start).
    from ..backup.domain import DomainBackupRequest, run_domain_backup
    from ..engine.libvirt import lookup_domain
    if target is None:
        try:
            lookup_domain(conn, domain)
        except UsageError as e:
            conn.close()
            raise UsageError(f"unknown target {args.target!r}: not a configured target (configured: "
                             f"{', '.join(t.name for t in cfg.targets) or 'none'}) and {e}") from e
    try:
        req = DomainBackupRequest(domain, disks, args.full, args.incremental)
        # a target's own consistency wins over domains.<name>.consistency
        own = {"consistency": target.consistency, "consistency_by_domain": ()} if target and target.consistency else {}
        base = options_from_config(cfg, domain, prefix, **own)
        sd = StateDir(cfg.state_dir).ensure()

        def run(c, r, progress):
            return run_domain_backup(c, r, lambda ns: open_store(cfg, ns), base, cfg.state_dir, cfg.run_dir,
                                     progress=progress, hold_offline_start=sd.offline_backup)
        return run_recorded_backup(sd, conn, req, run, progress=bar)
    finally:
        conn.close()

"""`ekko restore BACKUP`: one disk to a raw or qcow2 file or onto a block device; a domain
backup's disks to a directory, and with --define as a new libvirt domain; with --instant that
domain runs at once on the served backup while its data is pulled in (restore/instant.py)."""

import os

from .. import units
from ..errors import EkkoError, UsageError
from ..restore import domain as dr
from ..restore.disk import restore
from ..store import catalog
from ..store.factory import open_store
from .lookup import libvirt_connect, locate, namespaces_of
from .render import EXIT_DAMAGED, EXIT_OK, emit, progress_bar


def cmd_restore(cfg, args) -> int:
    if args.instant or args.bandwidth:
        return _restore_instant(cfg, args)
    if args.define or (args.to and os.path.isdir(args.to)):
        return _restore_domain(cfg, args)
    if not args.to:
        raise UsageError("restore: give --to FILE (or a directory, or --define NEWNAME)")
    if args.disk and len(args.disk) > 1:
        raise UsageError("restore: one --disk per output file; give a directory as --to for several disks")
    store, key = locate(cfg, args.project, args.backup, args.disk[0] if args.disk else None)
    m = catalog.load(store, key)
    bar = progress_bar(f"restore {m.backup_id}", args.json)
    try:
        res = restore(store, m, args.to, args.format, workers=cfg.workers + 1,
                      allow_damaged=args.allow_damaged, overwrite=args.force, progress=bar)
    finally:
        bar.finish()
    holes = [h.__dict__ for h in res.holes]
    if args.json:
        emit({"ok": not holes, "path": res.path, "format": res.format, "written_bytes": res.written_bytes,
              "holes": holes})
    else:
        print(f"restored {m.backup_id} to {res.path} ({res.format}, {units.human(m.virtual_size)}, "
              f"{units.human(res.written_bytes)} written)")
        for h in res.holes:
            print(f"  HOLE: segment {h.index} offset {h.offset} length {h.length}: {h.problem}")
    return EXIT_DAMAGED if holes else EXIT_OK


def _restore_domain(cfg, args) -> int:
    """Every disk of a domain backup (or the --disk ones) into a directory; --define: a new domain."""
    found = []
    for ns in namespaces_of(cfg, args.project):
        store = open_store(cfg, ns)
        found += [(store, k) for k in catalog.matching(store, args.backup)]
    chosen = dr.select(found, args.disk or (), args.backup)
    directory = args.to or os.path.join(cfg.state_dir, "restore", args.define)
    conn = libvirt_connect(cfg, args.define) if args.define else None
    bars = []

    def progress_for(dev):
        bars.append(progress_bar(f"restore {args.backup} {dev}", args.json))
        return bars[-1]
    try:
        res = dr.restore_domain(chosen, directory, define=args.define, conn=conn, fmt=args.format,
                                workers=cfg.workers + 1, allow_damaged=args.allow_damaged, overwrite=args.force,
                                progress_for=progress_for)
    finally:
        for b in bars:
            b.finish()
        if conn is not None:
            conn.close()
    if args.json:
        emit(dict(dr.as_dict(res), ok=not res.holes))
    else:
        for d in res.disks:
            print(f"restored {res.backup_id} disk {d.dev} to {d.path} ({d.format}, "
                  f"{units.human(d.result.written_bytes)} written)")
            for h in d.result.holes:
                print(f"  HOLE: segment {h.index} offset {h.offset} length {h.length}: {h.problem}")
        if res.name:
            print(f"defined domain {res.name} (UUID {res.uuid}) on the restored disks")
            for n in res.notes:
                print(f"  {n}")
    return EXIT_DAMAGED if res.holes else EXIT_OK


def _restore_instant(cfg, args) -> int:
    """--define NEWNAME --instant: the new domain runs on overlays of the served backup; returns
    once it runs and its supervisor has taken over the pulls."""
    from ..restore import instant
    if not args.instant:
        raise UsageError("restore: --bandwidth is for --instant")
    if not args.define:
        raise UsageError("restore --instant needs --define NEWNAME (the domain to start)")
    if args.format == "raw" or args.allow_damaged:
        raise UsageError("restore --instant: the overlays are qcow2 and every read is checked "
                         "(no --format raw, no --allow-damaged)")
    found, stores = [], []
    try:
        for ns in namespaces_of(cfg, args.project):
            stores.append(open_store(cfg, ns))
            found += [((stores[-1], ns), k) for k in catalog.matching(stores[-1], args.backup)]
        picked = [(ns, k, catalog.load(st, k)) for (st, ns), k in dr.select(found, args.disk or (), args.backup)]
    finally:
        for st in stores:
            st.close()
    directory = args.to or os.path.join(cfg.state_dir, "restore", args.define)
    conn = _libvirt(cfg)
    try:
        job = instant.start_instant(cfg, picked, directory, args.define, conn, bandwidth=args.bandwidth,
                                    overwrite=args.force, verbose=args.verbose)
    finally:
        conn.close()
    if args.json:
        emit(dict(instant.as_dict(job), ok=True))
    else:
        print(f"domain {job.domain} (UUID {job.uuid}) runs on {job.backup_id}, served; its data is being pulled "
              f"into {job.directory} (supervisor pid {job.supervisor_pid}; `ekko status` shows the progress)")
        if job.message:
            print(f"  {job.message}")
    return EXIT_OK


def _libvirt(cfg):
    """A connection for --instant, or an error naming the URI (exit 1: nothing was started)."""
    from .. import config
    try:
        import libvirt
    except ImportError:
        raise EkkoError("restore --instant needs libvirt-python (Debian: python3-libvirt)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    uri = config.libvirt_uri(cfg)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise EkkoError(f"restore --instant: libvirt at {uri} cannot be reached: {e.get_error_message()}; "
                        "nothing was started") from e


def cmd_instant_supervise(cfg, args) -> int:
    """The supervisor of one instant restore (spawned by restore --instant, or to take one over)."""
    from ..restore import supervisor
    return supervisor.main(cfg, args.domain, args.ready_fd, args.verbose)

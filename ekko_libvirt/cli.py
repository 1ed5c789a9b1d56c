"""ekko: argv -> typed requests -> core calls -> human or --json output.

Exit codes:
  0  success
  1  the operation failed (nothing committed; nothing lost)
  2  bad input: config, arguments, unknown target/backup/disk, impossible incremental
  3  damaged data: verify found damage, or restore met damaged segments
  130 interrupted (Ctrl-C)
"""

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from . import catalog, config, units
from .errors import EkkoError, UsageError
from .progress import Progress

log = logging.getLogger("ekko")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_DAMAGED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"ekko: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the command. On the sub-commands their
    defaults are SUPPRESS, so `ekko -c X list` keeps the X given before the command."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=d(None),
                        help=f"config file (default $EKKO_CONFIG or {config.DEFAULT_PATH})")
    common.add_argument("--json", action="store_true", default=d(False), help="machine-readable output on stdout")
    common.add_argument("-v", "--verbose", action="count", default=d(0), help="more log output on stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ekko", description="Incremental-forever backups of libvirt/QEMU disks.",
                parents=[_common(False)])
    common = _common(True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("backup", parents=[common], help="back up a target (first run full, then incremental)")
    b.add_argument("target", help="target name from the config (or a libvirt domain name/UUID)")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="take a full backup and start a new chain")
    mode.add_argument("--incremental", action="store_true", help="fail unless an incremental is possible")
    b.add_argument("--disk", action="append", help="libvirt engine: only this disk (repeatable)")

    ls = sub.add_parser("list", parents=[common], help="list backups in the store")
    ls.add_argument("target", nargs="?")
    ls.add_argument("--project", help="only this project's namespace")

    s = sub.add_parser("show", parents=[common], help="details of one backup")
    s.add_argument("backup")
    s.add_argument("--disk", help="which disk of a domain backup")
    s.add_argument("--project", help="only look in this project's namespace")

    r = sub.add_parser("restore", parents=[common], help="restore a backup to a raw or qcow2 file")
    r.add_argument("backup")
    r.add_argument("--to", required=True, help="output file (.qcow2 -> qcow2, else raw)")
    r.add_argument("--format", choices=("raw", "qcow2"))
    r.add_argument("--disk", help="which disk of a domain backup")
    r.add_argument("--project", help="only look in this project's namespace")
    r.add_argument("--allow-damaged", action="store_true", help="restore what is intact; report the holes")
    r.add_argument("--force", action="store_true", help="overwrite an existing output file")

    v = sub.add_parser("verify", parents=[common], help="check backups: segments exist (--deep: re-hash)")
    v.add_argument("backup", nargs="?", help="one backup (default: all)")
    v.add_argument("--deep", action="store_true", help="download, decompress and re-hash every segment")
    v.add_argument("--target")
    v.add_argument("--disk", help="which disk of a domain backup")
    v.add_argument("--project", help="only this project's namespace")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="ekko: %(levelname)s: %(message)s")
    try:
        cfg = config.load(args.config)
        return COMMANDS[args.command](cfg, args)
    except EkkoError as e:
        _fail(args, e, e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("ekko: interrupted; nothing was committed\n")
        return 130


def _fail(args, e: Exception, code: int) -> None:
    sys.stderr.write(f"ekko: error: {e}\n")
    if args.json:
        _emit({"ok": False, "error": str(e), "error_type": type(e).__name__, "exit_code": code})


def _emit(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _store(cfg, namespace=None):
    from .store.factory import open_store
    return open_store(cfg, namespace)


def _namespaces(cfg, args):
    """The project given with --project, else every namespace of the store."""
    from .store.factory import namespaces
    project = getattr(args, "project", None)
    return [project] if project else namespaces(cfg)


def _locate(cfg, args):
    """(store, manifest key) of BACKUP, searched in every project namespace unless --project."""
    found = []
    for ns in _namespaces(cfg, args):
        store = _store(cfg, ns)
        found += [(store, k) for k in catalog.matching(store, args.backup, getattr(args, "disk", None))]
    key = catalog.choose([k for _, k in found], args.backup, getattr(args, "disk", None))
    return next(st for st, k in found if k == key), key


# -- backup ---------------------------------------------------------------------------------
def _backup_options(cfg, target: str, prefix: str = "ekko-", **kw):
    from .pipeline import BackupOptions
    return BackupOptions(target=target, segment_size=cfg.segment_size, granularity=cfg.granularity,
                         bitmap_prefix=prefix, compress=cfg.compress, compression_level=cfg.compression_level,
                         workers=cfg.workers, request_size=cfg.request_size, in_flight=cfg.in_flight,
                         lock_dir=os.path.join(cfg.state_dir, "locks"), **kw)


def cmd_backup(cfg, args) -> int:
    target = cfg.target(args.target)
    bar = Progress(f"backup {args.target}", enabled=None if not args.json else False)
    try:
        if target is not None and target.engine == "qmp":
            results = [_backup_qmp(cfg, target, args, bar)]
        else:
            results = _backup_libvirt(cfg, target, args, bar)
    finally:
        bar.finish()
    if args.json:
        backups = [_summary(r.manifest.header(), r.key) for r in results]
        _emit({"ok": True, "backup": backups[0] if len(backups) == 1 else None, "backups": backups,
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
    from .engine.qmp import QMPEngine, QMPTarget
    from .pipeline import run_backup
    if args.disk:
        raise UsageError(f"target {target.name} is one disk: --disk applies to libvirt domains")
    store = _store(cfg)
    engine = QMPEngine(QMPTarget(target.name, target.qmp_socket, target.node, cfg.scratch_dir, cfg.run_dir,
                                 target.bitmap_prefix, cfg.qmp_timeout))
    try:
        return run_backup(engine, store, _backup_options(cfg, target.name, target.bitmap_prefix, force_full=args.full,
                                                         require_incremental=args.incremental), progress=bar)
    finally:
        engine.close()


def _backup_libvirt(cfg, target, args, bar):
    """A libvirt domain: by a configured target (engine: libvirt) or directly by name/UUID."""
    from .domain_job import DomainBackupRequest, run_domain_backup
    from .store.factory import open_store
    domain = target.domain if target is not None else args.target
    disks = tuple(args.disk or (target.disks if target is not None else ()))
    prefix = target.bitmap_prefix if target is not None else "ekko-"
    conn = _libvirt_connect(cfg, args.target)
    try:
        req = DomainBackupRequest(domain, disks, args.full, args.incremental)
        return run_domain_backup(conn, req, lambda ns: open_store(cfg, ns), _backup_options(cfg, domain, prefix),
                                 cfg.state_dir, cfg.run_dir, progress=bar)
    finally:
        conn.close()


def _libvirt_connect(cfg, what: str):
    try:
        import libvirt
    except ImportError:
        raise UsageError(f"unknown target {what!r} (configured: {', '.join(t.name for t in cfg.targets) or 'none'}), "
                         "and libvirt-python is not installed to look it up as a domain") from None
    uri = config.libvirt_uri(cfg)
    # libvirt prints every error to stderr by default, even those we handle: ours say more.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise UsageError(f"unknown target {what!r} (configured: {', '.join(t.name for t in cfg.targets) or 'none'}), "
                         f"and libvirt at {uri} cannot be reached to look it up as a domain: "
                         f"{e.get_error_message()}") from e


def _summary(h: Dict, key: str) -> Dict:
    c = h.get("counts") or {}
    return {"backup_id": h["backup_id"], "target": h["target"], "kind": h["kind"], "reason": h["reason"],
            "parent": h["parent"], "created": h["created"], "virtual_size": h["virtual_size"],
            "segment_size": h["segment_size"], "stored_bytes": c.get("stored_bytes"),
            "read_bytes": c.get("read_bytes"), "data_segments": c.get("data_segments"),
            "generation": h.get("generation"), "key": key}


# -- list / show ------------------------------------------------------------------------------
def cmd_list(cfg, args) -> int:
    rows = []
    for ns in _namespaces(cfg, args):
        for e in catalog.entries(_store(cfg, ns), args.target):
            row = _summary(e.header, e.key) if e.header else {"key": e.key, "damaged": e.error}
            row["project"] = ns
            rows.append(row)
    if args.json:
        _emit({"ok": True, "backups": rows})
        return EXIT_OK
    if not rows:
        print("no backups")
    for r in rows:
        if "damaged" in r:
            print(f"{r['key']}  DAMAGED MANIFEST: {r['damaged']}")
            continue
        print(f"{r['backup_id']}  {r['target']:<16} {r['kind']:<11} {units.human(r['virtual_size']):>10} disk  "
              f"{units.human(r['stored_bytes'] or 0):>10} new  parent={r['parent'] or '-'}")
    return EXIT_OK


def cmd_show(cfg, args) -> int:
    store, key = _locate(cfg, args)
    m = catalog.load(store, key)
    h = m.header()
    if args.json:
        out = dict(h)
        out.update(key=key, data_segments=m.table.data_count())
        _emit({"ok": True, "backup": out})
        return EXIT_OK
    c = m.counts
    print(f"backup      {m.backup_id}")
    print(f"target      {m.target}   disk {m.disk.get('node')} ({m.disk.get('format')}) {m.disk.get('filename')}")
    print(f"kind        {m.kind}")
    print(f"reason      {m.reason}")
    print(f"parent      {m.parent or '-'}")
    print(f"created     {m.created}   took {m.timings.get('seconds', 0):.1f} s")
    print(f"disk size   {units.human(m.virtual_size)} in {m.table.count} segments of {units.human(m.segment_size)}"
          f" ({m.table.data_count()} with data)")
    print(f"this backup read {units.human(c.get('read_bytes', 0))}, stored {c.get('new_segments', 0)} new segments "
          f"({units.human(c.get('stored_bytes', 0))}), reused {c.get('reused_segments', 0)}")
    gen = m.generation or {}
    print(f"bitmap      {gen.get('bitmap') or '-'} (granularity {gen.get('granularity') or '-'})")
    return EXIT_OK


# -- restore ----------------------------------------------------------------------------------
def cmd_restore(cfg, args) -> int:
    from .restore import restore
    store, key = _locate(cfg, args)
    m = catalog.load(store, key)
    bar = Progress(f"restore {m.backup_id}", enabled=None if not args.json else False)
    try:
        res = restore(store, m, args.to, args.format, workers=cfg.workers + 1,
                      allow_damaged=args.allow_damaged, overwrite=args.force, progress=bar)
    finally:
        bar.finish()
    holes = [h.__dict__ for h in res.holes]
    if args.json:
        _emit({"ok": not holes, "path": res.path, "format": res.format, "written_bytes": res.written_bytes,
               "holes": holes})
    else:
        print(f"restored {m.backup_id} to {res.path} ({res.format}, {units.human(m.virtual_size)}, "
              f"{units.human(res.written_bytes)} written)")
        for h in res.holes:
            print(f"  HOLE: segment {h['index'] if isinstance(h, dict) else h.index} offset {h.offset} "
                  f"length {h.length}: {h.problem}")
    return EXIT_DAMAGED if holes else EXIT_OK


# -- verify -----------------------------------------------------------------------------------
def cmd_verify(cfg, args) -> int:
    from .verify import verify
    if args.backup:
        store, key = _locate(cfg, args)
        groups = [(store, [key])]
    else:
        groups = [(st, catalog.keys(st, args.target)) for st in (_store(cfg, ns) for ns in _namespaces(cfg, args))]
    bar = Progress("verify", enabled=None if not args.json else False)
    try:
        rep = None
        for store, keys in groups:
            part = verify(store, keys, deep=args.deep, workers=cfg.workers + 1, progress=bar)
            rep = part if rep is None else rep.merge(part)
    finally:
        bar.finish()
    if args.json:
        _emit({"ok": rep.ok, "deep": args.deep, "backups": rep.backups, "segments_checked": rep.segments_checked,
               "damaged_segments": [{"key": k, "problem": p, "used_by": sorted(rep.used_by.get(k, ()))}
                                    for k, p in sorted(rep.damaged.items())],
               "bad_manifests": rep.bad_manifests, "damaged_backups": rep.damaged_backups()})
    else:
        what = "deep (re-hashed)" if args.deep else "existence"
        print(f"verified {len(rep.backups)} backup(s), {rep.segments_checked} distinct segments, {what}")
        for k, p in sorted(rep.damaged.items()):
            print(f"  DAMAGED {k}: {p}\n    used by: {', '.join(sorted(rep.used_by.get(k, ())))}")
        for k, p in sorted(rep.bad_manifests.items()):
            print(f"  BAD MANIFEST {k}: {p}")
        print("OK" if rep.ok else f"DAMAGE FOUND in backup(s): {', '.join(rep.damaged_backups())}")
    return EXIT_OK if rep.ok else EXIT_DAMAGED


COMMANDS = {"backup": cmd_backup, "list": cmd_list, "show": cmd_show, "restore": cmd_restore, "verify": cmd_verify}

if __name__ == "__main__":
    sys.exit(main())

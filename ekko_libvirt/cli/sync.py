"""`ekko sync SOURCE DEST`: replication of one store into another (lifecycle/sync.py), per project
namespace, with --json and a progress line. Exit 3 when a backup was not copied because a segment
it needs is damaged or missing at the source."""

from typing import Dict, List

from .. import units
from ..config import Config
from ..errors import UsageError
from ..lifecycle.sync import SyncReport, Syncer, fetchers
from ..store.factory import namespaces, open_raw_store, open_store
from . import logs
from .render import EXIT_DAMAGED, EXIT_OK, emit, progress_bar


def cmd_sync(cfg: Config, args) -> int:
    if args.source == args.dest:
        raise UsageError(f"sync: source and destination are the same store ({args.source!r})")
    src_cfg, dst_cfg = cfg.with_store(args.source), cfg.with_store(args.dest)
    if src_cfg.store == dst_cfg.store:
        raise UsageError(f"sync: stores {args.source!r} and {args.dest!r} are configured the same: one store")
    for c in (src_cfg, dst_cfg):              # named Swift stores' credentials stay out of every log
        if c.store.type == "swift":
            logs.REDACT.secrets |= logs.secrets_of(c)
    projects = [args.project] if args.project else namespaces(src_cfg)
    bar = progress_bar("sync", args.json)
    reports: List[SyncReport] = []
    copied_before = 0
    try:
        for ns in projects:
            def progress(done, _total, base=copied_before):
                bar(base + done, None)
            syncer = Syncer(open_store(src_cfg, ns), open_raw_store(src_cfg, ns), open_raw_store(dst_cfg, ns),
                            project=ns, progress=progress,
                            workers=fetchers(cfg.workers, src_cfg.store.type, dict(src_cfg.store.options)))
            reports.append(syncer.run())
            copied_before += reports[-1].bytes_copied
    finally:
        bar.finish()
    ok = all(r.ok for r in reports)
    if args.json:
        emit({"ok": ok, "source": args.source, "dest": args.dest, "namespaces": [as_dict(r) for r in reports]})
    else:
        for r in reports:
            print(describe(r))
    return EXIT_OK if ok else EXIT_DAMAGED


def as_dict(r: SyncReport) -> Dict:
    return {"project": r.project, "source_manifests": r.source_manifests, "already": r.already,
            "copied": [k.split("/", 1)[1] for k in r.copied],
            "failed": [{"backup": f.key.split("/", 1)[1], "problem": f.problem,
                        "segments": [{"key": k, "problem": p} for k, p in f.segments]} for f in r.failed],
            "segments_checked": r.segments_checked, "segments_present": r.segments_present,
            "segments_copied": r.segments_copied, "bytes_copied": r.bytes_copied, "protected": r.protected,
            "ok": r.ok}


def describe(r: SyncReport) -> str:
    lines = [f"{r.project or 'default'}: {len(r.copied)} backup(s) copied, {r.already} already there"
             + (f", {len(r.failed)} NOT copied" if r.failed else "")
             + f"; {r.segments_copied} segment(s) copied ({units.human(r.bytes_copied)}), "
               f"{r.segments_present} found there"]
    for f in r.failed:
        lines.append(f"  NOT copied {f.key.split('/', 1)[1]}: {f.problem}")
        lines += [f"    {k}: {p}" for k, p in f.segments[:10]]
        if len(f.segments) > 10:
            lines.append(f"    ... and {len(f.segments) - 10} more")
    return "\n".join(lines)

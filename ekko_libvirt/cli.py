"""ekko: argv -> typed requests -> core calls -> human or --json output.

Exit codes:
  0  success
  1  the operation failed (nothing committed; nothing lost)
  2  bad input: config, arguments, unknown target/backup/disk, impossible incremental
  3  damaged data: verify found damage, restore met damaged segments, gc found a manifest it
     cannot read (and deleted nothing) or a backup that committed a segment gc had just deleted
  130 interrupted (Ctrl-C)

Lifecycle commands (issue 5): prune, protect, unprotect, gc, and verify --sample/--since-days.
Each takes --json; each uses the exit codes above.
"""

import argparse
import datetime
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Dict, List, Optional

from .store import catalog
from . import config, units
from .errors import ConfigError, EkkoError, UsageError
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
    ls.add_argument("target", nargs="?", help="only this target, or libvirt domain (the targets of its disks)")
    ls.add_argument("--project", help="only this project's namespace")

    s = sub.add_parser("show", parents=[common], help="details of one backup")
    s.add_argument("backup", help="backup id or unique prefix; or a target or libvirt domain: its newest backup")
    s.add_argument("--disk", help="only this disk of a domain backup (default: every disk)")
    s.add_argument("--project", help="only look in this project's namespace")

    r = sub.add_parser("restore", parents=[common],
                       help="restore a backup to a raw or qcow2 file or onto a block device, or a domain backup's "
                            "disks to a directory (--define: as a new libvirt domain)")
    r.add_argument("backup")
    r.add_argument("--to", help="output file (.qcow2 -> qcow2, else raw), or a block device (raw, in place, "
                                "with --force); or an existing directory, or with --define a directory (default "
                                "STATE_DIR/restore/NEWNAME): one file per disk")
    r.add_argument("--format", choices=("raw", "qcow2"), help="output format (default: from the file name; "
                                                                "per disk: the backed-up disk's format)")
    r.add_argument("--disk", action="append", help="which disk of a domain backup (repeatable with a directory)")
    r.add_argument("--define", metavar="NEWNAME",
                   help="define a new libvirt domain NEWNAME on the restored disks, from the domain XML stored "
                        "with the backup (new UUID, no Nova metadata); refused if NEWNAME exists")
    r.add_argument("--project", help="only look in this project's namespace")
    r.add_argument("--allow-damaged", action="store_true", help="restore what is intact; report the holes")
    r.add_argument("--force", action="store_true", help="overwrite an existing output file or block device")

    v = sub.add_parser("verify", parents=[common], help="check backups: segments exist (--deep: re-hash)")
    v.add_argument("backup", nargs="?", help="one backup (default: all)")
    v.add_argument("--deep", action="store_true", help="download, decompress and re-hash every segment")
    v.add_argument("--sample", type=_fraction, default=1.0, metavar="PCT",
                   help="check a random share of the distinct segments, e.g. 5%% (default 100%%)")
    v.add_argument("--since-days", type=_days, metavar="N",
                   help="skip backups that passed an equally thorough verify in the last N days")
    v.add_argument("--target")
    v.add_argument("--disk", help="which disk of a domain backup")
    v.add_argument("--project", help="only this project's namespace")
    _lifecycle_parsers(sub, common)
    _key_parsers(sub, common)
    _agent_parsers(sub, common)
    return p


def _agent_parsers(sub, common) -> None:
    sub.add_parser("agent", parents=[common],
                   help="run the host agent: hook events, libvirt events, scheduled backups (see ekko.yaml agent:)")
    st = sub.add_parser("status", parents=[common],
                        help="per domain: chain state, last backup, next scheduled, running job and progress")
    st.add_argument("domain", nargs="?", help="only this domain (libvirt name or UUID)")
    h = sub.add_parser("hook", parents=[common], help="install or remove the libvirt hook that feeds the agent")
    hs = h.add_subparsers(dest="hook_command", required=True, parser_class=_Parser)
    for name, what in (("install", "write the hook (spool and state dirs baked in), then SIGHUP libvirtd"),
                       ("uninstall", "remove the hook, then SIGHUP libvirtd")):
        x = hs.add_parser(name, parents=[common], help=what)
        x.add_argument("--dest", help="hook file (default: agent.hook_path, /etc/libvirt/hooks/qemu.d/ekko)")
        x.add_argument("--no-reload", action="store_true", help="do not SIGHUP libvirtd")


def _key_parsers(sub, common) -> None:
    k = sub.add_parser("key", parents=[common], help="encryption keys: create one, show fingerprints (never a key)")
    ks = k.add_subparsers(dest="key_command", required=True, parser_class=_Parser)
    kc = ks.add_parser("create", parents=[common], help="write a new random key file (0600) and print its fingerprint")
    kc.add_argument("--project", help="fills {project} in encryption.key_file (default: default)")
    kc.add_argument("--key-file", help="write the key here instead of encryption.key_file")
    kw = ks.add_parser("show", parents=[common],
                       help="fingerprints of the configured keys and of the keys the stored backups need")
    kw.add_argument("--project", help="only this project")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text!r}")
    return n


def _fraction(text: str) -> float:
    """'5%' -> 0.05; '0.05' -> 0.05. Anything outside (0, 100%] is refused."""
    t = text.strip()
    try:
        f = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        f = -1.0
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a percentage (5%%) or a fraction in (0, 1]")
    return f


def _days(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if f < 0:
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, not {text!r}")
    return f


def _lifecycle_parsers(sub, common) -> None:
    from .lifecycle.prune import RULES
    pr = sub.add_parser("prune", parents=[common],
                        help="delete the backups no retention rule keeps (their manifests; gc frees the space)")
    pr.add_argument("target", nargs="?", help="only this target (default: every target)")
    periods = {"hourly": "hours", "daily": "days", "weekly": "ISO weeks", "monthly": "months", "yearly": "years"}
    for rule in RULES:
        pr.add_argument(f"--keep-{rule}", type=_count, metavar="N",
                        help="keep the N newest backups" if rule == "last" else
                        f"keep the newest backup of each of the N newest {periods[rule]} that have one")
    pr.add_argument("--dry-run", action="store_true", help="show what would go and why; delete nothing")
    pr.add_argument("--project", help="only this project's namespace")

    for name, what in (("protect", "keep a backup whatever the retention policy says"),
                       ("unprotect", "let the retention policy decide about a backup again")):
        pp = sub.add_parser(name, parents=[common], help=what)
        pp.add_argument("backup", help="backup id (or unique prefix); every disk of a domain backup")
        pp.add_argument("--disk", help="only this disk of a domain backup")
        pp.add_argument("--project", help="only look in this project's namespace")

    g = sub.add_parser("gc", parents=[common],
                       help="delete segments that no backup references (safe while backups run)")
    g.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    g.add_argument("--grace-hours", type=_days, metavar="H",
                   help="keep unreferenced segments younger than this (default: retention.gc_grace_hours, 24); "
                        "must exceed the longest backup")
    g.add_argument("--project", help="only this project's namespace")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `timeout`, a service stop, an operator's kill): the command ends through the
    same failure path as Ctrl-C, so a backup undoes itself in QEMU right away (the
    copy-before-write filter, the export, the new bitmap generation) and a restore removes its
    partial image, instead of leaving them to the next run."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)      # a second SIGTERM ends the process at once
    raise Terminated()


class _Redact(logging.Filter):
    """Last line of defence on the log output: no token or key gets through, at any -v. Values
    of token and key headers (swiftclient, keystoneauth: 'X-Auth-Token: ...', "'x-auth-token':
    '...'"), tempauth tokens wherever they appear, and the configured secrets themselves."""

    _HEADER = re.compile(r"(?i)(x-(?:auth|storage|service|subject)-token|x-auth-key|x-storage-pass)"
                         r"([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+")
    _TEMPAUTH = re.compile(r"AUTH_tk[0-9a-f]+")

    def __init__(self):
        super().__init__()
        self.secrets: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:       # a malformed record: logging reports it itself
            return True
        clean = self._TEMPAUTH.sub("AUTH_tk***", self._HEADER.sub(r"\1\2***", text))
        for secret in self.secrets:
            clean = clean.replace(secret, "***")
        if clean != text:
            record.msg, record.args = clean, None
        return True


_REDACT = _Redact()
# Libraries whose own log lines show only with -vv: swiftclient logs every request that did not
# answer 2xx at INFO, the 404 that is exists()'s normal "no" too.
_CHATTY = ("swiftclient", "keystoneauth", "keystoneclient", "urllib3", "requests")


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), stream=sys.stderr,
                        format="ekko: %(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if _REDACT not in handler.filters:
            handler.addFilter(_REDACT)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def _secrets_of(cfg) -> set:
    """The configured credentials (file and environment), for _REDACT; short ones would blank
    out ordinary words and are left to the store's own scrubbing."""
    from .store.swift import SECRET_FIELDS
    found = {v for k, v in cfg.store.options if k in SECRET_FIELDS and isinstance(v, str)}
    found |= {os.environ.get(n) for n in ("ST_KEY", "OS_PASSWORD", "OS_APPLICATION_CREDENTIAL_SECRET")}
    return {v for v in found if v and len(v) >= 4}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)     # `ekko agent` installs its own
    try:
        cfg = check_sections(config.load(args.config))
        if cfg.store.type == "swift":
            _REDACT.secrets |= _secrets_of(cfg)
        return COMMANDS[args.command](cfg, args)
    except EkkoError as e:
        _fail(args, e, e.exit_code)
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            sys.stderr.write("ekko: terminated (SIGTERM); nothing was committed, nothing left half-done\n")
            return 128 + signal.SIGTERM
        sys.stderr.write("ekko: interrupted; nothing was committed\n")
        return 130
    except OSError as e:
        # Outside the store and the restored image, which have their own errors: state_dir,
        # run_dir, lock and scratch files. A message naming the file, not a traceback (-vv has it).
        logging.getLogger("ekko").debug("I/O error", exc_info=True)
        where = f" ({e.filename})" if e.filename else ""
        _fail(args, EkkoError(f"{e.strerror or e}{where}"), 1)
        return 1


def check_sections(cfg):
    """The config sections typed above the core, checked before any command runs: a bad key in
    them fails every command at once (exit 2, naming the key), not only the one that reads it."""
    from .agent.settings import AgentSettings
    from .lifecycle.prune import RetentionConfig
    RetentionConfig.from_config(cfg)
    AgentSettings.from_config(cfg)
    return cfg


def _fail(args, e: Exception, code: int) -> None:
    if isinstance(e, ConfigError):      # one line, whatever the file held
        e = ConfigError(" ".join(str(e.key).split()), " ".join(e.problem.split()))
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
    """(store, manifest key) of BACKUP (an id, a unique id prefix, or a target or domain name: its
    newest backup; catalog.matching), searched in every project namespace unless --project."""
    found = []
    for ns in _namespaces(cfg, args):
        store = _store(cfg, ns)
        found += [(store, k) for k in catalog.matching(store, args.backup, getattr(args, "disk", None))]
    key = catalog.choose([k for _, k in found], args.backup, getattr(args, "disk", None))
    return next(st for st, k in found if k == key), key


# -- backup ---------------------------------------------------------------------------------
def _backup_options(cfg, target: str, prefix: str = "ekko-", **kw):
    from .backup.options import options_from_config
    return options_from_config(cfg, target, prefix, **kw)


def cmd_backup(cfg, args) -> int:
    target = cfg.target(args.target)
    bar = Progress(f"backup {args.target}", enabled=None if not args.json else False)
    try:
        if target is not None and target.engine == "qmp":
            results = _backup_qmp(cfg, target, args, bar)
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
    from .backup.transaction import DiskJob, run_transaction
    from .engine.qmp import QMPEngine, QMPTarget
    if args.disk:
        raise UsageError(f"target {target.name} is one disk: --disk applies to libvirt domains")
    store = _store(cfg)
    engine = QMPEngine([QMPTarget(target.name, target.qmp_socket, target.node, cfg.scratch_dir, cfg.run_dir,
                                  target.bitmap_prefix, cfg.qmp_timeout)])
    try:
        opts = _backup_options(cfg, target.name, target.bitmap_prefix, force_full=args.full,
                               require_incremental=args.incremental)
        return run_transaction(engine, store, [DiskJob(target.name)], opts, progress=bar)
    finally:
        engine.close()


def _backup_libvirt(cfg, target, args, bar):
    """A libvirt domain: by a configured target (engine: libvirt) or directly by name/UUID. Recorded
    as a job in the agent's state directory, like the agent's own: `ekko status` shows it, and it
    never runs on a domain at the same time as another job."""
    from .agent.jobs import run_recorded_backup
    from .agent.state import StateDir
    from .backup.domain import DomainBackupRequest, run_domain_backup
    from .store.factory import open_store
    domain = target.domain if target is not None else args.target
    disks = tuple(args.disk or (target.disks if target is not None else ()))
    prefix = target.bitmap_prefix if target is not None else "ekko-"
    conn = _libvirt_connect(cfg, args.target)
    if target is None:
        from .engine.libvirt import lookup_domain
        try:
            lookup_domain(conn, domain)
        except UsageError as e:
            conn.close()
            raise UsageError(f"unknown target {args.target!r}: not a configured target (configured: "
                             f"{', '.join(t.name for t in cfg.targets) or 'none'}) and {e}") from e
    try:
        req = DomainBackupRequest(domain, disks, args.full, args.incremental)
        base = _backup_options(cfg, domain, prefix)

        sd = StateDir(cfg.state_dir).ensure()

        def run(c, r, progress):
            return run_domain_backup(c, r, lambda ns: open_store(cfg, ns), base, cfg.state_dir, cfg.run_dir,
                                     progress=progress, hold_offline_start=sd.offline_backup)
        return run_recorded_backup(sd, conn, req, run, progress=bar)
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
            "generation": h.get("generation"), "timings": h.get("timings"), "key": key}


# -- list / show ------------------------------------------------------------------------------
def _verified(state) -> Optional[Dict]:
    """The verify/ marker of a backup as output: when, how, what was found; None: never verified."""
    if state is None:
        return None
    return {"time": datetime.datetime.fromtimestamp(state.verified, datetime.timezone.utc).isoformat(
        timespec="seconds"), "ok": state.ok, "deep": state.deep, "sample": state.sample,
        "damaged_segments": list(state.damaged_segments), "problem": state.problem or None}


def _marks(store, target: str, backup_id: str, protected: Optional[set] = None,
           verified: Optional[set] = None) -> Dict:
    """protected + verified of one backup, from its markers in the store. `protected`/`verified`:
    the marker names listed once for many backups ('<target>/<backup-id>'); None: look it up."""
    from .store import markers
    rel = f"{target}/{backup_id}"
    prot = rel in protected if protected is not None else markers.is_protected(store, target, backup_id)
    state = markers.read_verify(store, target, backup_id) if verified is None or rel in verified else None
    return {"protected": prot, "verified": _verified(state)}


def _describe_verified(v: Optional[Dict]) -> str:
    if v is None:
        return "never verified"
    how = ("deep" if v["deep"] else "existence") + ("" if v["sample"] >= 1 else f", {v['sample']:.1%} sample")
    if v["ok"]:
        return f"verified ok {v['time']} ({how})"
    what = v["problem"] or f"{len(v['damaged_segments'])} damaged segment(s)"
    return f"VERIFY FAILED {v['time']} ({how}): {what}"


def cmd_list(cfg, args) -> int:
    """Every backup, or those of TARGET: a target, or a libvirt domain (its disks' targets,
    catalog.named: the store tells, libvirtd is not asked)."""
    from .store import markers
    rows = []
    for ns in _namespaces(cfg, args):
        store = _store(cfg, ns)
        if args.target is None:
            found = list(catalog.entries(store))
        else:
            found = sorted((e for t in catalog.named(store, args.target) for e in catalog.entries(store, t)),
                           key=lambda e: (e.backup_id, e.target))
        if not found:
            continue
        protected = markers.protected(store)
        verified = {k[len(markers.VERIFY):] for k in store.list(markers.VERIFY)}
        for e in found:
            if e.locked:
                row = {"key": e.key, "locked": e.error, "key_fingerprint": e.key_fingerprint}
            else:
                row = _summary(e.header, e.key) if e.header else {"key": e.key, "damaged": e.error}
            row["project"] = ns
            row.update(_marks(store, e.target, e.backup_id, protected, verified))
            rows.append(row)
    if args.json:
        _emit({"ok": True, "backups": rows})
        return EXIT_OK
    if not rows:
        print("no backups" + (f" of {args.target!r}: no target or libvirt domain of that name has backups in the "
                              "store" if args.target else ""))
    for r in rows:
        if "damaged" in r:
            print(f"{r['key']}  DAMAGED MANIFEST: {r['damaged']}")
            continue
        if "locked" in r:
            print(f"{r['key']}  LOCKED: {r['locked']}")
            continue
        print(f"{r['backup_id']}  {r['target']:<16} {r['kind']:<11} {units.human(r['virtual_size']):>10} disk  "
              f"{units.human(r['stored_bytes'] or 0):>10} new  parent={r['parent'] or '-'}"
              f"{'  PROTECTED' if r['protected'] else ''}  {_describe_verified(r['verified'])}")
    return EXIT_OK


def cmd_show(cfg, args) -> int:
    """One backup: by id or id prefix, or a target's or a domain's newest; every disk of a domain
    backup unless --disk picks one."""
    shown = []
    for store, key in _locate_all(cfg, args):
        m = catalog.load(store, key)
        shown.append((key, m, _marks(store, m.target, m.backup_id)))
    if args.json:
        out = [dict(m.header(), key=key, data_segments=m.table.data_count(), **marks) for key, m, marks in shown]
        _emit({"ok": True, "backup": out[0] if len(out) == 1 else None, "backups": out})
        return EXIT_OK
    for i, (_key, m, marks) in enumerate(shown):
        if i:
            print()
        _print_backup(m, marks)
    return EXIT_OK


def _print_backup(m, marks) -> None:
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
    enc = m.encryption or {}
    print(f"encryption  {enc.get('cipher', 'none')}" + (f", key fingerprint {enc['key_fingerprint']}" if enc else ""))
    print(f"protected   {'yes (never pruned: ekko unprotect to let retention decide)' if marks['protected'] else 'no'}")
    v = marks["verified"]
    print(f"verified    {_describe_verified(v)}")
    for seg in (v or {}).get("damaged_segments") or ():
        print(f"  DAMAGED {seg}")


# -- restore ----------------------------------------------------------------------------------
def cmd_restore(cfg, args) -> int:
    from .restore.disk import restore
    if args.define or (args.to and os.path.isdir(args.to)):
        return _restore_domain(cfg, args)
    if not args.to:
        raise UsageError("restore: give --to FILE (or a directory, or --define NEWNAME)")
    if args.disk and len(args.disk) > 1:
        raise UsageError("restore: one --disk per output file; give a directory as --to for several disks")
    store, key = _locate(cfg, argparse.Namespace(**dict(vars(args), disk=args.disk[0] if args.disk else None)))
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


def _restore_domain(cfg, args) -> int:
    """Every disk of a domain backup (or the --disk ones) into a directory; --define: a new domain."""
    from .restore import domain as dr
    found = []
    for ns in _namespaces(cfg, args):
        store = _store(cfg, ns)
        found += [(store, k) for k in catalog.matching(store, args.backup)]
    chosen = dr.select(found, args.disk or (), args.backup)
    directory = args.to or os.path.join(cfg.state_dir, "restore", args.define)
    conn = _libvirt_connect(cfg, args.define) if args.define else None
    bars = []

    def progress_for(dev):
        bars.append(Progress(f"restore {args.backup} {dev}", enabled=None if not args.json else False))
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
        _emit(dict(dr.as_dict(res), ok=not res.holes))
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


# -- verify -----------------------------------------------------------------------------------
def _keys_named(store, name: Optional[str]) -> List[str]:
    """Manifest keys of a target, or of every disk of the libvirt domain so named; all if None."""
    if not name:
        return catalog.keys(store)
    return [k for t in catalog.named(store, name) for k in catalog.keys(store, t)]


def cmd_verify(cfg, args) -> int:
    from .backup.ledger import Ledger, vanished_reasons
    from .lifecycle.verify import run as verify_run
    vanished = []
    if args.backup:
        store, key = _locate(cfg, args)
        groups = [(store, [key])]
    else:
        groups = [(st, _keys_named(st, args.target)) for st in (_store(cfg, ns) for ns in _namespaces(cfg, args))]
        # what this host committed must still be there: an emptied store is not "0 backups OK"
        everywhere = [st for st, _ in groups] if not getattr(args, "project", None) else \
            [_store(cfg, ns) for ns in _namespaces(cfg, argparse.Namespace())]
        vanished = vanished_reasons(Ledger(cfg.state_dir), everywhere,
                                    {args.target, *(t for st in everywhere for t in catalog.named(st, args.target))}
                                    if args.target else None)
    bar = Progress("verify", enabled=None if not args.json else False)
    try:
        rep, skipped, marked, cleared, not_recorded = None, [], [], [], []
        for store, keys in groups:
            done = verify_run(store, keys, deep=args.deep, sample=args.sample, since_days=args.since_days,
                              workers=cfg.workers + 1, progress=bar)
            part = done.report
            skipped += done.skipped
            marked += done.marked
            cleared += done.cleared
            if done.not_recorded:
                not_recorded.append(done.not_recorded)
            rep = part if rep is None else rep.merge(part)
    finally:
        bar.finish()
    if args.json:
        _emit({"ok": rep.ok and not vanished, "deep": args.deep, "backups": rep.backups, "segments_checked": rep.segments_checked,
               "damaged_segments": [{"key": k, "problem": p, "used_by": sorted(rep.used_by.get(k, ()))}
                                    for k, p in sorted(rep.damaged.items())],
               "bad_manifests": rep.bad_manifests, "damaged_backups": rep.damaged_backups(),
               "sample": args.sample, "skipped": skipped, "marked": marked, "cleared": cleared,
               "not_recorded": not_recorded, "vanished": vanished})
    else:
        what = "deep (re-hashed)" if args.deep else "existence"
        share = "" if args.sample >= 1 else f" (a {args.sample:.1%} sample)"
        print(f"verified {len(rep.backups)} backup(s), {rep.segments_checked} distinct segments{share}, {what}")
        if skipped:
            print(f"  skipped {len(skipped)} backup(s) verified in the last {args.since_days:g} day(s)")
        if marked:
            print(f"  marked {len(marked)} segment(s) damaged in the store: the next backup of each disk "
                  f"that still holds that data stores them again")
        if cleared:
            print(f"  {len(cleared)} segment(s) marked damaged before are intact now: marks removed")
        for k, p in sorted(rep.damaged.items()):
            print(f"  DAMAGED {k}: {p}\n    used by: {', '.join(sorted(rep.used_by.get(k, ())))}")
        for k, p in sorted(rep.bad_manifests.items()):
            print(f"  BAD MANIFEST {k}: {p}")
        for why in vanished:
            print(f"  VANISHED {why}")
        print("OK" if rep.ok and not vanished else
              f"DAMAGE FOUND in backup(s): {', '.join(rep.damaged_backups())}" if not rep.ok else
              "BACKUPS LOST: the store no longer holds backups this host committed (the next backup of each "
              "such disk is a full that says why)")
    for why in not_recorded:
        sys.stderr.write(f"ekko: warning: the results were not recorded in the store ({why}): `ekko list` "
                         "keeps its old verify state, and damage found is not marked for self-healing\n")
    return EXIT_OK if rep.ok and not vanished else EXIT_DAMAGED


# -- prune / protect / gc ---------------------------------------------------------------------
def cmd_prune(cfg, args) -> int:
    from .lifecycle import prune
    from .agent.settings import AgentSettings
    from .lifecycle.retention import prune_store
    settings = AgentSettings.from_config(cfg)
    given = {r: getattr(args, f"keep_{r}") for r in prune.RULES if getattr(args, f"keep_{r}") is not None}
    if given:
        cli_policy = prune.Policy(**given)
        policy_for = lambda _target, _labels: cli_policy  # noqa: E731
    elif settings.has_retention():
        # the agent's rule too: retention.targets, else the domain's (domains: NAME: retention:), else default
        def policy_for(target, labels):
            return settings.retention_for(target, labels.get("domain_uuid"), labels.get("domain_name"))
    else:
        raise UsageError("no retention rule: give --keep-last/--keep-daily/... or a `retention:` section "
                         f"(or domains: NAME: retention:) in {cfg.source}")
    tz = datetime.datetime.now().astimezone().tzinfo
    rows = []
    for ns in _namespaces(cfg, args):
        store = _store(cfg, ns)
        # a libvirt domain's name stands for its disks' targets (catalog.named)
        for target in (catalog.named(store, args.target) if args.target else [None]):
            for r in prune_store(store, policy_for, target, tz, args.dry_run):
                r["project"] = ns
                rows.append(r)
    kept = sum(1 for r in rows if r["keep"])
    gone = len(rows) - kept
    if args.json:
        _emit({"ok": True, "dry_run": args.dry_run, "kept": kept, "deleted": 0 if args.dry_run else gone,
               "would_delete": gone if args.dry_run else 0, "backups": rows})
        return EXIT_OK
    print(f"prune{' (dry run)' if args.dry_run else ''}: {len(rows)} backup(s): keep {kept}, "
          f"{'would delete' if args.dry_run else 'delete'} {gone}")
    target = None
    for r in rows:
        if r["target"] != target:
            target = r["target"]
            print(f"  {target}  ({r['policy']})")
        action = "keep  " if r["keep"] else ("would delete" if args.dry_run else "DELETED")
        print(f"    {r['backup_id']}  {action:<13} {', '.join(r['reasons'])}")
    if gone and not args.dry_run:
        print("manifests deleted; `ekko gc` frees the segments no other backup uses")
    return EXIT_OK


def _locate_all(cfg, args):
    """(store, manifest key) of every disk of BACKUP (one backup id; or a target or domain name:
    its newest backup), across namespaces."""
    found = []
    for ns in _namespaces(cfg, args):
        store = _store(cfg, ns)
        found += [(store, k) for k in catalog.matching(store, args.backup, getattr(args, "disk", None))]
    if len({k.rsplit("/", 1)[1] for _, k in found}) != 1:
        catalog.choose([k for _, k in found], args.backup, getattr(args, "disk", None))   # raises the UsageError
    return found


def cmd_protect(cfg, args) -> int:
    from .store import markers
    done = []
    for store, key in _locate_all(cfg, args):
        target, bid = key[len(catalog.PREFIX):].rsplit("/", 1)
        if args.command == "protect":
            markers.protect(store, target, bid)
            changed = True
        else:
            changed = markers.unprotect(store, target, bid)
        done.append({"backup_id": bid, "target": target, "protected": args.command == "protect", "changed": changed})
    if args.json:
        _emit({"ok": True, "backups": done})
        return EXIT_OK
    for d in done:
        state = "protected" if d["protected"] else ("no longer protected" if d["changed"] else "was not protected")
        print(f"{d['backup_id']}  {d['target']}: {state}")
    return EXIT_OK


def cmd_gc(cfg, args) -> int:
    from .lifecycle.gc import collect
    from .lifecycle.prune import RetentionConfig
    grace = args.grace_hours if args.grace_hours is not None else RetentionConfig.from_config(cfg).gc_grace_hours
    show = not args.json and sys.stderr.isatty()
    results = []
    for ns in _namespaces(cfg, args):
        label = f"gc{' ' + ns if ns else ''}"

        def progress(phase, done, total, _label=label):
            if show:
                sys.stderr.write(f"\r{_label}: {phase} {done}{'/' + str(total) if total else ''} ")
                sys.stderr.flush()
        rep = collect(_store(cfg, ns), grace, dry_run=args.dry_run, workers=cfg.workers + 1, progress=progress)
        if show:
            sys.stderr.write("\n")
        results.append((ns, rep))
    ok = all(r.ok for _, r in results)
    if args.json:
        _emit({"ok": ok, "dry_run": args.dry_run, "grace_hours": grace,
               "stores": [dict(r.as_dict(), project=ns) for ns, r in results]})
        return EXIT_OK if ok else EXIT_DAMAGED
    for ns, r in results:
        where = f" (project {ns})" if ns else ""
        verb = "would delete" if r.dry_run else "deleted"
        print(f"gc{where}: {r.manifests} backup(s) reference {r.referenced} segment(s); {r.segments} segment(s) "
              f"in the store, {r.unreferenced} unreferenced")
        print(f"  {verb} {r.deleted} ({units.human(r.deleted_bytes)}); kept {r.kept_young} younger than "
              f"{grace:g} h; removed {r.temp_removed} temp file(s) and {r.markers_removed} stale marker(s); "
              f"{r.seconds:.1f} s")
        for key, ids in sorted(r.raced.items()):
            print(f"  RACE: {key} was deleted while backup(s) {', '.join(ids)} committed it: marked damaged, "
                  f"the next backup of that disk stores it again")
    return EXIT_OK if ok else EXIT_DAMAGED


# -- key -------------------------------------------------------------------------------------
def cmd_key(cfg, args) -> int:
    from .format import crypto
    project = args.project or crypto.DEFAULT_PROJECT
    if args.key_command == "create":
        if not (args.key_file or cfg.encryption.key_file):
            raise UsageError(f"no encryption.key_file in {cfg.source}: give --key-file PATH")
        path = args.key_file or crypto.key_path(cfg.encryption.key_file, project)
        fp = crypto.create_key(path)
        if args.json:
            _emit({"ok": True, "project": project, "key_file": path, "fingerprint": fp})
        else:
            print(f"created key {path} for project {project}: fingerprint {fp}")
            print("keep a copy of it somewhere safe: backups sealed with it cannot be read without it")
        return EXIT_OK
    rows = [_key_row(cfg, ns, exists) for ns, exists in _key_namespaces(cfg, args.project)]
    if args.json:
        _emit({"ok": True, "encryption": cfg.encryption.enabled, "keys": rows})
        return EXIT_OK
    print(f"encryption {'on' if cfg.encryption.enabled else 'off'} ({cfg.source})")
    for r in rows:
        key = (f"key {r['key_file']}: fingerprint {r['fingerprint']}" if r["fingerprint"]
               else r["problem"] or "no encryption.key_file configured")
        print(f"project {r['project']}: {key}")
        for fp, n in sorted(r["backups"].items()):
            mine = " (this key)" if fp == r["fingerprint"] else ""
            print(f"  {n} backup(s) {'not encrypted' if fp == 'none' else 'sealed with ' + fp}{mine}")
    return EXIT_OK


def _key_namespaces(cfg, project: Optional[str]):
    """(namespace, whether the store has it): every namespace, or the one of --project."""
    from .format.crypto import DEFAULT_PROJECT
    from .store.factory import namespaces
    known = namespaces(cfg)
    if project is None:
        return [(ns, True) for ns in known]
    ns = None if project == DEFAULT_PROJECT else project
    return [(ns, ns in known)]


def _key_row(cfg, ns: Optional[str], exists: bool) -> Dict:
    """One project's configured key (fingerprint only) and the fingerprints its backups need."""
    from .format import crypto
    from .format.codec import sealed_fingerprint
    from .errors import ConfigError
    from .store.factory import open_raw_store
    project = ns or crypto.DEFAULT_PROJECT
    row = {"project": project, "namespace": ns, "key_file": None, "fingerprint": None, "problem": None,
           "backups": {}}
    if cfg.encryption.key_file:
        row["key_file"] = path = crypto.key_path(cfg.encryption.key_file, project)
        try:
            row["fingerprint"] = crypto.fingerprint(crypto.load_key(path))
        except ConfigError as e:
            row["problem"] = e.problem
    if exists:
        store = open_raw_store(cfg, ns)
        for key in catalog.keys(store):
            try:
                fp = sealed_fingerprint(store.get(key)[:crypto.PREFIX_SIZE]) or "none"
            except EkkoError:
                continue
            row["backups"][fp] = row["backups"].get(fp, 0) + 1
    return row


# -- agent, status, hook -------------------------------------------------------------------------
def cmd_agent(cfg, args) -> int:
    from .agent import daemon
    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)      # a daemon tells what it does
    return daemon.main(cfg, cfg.source or None)


def cmd_status(cfg, args) -> int:
    from .agent import status
    from .agent.settings import AgentSettings
    from .agent.state import StateDir
    settings = AgentSettings.from_config(cfg)
    sd = StateDir(cfg.state_dir)
    conn, lv_error = None, None
    try:
        import libvirt
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        conn = libvirt.open(config.libvirt_uri(cfg))
    except ImportError:
        lv_error = "libvirt-python is not installed"
    except libvirt.libvirtError as e:
        lv_error = e.get_error_message()
    if lv_error:
        log.warning("libvirt not reachable (%s): showing what the agent's state directory knows", lv_error)
    stores: Dict[Optional[str], Any] = {}

    def open_store(ns):
        if ns not in stores:
            stores[ns] = _store(cfg, ns)
        return stores[ns]
    try:
        now = datetime.datetime.now().astimezone()
        rows = status.collect(sd, conn, open_store, settings.schedule, settings.overrides, args.domain, now)
    finally:
        if conn is not None:
            conn.close()
    if args.domain and not rows:
        raise UsageError(f"no domain {args.domain!r} known to libvirt or to the agent's state in {cfg.state_dir}")
    agent = status.agent_info(sd)
    lifecycle = status.lifecycle_info(sd.load_lifecycle(), settings.gc_interval_s, settings.verify, now)
    hook = status.hook_info(settings.hook_path, settings.spool_dir)
    vanished, store_error = _vanished(cfg, args.domain)
    if args.json:
        _emit({"ok": not vanished, "agent": agent, "libvirt": {"uri": config.libvirt_uri(cfg), "error": lv_error},
               "hook": hook, "lifecycle": lifecycle, "domains": rows,
               "store": {"vanished": vanished, "error": store_error}})
        return EXIT_DAMAGED if vanished else EXIT_OK
    running = f"running, pid {agent['pid']} since {agent['since']}" if agent["running"] else "not running"
    print(f"agent: {running}; {len(rows)} domain(s)")
    print(status.describe_hook(hook))
    print(status.describe_lifecycle(lifecycle))
    for r in rows:
        print(status.describe(r))
    if store_error:
        print(f"store: cannot check that it still holds what this host committed: {store_error}")
    for why in vanished:
        print(f"store: VANISHED {why}")
    return EXIT_DAMAGED if vanished else EXIT_OK


def _vanished(cfg, domain: Optional[str] = None) -> "tuple[List[str], Optional[str]]":
    """Backups this host committed that the store lost (backup/ledger.py), of every target or of
    the disks of `domain`, and why it could not tell."""
    from .backup.ledger import Ledger, vanished_reasons
    from .engine.domain_xml import target_name
    records = Ledger(cfg.state_dir).records()
    targets = [r.target for r in records if domain is None or r.target.startswith(target_name(domain, ""))]
    if not targets:
        return [], None
    try:
        stores = [_store(cfg, ns) for ns in _namespaces(cfg, argparse.Namespace())]
        return vanished_reasons(Ledger(cfg.state_dir), stores, targets), None
    except EkkoError as e:
        return [], str(e)


def cmd_hook(cfg, args) -> int:
    from .agent.settings import AgentSettings
    from .agent.spool import install_hook, uninstall_hook
    settings = AgentSettings.from_config(cfg)
    dest = args.dest or settings.hook_path
    if args.hook_command == "install":
        try:
            install_hook(dest, settings.spool_dir, cfg.state_dir, spool_max=settings.spool_max_events)
        except (OSError, ValueError) as e:
            raise EkkoError(f"cannot install the hook as {dest}: {e}") from e
        done = (f"installed {dest} (spool {settings.spool_dir}, coalesced above {settings.spool_max_events} events, "
                f"state {cfg.state_dir})")
    else:
        try:
            removed = uninstall_hook(dest)
        except (OSError, ValueError) as e:
            raise EkkoError(f"cannot remove the hook {dest}: {e}") from e
        done = f"removed {dest}" if removed else f"{dest} was not installed"
    pid = None if args.no_reload else _reload_libvirtd()
    told = ("libvirtd not told (--no-reload)" if args.no_reload else
            f"libvirtd (pid {pid}) re-reads its hooks" if pid else "libvirtd is not running: it reads the hooks "
                                                                   "when it starts")
    if args.json:
        _emit({"ok": True, "hook": dest, "action": args.hook_command, "libvirtd_pid": pid,
               "spool_dir": settings.spool_dir, "state_dir": cfg.state_dir})
    else:
        print(f"{done}; {told}")
    return EXIT_OK


def _reload_libvirtd() -> Optional[int]:
    """SIGHUP the running libvirtd (or virtqemud): hook files are looked for at start and on SIGHUP."""
    for pidfile, comm in (("/run/libvirtd.pid", "libvirtd"), ("/run/virtqemud.pid", "virtqemud")):
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != comm:
                    continue
            os.kill(pid, signal.SIGHUP)
            return pid
        except (OSError, ValueError):
            continue
    return None


COMMANDS = {"backup": cmd_backup, "list": cmd_list, "show": cmd_show, "restore": cmd_restore, "verify": cmd_verify,
            "prune": cmd_prune, "protect": cmd_protect, "unprotect": cmd_protect, "gc": cmd_gc,
            "key": cmd_key, "agent": cmd_agent, "status": cmd_status, "hook": cmd_hook}

if __name__ == "__main__":
    sys.exit(main())

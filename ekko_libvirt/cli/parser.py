"""argv -> argparse.Namespace: every command, its options and their help, and the argument types
that refuse a bad value with exit 2 (argparse's usage line, then `ekko: error: ...`)."""

import argparse
import sys
import textwrap

from .. import config
from ..lifecycle.prune import RULES
from .render import EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"ekko: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _common(suppress: bool) -> _Parser:
    """Global options, accepted before or after the command. On the sub-commands their
    defaults are SUPPRESS, so `ekko -c X list` keeps the X given before the command."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    common = _Parser(add_help=False)
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
    r.add_argument("--instant", action="store_true",
                   help="with --define: start NEWNAME at once on qcow2 overlays in DIR backed by the backup's NBD "
                        "export (ekko serve), and pull the data in while it runs (a supervisor in the background "
                        "keeps the export up until then; see `ekko status`)")
    r.add_argument("--bandwidth", type=_size, default=0, metavar="SIZE",
                   help="with --instant: pull at most SIZE per second per disk, e.g. 50MiB (default: unlimited)")
    isv = sub.add_parser("_instant-supervise", parents=[common],
                         help="(internal) the supervisor of an instant restore: spawned by restore --instant and "
                              "by the agent; by hand, it takes over a job whose supervisor is gone")
    isv.add_argument("domain")
    isv.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

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
    _serve_parsers(sub, common)
    _lifecycle_parsers(sub, common)
    _key_parsers(sub, common)
    _agent_parsers(sub, common)
    _sync_parsers(sub, common)
    return p


def _serve_parsers(sub, common: _Parser) -> None:
    sv = sub.add_parser(
        "serve", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="serve one backup's disk as a read-only NBD export (nbdkit) until Ctrl-C / SIGTERM",
        description=textwrap.fill(
            "Serve one backup's disk, read-only, over NBD (nbdkit and ekko's plugin), without restoring "
            "it: any NBD client reads it (qemu-img, nbdcopy, nbdinfo, qemu-nbd, libguestfs, nbdfuse). "
            "Segments are fetched from the store when read, each re-hashed before a byte of it is "
            "served; a missing or damaged one fails that read with EIO (the log names it), never "
            "wrong bytes. Block status comes from the manifest, so clients skip the zero segments.", 79),
        epilog=textwrap.fill("Prints the NBD URI (--json: uri, socket, pid, backup), then serves until Ctrl-C, "
                             "SIGTERM or --idle-timeout; the nbdkit process ends with ekko.", 79) + "\n\nexamples:\n"
               "  ekko serve vm1                      # the newest backup of target or domain vm1\n"
               "  ekko serve 20261201T0300 --disk vda --tcp 127.0.0.1:10809\n"
               "  qemu-img convert -O qcow2 'nbd+unix:///?socket=...' out.qcow2")
    sv.add_argument("backup", help="backup id or unique prefix; or a target or libvirt domain: its newest backup")
    sv.add_argument("--disk", help="which disk of a domain backup (e.g. vda); needed when it has several")
    sv.add_argument("--socket", metavar="PATH",
                    help="listen on this unix socket (default: RUN_DIR/serve-PID-N.sock; mode 0600)")
    sv.add_argument("--tcp", metavar="HOST:PORT",
                    help="listen on TCP instead (HOST defaults to 127.0.0.1; no TLS, no authentication: "
                         "anyone who reaches the port reads the disk)")
    sv.add_argument("--idle-timeout", type=_seconds, metavar="S",
                    help="stop after S seconds with no client connected")
    sv.add_argument("--cache", type=_size, default=None, metavar="SIZE",
                    help="decoded segments kept in memory (default: the config's serve.cache, 64MiB)")
    sv.add_argument("--project", help="only look in this project's namespace")

    mo = sub.add_parser("mount", parents=[common],
                        help="the backup's raw disk as the read-only file DIR/disk.raw (nbdfuse over ekko serve)")
    mo.add_argument("backup", help="backup id or unique prefix; or a target or libvirt domain: its newest backup")
    mo.add_argument("dir", help="an empty directory to mount on")
    mo.add_argument("--disk", help="which disk of a domain backup (e.g. vda)")
    mo.add_argument("--project", help="only look in this project's namespace")
    mo.add_argument("--foreground", action="store_true",
                    help="stay in the foreground until unmounted; Ctrl-C / SIGTERM unmount (default: return once "
                         "mounted, a background ekko holds the mount until `ekko umount DIR`)")
    mo.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    um = sub.add_parser("umount", parents=[common], help="unmount what `ekko mount` mounted on DIR")
    um.add_argument("dir")
    fi = sub.add_parser(
        "files", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="list a directory of a guest file system in a backup, or extract files and trees (libguestfs)",
        description=textwrap.fill(
            "List a directory of the guest file system in a backup (name, type, size, mode, mtime), or copy "
            "files and trees out with --extract DIR (modes and mtimes kept, symlinks as symlinks, never "
            "followed; nothing outside DIR written, nothing in it overwritten). The backup is served "
            "(ekko serve) to a libguestfs appliance: partitions, LVM and file systems are read in there, "
            "never by this host's kernel.", 79) + "\n\nexamples:\n"
               "  ekko files vm1 /etc --disk vda\n"
               "  ekko files 20261201T0300 /etc/fstab /home/ann --extract /tmp/out")
    fi.add_argument("backup", help="backup id or unique prefix; or a target or libvirt domain: its newest backup")
    fi.add_argument("paths", nargs="*", metavar="PATH", help="guest path (default /); several with --extract")
    fi.add_argument("--extract", metavar="DIR", help="copy PATH... (files or trees) into DIR")
    fi.add_argument("--disk", help="which disk of a domain backup (e.g. vda)")
    fi.add_argument("--fs", metavar="DEVICE",
                    help="the file system, as the appliance names it (/dev/sda2, /dev/vg0/root) when the disk "
                         "has several")
    fi.add_argument("--project", help="only look in this project's namespace")


def _sync_parsers(sub, common: _Parser) -> None:
    sy = sub.add_parser(
        "sync", parents=[common], help="copy the backups a second store lacks into it (replication)",
        description=textwrap.fill(
            "Copy every backup of store SOURCE that store DEST lacks, with the segments it needs, project by "
            "project. Each segment is decoded and re-hashed on the way; a damaged or missing one is reported and "
            "the backups that need it are not committed at DEST (exit 3). Manifests go last, so DEST is always "
            "consistent; an interrupted sync resumes where it stopped. Encrypted stores are copied sealed (DEST "
            "never needs the key; reading SOURCE's manifests does).", 79),
        epilog="stores: 'default' is `store:` of the config, the others are named under `stores:`")
    sy.add_argument("source", help="the store to copy from: default, or a name under `stores:`")
    sy.add_argument("dest", help="the store to copy into: default, or a name under `stores:`")
    sy.add_argument("--project", help="only this project's namespace")


def _agent_parsers(sub, common: _Parser) -> None:
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


def _key_parsers(sub, common: _Parser) -> None:
    k = sub.add_parser("key", parents=[common], help="encryption keys: create one, show fingerprints (never a key)")
    ks = k.add_subparsers(dest="key_command", required=True, parser_class=_Parser)
    kc = ks.add_parser("create", parents=[common], help="write a new random key file (0600) and print its fingerprint")
    kc.add_argument("--project", help="fills {project} in encryption.key_file (default: default)")
    kc.add_argument("--key-file", help="write the key here instead of encryption.key_file")
    kw = ks.add_parser("show", parents=[common],
                       help="fingerprints of the configured keys and of the keys the stored backups need")
    kw.add_argument("--project", help="only this project")


def _lifecycle_parsers(sub, common: _Parser) -> None:
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


# -- argument types: a bad value is argparse's error (exit 2, naming the option) ----------------
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
        raise argparse.ArgumentTypeError(f"{text!r}: give a percentage (5%) or a fraction in (0, 1]")
    return f


def _seconds(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if not f > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return f


def _size(text: str) -> int:
    from ..units import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _days(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if f < 0:
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, not {text!r}")
    return f

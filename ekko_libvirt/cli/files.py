"""`ekko files BACKUP [PATH]`: list a directory of the guest file system in a backup;
`ekko files BACKUP PATH... --extract DIR`: copy files and trees out. Through `ekko serve`'s
server (serve/server.py) and one libguestfs appliance per command (serve/files.py).

Exit 3 when the guest file system is damaged: it cannot be mounted, the directory cannot be
read, or (extracting) some entries could not be read: those are named, the rest is extracted."""

import datetime
import stat
import sys

from ..errors import UsageError
from ..serve import files, server
from .render import EXIT_OK, emit
from .serve import locate_namespace

EXIT_DAMAGED = files.DamagedFileSystem.exit_code


def cmd_files(cfg, args) -> int:
    paths = args.paths or ["/"]
    if args.extract is None and len(paths) > 1:
        raise UsageError("files: one PATH to list (several only with --extract DIR)")
    if args.extract is not None and not args.paths:
        raise UsageError("files --extract: give the guest PATHs to extract")
    wanted = [files.guest_path(p) for p in paths]         # '..' refused before anything starts
    ns, key = locate_namespace(cfg, args.project, args.backup, args.disk)
    with server.serving(cfg, ns, key, verbose=args.verbose) as srv:
        assert srv.socket is not None
        with files.Guest(srv.socket, args.fs, trace=args.verbose >= 2) as g:
            where = {"backup_id": srv.manifest.backup_id, "target": srv.manifest.target,
                     "filesystem": g.device, "fstype": g.fstype}
            if args.extract is None:
                entries, refused = g.listdir(wanted[0])
                if args.json:
                    emit(dict(where, ok=True, path=wanted[0], entries=[e.as_dict() for e in entries],
                              refused=refused))
                else:
                    print(f"{where['backup_id']} ({where['target']}) {g.device} ({g.fstype}): {wanted[0]}")
                    for e in entries:
                        print(_line(e))
                for r in refused:
                    sys.stderr.write(f"ekko files: {files.printable(r)}: a name that is not one path component, "
                                     "not shown\n")
                return EXIT_OK
            done = files.extract(g, wanted, args.extract)
    failed = [{"path": p, "error": why} for p, why in done.failed]
    if args.json:
        emit(dict(where, ok=not failed, into=args.extract, paths=wanted, files=done.files,
                  directories=done.directories, symlinks=done.symlinks, hardlinks=done.hardlinks, bytes=done.bytes,
                  skipped=done.skipped, failed=failed))
    else:
        print(f"extracted {done.files} files ({done.bytes} bytes), {done.directories} directories, "
              f"{done.symlinks} symlinks, {done.hardlinks} hard links from {where['backup_id']} "
              f"{where['filesystem']} into {args.extract}")
    for p in done.skipped:
        sys.stderr.write(f"ekko files: skipped {files.printable(p)} (not a file, directory or symlink)\n")
    for p, why in done.failed:
        sys.stderr.write(f"ekko files: not extracted: {files.printable(p)}: {why}\n")
    if failed:
        sys.stderr.write(f"ekko files: {len(failed)} entries could not be read (damaged guest file system); "
                         "everything else is in the destination\n")
        return EXIT_DAMAGED
    return EXIT_OK


def _line(e: files.Entry) -> str:
    kind = {"directory": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR, "block": stat.S_IFBLK,
            "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}.get(e.type, stat.S_IFREG)
    when = datetime.datetime.fromtimestamp(e.mtime_ns // 1_000_000_000, datetime.timezone.utc)
    name = files.printable(e.name) + (f" -> {files.printable(e.target)}" if e.target is not None else "")
    return f"{stat.filemode(kind | e.mode)} {e.size:>12} {when:%Y-%m-%d %H:%M:%S} {name}"

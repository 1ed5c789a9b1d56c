"""`ekko serve BACKUP`: one backup's disk as a read-only NBD export until Ctrl-C, SIGTERM or
--idle-timeout (serve/server.py starts and stops nbdkit). `ekko mount BACKUP DIR` / `ekko umount
DIR`: that export as the read-only file DIR/disk.raw through nbdfuse (serve/mount.py)."""

import json
import os
import subprocess
import sys
from typing import Optional, Tuple

from .. import config, units
from ..errors import ConfigError, UsageError
from ..serve import server
from ..store import catalog
from ..store.factory import open_store
from .lookup import namespaces_of
from .render import EXIT_OK, emit


def parse_tcp(text: str) -> Tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' (host 127.0.0.1); '[::1]:PORT' for IPv6."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        n = -1
    if not 0 < n < 65536:
        raise UsageError(f"--tcp {text!r}: give HOST:PORT with a port in 1..65535")
    return host, n


def cmd_serve(cfg, args) -> int:
    if args.socket and args.tcp:
        raise UsageError("serve: --socket and --tcp exclude each other")
    cache = cfg.serve.cache if args.cache is None else _cache(args.cache)
    ns, key = locate_namespace(cfg, args.project, args.backup, args.disk)
    srv = server.start(cfg, ns, key, socket_path=args.socket, tcp=parse_tcp(args.tcp) if args.tcp else None,
                       idle_timeout=args.idle_timeout, cache_bytes=cache, verbose=args.verbose)
    reason = "stopped"
    try:
        info = srv.describe()
        if args.json:
            emit(dict(info, ok=True))
        else:
            m = srv.manifest
            print(f"serving {m.backup_id} ({m.target}, {units.human(m.virtual_size)}, read-only) at {srv.uri}")
            print("  Ctrl-C or SIGTERM stops it" + (f"; so do {args.idle_timeout:g} s without a client"
                                                    if args.idle_timeout else ""))
        sys.stdout.flush()
        rc = srv.wait()
        if rc != 0:
            raise server.ServeError(f"nbdkit (pid {srv.pid}) exited with status {rc}: "
                                    + " / ".join(list(srv.tail)[-5:]))
        reason = f"no client for {args.idle_timeout:g} s (--idle-timeout)" if args.idle_timeout else "nbdkit ended"
    except KeyboardInterrupt as e:
        from . import Terminated
        reason = "SIGTERM" if isinstance(e, Terminated) else "interrupted"
    finally:
        srv.stop()
    sys.stderr.write(f"ekko serve: stopped ({reason}); {srv.uri} is gone\n")
    return EXIT_OK


def _cache(size: int) -> int:
    """--cache SIZE: the bounds of the config's serve.cache."""
    try:
        return config.serve_cache(size, "--cache")
    except ConfigError as e:
        raise UsageError(f"--cache: {e.problem}") from e


def locate_namespace(cfg, project: Optional[str], backup: str, disk: Optional[str]) -> Tuple[Optional[str], str]:
    """(project namespace, manifest key) of BACKUP, searched as lookup.locate does: the server
    opens the store of that namespace again itself."""
    found = []
    for ns in namespaces_of(cfg, project):
        store = open_store(cfg, ns)
        try:
            found += [(ns, k) for k in catalog.matching(store, backup, disk)]
        finally:
            store.close()
    key = catalog.choose([k for _, k in found], backup, disk)
    return next(ns for ns, k in found if k == key), key


def cmd_mount(cfg, args) -> int:
    """Foreground: serve + nbdfuse until unmounted or stopped. Default: the same in a background
    ekko (a session of its own, its log in RUN_DIR/mounts/), returning once the file is there."""
    from ..serve import mount
    if not args.foreground:
        return _mount_background(cfg, args)
    ns, key = locate_namespace(cfg, args.project, args.backup, args.disk)
    ready_fd = args.ready_fd

    def on_ready(rec) -> None:
        info = dict(rec.__dict__, ok=True, file=rec.file)
        if ready_fd is not None:
            os.write(ready_fd, (json.dumps(info) + "\n").encode())
            os.close(ready_fd)
        elif args.json:
            emit(info)
        else:
            print(f"mounted {rec.backup_id} ({rec.target}) read-only at {rec.file}; "
                  f"Ctrl-C or `ekko umount {rec.dir}` ends it")
        sys.stdout.flush()
    try:
        why = mount.mount_foreground(cfg, ns, key, args.dir, on_ready, verbose=args.verbose)
    except KeyboardInterrupt as e:
        from . import Terminated
        why = "SIGTERM" if isinstance(e, Terminated) else "interrupted"
    sys.stderr.write(f"ekko mount: {args.dir} {'unmounted' if why == 'unmounted' else 'unmounted (' + why + ')'}\n")
    return EXIT_OK


def _mount_background(cfg, args) -> int:
    from ..serve import mount
    mount.check_dir(args.dir)          # the common mistakes, before anything starts
    locate_namespace(cfg, args.project, args.backup, args.disk)
    os.makedirs(os.path.join(cfg.run_dir, "mounts"), mode=0o700, exist_ok=True)
    log_path = mount.record_path(cfg, args.dir)[:-len(".json")] + ".log"
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", os.path.abspath(cfg.source), "mount", args.backup,
           os.path.abspath(args.dir), "--foreground", "--ready-fd", str(w), *(["-v"] * args.verbose)]
    for opt, val in (("--disk", args.disk), ("--project", args.project)):
        if val:
            cmd += [opt, val]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(w,),
                                start_new_session=True, env=dict(os.environ, PYTHONPATH=server.PACKAGE_ROOT))
    os.close(w)
    with os.fdopen(r) as ready:
        line = ready.readline()
    if not line:
        proc.wait()
        with open(log_path, errors="replace") as f:
            tail = [t.rstrip() for t in f.readlines()[-6:] if t.strip()]
        err = next((t[len("ekko: error: "):] for t in reversed(tail) if t.startswith("ekko: error: ")), None)
        raise mount.MountError(err or f"ekko mount (pid {proc.pid}) exited with status {proc.returncode}: "
                               + " / ".join(tail))
    info = json.loads(line)
    if args.json:
        emit(dict(info, log=log_path))
    else:
        print(f"mounted {info['backup_id']} ({info['target']}) read-only at {info['file']}")
        print(f"  ekko umount {info['dir']} unmounts it (ekko pid {info['pid']}, log {log_path})")
    return EXIT_OK


def cmd_umount(cfg, args) -> int:
    from ..serve import mount
    rec = mount.umount(cfg, args.dir)
    if args.json:
        emit({"ok": True, "dir": rec.dir, "backup_id": rec.backup_id})
    else:
        print(f"unmounted {rec.dir} ({rec.backup_id})")
    return EXIT_OK

"""`ekko serve BACKUP`: one backup's disk as a read-only NBD export until Ctrl-C, SIGTERM or
--idle-timeout (serve/server.py starts and stops nbdkit)."""

import sys
from typing import Optional, Tuple

from .. import units
from ..errors import UsageError
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
    ns, key = locate_namespace(cfg, args.project, args.backup, args.disk)
    srv = server.start(cfg, ns, key, socket_path=args.socket, tcp=parse_tcp(args.tcp) if args.tcp else None,
                       idle_timeout=args.idle_timeout, cache_bytes=args.cache, verbose=args.verbose)
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

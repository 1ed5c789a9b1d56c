"""This host's side: `ekko agent` (the daemon), `ekko status` (per domain, from the agent's state
directory and libvirt), `ekko hook install|uninstall` (the libvirt hook that feeds the agent)."""

import datetime
import logging
import os
import signal
from typing import Any, Dict, List, Optional, Tuple

from .. import config
from ..agent import status
from ..agent.settings import AgentSettings
from ..agent.spool import install_hook, uninstall_hook
from ..agent.state import StateDir
from ..backup.ledger import Ledger, vanished_reasons
from ..engine.domain_xml import target_name
from ..errors import EkkoError, UsageError
from ..store.factory import namespaces, open_store
from .render import EXIT_DAMAGED, EXIT_OK, emit

log = logging.getLogger("ekko")


def cmd_agent(cfg, args) -> int:
    # Imported here: the daemon brings the whole backup pipeline (~30 ms) that `ekko status` and
    # `ekko hook` do without.
    from ..agent import daemon
    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)      # a daemon tells what it does
    return daemon.main(cfg, cfg.source or None)


def cmd_status(cfg, args) -> int:
    settings = AgentSettings.from_config(cfg)
    sd = StateDir(cfg.state_dir)
    conn, lv_error = None, None
    try:
        # Imported here: without libvirt-python, status shows what the state directory knows.
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

    def open_ns(ns):
        if ns not in stores:
            stores[ns] = open_store(cfg, ns)
        return stores[ns]
    try:
        now = datetime.datetime.now().astimezone()
        rows = status.collect(sd, conn, open_ns, settings.schedule, settings.overrides, args.domain, now)
    finally:
        if conn is not None:
            conn.close()
    if args.domain and not rows:
        raise UsageError(f"no domain {args.domain!r} known to libvirt or to the agent's state in {cfg.state_dir}")
    agent = status.agent_info(sd)
    lifecycle = status.lifecycle_info(sd.load_lifecycle(), settings.gc_interval_s, settings.verify, now,
                                      settings.sync)
    hook = status.hook_info(settings.hook_path, settings.spool_dir)
    vanished, store_error = _vanished(cfg, args.domain)
    from ..restore import instant      # instant restores: their records, servers and supervisors
    restores = [j for j in instant.jobs(cfg) if not args.domain or j.domain == args.domain]
    if args.json:
        emit({"ok": not vanished, "agent": agent, "libvirt": {"uri": config.libvirt_uri(cfg), "error": lv_error},
              "hook": hook, "lifecycle": lifecycle, "domains": rows,
              "store": {"vanished": vanished, "error": store_error},
              "instant_restores": [instant.as_dict(j) for j in restores]})
        return EXIT_DAMAGED if vanished else EXIT_OK
    running = f"running, pid {agent['pid']} since {agent['since']}" if agent["running"] else "not running"
    print(f"agent: {running}; {len(rows)} domain(s)")
    print(status.describe_hook(hook))
    print(status.describe_lifecycle(lifecycle))
    for r in rows:
        print(status.describe(r))
    for j in restores:
        print(instant.describe(j))
    if store_error:
        print(f"store: cannot check that it still holds what this host committed: {store_error}")
    for why in vanished:
        print(f"store: VANISHED {why}")
    return EXIT_DAMAGED if vanished else EXIT_OK


def _vanished(cfg, domain: Optional[str] = None) -> Tuple[List[str], Optional[str]]:
    """Backups this host committed that the store lost (backup/ledger.py), of every target or of
    the disks of `domain`, and why it could not tell."""
    records = Ledger(cfg.state_dir).records()
    targets = [r.target for r in records if domain is None or r.target.startswith(target_name(domain, ""))]
    if not targets:
        return [], None
    try:
        stores = [open_store(cfg, ns) for ns in namespaces(cfg)]
        return vanished_reasons(Ledger(cfg.state_dir), stores, targets), None
    except EkkoError as e:
        return [], str(e)


def cmd_hook(cfg, args) -> int:
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
        emit({"ok": True, "hook": dest, "action": args.hook_command, "libvirtd_pid": pid,
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

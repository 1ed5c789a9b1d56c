"""ekko: argv -> typed requests -> core calls -> human or --json output.

Exit codes:
  0  success
  1  the operation failed (nothing committed; nothing lost)
  2  bad input: config, arguments, unknown target/backup/disk, impossible incremental
  3  damaged data: verify found damage, restore met damaged segments, gc found a manifest it
     cannot read (and deleted nothing) or a backup that committed a segment gc had just deleted
  130 interrupted (Ctrl-C)

The package:
  __init__.py   main(): parse, log, load and check the config, run the command, map errors to exit codes
  parser.py     argv -> argparse.Namespace (every command, option and help text)
  render.py     exit codes, --json output, the error line, the progress line, a backup in human lines
  logs.py       log levels, chatty libraries, the redaction of tokens and keys
  lookup.py     --project and BACKUP -> stores and manifest keys; a libvirt connection
  backup.py     backup          restore.py  restore
  store.py      list, show      lifecycle.py  verify, prune, protect, unprotect, gc
  key.py        key create, key show
  serve.py      serve, mount, umount (serve/: nbdkit and its plugin; nbdfuse)
  files.py      files (serve/files.py: libguestfs over ekko serve)
  host.py       agent, status, hook
"""

import argparse
import importlib
import logging
import signal
import sys
import threading
from typing import Callable, Dict, List, Optional, Tuple

from .. import config
from ..agent.settings import AgentSettings
from ..errors import EkkoError
from ..lifecycle.prune import RetentionConfig
from . import logs
from .parser import build_parser
from .render import fail

# command -> (module of this package, function). The module is imported when its command runs,
# not before: a short command (`ekko list`) then does not load the QMP and libvirt engines, the
# restore writers or the agent, which would add a third to its start-up.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "backup": ("backup", "cmd_backup"), "restore": ("restore", "cmd_restore"),
    "list": ("store", "cmd_list"), "show": ("store", "cmd_show"),
    "verify": ("lifecycle", "cmd_verify"), "prune": ("lifecycle", "cmd_prune"),
    "protect": ("lifecycle", "cmd_protect"), "unprotect": ("lifecycle", "cmd_protect"),
    "gc": ("lifecycle", "cmd_gc"), "key": ("key", "cmd_key"),
    "serve": ("serve", "cmd_serve"), "mount": ("serve", "cmd_mount"), "umount": ("serve", "cmd_umount"),
    "files": ("files", "cmd_files"),
    "_instant-supervise": ("restore", "cmd_instant_supervise"),
    "agent": ("host", "cmd_agent"), "status": ("host", "cmd_status"), "hook": ("host", "cmd_hook"),
    "sync": ("sync", "cmd_sync")}


def _command(name: str) -> Callable[[config.Config, argparse.Namespace], int]:
    module, function = COMMANDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `timeout`, a service stop, an operator's kill): the command ends through the
    same failure path as Ctrl-C, so a backup undoes itself in QEMU right away (the
    copy-before-write filter, the export, the new bitmap generation) and a restore removes its
    partial image, instead of leaving them to the next run."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)      # a second SIGTERM ends the process at once
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup_logging(args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)     # `ekko agent` installs its own
    try:
        cfg = check_sections(config.load(args.config))
        if cfg.store.type == "swift":
            logs.REDACT.secrets |= logs.secrets_of(cfg)
        return _command(args.command)(cfg, args)
    except EkkoError as e:
        fail(args.json, e, e.exit_code)
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
        fail(args.json, EkkoError(f"{e.strerror or e}{where}"), 1)
        return 1


def check_sections(cfg: config.Config) -> config.Config:
    """The config sections typed above the core, checked before any command runs: a bad key in
    them fails every command at once (exit 2, naming the key), not only the one that reads it."""
    RetentionConfig.from_config(cfg)
    AgentSettings.from_config(cfg)
    return cfg

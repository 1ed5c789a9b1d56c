"""The event spool: the reading side of hooks/qemu, and the hook's baked configuration.

The hook (hooks/qemu) writes one file per libvirt hook call into the spool directory
(default /var/spool/ekko/events):

    .tmp-NAME                      being written (ignored here; removed by `cleanup_tmp` when old)
    NAME = WALLNS-MONONS-PID-RAND.json
                                   one event: a JSON object (format: events.parse_event); WALLNS
                                   and MONONS are zero-padded (20 digits) so that sorting names
                                   sorts events by the time of the hook call
    bad/NAME, bad/NAME.reason      quarantined: unreadable or not an event, with the reason

Delivery is at-least-once and in order: `drain` hands events to a handler oldest first and
deletes (acks) each file only after the handler returned; if the handler raises, draining stops
and that file and all later ones stay for the next round. Handlers must be idempotent.

Ordering caveat: names sort by wall-clock time. If the clock steps back between two hook calls
the order of those two is lost; each event also carries `mono_ns` and `boot_id` for the agent.

Installing the hook: libvirt gives a hook only LC_ALL, PATH and HOME, so the spool and state
directories are baked into the installed copy -- `render_hook(source, spool_dir, state_dir)`
rewrites the two lines `SPOOL_DIR = "..."` and `STATE_DIR = "..."`, `install_hook` writes the
result atomically (mode 0755). libvirtd picks up a NEW hook file only at start or on SIGHUP.
"""

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from .events import HookEvent, MalformedEvent, parse_event
from .state import fsync_dir

DEFAULT_SPOOL_DIR = "/var/spool/ekko/events"
DEFAULT_HOOK_PATH = "/etc/libvirt/hooks/qemu.d/ekko"
MAX_EVENT_FILE = 64 * 1024
EVENT_NAME = re.compile(r"^(\d{20})-(\d{20})-(\d{1,10})-([0-9a-f]{16})\.json$")
BAD_DIR = "bad"


@dataclass(frozen=True)
class SpoolEntry:
    path: str
    name: str

    @property
    def wall_ns(self) -> int:
        return int(self.name[:20])


@dataclass(frozen=True)
class DrainResult:
    processed: Tuple[HookEvent, ...] = ()
    quarantined: Tuple[str, ...] = ()        # file names moved to bad/
    stopped_at: Optional[str] = None         # file name whose handler raised (left in the spool)
    error: Optional[BaseException] = field(default=None, compare=False)


@dataclass(frozen=True)
class Spool:
    root: str = DEFAULT_SPOOL_DIR

    @property
    def bad_dir(self) -> str:
        return os.path.join(self.root, BAD_DIR)

    def ensure(self) -> "Spool":
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        return self

    def pending(self) -> List[SpoolEntry]:
        """Event files waiting, oldest first. Files with foreign names are included (and will be
        quarantined by `drain`); temp files and directories are not."""
        out = []
        try:
            it = os.scandir(self.root)
        except FileNotFoundError:
            return []
        with it:
            for e in it:
                # symlinks are listed so that `drain` quarantines them (read() opens O_NOFOLLOW)
                if not e.name.startswith(".") and (e.is_symlink() or e.is_file(follow_symlinks=False)):
                    out.append(SpoolEntry(e.path, e.name))
        # Well-formed names sort by time; foreign names go last, in name order.
        return sorted(out, key=lambda s: (EVENT_NAME.match(s.name) is None, s.name))

    def read(self, entry: SpoolEntry) -> HookEvent:
        """Parse one event file. Raises MalformedEvent (with the reason) -- quarantine it."""
        if EVENT_NAME.match(entry.name) is None:
            raise MalformedEvent("file name is not WALLNS-MONONS-PID-RAND.json", entry.name)
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise MalformedEvent(f"cannot open: {e.strerror}", entry.name) from e
        try:
            raw = os.read(fd, MAX_EVENT_FILE + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_EVENT_FILE:
            raise MalformedEvent(f"larger than {MAX_EVENT_FILE} bytes", entry.name)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise MalformedEvent(f"not JSON: {e}", entry.name) from e
        return parse_event(data, entry.name)

    def ack(self, entry: SpoolEntry) -> None:
        """The event was processed: delete it (durably)."""
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        fsync_dir(self.root)

    def quarantine(self, entry: SpoolEntry, reason: str) -> str:
        """Move a file the agent cannot use into bad/, with a NAME.reason file next to it."""
        os.makedirs(self.bad_dir, mode=0o700, exist_ok=True)
        dest = os.path.join(self.bad_dir, entry.name)
        os.replace(entry.path, dest)
        with open(dest + ".reason", "w") as f:
            f.write(reason.replace("\n", " ") + "\n")
        fsync_dir(self.bad_dir)
        fsync_dir(self.root)
        return dest

    def drain(self, handler: Callable[[HookEvent], None], limit: Optional[int] = None) -> DrainResult:
        """Process pending events in order: handler(event), then ack; malformed -> quarantine.

        A handler exception stops the drain (returned in `error`, not raised): the event stays
        and is handed over again next time."""
        processed: List[HookEvent] = []
        bad: List[str] = []
        for entry in self.pending()[:limit]:
            try:
                event = self.read(entry)
            except MalformedEvent as e:
                self.quarantine(entry, e.reason)
                bad.append(entry.name)
                continue
            try:
                handler(event)
            except Exception as e:   # noqa: BLE001 -- handed back to the caller, with the file kept
                return DrainResult(tuple(processed), tuple(bad), entry.name, e)
            self.ack(entry)
            processed.append(event)
        return DrainResult(tuple(processed), tuple(bad))

    def cleanup_tmp(self, max_age_s: float = 600, now: Optional[float] = None) -> int:
        """Remove hook temp files older than max_age_s (a hook killed mid-write). -> count."""
        now = now if now is not None else time.time()
        n = 0
        for name in _listdir(self.root):
            if name.startswith(".tmp-"):
                path = os.path.join(self.root, name)
                try:
                    if now - os.lstat(path).st_mtime > max_age_s:
                        os.unlink(path)
                        n += 1
                except FileNotFoundError:
                    pass
        return n


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# --- the hook's baked configuration ------------------------------------------------------------

_BAKED = {"SPOOL_DIR": re.compile(r'^SPOOL_DIR = "[^"\n]*"$', re.M),
          "STATE_DIR": re.compile(r'^STATE_DIR = "[^"\n]*"$', re.M)}


def render_hook(source: str, spool_dir: str, state_dir: str) -> str:
    """The hook's text with SPOOL_DIR and STATE_DIR baked in. Raises ValueError on a bad value
    or a source without exactly one line for each."""
    out = source
    for key, value in (("SPOOL_DIR", spool_dir), ("STATE_DIR", state_dir)):
        if not os.path.isabs(value) or any(c in value for c in '"\\\n') or not value.isprintable():
            raise ValueError(f"{key} must be an absolute path without quotes or backslashes: {value!r}")
        out, n = _BAKED[key].subn(lambda _m, k=key, v=value: f'{k} = "{v}"', out)
        if n != 1:
            raise ValueError(f"hook source has {n} lines `{key} = \"...\"` (expected exactly one)")
    return out


def hook_source_path() -> str:
    """hooks/qemu of this source tree, else the copy setup.py installs in share/ekko/hooks/."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for cand in (os.path.join(here, "hooks", "qemu"),
                 os.path.join(sys.prefix, "share", "ekko", "hooks", "qemu"),
                 "/usr/share/ekko/hooks/qemu", "/usr/local/share/ekko/hooks/qemu"):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError("ekko's hook source (hooks/qemu) is not installed")


def install_hook(dest: str = DEFAULT_HOOK_PATH, spool_dir: str = DEFAULT_SPOOL_DIR,
                 state_dir: str = "/var/lib/ekko", source: Optional[str] = None) -> str:
    """Write the baked hook to `dest` atomically (0755) and create the spool dir. -> dest.
    The caller SIGHUPs libvirtd if it runs (a new hook file is picked up only then)."""
    with open(source or hook_source_path()) as f:
        text = render_hook(f.read(), spool_dir, state_dir)
    d = os.path.dirname(dest)
    os.makedirs(d, mode=0o755, exist_ok=True)
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    # The temp file goes one level up: libvirt runs every executable in qemu.d, temp files included.
    tmp = os.path.join(os.path.dirname(d), f".{os.path.basename(dest)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    fsync_dir(d)
    return dest


HOOK_SIGNATURE = "ekko's libvirt QEMU hook"


def uninstall_hook(dest: str = DEFAULT_HOOK_PATH) -> bool:
    """Remove an installed hook. -> False if there was none. Raises ValueError for a file that is
    not ekko's hook (it is left alone). The caller SIGHUPs libvirtd. The spool is kept."""
    try:
        with open(dest, errors="replace") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return False
    if HOOK_SIGNATURE not in head:
        raise ValueError(f"{dest} is not ekko's hook: left alone")
    os.unlink(dest)
    fsync_dir(os.path.dirname(dest) or ".")
    return True

"""The event spool: the reading side of hooks/qemu, and the hook's baked configuration.

The hook (hooks/qemu) writes one file per libvirt hook call into the spool directory
(default /var/spool/ekko/events):

    .tmp-NAME                      being written (ignored here; removed by `cleanup_tmp` when old)
    .lock                          flock: held by `drain`; the hook coalesces only when it is free
    NAME = WALLNS-MONONS-PID-RAND-L-UUID.json
                                   one event: a JSON object; the name, the rule for a valid event
                                   and coalescing are hookformat's (shared with the hook). WALLNS
                                   and MONONS are zero-padded (20 digits) so that sorting names
                                   sorts events by the time of the hook call
    bad/NAME, bad/NAME.reason      quarantined: unreadable or not an event, with the reason;
                                   anything else in the spool (a directory, a FIFO, a symlink, a
                                   foreign name) is moved there too, never opened in a way that
                                   blocks or follows it

Delivery is at-least-once and in order per domain: `drain` hands events to a handler oldest first
and deletes (acks) each file only after the handler returned; if the handler raises, that file
and all later ones of the same domain stay for the next round (other domains go on). Handlers
must be idempotent.

Ordering caveat: names sort by wall-clock time. If the clock steps back between two hook calls
the order of those two is lost; each event also carries `mono_ns` and `boot_id` for the agent.

Bounded: while the agent is down the hook coalesces the spool above `agent.spool_max_events`
(hookformat.coalesce_spool), keeping every event the agent's decisions need.

Installing the hook: libvirt gives a hook only LC_ALL, PATH and HOME, so its settings are baked
into the installed copy -- `render_hook(source, spool_dir, state_dir, rule_file, spool_max)`
rewrites the lines `SPOOL_DIR = "..."`, `STATE_DIR = "..."`, `RULE_FILE = "..."` (this package's
hookformat.py, which the hook loads) and `SPOOL_MAX = N`; `install_hook` writes the result
atomically (mode 0755). libvirtd picks up a NEW hook file only at start or on SIGHUP.
"""

import errno
import fcntl
import json
import os
import re
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

from . import hookformat
from .events import HookEvent, MalformedEvent, parse_event
from .state import fsync_dir

DEFAULT_SPOOL_DIR = "/var/spool/ekko/events"
DEFAULT_HOOK_PATH = "/etc/libvirt/hooks/qemu.d/ekko"
MAX_EVENT_FILE = 64 * 1024
BAD_DIR = "bad"
MAX_REQUEUE = 10000


class Vanished(Exception):
    """A spool entry was removed between listing and reading (an operator, a coalescing hook)."""


@dataclass(frozen=True)
class SpoolEntry:
    path: str
    name: str

    @property
    def wall_ns(self) -> int:
        return int(self.name[:20])

    @property
    def is_event_name(self) -> bool:
        return hookformat.parse_name(self.name) is not None


@dataclass(frozen=True)
class DrainResult:
    processed: Tuple[HookEvent, ...] = ()
    quarantined: Tuple[str, ...] = ()        # file names moved to bad/
    stopped_at: Optional[str] = None         # first file whose handler raised (kept, with its domain's later ones)
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
        """Entries waiting, oldest first: event files by name, then whatever else is there (foreign
        names, directories, FIFOs, symlinks: `drain` quarantines them). Hidden names (temp files,
        the lock) and bad/ are not listed."""
        out = []
        try:
            it = os.scandir(self.root)
        except FileNotFoundError:
            return []
        with it:
            for e in it:
                if not e.name.startswith(".") and e.name != BAD_DIR:
                    out.append(SpoolEntry(e.path, e.name))
        return sorted(out, key=lambda s: (not s.is_event_name, s.name))

    def read(self, entry: SpoolEntry) -> HookEvent:
        """Parse one event file. Raises MalformedEvent (with the reason) -- quarantine it -- or
        Vanished. Never follows a symlink, never blocks on a FIFO."""
        if not entry.is_event_name:
            raise MalformedEvent("file name is not WALLNS-MONONS-PID-RAND-L-UUID.json", entry.name)
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise Vanished(entry.name) from e
        except OSError as e:
            raise MalformedEvent(f"cannot open: {e.strerror}", entry.name) from e
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise MalformedEvent(f"not a regular file ({_kind(mode)})", entry.name)
            raw = os.read(fd, MAX_EVENT_FILE + 1)
        finally:
            os.close(fd)
        if len(raw) > MAX_EVENT_FILE:
            raise MalformedEvent(f"larger than {MAX_EVENT_FILE} bytes", entry.name)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise MalformedEvent(f"not JSON: {e}", entry.name) from e
        return parse_event(data, entry.name)

    def ack(self, entry: SpoolEntry) -> None:
        """The event was processed: delete it (durably)."""
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        fsync_dir(self.root)

    def quarantine(self, entry: SpoolEntry, reason: str) -> Optional[str]:
        """Move an entry the agent cannot use (a file, a directory, anything) into bad/, with a
        NAME.reason file next to it; an existing bad/NAME is not replaced (NAME.1, NAME.2, ...).
        -> its new path, or None if it vanished meanwhile."""
        os.makedirs(self.bad_dir, mode=0o700, exist_ok=True)
        base = os.path.join(self.bad_dir, entry.name)
        for n in range(1000):
            dest = base if n == 0 else f"{base}.{n}"
            if os.path.lexists(dest) or os.path.lexists(dest + ".reason"):
                continue
            try:
                os.rename(entry.path, dest)
            except FileNotFoundError:
                if not os.path.lexists(entry.path):
                    return None
                raise
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    continue            # appeared meanwhile: next name
                raise
            break
        else:
            raise OSError(errno.EEXIST, f"no free name for {entry.name} in {self.bad_dir}")
        with open(dest + ".reason", "w") as f:
            f.write(reason.replace("\n", " ") + "\n")
        fsync_dir(self.bad_dir)
        fsync_dir(self.root)
        return dest

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the spool's lock (hookformat.LOCK_NAME): no hook coalesces meanwhile."""
        fd = os.open(os.path.join(self.root, hookformat.LOCK_NAME),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)            # the hook's note of essential events kept (hookformat)
            yield
        finally:
            os.close(fd)

    def drain(self, handler: Callable[[HookEvent], None], limit: Optional[int] = None) -> DrainResult:
        """Process pending events in order: handler(event), then ack; malformed -> quarantine.
        Under the spool's lock, so a hook never coalesces events the handler is between.

        A handler exception keeps that event and every later event OF THE SAME DOMAIN for the next
        round (returned in `error` / `stopped_at`, not raised); the other domains' events go on, so
        one domain whose state cannot be written does not hold back another's full-required."""
        processed: List[HookEvent] = []
        bad: List[str] = []
        held: set = set()
        first: Optional[Tuple[str, BaseException]] = None
        self.ensure()
        with self.locked():
            for entry in self.pending()[:limit]:
                try:
                    event = self.read(entry)
                except Vanished:
                    continue
                except MalformedEvent as e:
                    if self.quarantine(entry, e.reason) is not None:
                        bad.append(entry.name)
                    continue
                key = event.uuid or event.domain
                if key in held:
                    continue
                try:
                    handler(event)
                except Exception as e:   # noqa: BLE001 -- handed back to the caller, with the file kept
                    held.add(key)
                    first = first or (entry.name, e)
                    continue
                self.ack(entry)
                processed.append(event)
        if first is not None:
            return DrainResult(tuple(processed), tuple(bad), first[0], first[1])
        return DrainResult(tuple(processed), tuple(bad))

    def requeue_bad(self, limit: int = MAX_REQUEUE) -> List[str]:
        """Move back from bad/ the event files the current rule accepts (quarantined by an agent
        with a stricter rule: an empty `extra`, say). They sort among the pending events by their
        time; the state ignores what is older than what it already knows. -> their names."""
        back = []
        for name in sorted(_listdir(self.bad_dir))[:limit]:
            entry = SpoolEntry(os.path.join(self.bad_dir, name), name)
            if not entry.is_event_name or os.path.lexists(os.path.join(self.root, name)):
                continue
            try:
                self.read(entry)
            except (MalformedEvent, Vanished):
                continue
            os.rename(entry.path, os.path.join(self.root, name))
            try:
                os.unlink(entry.path + ".reason")
            except FileNotFoundError:
                pass
            back.append(name)
        if back:
            fsync_dir(self.root)
            fsync_dir(self.bad_dir)
        return back

    def cleanup_tmp(self, max_age_s: float = 600, now: Optional[float] = None) -> int:
        """Remove hook temp files older than max_age_s (a hook killed mid-write). -> count."""
        now = now if now is not None else time.time()
        n = 0
        for name in _listdir(self.root):
            if name.startswith(".tmp-"):
                path = os.path.join(self.root, name)
                try:
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime > max_age_s:
                        os.unlink(path)
                        n += 1
                except FileNotFoundError:
                    pass
        return n


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a file"


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# --- the hook's baked configuration ------------------------------------------------------------

_BAKED = {key: re.compile(rf'^{key} = "[^"\n]*"$', re.M) for key in ("SPOOL_DIR", "STATE_DIR", "RULE_FILE")}
_BAKED["SPOOL_MAX"] = re.compile(r"^SPOOL_MAX = \d+$", re.M)


def rule_file() -> str:
    """This package's hookformat.py: the file the installed hook loads its rule from."""
    return os.path.abspath(hookformat.__file__)


def _literal(text: str) -> Callable[["re.Match[str]"], str]:
    """A replacement for re.sub that inserts `text` as it is (no backslash escapes)."""
    return lambda _m: text


def render_hook(source: str, spool_dir: str, state_dir: str, rule: Optional[str] = None,
                spool_max: int = hookformat.DEFAULT_BOUND) -> str:
    """The hook's text with SPOOL_DIR, STATE_DIR, RULE_FILE (default: `rule_file()`) and
    SPOOL_MAX baked in. Raises ValueError on a bad value or a source without exactly one line
    for each."""
    out = source
    if isinstance(spool_max, bool) or not isinstance(spool_max, int) or spool_max < 1:
        raise ValueError(f"SPOOL_MAX must be a positive integer: {spool_max!r}")
    for key, value in (("SPOOL_DIR", spool_dir), ("STATE_DIR", state_dir), ("RULE_FILE", rule or rule_file()),
                       ("SPOOL_MAX", str(spool_max))):
        if key != "SPOOL_MAX" and (not os.path.isabs(value) or any(c in value for c in '"\\\n')
                                   or not value.isprintable()):
            raise ValueError(f"{key} must be an absolute path without quotes or backslashes: {value!r}")
        line = f"{key} = {value}" if key == "SPOOL_MAX" else f'{key} = "{value}"'
        out, n = _BAKED[key].subn(_literal(line), out)
        if n != 1:
            raise ValueError(f"hook source has {n} lines `{key} = ...` (expected exactly one)")
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
                 state_dir: str = "/var/lib/ekko", source: Optional[str] = None,
                 spool_max: int = hookformat.DEFAULT_BOUND) -> str:
    """Write the baked hook to `dest` atomically (0755) and create the spool dir. -> dest.
    The caller SIGHUPs libvirtd if it runs (a new hook file is picked up only then).
    Raises ValueError when the rule file is one the hook would refuse to load (writable by others)."""
    rule = rule_file()
    st = os.stat(rule)
    if st.st_mode & 0o022 or st.st_uid not in (0, os.getuid()):
        raise ValueError(f"{rule} is writable by group or others (or owned by another user): the hook, run as "
                         "root, would refuse to load it")
    with open(source or hook_source_path()) as f:
        text = render_hook(f.read(), spool_dir, state_dir, rule, spool_max)
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

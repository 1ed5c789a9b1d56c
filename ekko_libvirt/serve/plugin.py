"""nbdkit plugin (nbdkit-plugin-python, API_VERSION 2): one backup's disk, read-only.

Started by server.py as `nbdkit ... python ekko_libvirt/serve/plugin.py config=FILE manifest=KEY
[namespace=NS] [cache=BYTES] [readahead=N] [workers=N] [idle_timeout=S] [verbose=N]`. nbdkit
embeds the system Python (/usr/bin/python3.11 on Debian 12): this file is run as a script by that
interpreter, which finds ekko_libvirt and its dependencies on the PYTHONPATH server.py gives it.

Everything it serves goes through serve/disk.py (ServedDisk): every segment re-hashed before a
byte of it is served; a segment that is missing or damaged fails that read with EIO, and the log
(nbdkit's stderr) names the segment, its key and its disk offset. Block status from the
manifest's ZERO entries. thread_model parallel: ServedDisk locks what it shares, and the work
of a read (store I/O, decompression, hashing in _segcore) releases the GIL.

zeros=hole: block status says HOLE, not HOLE|ZERO, for zero segments (see extents).

--idle-timeout: after S seconds with no client connected, the server shuts itself down
(nbdkit.shutdown: nbdkit closes and exits 0).
"""

import errno
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, Optional

import nbdkit  # type: ignore[import-not-found]  # the module nbdkit's embedded Python provides

# nbdkit may put this script's directory first on sys.path: nothing in it must shadow a top-level
# module (the package is found through PYTHONPATH, as ekko_libvirt).
_HERE = os.path.dirname(os.path.abspath(globals().get("__file__", "") or "."))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

API_VERSION = 2

_params: Dict[str, Optional[str]] = {
    "namespace": None, "cache": None, "readahead": None, "workers": "4", "idle_timeout": None, "verbose": "0",
    "parent_fd": None, "unlink": None, "logfile": None, "zeros": "zero"}
_state: Dict[str, Any] = {}
log = logging.getLogger("ekko_libvirt.serve")


def config(key, value):
    if key not in ("config", "manifest") and key not in _params:
        raise RuntimeError(f"ekko serve plugin: unknown parameter {key!r}")
    _params[key] = value


def config_complete():
    if not _params.get("config") or not _params.get("manifest"):
        raise RuntimeError("ekko serve plugin: config=FILE and manifest=KEY are required")
    # Imported here, after nbdkit parsed the parameters: errors then go through nbdkit's error path.
    from ekko_libvirt import config as ekko_config
    from ekko_libvirt.cli import logs
    from ekko_libvirt.serve.disk import DEFAULT_CACHE, DEFAULT_READAHEAD, ServedDisk
    from ekko_libvirt.store import catalog
    from ekko_libvirt.store.factory import open_store

    logs.setup_logging(int(_params["verbose"] or 0))
    cfg = ekko_config.load(_params["config"])
    if cfg.store.type == "swift":
        logs.REDACT.secrets |= logs.secrets_of(cfg)
    store = open_store(cfg, _params["namespace"] or None)
    m = catalog.load(store, str(_params["manifest"]))
    cache = int(_params["cache"]) if _params["cache"] else DEFAULT_CACHE
    ahead = int(_params["readahead"]) if _params["readahead"] is not None else DEFAULT_READAHEAD
    _state["disk"] = ServedDisk(store, m, cache_bytes=cache, readahead=ahead, workers=int(_params["workers"] or 4))
    _state["idle"] = _Idle(float(_params["idle_timeout"])) if _params["idle_timeout"] else None
    log.info("serving %s (%d bytes, %d segments of %d, %d with data)", _params["manifest"], m.virtual_size,
             m.table.count, m.segment_size, m.table.data_count())


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    if _state.get("idle") is not None:
        _state["idle"].start()
    if _params["parent_fd"] is not None:
        threading.Thread(target=_watch_parent, args=(int(_params["parent_fd"]),), name="ekko-serve-parent",
                         daemon=True).start()


def after_fork():
    """A daemonized nbdkit (server.start(detached=True)) has its stderr on /dev/null: our log (and
    nbdkit's, with --log=stderr) goes to `logfile` instead, appended."""
    if _params["logfile"]:
        fd = os.open(_params["logfile"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 2)
        os.close(fd)


def _watch_parent(fd: int) -> None:
    """The read end of ekko's lifeline: EOF when ekko closes it (stop) or dies (even SIGKILL). Then
    this process ends at once, connected clients or not (nbdkit's own shutdown waits for them)."""
    stopped = False
    while True:
        try:
            got = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not got:
            break
        stopped = stopped or b"s" in got        # server.STOP_BYTE: ekko stopped it on purpose
    if _params["unlink"]:
        try:
            os.unlink(_params["unlink"])
        except OSError:
            pass
    try:
        if stopped:
            log.info("stopped by ekko: exiting")
        else:
            log.warning("ekko (the parent of this server) is gone: exiting")
    except Exception:       # noqa: BLE001 - stderr may be gone with the parent
        pass
    os._exit(0)


def cleanup():
    disk = _state.get("disk")
    if disk is not None:
        disk.close()


class _Handle:
    __slots__ = ()


def open(readonly):          # the name nbdkit calls (shadows the builtin here)
    idle = _state.get("idle")
    if idle is not None:
        idle.connected(+1)
    return _Handle()


def close(h):
    idle = _state.get("idle")
    if idle is not None:
        idle.connected(-1)


def get_size(h):
    return _state["disk"].size


def can_write(h):
    return False


def can_multi_conn(h):
    return True             # read-only: every connection sees the same bytes


def can_extents(h):
    return True


def is_rotational(h):
    return False


def pread(h, buf, offset, flags):
    from ekko_libvirt.serve.disk import SegmentUnreadable
    try:
        _state["disk"].read(buf, offset)
    except SegmentUnreadable as e:
        log.error("EIO for the read of %d bytes at offset %d: %s", len(buf), offset, e)
        nbdkit.set_error(errno.EIO)
        raise
    except Exception as e:
        log.error("EIO for the read of %d bytes at offset %d: %s: %s", len(buf), offset, type(e).__name__, e)
        nbdkit.set_error(errno.EIO)
        raise


_ZERO = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


def extents(h, count, offset, flags):
    """Zero segments are holes that read as zeros. zeros=hole (instant restore's servers) says HOLE
    only: QEMU then counts them as unallocated in the backing, so block-stream does not copy them
    (an unallocated cluster of the overlay reads as zeros once the backing is gone, which is what
    the backup holds there); with ZERO it would read and write every zero of a 1 TiB disk."""
    runs = _state["disk"].extents(offset, count)
    if flags & nbdkit.FLAG_REQ_ONE:
        runs = runs[:1]
    zero = nbdkit.EXTENT_HOLE if _params["zeros"] == "hole" else _ZERO
    return [(o, n, zero if z else 0) for o, n, z in runs]


class _Idle:
    """Shuts the server down once no client has been connected for `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.clients = 0
        self.since = time.monotonic()
        self.cond = threading.Condition()

    def connected(self, delta: int) -> None:
        with self.cond:
            self.clients += delta
            self.since = time.monotonic()
            self.cond.notify()

    def start(self) -> None:
        threading.Thread(target=self._run, name="ekko-serve-idle", daemon=True).start()

    def _run(self) -> None:
        with self.cond:
            while True:
                if self.clients:
                    self.cond.wait()
                    continue
                left = self.since + self.seconds - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        log.warning("no client for %g s (--idle-timeout): stopping", self.seconds)
        nbdkit.shutdown()

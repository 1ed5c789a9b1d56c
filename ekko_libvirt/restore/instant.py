"""`ekko restore BACKUP --define NEWNAME --instant [--to DIR]`: a new domain that runs at once on
local qcow2 overlays backed by the backup's NBD export, its data pulled in while it runs.

    start_instant   checks (backup holds a domain XML, NEWNAME free, DIR usable, socket path short
                    enough) -> per disk: a detached server (serve/server.py) on DIR/<dev>.nbd.sock
                    and an overlay DIR/<dev>.qcow2 backed by it -> the record (state_dir/instant/
                    NEWNAME.json) -> define -> start -> pulls started -> the supervisor spawned,
                    which says when it holds the record's lock. Each step registers its undo: any
                    failure (or Ctrl-C) leaves no domain, no server, no overlay, no record.
    spawn_supervisor  `ekko _instant-supervise NEWNAME` in a session of its own (supervisor.py);
                    also how the agent (or anyone) takes over the job of a supervisor that died
    jobs / load     the records, for `ekko status`

The servers are daemons of their own (not children of this command or of the supervisor), so a
supervisor that dies leaves the guest running; a new supervisor finds them by PID and start time.
The pure parts (XML, record, decisions) are in instant_plan.py.
"""

import concurrent.futures
import contextlib
import json
import logging
import os
import pwd
import subprocess
import sys
import time
import uuid as uuidlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import procs
from ..durable import read_json, write_json_atomic
from ..engine import domain_xml as dx
from ..engine.libvirt import QEMU_USER
from ..faults import pause_point
from ..errors import EkkoError, EngineError, UsageError
from ..format.manifest import Manifest
from ..serve import server
from .domain import _domain_exists, _make_dir, disk_of
from . import instant_plan as plan
from .instant_plan import InstantDisk, InstantJob, backing_uri, instant_domain_xml, overlay_name, socket_name

log = logging.getLogger("ekko.instant")

SUPERVISOR_READY_TIMEOUT = 60.0
BLOCK_PULL_BANDWIDTH_BYTES = 0x40       # VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES (libvirt >= 1.2.9)


class InstantRestoreError(EngineError):
    """A step of an instant restore failed; everything it had set up was undone."""


def state_path(cfg, name: str) -> str:
    return os.path.join(cfg.state_dir, "instant", f"{name}.json")


def load(cfg, name: str) -> Optional[InstantJob]:
    try:
        return InstantJob.from_dict(read_json(state_path(cfg, name)))
    except FileNotFoundError:
        return None


def save(cfg, job: InstantJob) -> None:
    write_json_atomic(state_path(cfg, job.domain), job.to_dict())


def jobs(cfg) -> List[InstantJob]:
    d = os.path.join(cfg.state_dir, "instant")
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        try:
            out.append(InstantJob.from_dict(read_json(os.path.join(d, n))))
        except (OSError, ValueError, TypeError) as e:
            log.warning("instant restore record %s unreadable: %s", n, e)
    return out


def server_alive(d: InstantDisk) -> bool:
    return d.server_pid is not None and d.server_ticks is not None and procs.process_running(d.server_pid,
                                                                                            d.server_ticks)


def supervisor_alive(job: InstantJob) -> bool:
    return (job.supervisor_pid is not None and job.supervisor_ticks is not None
            and procs.process_running(job.supervisor_pid, job.supervisor_ticks))


def start_server(cfg, d: InstantDisk, verbose: int = 0, manifest: Optional[Manifest] = None) -> None:
    """A detached server for disk `d` on its socket, reachable by QEMU (libvirt-qemu): fills in its
    PID and start time. `manifest`: d.key's, loaded already (a 1 TiB disk's takes ~0.4 s)."""
    srv = server.start(cfg, d.namespace, d.key, socket_path=d.socket, detached=True, logfile=d.log,
                       verbose=verbose, zeros_as_holes=True, manifest=manifest)
    d.server_pid, d.server_ticks = srv.pid, srv.start_ticks
    try:
        pw = pwd.getpwnam(QEMU_USER)
        os.chown(d.socket, pw.pw_uid, pw.pw_gid)     # 0600 and QEMU's: no one else connects
    except KeyError:
        pass                                          # QEMU runs as root here


def start_servers(cfg, disks: Sequence[InstantDisk], manifests: Sequence[Manifest], verbose: int,
                  undo: contextlib.ExitStack) -> None:
    """Every disk's server at once (each start is mostly waiting for nbdkit's Python to load the
    manifest: a domain of several disks should not wait for them one after the other). Each one
    that started is registered in `undo`, also when another failed; then the first error is raised."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(disks)),
                                                 thread_name_prefix="ekko-instant-serve")
    futures = [pool.submit(start_server, cfg, d, verbose, m) for d, m in zip(disks, manifests, strict=True)]
    try:
        concurrent.futures.wait(futures)
    finally:
        pool.shutdown(wait=True)         # interrupted (SIGTERM): the starts end first, so none is unknown
        for d, f in zip(disks, futures, strict=True):
            if f.exception() is None:
                undo.callback(stop_server, d)
    for f in futures:
        e = f.exception()
        if e is not None:
            raise e


def stop_server(d: InstantDisk) -> None:
    if d.server_pid is not None:
        server.stop_pid(d.server_pid, d.server_ticks)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d.socket)


def check_directory(directory: str, devs: Sequence[str], overwrite: bool) -> None:
    """DIR must be (or become) a writable directory, without overlays already in it, and short
    enough for the sockets in it (a unix socket path has at most 107 bytes)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"--to {directory}: exists and is not a directory")
    parent = directory
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--to {directory}: not writable ({parent} does not let this user create files)")
    for dev in devs:
        sock = os.path.join(os.path.abspath(directory), socket_name(dev))
        if len(sock.encode()) > 107:
            raise UsageError(f"--to {directory}: too long for the NBD socket {sock} (a unix socket path has at "
                             "most 107 bytes): choose a shorter directory")
        path = os.path.join(directory, overlay_name(dev))
        if os.path.lexists(path) and not overwrite:
            raise UsageError(f"{path} exists: refusing to overwrite it (another --to, or --force)")


def create_overlay(path: str, socket_path: str, size: int) -> None:
    """A qcow2 whose header names the export as its backing (format raw); no data of its own."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing_uri(socket_path),
                        "-u", path, str(size)], capture_output=True, text=True)
    if p.returncode != 0:
        raise InstantRestoreError(f"qemu-img create {path} failed: {p.stderr.strip()}")


def start_instant(cfg, found: Sequence[Tuple[Optional[str], str, Manifest]], directory: str, name: str, conn, *,
                  bandwidth: int = 0, overwrite: bool = False, verbose: int = 0,
                  spawn: Optional[Callable[..., Tuple[int, int]]] = None) -> InstantJob:
    """found: (namespace, manifest key, Manifest) of one backup id's disks. -> the job, streaming,
    its supervisor running. Undoes everything on any failure."""
    if not cfg.source:
        raise UsageError("restore --instant needs a config file (the servers and the supervisor read it again)")
    try:
        plan.check_name(name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    xml = next((m.labels["domain_xml"] for _, _, m in found if m.labels.get("domain_xml")), None)
    backup_id = found[0][2].backup_id
    if xml is None:
        raise UsageError(f"backup {backup_id} holds no domain definition (made before ekko stored it): "
                         "--instant needs one")
    if _domain_exists(conn, name):
        raise UsageError(f"a domain named {name!r} exists already: choose another name")
    before = load(cfg, name)
    if before is not None and before.phase in ("starting", "streaming"):
        raise UsageError(f"an instant restore of {name!r} is still under way ({state_path(cfg, name)}): "
                         "choose another name")        # a finished one's record is replaced
    devs = [disk_of(k) for _, k, _ in found]
    directory = os.path.abspath(directory)
    check_directory(directory, devs, overwrite)
    logs = os.path.join(cfg.run_dir, "instant")
    job = InstantJob(name, str(uuidlib.uuid4()), backup_id, directory, os.path.abspath(cfg.source), bandwidth,
                     time.time())
    for (ns, key, m), dev in zip(found, devs, strict=True):
        job.disks.append(InstantDisk(dev, ns, key, os.path.join(directory, overlay_name(dev)),
                                     os.path.join(directory, socket_name(dev)), os.path.join(logs, f"{name}-{dev}.log"),
                                     m.virtual_size))
    with contextlib.ExitStack() as undo:
        made_dir = not os.path.isdir(directory)
        try:
            _make_dir(directory)
            os.makedirs(logs, mode=0o700, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--to {directory}: cannot create it: {e.strerror}") from e
        if made_dir:
            undo.callback(_rmdir_quietly, directory)
        start_servers(cfg, job.disks, [m for _, _, m in found], verbose, undo)
        for d in job.disks:
            create_overlay(d.overlay, d.socket, d.virtual_size)
            undo.callback(_unlink_quietly, d.overlay)
        job.timings["served"] = since_start()
        new_xml, notes = dx.restored_domain_xml(xml, name, job.uuid, {d.dev: (d.overlay, "qcow2") for d in job.disks})
        new_xml = instant_domain_xml(new_xml, {d.dev: d.socket for d in job.disks})
        save(cfg, job)
        undo.callback(_unlink_quietly, state_path(cfg, name))
        dom = _define(conn, new_xml, name)
        undo.callback(_undefine_quietly, dom)
        _libvirt_step(f"start {name}", dom.create)
        job.timings["running"] = since_start()
        undo.callback(_destroy_quietly, dom)
        for d in job.disks:
            _libvirt_step(f"pull {d.dev} of {name}", dom.blockPull, d.dev, bandwidth, BLOCK_PULL_BANDWIDTH_BYTES)
            job.pulls_started += 1
        pause_point("instant-started")       # tests: a SIGTERM here must undo all of the above
        job.message = "; ".join(notes) or None
        job.phase = "streaming"
        save(cfg, job)
        job.supervisor_pid, job.supervisor_ticks = (spawn or spawn_supervisor)(cfg, name)
        job.timings["supervised"] = since_start()
        undo.pop_all()
    return job


def since_start() -> float:
    """Seconds since this process started (its Python start-up included): the kernel's start time
    of the process counts in clock ticks of CLOCK_BOOTTIME."""
    ticks = procs.process_start_ticks(os.getpid()) or 0
    return round(time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"), 3)


def spawn_supervisor(cfg, name: str, verbose: int = 0) -> Tuple[int, int]:
    """`ekko _instant-supervise NAME` in a new session, its log next to the servers'. Returns once it
    holds the job's lock and has recorded itself (its PID and start time)."""
    log_path = os.path.join(cfg.run_dir, "instant", f"{name}-supervisor.log")
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", os.path.abspath(cfg.source), "_instant-supervise", name,
           "--ready-fd", str(w), *(["-v"] * verbose)]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(w,),
                                start_new_session=True, env=dict(os.environ, PYTHONPATH=server.PACKAGE_ROOT))
    os.close(w)
    with os.fdopen(r) as ready:
        line = ready.readline()
    if not line:
        proc.wait()
        with open(log_path, errors="replace") as f:
            tail = [t.rstrip() for t in f.readlines()[-6:] if t.strip()]
        raise InstantRestoreError(f"the supervisor of {name} (pid {proc.pid}) exited with status {proc.returncode} "
                                  f"before taking over: {' / '.join(tail)} (log {log_path})")
    info = json.loads(line)
    return int(info["pid"]), int(info["start_ticks"])


def resume_supervisors(cfg) -> List[str]:
    """A supervisor for every unfinished job whose own is gone (after an agent restart, a reboot of
    ekko's side, a kill): -> the domains taken over."""
    out = []
    for job in jobs(cfg):
        if job.phase == "streaming" and not supervisor_alive(job):
            try:
                spawn_supervisor(cfg, job.domain)
                out.append(job.domain)
            except EkkoError as e:
                log.error("cannot take over the instant restore of %s: %s", job.domain, e)
    return out


def _define(conn, xml: str, name: str):
    import libvirt
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as e:
        raise InstantRestoreError(f"libvirt refused to define {name}: {e.get_error_message()}; "
                                  "the servers and overlays were removed") from e


def _libvirt_step(what: str, fn, *args):
    import libvirt
    try:
        return fn(*args)
    except libvirt.libvirtError as e:
        raise InstantRestoreError(f"{what} failed: {e.get_error_message()}; the new domain, its servers and "
                                  "overlays were removed") from e


def _undefine_quietly(dom) -> None:
    import libvirt
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def _destroy_quietly(dom) -> None:
    import libvirt
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _rmdir_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def describe(job: InstantJob) -> str:
    return plan.describe(job, supervisor_alive(job), [server_alive(d) for d in job.disks])


def as_dict(job: InstantJob) -> Dict:
    done, total = job.progress()
    return dict(job.to_dict(), pulled_bytes=done, total_bytes=total, supervisor_alive=supervisor_alive(job),
                servers_alive=[server_alive(d) for d in job.disks])

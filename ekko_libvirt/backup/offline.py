"""Offline backups of shut-off domains: the images are opened by a qemu-storage-daemon under our
control and backed up by the QMP engine, with the same bitmap generations libvirt uses, so the
chain carries on across stop and start. While it runs, the agent's marker makes the libvirt
hook refuse to start the domain (two writers on one qcow2 would corrupt it).

The daemon runs in its own session (a Ctrl-C of ours must not kill it before it wrote the
bitmaps back), so it would outlive a SIGKILLed ekko and hold the images, write locks included:
the domain could not start until someone found and stopped it. A reaper (engine/reaper.py)
stops it then, cleanly; the next backup's recovery settles the generations as after any
interrupted backup."""

import contextlib
import logging
import os
import socket
import subprocess
import time
from dataclasses import replace
from typing import Callable, ContextManager, List, Optional

from ..store.base import Store
from ..engine import domain_xml as dx
from ..engine.qmp import Names, QMPEngine, QMPTarget
from ..engine.reaper import Reaper
from ..errors import EngineError
from ..procs import process_start_ticks
from .options import BackupOptions, BackupResult
from .transaction import DiskJob, run_transaction

log = logging.getLogger(__name__)

HoldStart = Callable[[str, str], ContextManager]


class StorageDaemon:
    """One qemu-storage-daemon holding the domain's images, one node per disk (node = dev)."""

    def __init__(self, disks: List[dx.DomainDisk], run_dir: str, tag: str):
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        self.qmp_socket = os.path.join(run_dir, f"qsd-{tag}.qmp")
        self.log_path = os.path.join(run_dir, f"qsd-{tag}.log")
        self.disks = disks
        self.leftovers: List[str] = []      # files to remove should we die with the daemon running
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.reaper: Optional[Reaper] = None

    def __enter__(self) -> "StorageDaemon":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_socket)
        args = ["qemu-storage-daemon"]
        for d in self.disks:
            if d.kind != "file":
                raise EngineError(f"disk {d.dev}: offline backup of {d.kind} disks is not supported")
            args += ["--blockdev", f"driver=file,node-name=f-{d.dev},filename={d.source}",
                     "--blockdev", f"driver={d.format},node-name={d.dev},file=f-{d.dev}"]
        args += ["--chardev", f"socket,id=m0,path={self.qmp_socket},server=on,wait=off", "--monitor", "chardev=m0"]
        self.proc = proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=open(self.log_path, "ab"),
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.reaper = Reaper({"kind": "process", "name": f"qemu-storage-daemon {self.qmp_socket}",
                              "pid": proc.pid, "pid_start": process_start_ticks(proc.pid),
                              "remove": self.leftovers},
                             self.log_path + ".reaper.log").start()
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                self._stop()
                with open(self.log_path, errors="replace") as f:
                    raise EngineError(f"qemu-storage-daemon could not open the images: {f.read()[-500:].strip()}")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(self.qmp_socket)
                    return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self._stop()
                raise EngineError("qemu-storage-daemon did not open its QMP socket within 20 s")
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        """SIGTERM is a clean shutdown: persistent bitmaps are written into the qcow2 images."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reaper is not None:
            self.reaper.done()
            self.reaper = None


def backup_offline(dom, disks: List[dx.DomainDisk], jobs: List[DiskJob], store: Store, opts: BackupOptions, lock: str,
                   state_dir: str, run_dir: str, progress: Optional[Callable[[int, int], None]],
                   hold_start: HoldStart, broken: Optional[str] = None) -> List[BackupResult]:
    """The transaction over the daemon's QMP: one view of all disks, as an online backup has.
    `hold_start(uuid, name)`: a context manager during which the libvirt hook refuses to start
    the domain (the agent's offline marker, agent/state.py: the caller's to give)."""
    uuid = dom.UUIDString()
    with hold_start(uuid, dom.name()):
        # The marker is in place: from now on the hook refuses a start. Re-check the state, in
        # case the domain started between our first look and the marker.
        if dom.isActive():
            raise EngineError(f"domain {dom.name()} started while its offline backup was being prepared; "
                              "nothing was done: run the backup again")
        qsd = StorageDaemon(disks, run_dir, uuid[:8])
        targets = [QMPTarget(j.target, qsd.qmp_socket, d.dev, os.path.join(state_dir, "scratch"), run_dir,
                             opts.bitmap_prefix) for d, j in zip(disks, jobs, strict=True)]
        qsd.leftovers = [Names.for_target(t).fleece_file for t in targets]
        with qsd:
            # no reaper of the engine's own: should we die, the daemon's reaper ends it, views and all
            engine = QMPEngine(targets, reaper=False, no_guest="the domain is shut off: its disks are as its "
                               "guest left them, nothing to freeze")
            try:
                # no guest writes: the fleece files stay empty, no scratch room to keep
                offline = replace(opts, labels=dict(opts.labels, offline=True), scratch_reserve=0)
                return run_transaction(engine, store, jobs, offline, progress, lock=lock, broken=broken)
            finally:
                engine.close()

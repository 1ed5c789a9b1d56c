"""The reference peers of issue 6, run on the same W and D1 as ekko, in the same run.

    nbdcopy of the export -> local raw file      the read+write limit
    qemu-img convert -O qcow2                    restore's limit (run by the ekko phase)
    virtnbdbackup (+ -z), through libvirt        the tool ekko replaces
    restic / borg reading the export as a stream  whole-disk readers with deduplication

None of them is a dependency of ekko or of `make test`: the bench installs the Debian packages
itself when asked (`--install-peers`), or says how.
"""

import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import procs
from procs import Run, Vm

PEER_PACKAGES = {"virtnbdbackup": "virtnbdbackup", "restic": "restic", "borg": "borgbackup"}
DOMAIN = "ekko-test-bench-w"


def installed(tool: str) -> bool:
    return shutil.which(tool) is not None


def install_peers(tools: List[str]) -> None:
    pkgs = [PEER_PACKAGES[t] for t in tools if t in PEER_PACKAGES and not installed(t)]
    if not pkgs:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # No systemd: keep postinst scripts from starting daemons (as scripts/install-deps.sh does).
    rc_d = "/usr/sbin/policy-rc.d"
    ours = not os.path.exists(rc_d)
    if ours:
        with open(rc_d, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(rc_d, 0o755)
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs], env=env, check=True)
    finally:
        if ours:
            os.unlink(rc_d)


def write_d1(write: Callable[[str, int, int], None], d1_files: List[Tuple[str, int, int]]) -> float:
    t0 = time.monotonic()
    for path, off, n in d1_files:
        write(path, off, n)
    return time.monotonic() - t0


def result(tool: str, full: Run, inc: Optional[Run], none: Optional[Run], restore: Optional[Run],
           store_full: Optional[int], store_d1: Optional[int], extra: Optional[Dict] = None) -> Dict:
    r = {"tool": tool,
         "full_s": full.wall, "inc_d1_s": inc.wall if inc else None, "inc_none_s": none.wall if none else None,
         "restore_s": restore.wall if restore else None,
         "store_full_mib": store_full / 2**20 if store_full is not None else None,
         "store_d1_mib": store_d1 / 2**20 if store_d1 is not None else None,
         "cpu_full_tool_s": full.cpu, "cpu_full_qemu_s": full.qemu_cpu, "rss_mib": full.maxrss_mib,
         "runs": {k: v.summary() for k, v in (("full", full), ("inc_d1", inc), ("inc_none", none),
                                               ("restore", restore)) if v is not None}}
    r.update(extra or {})
    return r


# -- nbdcopy: the read + write limit ---------------------------------------------------------------
def run_nbdcopy(workdir: str, image: str, flush: bool = False, to_null: bool = False) -> Dict:
    """The issue's reference is plain nbdcopy: its 3 GiB reach the page cache only. With
    --flush the file is durable when it returns, as every object of a backup is; `to_null`:
    nothing is written (nbdcopy's null:), the read alone (bench/floors.py)."""
    vm = Vm(workdir, image).start()
    out = "null:" if to_null else os.path.join(workdir, "nbdcopy.raw")
    try:
        uri = vm.export(os.path.join(workdir, "e.nbd"))
        r = procs.run(["nbdcopy", *(["--flush"] if flush else []), uri, out], qemu_pid=vm.pid)
        vm.unexport()
    finally:
        vm.stop()
    if not to_null:
        os.unlink(out)
    return result("nbdcopy of the export -> local raw file" + (", --flush (durable)" if flush else ""),
                  r, None, None, None, None, None)


# -- restic and borg: whole-disk stream readers -----------------------------------------------------
def _stream_peer(tool: str, workdir: str, image: str, d1_files, env: Dict, init: List[str],
                 backup: Callable[[str, str], str], restore: Callable[[str], str], repo: str) -> Dict:
    procs.run(init, env=env)
    vm = Vm(workdir, image).start()
    try:
        uri = vm.export(os.path.join(workdir, "e.nbd"))
        full = procs.run(backup(uri, "full"), qemu_pid=vm.pid, env=env, shell=True)
        store_full = procs.tree_bytes(repo)
        write_d1(vm.guest_write, d1_files)
        vm.flush()
        inc = procs.run(backup(uri, "d1"), qemu_pid=vm.pid, env=env, shell=True)
        store_d1 = procs.tree_bytes(repo)
        vm.unexport()
    finally:
        vm.stop()
    out = os.path.join(workdir, f"{tool}-out")
    os.makedirs(out)
    rest = procs.run(restore(out), env=env, cwd=out, shell=True)
    shutil.rmtree(out, ignore_errors=True)
    return result(tool, full, inc, None, rest, store_full, store_d1)


def run_restic(workdir: str, image: str, d1_files) -> Dict:
    repo = os.path.join(workdir, "restic-repo")
    env = dict(os.environ, RESTIC_REPOSITORY=repo, RESTIC_PASSWORD="bench",
               RESTIC_CACHE_DIR=os.path.join(workdir, "restic-cache"))
    version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.split()[1]
    r = _stream_peer(
        "restic", workdir, image, d1_files, env, ["restic", "init"],
        lambda uri, tag: f"nbdcopy '{uri}' - | restic backup --quiet --stdin --stdin-filename vda.raw --tag {tag}",
        lambda out: f"restic restore --quiet latest --tag d1 --target {out}", repo)
    r["tool"] = f"restic {version} (reads the whole disk every time)"
    return r


def run_borg(workdir: str, image: str, d1_files) -> Dict:
    repo = os.path.join(workdir, "borg-repo")
    env = dict(os.environ, BORG_REPO=repo, BORG_PASSPHRASE="", BORG_BASE_DIR=os.path.join(workdir, "borg-base"),
               BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
    version = subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.split()[-1]
    r = _stream_peer(
        "borg", workdir, image, d1_files, env, ["borg", "init", "--encryption", "none"],
        lambda uri, tag: f"nbdcopy '{uri}' - | borg create --compression zstd,1 --stdin-name vda.raw ::{tag} -",
        lambda out: "borg extract --sparse ::d1", repo)
    r["tool"] = f"borg {version} zstd,1 (reads the whole disk every time)"
    return r


# -- virtnbdbackup, through libvirt -------------------------------------------------------------
class LibvirtSide:
    """libvirtd from the test harness (reused if one runs and EKKO_TEST_REUSE_LIBVIRTD=1; stopped
    only if we started it) and one throwaway domain per measured run."""

    def __init__(self, log_dir: str):
        sys.path.insert(0, os.path.join(procs.ROOT, "tests"))
        from harness import libvirtd as lv
        self.lv = lv
        self.daemon = lv.Libvirtd(log_dir)

    def __enter__(self) -> "LibvirtSide":
        self.daemon.start()
        self.conn = self.daemon.connect()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.lv.destroy_and_undefine(self.conn, DOMAIN)
            self.conn.close()
        finally:
            self.daemon.stop()

    def run_virtnbdbackup(self, workdir: str, image: str, d1_files, compress: bool) -> Dict:
        lv = self.lv
        if lv.find_domain(self.conn, DOMAIN) is not None:
            raise RuntimeError(f"domain {DOMAIN} exists: a previous bench run did not clean up (virsh undefine it)")
        dom = lv.define_test_domain(self.conn, DOMAIN, [(image, "qcow2", "vda")], self.daemon.dom_type)
        out = os.path.join(workdir, "vnb")
        scratch = os.path.join(workdir, "vnb-scratch")
        os.makedirs(scratch)
        z = ["-z"] if compress else []
        env = dict(os.environ, TMPDIR=workdir)      # their qemu-img/qemu-nbd logs go with the workdir
        try:
            dom.create()
            pid = lv.qemu_pid(dom)
            procs.wait_idle(pid)
            base = ["virtnbdbackup", "-d", DOMAIN, "-o", out, "-S", scratch, "-n", *z]
            full = procs.run(base + ["-l", "full"], qemu_pid=pid, env=env)
            store_full = procs.tree_bytes(out)
            write_d1(lambda path, off, n: self._guest_write(dom, path, off, n), d1_files)
            inc = procs.run(base + ["-l", "inc"], qemu_pid=pid, env=env)
            store_d1 = procs.tree_bytes(out)
            none = procs.run(base + ["-l", "inc"], qemu_pid=pid, env=env)
        finally:
            lv.destroy_and_undefine(self.conn, DOMAIN)
            if os.path.exists(lv.domain_log(DOMAIN)):
                os.unlink(lv.domain_log(DOMAIN))
        rdir = os.path.join(workdir, "vnb-restore")
        rest = procs.run(["virtnbdrestore", "-i", out, "-o", rdir, "-u", "virtnbdbackup.1", "-n",
                          "-L", os.path.join(workdir, "virtnbdrestore.log")], env=env)
        version = subprocess.run(["virtnbdbackup", "-V"], capture_output=True, text=True).stdout.strip()
        shutil.rmtree(rdir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        name = f"virtnbdbackup {version}" + (" -z (lz4)" if compress else ", no compression")
        return result(name, full, inc, none, rest, store_full, store_d1)

    def _guest_write(self, dom, path: str, off: int, n: int) -> None:
        alias = self.lv.disk_alias(dom, "vda")
        dev = f"/machine/peripheral/{alias}/virtio-backend"
        log = self.lv.domain_log(DOMAIN)
        start = os.path.getsize(log)
        out = self.lv.monitor(dom, f'qemu-io -d {dev} "write -s {path} {off} {n}"')
        if out.strip():
            raise RuntimeError(f"qemu-io write into {dev} failed: {out.strip()}")
        ok = f"wrote {n}/{n} bytes at offset {off}".encode()
        deadline = time.monotonic() + 10
        while True:
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read()
            if ok in text:
                return
            if b"write failed" in text or time.monotonic() > deadline:
                raise RuntimeError(f"guest write at {off} into {DOMAIN} failed: {text[-300:]!r}")
            time.sleep(0.005)

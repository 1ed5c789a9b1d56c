"""ekko on W, through the real CLI (`python -m ekko_libvirt.cli -c CFG ...`), against a QEMU the
bench starts: full, incremental after D1, incremental with no change, restore of the D1 backup
to qcow2; then `qemu-img convert -O qcow2` of the same disk (restore's limit)."""

import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import yaml

import floors
import peers
import procs
from procs import Vm


def ekko_config(workdir: str, qmp_socket: str, overrides: Dict) -> Dict:
    cfg = {"store": {"type": "local", "path": os.path.join(workdir, "store")},
           "state_dir": os.path.join(workdir, "state"), "run_dir": os.path.join(workdir, "run"),
           "targets": {"w": {"engine": "qmp", "qmp_socket": qmp_socket, "node": procs.NODE}}}
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


class Ekko:
    def __init__(self, workdir: str, cfg: Dict, profile: Optional[str] = None):
        self.workdir = workdir
        self.path = os.path.join(workdir, "ekko.yaml")
        with open(self.path, "w") as f:
            yaml.safe_dump(cfg, f)
        self.store = cfg["store"].get("path")     # None: not a local store (bench/swift_full.py)
        self.env = dict(os.environ, PYTHONPATH=procs.ROOT)
        if os.environ.get("EKKO_BENCH_PYCACHE"):
            # As installed: byte-compiled once (pip does it), not compiled again at every command.
            self.env.pop("PYTHONDONTWRITEBYTECODE", None)
            self.env["PYTHONPYCACHEPREFIX"] = os.environ["EKKO_BENCH_PYCACHE"]
        self.profile = profile

    def __call__(self, *args: str, qemu_pid: Optional[int] = None, profile_as: str = "") -> Tuple[procs.Run, Dict]:
        cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", self.path, *args, "--json"]
        if self.profile and profile_as:
            cmd = _profiled(cmd, self.profile, profile_as)
        r = procs.run(cmd, qemu_pid=qemu_pid, env=self.env)
        # py-spy prints its own lines on stdout around ours
        return r, json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])


def _profiled(cmd: List[str], tool: str, name: str) -> List[str]:
    """py-spy (sampling, all threads, native frames off) writing collapsed stacks next to the JSON."""
    out = os.path.join(procs.ROOT, "bench", "out", f"profile-{name}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if tool == "py-spy":
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        return [spy, "record", "--threads", "--native", "-r", "250", "-f", "raw", "-o", out + ".txt", "--", *cmd]
    raise ValueError(f"unknown profiler {tool!r}")


def run_full(workdir: str, base_image: str, overrides: Dict, encrypted: bool) -> Dict:
    """Only a full backup of W (the encryption on/off comparison): a fresh store each time."""
    if encrypted:
        from ekko_libvirt.format import crypto
        keys = os.path.join(workdir, "keys")
        os.makedirs(keys, mode=0o700)
        crypto.create_key(os.path.join(keys, "default.key"))
        overrides = dict(overrides, encryption={"enabled": True, "key_file": os.path.join(keys, "{project}.key")})
    image = os.path.join(workdir, "disk.qcow2")
    procs.copy_image(base_image, image)
    vm = Vm(workdir, image).start()
    ekko = Ekko(workdir, ekko_config(workdir, vm.qmp_socket, overrides))
    try:
        full, jf = ekko("backup", "w", "--full", qemu_pid=vm.pid)
    finally:
        vm.stop()
    res = peers.result("ekko, encryption on" if encrypted else "ekko", full, None, None, None,
                       procs.tree_bytes(ekko.store), None, {"encryption": jf["backup"].get("encryption")})
    shutil.rmtree(ekko.store, ignore_errors=True)
    os.unlink(image)
    return res


def run(workdir: str, base_image: str, d1_files, overrides: Dict, convert: bool = True, verify: bool = True,
        profile: Optional[str] = None) -> Dict:
    image = os.path.join(workdir, "disk.qcow2")
    procs.copy_image(base_image, image)
    vm = Vm(workdir, image).start()
    ekko = Ekko(workdir, ekko_config(workdir, vm.qmp_socket, overrides), profile)
    try:
        full, jf = ekko("backup", "w", "--full", qemu_pid=vm.pid, profile_as="full")
        store_full = procs.tree_bytes(ekko.store)
        d1_write_s = peers.write_d1(vm.guest_write, d1_files)
        vm.flush()
        inc, ji = ekko("backup", "w", "--incremental", qemu_pid=vm.pid, profile_as="inc-d1")
        store_d1 = procs.tree_bytes(ekko.store)
        objects = procs.tree_files(os.path.join(ekko.store, "segments"))
        none, jn = ekko("backup", "w", "--incremental", qemu_pid=vm.pid, profile_as="inc-none")
    finally:
        vm.stop()
    os.sync()
    d1_id = ji["backup"]["backup_id"]
    out = os.path.join(workdir, "restored.qcow2")
    rest, _ = ekko("restore", d1_id, "--to", out, profile_as="restore")
    extra = {"segment_size": jf["backup"]["segment_size"], "segment_objects_after_d1": objects,
             "manifest_bytes": sorted(os.path.getsize(os.path.join(dp, f))
                                      for dp, _d, fs in os.walk(os.path.join(ekko.store, "manifests")) for f in fs),
             "d1_guest_write_s": d1_write_s,
             # the read-back check before the commit, timed inside the full (its share of it: bench/run.py)
             "read_back_full_s": (jf["backup"].get("timings") or {}).get("read_back_seconds"),
             "kinds": [jf["backup"]["kind"], ji["backup"]["kind"],
                                                       jn["backup"]["kind"]],
             "read_bytes": [jf["backup"]["read_bytes"], ji["backup"]["read_bytes"], jn["backup"]["read_bytes"]],
             "stored_bytes": [jf["backup"]["stored_bytes"], ji["backup"]["stored_bytes"],
                              jn["backup"]["stored_bytes"]]}
    if verify:
        # The restored D1 backup must equal the disk as it stood after D1 (unchanged since).
        p = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", out, image])
        extra["restore_identical"] = p.returncode == 0
    floor = floors.restore_floor(ekko.store, "w", d1_id, os.stat(out).st_blocks * 512, workdir)
    os.unlink(out)
    res = peers.result("ekko", full, inc, none, rest, store_full, store_d1, extra)
    res["floor-restore"] = floor
    if convert:
        dst = os.path.join(workdir, "convert.qcow2")
        os.sync()
        conv = procs.run(["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=65536", image, dst])
        os.unlink(dst)
        res["convert"] = peers.result("qemu-img convert -O qcow2 (restore's limit)", conv, None, None, None,
                                      None, None)
        res["convert"]["restore_s"], res["convert"]["full_s"] = conv.wall, None
        res["convert"]["cpu_full_tool_s"] = conv.cpu
        # Context: convert's default cache mode leaves its output in the page cache (not durable;
        # `sync` after it took 1.3 s here); ekko's restore output is on disk when it returns.
        os.sync()
        durable = procs.run(["qemu-img", "convert", "-t", "none", "-O", "qcow2", "-o", "cluster_size=65536",
                             image, dst])
        os.unlink(dst)
        res["convert-durable"] = peers.result("qemu-img convert -t none -O qcow2 (durable)", durable, None, None,
                                              None, None, None)
        res["convert-durable"]["restore_s"], res["convert-durable"]["full_s"] = durable.wall, None
        res["convert-durable"]["cpu_full_tool_s"] = durable.cpu
    shutil.rmtree(os.path.join(workdir, "store"), ignore_errors=True)
    os.unlink(image)
    return res

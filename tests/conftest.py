import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from harness.qemu import QemuDisk  # noqa: E402


@pytest.fixture
def workdir():
    # Short path: unix socket paths must stay under 108 bytes.
    d = tempfile.mkdtemp(prefix="ek", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Ekko:
    """Runs the real `ekko` console entry point in a subprocess, as an operator would."""

    def __init__(self, workdir: str, cfg: dict):
        self.workdir = workdir
        self.cfg = cfg
        self.path = os.path.join(workdir, "ekko.yaml")
        self.write_config()

    def write_config(self) -> None:
        with open(self.path, "w") as f:
            yaml.safe_dump(self.cfg, f)

    def run(self, *args, env=None, check=True, json_out=False):
        cmd = [sys.executable, "-m", "ekko_libvirt.cli", "-c", self.path, *args]
        if json_out:
            cmd.append("--json")
        e = dict(os.environ, **(env or {}))
        e["PYTHONPATH"] = ROOT
        p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)
        if check and p.returncode != 0:
            raise AssertionError(f"ekko {' '.join(args)} exited {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
        if json_out and p.stdout.strip():
            p.data = json.loads(p.stdout)
        return p

    def backup(self, target="t1", *extra, **kw):
        p = self.run("backup", target, *extra, json_out=True, **kw)
        return p.data["backup"] if p.returncode == 0 else p

    @property
    def store_dir(self) -> str:
        return self.cfg["store"]["path"]


def make_config(workdir: str, targets: dict, segment_size: str = "256KiB") -> dict:
    return {"store": {"type": "local", "path": os.path.join(workdir, "store")},
            "state_dir": os.path.join(workdir, "state"), "run_dir": os.path.join(workdir, "run"),
            "segment_size": segment_size, "workers": 2, "targets": targets}


@pytest.fixture
def qdisk(workdir):
    disks = []

    def make(size=32 << 20, fmt="qcow2", name="disk"):
        d = QemuDisk(workdir, size, fmt, name).start()
        disks.append(d)
        return d
    yield make
    for d in disks:
        d.stop()


@pytest.fixture
def ekko_for(workdir):
    def make(disk, segment_size="256KiB", name="t1"):
        cfg = make_config(workdir, {name: {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}},
                          segment_size)
        return Ekko(workdir, cfg)
    return make


def read_raw(path: str) -> bytes:
    if path.endswith(".qcow2"):
        raw = path + ".raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", path, raw], check=True)
        path = raw
    with open(path, "rb") as f:
        return f.read()

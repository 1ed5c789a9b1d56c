import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml
from hypothesis import HealthCheck, settings

# Hypothesis profiles for the property tests (tests/unit/test_prop_*.py). "default" (make test):
# few examples, derandomized, so every run tries the same inputs and stays fast. "torture"
# (make torture, HYPOTHESIS_PROFILE=torture): HYPOTHESIS_EXAMPLES examples per test (2000), random
# inputs from --hypothesis-seed. Both: no deadline (no test asserts a duration), no example
# database in the working tree, and a failure prints its falsifying example and the
# @reproduce_failure blob that replays it.
settings.register_profile("default", max_examples=60, derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("torture", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "2000")),
                          deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from harness.qemu import QemuDisk  # noqa: E402
from tests.swift_fixtures import swift_server  # noqa: E402,F401  (session fixture, shared by all)


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

    def store(self, namespace=None):
        """The configured store, opened as ekko opens it (local directory or Swift)."""
        from ekko_libvirt import config
        from ekko_libvirt.store.factory import open_store
        return open_store(config.build(self.cfg), namespace)

    def corrupt(self, key: str, offset: int = 100) -> None:
        """Flip one bit of a stored object, through the store itself (works on every backend)."""
        st = self.store()
        blob = bytearray(st.get(key))
        blob[offset] ^= 0x01
        st.put(key, bytes(blob))

    def lose(self, key: str) -> None:
        self.store().delete(key)


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


@pytest.fixture(params=["local", "swift"])
def store_kind(request):
    return request.param


def swift_section(server, account="test") -> dict:
    user, key = server.credentials(account)
    return {"type": "swift", "auth_url": server.auth_url, "auth_version": "1", "user": user, "key": key,
            "container_prefix": f"ekko-{os.urandom(5).hex()}", "retries": 3, "timeout": 30}


@pytest.fixture
def ekko_for(workdir, request):
    """ekko_for(disk) -> Ekko on a local store; on Swift too when the test uses `store_kind`."""
    kind = request.getfixturevalue("store_kind") if "store_kind" in request.fixturenames else "local"

    def make(disk, segment_size="256KiB", name="t1"):
        cfg = make_config(workdir, {name: {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}},
                          segment_size)
        if kind == "swift":
            cfg["store"] = swift_section(request.getfixturevalue("swift_server"))
        return Ekko(workdir, cfg)
    return make


def manifest_of(store, contents, segment_size: int, virtual_size=None):
    """A full backup's manifest whose segment i holds contents[i] (None: a zero segment), its
    segments put in `store`: for restore tests that need no QEMU."""
    from ekko_libvirt.format import manifest as mf
    from ekko_libvirt.format import segment
    t = mf.SegmentTable(len(contents))
    for i, raw in enumerate(contents):
        if raw is None:
            t.set_zero(i)
            continue
        enc = segment.encode(raw)
        store.put(enc.key, enc.blob)
        t.set_data(i, enc.digest)
    return mf.Manifest("20260101T000000000Z-abcdef", "t1", virtual_size or len(contents) * segment_size,
                       segment_size, t, kind="full")


def read_raw(path: str) -> bytes:
    if path.endswith(".qcow2"):
        raw = path + ".raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", path, raw], check=True)
        path = raw
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def small_fs(parent: str, name: str, size_mib: int, mode: str = "0700"):
    """A tmpfs of `size_mib` MiB mounted at parent/name for the block (the tests that fill a
    file system or make it read-only); unmounted after it, lazily if something still holds it."""
    mnt = os.path.join(parent, name)
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode={mode}", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], check=False).returncode:
            subprocess.run(["umount", "-l", mnt], check=False)


def remount(mnt: str, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", mnt], check=True)


def release_pauses(fifo: str, proc) -> None:
    """Open and close the pause FIFO (EKKO_TEST_PAUSE) whenever a thread of `proc` waits on it,
    until `proc` exits; in a thread of its own."""
    def run():
        while proc.poll() is None:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:          # ENXIO: nobody waits at the moment
                time.sleep(0.02)
                continue
            os.close(fd)
    threading.Thread(target=run, daemon=True).start()


# -- the host's own ekko directories stay untouched ------------------------------------------------------
# Every test gives ekko its own state_dir/run_dir/store. A config that forgets one falls back on
# /var/lib/ekko (config.py's defaults), the directory of a real installation: test_deb_package
# refuses to install where it exists. Checked over the whole session, whatever the test order.
_HOST_DIR = "/var/lib/ekko"
_host_dir_before = os.path.exists(_HOST_DIR)


def pytest_sessionfinish(session, exitstatus):
    if not _host_dir_before and os.path.exists(_HOST_DIR):
        found = sorted(os.listdir(_HOST_DIR))
        print(f"\nFAILED: a test created {_HOST_DIR} (holding {found}): a config without its own "
              "state_dir/run_dir/store path")
        session.exitstatus = 1

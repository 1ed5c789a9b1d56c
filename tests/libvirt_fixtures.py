"""pytest fixtures for tests against a real libvirtd. Import the ones a module uses:

    from libvirt_fixtures import libvirtd, libvirt_conn, test_domains, ekko_hook  # noqa: F401

libvirtd      (session) virtlogd + libvirtd started by tests/harness/libvirtd.py, stopped by PID at
              the end. Not installed / not root: skip -- or FAIL when CI=true.
libvirt_conn  a fresh qemu:///system connection per test (a libvirtd restart kills connections).
test_domains  TestDomains for the test; at teardown it destroys/undefines what it defined.
ekko_hook     (module) hooks/qemu installed as /etc/libvirt/hooks/qemu.d/ekko with a temp spool and
              state dir baked in, libvirtd told by SIGHUP; at teardown the previous file (if any)
              is put back and libvirtd told again.
"""

import os
import shutil
from dataclasses import dataclass

import pytest

from harness import in_ci
from harness.libvirtd import Libvirtd, TestDomains, make_image, make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK_SOURCE = os.path.join(ROOT, "hooks", "qemu")
HOOK_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_DEST = os.path.join(HOOK_DIR, "ekko")


def missing(reason: str) -> None:
    """Skip -- or fail when CI=true: a CI run must not pass by skipping the real-libvirt tests."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


# Each test module imports `libvirtd`, which makes it a separate (session-scoped) fixture per
# module: without this shared instance the second module of a run would find the first one's
# libvirtd running and refuse (AlreadyRunning). The last user stops it, at the end of the session.
_SHARED = {"lv": None, "log_dir": None, "users": 0}


@pytest.fixture(scope="session")
def libvirtd():
    if shutil.which("libvirtd") is None or shutil.which("virtlogd") is None:
        missing("libvirtd/virtlogd not installed")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing("python3-libvirt not importable")
    if os.geteuid() != 0:
        missing("a system libvirtd needs root")
    if _SHARED["lv"] is None:
        log_dir = make_workdir("ekko-libvirtd-")
        lv = Libvirtd(log_dir)
        try:
            lv.start()      # a libvirtd we did not start -> AlreadyRunning: an error, not a skip
        except BaseException:
            if not os.environ.get("EKKO_KEEP_LOGS"):     # the error carries the log's last lines
                shutil.rmtree(log_dir, ignore_errors=True)
            raise
        _SHARED.update(lv=lv, log_dir=log_dir)
    _SHARED["users"] += 1
    try:
        yield _SHARED["lv"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            lv, log_dir = _SHARED["lv"], _SHARED["log_dir"]
            _SHARED.update(lv=None, log_dir=None)
            lv.stop()
            if not os.environ.get("EKKO_KEEP_LOGS"):
                shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture
def libvirt_conn(libvirtd):
    conn = libvirtd.connect()
    yield conn
    try:
        conn.close()
    except Exception:   # noqa: BLE001 -- dead after a libvirtd restart
        pass


@pytest.fixture
def test_domains(libvirtd, libvirt_conn):
    doms = TestDomains(libvirt_conn, libvirtd.dom_type)
    yield doms
    conn = libvirtd.connect()      # the test's connection may be dead (libvirtd restarted)
    try:
        errors = doms.cleanup(conn)
    finally:
        conn.close()
    assert not errors, f"cleanup of test domains failed: {errors}"


@pytest.fixture
def images():
    """images(name, fmt='qcow2', size=16 MiB) -> path in a directory QEMU can reach."""
    d = make_workdir("ekko-img-")
    yield lambda name, fmt="qcow2", size=16 << 20: make_image(os.path.join(d, f"{name}.{fmt}"), fmt, size)
    shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class InstalledHook:
    path: str
    spool_dir: str
    state_dir: str


@pytest.fixture(scope="module")
def ekko_hook(libvirtd):
    from ekko_libvirt.agent.spool import install_hook
    root = make_workdir("ekko-hook-")
    spool_dir, state_dir = os.path.join(root, "spool"), os.path.join(root, "state")
    created_dir = not os.path.isdir(HOOK_DIR)
    backup = None
    if os.path.lexists(HOOK_DEST):
        backup = os.path.join(root, "previous-hook")
        shutil.move(HOOK_DEST, backup)
    try:
        install_hook(HOOK_DEST, spool_dir, state_dir, source=HOOK_SOURCE)
        libvirtd.reload_hooks()
        yield InstalledHook(HOOK_DEST, spool_dir, state_dir)
    finally:
        try:
            os.unlink(HOOK_DEST)
        except FileNotFoundError:
            pass
        if backup is not None:
            shutil.move(backup, HOOK_DEST)
        elif created_dir:
            try:
                os.rmdir(HOOK_DIR)
            except OSError:
                pass
        if libvirtd.pid is not None:
            libvirtd.reload_hooks()
        shutil.rmtree(root, ignore_errors=True)

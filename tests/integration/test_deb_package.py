"""The Debian package (packaging/build-deb.sh): built, installed on this machine with apt, used (a
backup and a restore of a live QEMU disk with the installed /usr/bin/ekko and Debian's python3, the
agent started from the packaged config), removed (the agent stopped, the hook gone, the conffile
kept), purged (state and spool gone, the store left whole and restorable), and what is left checked.

It changes the machine (/usr/bin/ekko, /etc/libvirt/hooks/qemu.d/ekko, /var/lib/ekko): it refuses
to run where any of that exists already, purges what it installed whatever happens, and must run
under the libvirtd lock (flock /tmp/ekko-libvirtd.lock), as the tests that install the hook do.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_raw
from harness import in_ci

KiB, MiB = 1024, 1024 * 1024
OWNED = ("/usr/bin/ekko", "/etc/ekko", "/var/lib/ekko", "/var/spool/ekko", "/etc/libvirt/hooks/qemu.d/ekko",
         "/usr/lib/python3/dist-packages/ekko_libvirt", "/usr/lib/ekko")
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-q"]
# the installed command as an operator runs it: Debian's python3, nothing of this tree or the venv
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


def missing(why):
    if in_ci():
        pytest.fail(f"{why} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(why)


def run(cmd, check=True, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def ekko(*args, check=True):
    return run(["/usr/bin/ekko", *args], check=check, env=CLEAN_ENV, cwd="/")


def installed() -> bool:
    p = run(["dpkg-query", "-W", "-f", "${Status}", "ekko"], check=False)
    return p.returncode == 0 and "installed" in p.stdout and "not-installed" not in p.stdout


@pytest.fixture
def package(tmp_path):
    if os.geteuid() != 0:
        missing("installing a package needs root")
    for tool in ("dpkg-deb", "apt-get", "gcc"):
        if shutil.which(tool) is None:
            missing(f"{tool} not installed")
    there = [p for p in OWNED if os.path.lexists(p)] + (["package ekko"] if installed() else [])
    if there:
        pytest.fail(f"this machine already has {', '.join(there)}: not installing over it", pytrace=False)
    venv = os.path.dirname(os.path.dirname(sys.executable))          # where qemu.qmp is carried from
    deb = run(["bash", os.path.join(ROOT, "packaging", "build-deb.sh"), str(tmp_path / "out")],
              env=dict(os.environ, EKKO_VENV=venv)).stdout.strip()
    try:
        yield deb
    finally:
        if installed() or run(["dpkg-query", "-W", "ekko"], check=False).returncode == 0:
            run(APT + ["purge", "ekko"], check=False)
        if not installed():      # nothing of these was here before the test (checked above): all its own
            for path in ("/var/lib/ekko", "/usr/lib/ekko", "/usr/lib/python3/dist-packages/ekko_libvirt"):
                shutil.rmtree(path, ignore_errors=True)


def test_build_install_use_remove_purge(package, qdisk, workdir):
    info = run(["dpkg-deb", "-I", package]).stdout
    for dep in ("python3-libvirt", "python3-libnbd", "python3-swiftclient", "python3-xxhash", "python3-zstandard",
                "python3-yaml", "python3-cryptography", "python3-prometheus-client", "qemu-utils"):
        assert dep in info, dep
    assert run(["dpkg-deb", "-f", package, "Package"]).stdout.strip() == "ekko"
    run(APT + ["install", "--no-install-recommends", package])
    assert installed()

    # installed: the command on Debian's python3, the conffile 0600, the unit, the hook as a drop-in
    where = run(["/usr/bin/python3", "-c", "import ekko_libvirt, qemu.qmp; print(ekko_libvirt.__file__)"],
                env=CLEAN_ENV, cwd="/").stdout
    assert where.startswith("/usr/lib/python3/dist-packages/ekko_libvirt/"), where
    assert oct(os.stat("/etc/ekko/ekko.yaml").st_mode & 0o777) == "0o600"
    assert "/etc/ekko/ekko.yaml" in run(["dpkg-query", "-W", "-f", "${Conffiles}", "ekko"]).stdout
    assert os.path.isfile("/lib/systemd/system/ekko-agent.service")
    hook = "/etc/libvirt/hooks/qemu.d/ekko"
    assert os.access(hook, os.X_OK)
    status = json.loads(ekko("status", "--json").stdout)
    assert status["hook"]["installed"] and status["hook"]["rule_ok"], status["hook"]
    assert status["hook"]["rule_file"] == "/usr/lib/python3/dist-packages/ekko_libvirt/agent/hookformat.py"
    assert oct(os.stat("/var/spool/ekko/events").st_mode & 0o777) == "0o700"

    # used: a full and an incremental of a live QEMU disk into /var/lib/ekko/store, restored exactly
    disk = qdisk(8 * MiB + 64 * KiB)
    cfg = os.path.join(workdir, "ekko.yaml")
    with open(cfg, "w") as f:
        json.dump({"store": {"type": "local", "path": "/var/lib/ekko/store"}, "state_dir": "/var/lib/ekko",
                   "run_dir": os.path.join(workdir, "run"), "segment_size": "256KiB",
                   "targets": {"t1": {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}}}, f)
    disk.write(0, os.urandom(MiB))
    b1 = json.loads(ekko("-c", cfg, "backup", "t1", "--json").stdout)["backup"]
    s1 = disk.snapshot()
    disk.write(5 * MiB, os.urandom(300 * KiB))
    b2 = json.loads(ekko("-c", cfg, "backup", "t1", "--json").stdout)["backup"]
    s2 = disk.snapshot()
    assert (b1["kind"], b2["kind"]) == ("full", "incremental")
    for b, want in ((b1, s1), (b2, s2)):
        out = os.path.join(workdir, f"{b['backup_id']}.qcow2")
        ekko("-c", cfg, "restore", b["backup_id"], "--to", out)
        assert read_raw(out) == want

    # the agent from the packaged config (no libvirtd needed to start); `remove` must stop it
    log = open(os.path.join(workdir, "agent.log"), "wb")
    agent = subprocess.Popen(["/usr/bin/ekko", "agent"], env=CLEAN_ENV, cwd="/", stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while b"agent ready" not in open(log.name, "rb").read():
            assert agent.poll() is None and time.monotonic() < deadline, open(log.name, "rb").read()
            try:
                agent.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        run(APT + ["remove", "ekko"])
        assert agent.wait(5) == 0, open(log.name, "rb").read()          # prerm stopped it: SIGTERM, exit 0
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
        log.close()
    assert b"agent stopped" in open(log.name, "rb").read()

    # removed: command, hook, modules (byte code too), vendored qemu.qmp gone; conffile, state, store kept
    for gone in ("/usr/bin/ekko", hook, "/usr/lib/python3/dist-packages/ekko_libvirt",
                 "/usr/lib/python3/dist-packages/ekko-vendor.pth", "/usr/lib/ekko"):
        assert not os.path.lexists(gone), gone
    assert os.path.isfile("/etc/ekko/ekko.yaml") and os.path.isdir("/var/lib/ekko/agent")

    # purged: config, spool and state gone; the store whole (restorable with this tree's ekko)
    run(APT + ["purge", "ekko"])
    assert not installed()
    for gone in ("/etc/ekko", "/var/spool/ekko", "/var/lib/ekko/agent", "/var/lib/ekko/locks",
                 "/var/lib/ekko/ledger"):
        assert not os.path.lexists(gone), gone
    assert sorted(os.listdir("/var/lib/ekko")) == ["store"]
    venv_cfg = os.path.join(workdir, "after.yaml")
    with open(venv_cfg, "w") as f:
        json.dump({"store": {"type": "local", "path": "/var/lib/ekko/store"},
                   "state_dir": os.path.join(workdir, "state2")}, f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = os.path.join(workdir, "after.raw")
    run([sys.executable, "-m", "ekko_libvirt.cli", "-c", venv_cfg, "restore", b2["backup_id"], "--to", out], env=env)
    assert read_raw(out) == s2

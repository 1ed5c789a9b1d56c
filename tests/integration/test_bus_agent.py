"""The real agent daemon on the real bus: `ekko agent` (a subprocess, as in test_agent_libvirt.py)
with `agent.bus`, a real libvirtd domain carrying Nova's metadata, RabbitMQ from the harness, and
the API's Bus in this process.

    backup-now through the Bus   -> the job ends "done" with the backup id; that backup is in the
                                    store (the project's namespace, from Nova's metadata)
    the agent SIGKILLed during a backup-now (held at its pause point) -> the job ends "failed"
                                    with why, within a bounded time
    the agent restarted          -> the next backup-now works; its restored disk equals the source
                                    (`qemu-img compare`)
    no transport password        in the agent's log

Run under `flock /tmp/ekko-libvirtd.lock` like every libvirtd test.
"""

import os
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from ekko_libvirt.api import busrules
from ekko_libvirt.api import conf as api_conf
from ekko_libvirt.api.bus import Bus
from libvirt_fixtures import ekko_hook, images, libvirt_conn, libvirtd, test_domains  # noqa: F401
from rabbit_fixtures import rabbit  # noqa: F401
from tests.integration.test_agent_libvirt import (agent_ekko, agents, lvwork, open_fifo_when_waited_on,  # noqa: F401
                                                  wait_for)
from tests.integration.test_libvirt_backup import start_guest

KiB, MiB = 1024, 1024 * 1024
HOST = "cmp-bus-test"
BEAT = 0.5


@pytest.fixture
def api_bus(rabbit, tmp_path):
    path = tmp_path / "ekko-api.conf"
    path.write_text(f"[DEFAULT]\ntransport_url = {rabbit.transport_url}\n"
                    f"[bus]\nstate_path = {tmp_path}/bus.sqlite\ncall_timeout = 5\n")
    bus = Bus(api_conf.load(files=[str(path)]))
    assert bus.wait_listening(60)
    yield bus
    bus.stop()


def bus_ekko(lvwork, hook, rabbit):
    return agent_ekko(lvwork, hook, bus={"transport_url": rabbit.transport_url, "host": HOST,
                                         "heartbeat_interval": BEAT})


def reports_domain(bus, uuid, agent_id=None):
    for h in bus.hosts():
        if h["host"] == HOST and h["alive"] and any(d.get("uuid") == uuid for d in h["domains"]):
            row = bus.db.host(HOST)
            return agent_id is None or row["agent_id"] != agent_id
    return False


def disk_path(dom, dev):
    root = ET.fromstring(dom.XMLDesc(0))
    for d in root.findall("devices/disk"):
        if d.find("target").get("dev") == dev:
            return d.find("source").get("file")
    raise AssertionError(f"no disk {dev}")


def test_backup_now_kill_and_restart(libvirtd, ekko_hook, test_domains, images, lvwork, agents, rabbit, api_bus):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-bus", nova=True)
    uuid = g.dom.UUIDString()
    g.write("vda", 0, os.urandom(300 * KiB))
    ekko = bus_ekko(lvwork, ekko_hook, rabbit)
    agent = agents(ekko)
    wait_for(lambda: reports_domain(api_bus, uuid), 30, "the agent's heartbeat naming the domain")

    # 1. backup-now through the bus: done, with the backup id, and that backup is in the store
    job = api_bus.backup_now(HOST, uuid)
    j = wait_for(lambda: (x := api_bus.job(job))["state"] in busrules.FINAL and x, 120, "the job's end")
    assert j["state"] == "done", j
    b1 = j["result"]["backup_id"]
    shown = ekko.run("show", b1, "--disk", "vda", json_out=True).data["backup"]
    assert shown["labels"]["project_id"] == "p-5678" and shown["kind"] == "full"

    # 2. the agent SIGKILLed while it runs a backup-now (held after libvirt's backup began)
    g.write("vda", 4 * MiB, os.urandom(200 * KiB))
    assert agent.terminate() == 0
    fifo = os.path.join(lvwork, "pause.fifo")
    os.mkfifo(fifo)
    agent = agents(ekko, env={"EKKO_TEST_PAUSE": f"after-transaction:{fifo}"})
    first_agent = api_bus.db.host(HOST)["agent_id"]
    wait_for(lambda: reports_domain(api_bus, uuid), 30, "the second agent's heartbeat")
    job = api_bus.backup_now(HOST, uuid)
    fd = open_fifo_when_waited_on(fifo)
    try:
        wait_for(lambda: api_bus.job(job)["state"] == "running", 10, "running")
        agent.kill()
        killed = time.monotonic()
    finally:
        os.close(fd)
    j = wait_for(lambda: (x := api_bus.job(job))["state"] in busrules.FINAL and x, 30, "the killed job's end")
    took = time.monotonic() - killed
    assert j["state"] == "failed" and f"agent on {HOST} is not answering" in j["error"], j
    assert took <= busrules.MIN_DEAD_S + 5, took
    assert api_bus.hosts()[0]["down"] is True

    # 3. restarted: it settles what the killed one left, heartbeats again, and the next backup-now works
    g.write("vda", 9 * MiB, os.urandom(100 * KiB))
    g.write("vdb", 1 * MiB, os.urandom(64 * KiB))
    agent = agents(ekko)
    wait_for(lambda: reports_domain(api_bus, uuid, agent_id=first_agent), 30, "the restarted agent's heartbeat")
    job = api_bus.backup_now(HOST, uuid)
    j = wait_for(lambda: (x := api_bus.job(job))["state"] in busrules.FINAL and x, 120, "the job's end")
    assert j["state"] == "done", j
    b3 = j["result"]["backup_id"]
    assert b3 != b1
    for dev in ("vda", "vdb"):
        g.flush(dev)
        out = os.path.join(lvwork, f"r-{dev}.raw")
        ekko.run("restore", b3, "--disk", dev, "--to", out)
        src = disk_path(g.dom, dev)
        fmt = "qcow2" if src.endswith(".qcow2") else "raw"
        cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", fmt, "-F", "raw", src, out],
                             capture_output=True, text=True, timeout=120)
        assert cmp.returncode == 0, (dev, cmp.stdout, cmp.stderr)
    assert agent.terminate() == 0
    text = agent.text()
    assert "Traceback" not in text, text
    assert rabbit.password not in text and "rabbit://ekko:***@" in text
    for name in os.listdir(lvwork):
        if name.startswith("agent-") and name.endswith(".log"):
            with open(os.path.join(lvwork, name), errors="replace") as f:
                assert rabbit.password not in f.read(), name

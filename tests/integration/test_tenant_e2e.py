"""Issue 19 end to end, as a tenant with the real `openstack` CLI, every service real and started
and stopped by the harness:

    Keystone (tests/harness/keystone.py)  catalog: `ekko-backup` -> the served ekko-api,
                                          `image` -> the test Glance (region RegionE2E: this
                                          module's endpoints, apart from any other module's)
    RabbitMQ (tests/harness/rabbitmq.py)  the bus between ekko-api and the agent
    Glance   (tests/harness/glance.py)    where the restore lands (NoAuth: it takes any token)
    libvirtd (tests/harness/libvirtd.py)  a domain with Nova's metadata: its UUID is the instance
                                          id, its owner project Keystone's p1; its disk vda is
                                          raw, an ext4 file system (mke2fs -d, no guest) of
                                          known files, and free space past it for new data
    `ekko agent` with agent.bus           the host's agent, backing the domain up on request
    `ekko-api --config-file F serve`      gunicorn, auth_token against Keystone, the bus

The flow, as p1's member (`openstack ekko ...`): the instance is listed (one backup, made before
by the host, as a schedule would) -> `backup create --wait` -> `job show`: done, naming the new
backup -> `backup list` shows it -> `file list` of a directory and `file get` of one file (bytes
equal what was written into the disk) -> `backup restore --image-name --wait` -> `openstack image
save` of that image equals the disk at the backup's instant (`qemu-img compare`) -> new data, a
second `backup create` -> `backup delete` of the older -> `usage show` drops by it.
And p1's reader: `backup create` 403, `backup list` works; p2's member: 404 on p1's backup.
Nothing in ekko-api's or the agent's log holds a token, a password or the bus password.

Two libguestfs appliance launches (file list, file get): the rest is seconds. Run under
`flock /tmp/ekko-libvirtd.lock` like every libvirtd test. EKKO_TEST_SEED: the files' bytes and
the instance's UUID (printed).
"""

import json
import os
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest

from harness.libvirtd import domain_xml, make_workdir
from libvirt_fixtures import ekko_hook, libvirt_conn, libvirtd, test_domains  # noqa: F401
from rabbit_fixtures import rabbit  # noqa: F401
from tests.glance_fixtures import glance_server  # noqa: F401
from tests.harness.keystone import KeystoneServer
from tests.integration.test_agent_libvirt import agent_ekko, agents, wait_for  # noqa: F401
from tests.integration.test_api_keystone import FERNET, VENV_BIN, ApiProcess, _free_port
from tests.integration.test_libvirt_backup import Guest
from tests.keystone_fixtures import keystone_server  # noqa: F401

HOST = "127.0.0.1"
REGION = "RegionE2E"
AGENT_HOST = "cmp-e2e"
DOMAIN = "ekko-test-tenant"
KiB, MiB = 1024, 1024 * 1024
DISK = 64 * MiB
FS_SIZE = 40 * MiB                  # the ext4 file system; the rest of the disk is where new data goes
SEED = int(os.environ.get("EKKO_TEST_SEED", str(random.randrange(1 << 32))))


def nova_metadata(project_id: str) -> str:
    return ('<metadata><nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">'
            "<nova:name>tenant-vm</nova:name><nova:owner>"
            '<nova:user uuid="u-e2e">alice</nova:user>'
            f'<nova:project uuid="{project_id}">p1</nova:project>'
            "</nova:owner></nova:instance></metadata>")


def guest_tree(root: str, rnd: random.Random) -> Dict[str, bytes]:
    """The files of the guest's file system; {guest path: bytes}."""
    files = {"/etc/hostname": b"tenant-vm\n",
             "/home/alice/report.bin": rnd.randbytes(300 * KiB + 17),
             "/home/alice/notes.txt": b"quarterly numbers, do not lose\n" * 20,
             "/home/alice/empty.txt": b""}
    for path, data in files.items():
        p = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return files


def make_disk(path: str, tree: str) -> None:
    """A qcow2 disk (v3: the agent keeps a dirty bitmap in it, so backups after the first are
    incremental) whose first FS_SIZE bytes are an ext4 file system made from `tree` (no mount)."""
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(DISK)
    try:
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, "-E", "nodiscard", raw, f"{FS_SIZE // KiB}k"],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    finally:
        os.unlink(raw)
    os.chmod(path, 0o666)


@dataclass
class World:
    ks: KeystoneServer
    api_url: str
    api_log: str
    glance_url: str
    transport_password: str
    work: str
    api: ApiProcess


def write_api_conf(d: str, ks: KeystoneServer, port: int, store_root: str, transport_url: str) -> str:
    ekko_yaml = os.path.join(d, "ekko.yaml")
    with open(ekko_yaml, "w") as f:
        # its own state and run directories: `ekko files` through the API serves the disk on a
        # socket under run_dir, which must not be the host's /var/lib/ekko (test_deb_package refuses
        # to install where that exists)
        json.dump({"store": {"type": "local", "path": store_root}, "state_dir": os.path.join(d, "api-state"),
                   "run_dir": os.path.join(d, "api-run")}, f)     # JSON is YAML
    admin = ks.users["admin"]
    path = os.path.join(d, "ekko-api.conf")
    with open(path, "w") as f:
        os.fchmod(f.fileno(), 0o600)          # the service user's password, the bus password
        f.write(f"""[DEFAULT]
transport_url = {transport_url}
[bus]
state_path = {d}/bus.sqlite
call_timeout = 10
[api]
ekko_config = {ekko_yaml}
index_path = {d}/index.sqlite
index_max_age = 0
bind = {HOST}:{port}
workers = 1
threads = 4
[keystone_authtoken]
www_authenticate_uri = {ks.url}
auth_url = {ks.url}
auth_type = password
username = {admin.name}
password = {admin.password}
project_name = admin
user_domain_id = default
project_domain_id = default
interface = public
http_request_max_retries = 1
""")
    return path


@pytest.fixture(scope="module")
def world(keystone_server, rabbit, glance_server, libvirtd, tmp_path_factory):  # noqa: F811
    """ekko-api served over the agent's store, registered in Keystone with the Glance beside it."""
    print(f"EKKO_TEST_SEED={SEED}")
    work = make_workdir("ekko-e2e-")
    d = str(tmp_path_factory.mktemp("ekko-api"))
    port = _free_port()
    url = f"http://{HOST}:{port}"
    api = ApiProcess(write_api_conf(d, keystone_server, port, os.path.join(work, "store"), rabbit.transport_url),
                     os.path.join(d, "api.log"), url)
    services: List[str] = []
    try:
        api.start()
        services.append(keystone_server.register_service("ekko-backup", "ekko", url, REGION))
        services.append(keystone_server.register_service("image", "glance", glance_server.url, REGION))
        yield World(keystone_server, url, api.log_path, glance_server.url, rabbit.password, work, api)
    finally:
        for sid in services:
            keystone_server.unregister_service(sid)
        api.stop()
        left = api.running_pids()
        shutil.rmtree(work, ignore_errors=True)
        assert not left, f"ekko-api processes still running after stop(): {left}"


class Tenant:
    """The `openstack` CLI as one user of the test cloud (this module's region)."""

    def __init__(self, w: World, user: str):
        self.w, self.user = w, user

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        env.update(self.w.ks.openrc(self.w.ks.users[self.user]), OS_REGION_NAME=REGION)
        t0 = time.monotonic()
        r = subprocess.run([os.path.join(VENV_BIN, "openstack"), *args], capture_output=True, text=True, env=env,
                           timeout=300)
        print(f"{self.user}: openstack {' '.join(args)} -> {r.returncode} ({time.monotonic() - t0:.1f} s)")
        leak = FERNET.search(r.stdout + r.stderr) is not None        # a bool: a failure must not print it
        assert not leak, f"a token in the output of openstack {' '.join(args[:3])}"
        if ok:
            assert r.returncode == 0, (args, r.returncode, r.stderr[-2000:])
        else:
            assert r.returncode != 0, (args, r.stdout[-2000:])
            assert "Traceback" not in r.stderr, r.stderr[-2000:]
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-f", "json").stdout)


def admin_get(w: World, path: str) -> Any:
    """GET on ekko-api as the cloud's admin (what an operator's tooling would ask)."""
    token = w.ks.token(w.ks.users["admin"])
    req = urllib.request.Request(w.api_url + path, headers={"X-Auth-Token": token})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def agent_reports(w: World, uuid: str) -> bool:
    """The API has the agent's heartbeat naming the domain (the first call also starts the API's bus)."""
    try:
        hosts = admin_get(w, "/v1/admin/hosts")["hosts"]
    except urllib.error.HTTPError:
        return False
    return any(h["host"] == AGENT_HOST and h["alive"] and any(d.get("uuid") == uuid for d in h["domains"])
               for h in hosts)


def start_domain(test_domains, w: World, disk: str, uuid: str, project_id: str) -> Guest:  # noqa: F811
    xml = domain_xml(DOMAIN, [(disk, "qcow2", "vda")], test_domains.dom_type, uuid=uuid)
    xml = xml.replace("</name>", "</name>\n" + nova_metadata(project_id), 1)
    dom = test_domains.conn.defineXML(xml)
    test_domains.names.append(DOMAIN)
    dom.create()
    return Guest(dom, [(disk, "qcow2", "vda", DISK)], w.work)


def copy_disk(g: Guest, disk: str, out: str) -> str:
    """The disk as the guest sees it now (flushed first), raw: what a backup taken now must hold."""
    g.flush("vda")
    subprocess.run(["qemu-img", "convert", "-U", "-q", "-f", "qcow2", "-O", "raw", disk, out], check=True, timeout=120)
    return out


def qemu_compare(a: str, fa: str, b: str, fb: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, a, b], capture_output=True, text=True,
                          timeout=120)


def backup_ids(t: Tenant, uuid: str) -> List[str]:
    return [b["ID"] for b in t.json("ekko", "backup", "list", uuid)]


def usage(t: Tenant) -> Dict[str, int]:
    return t.json("ekko", "usage", "show")


def test_tenant_end_to_end_with_the_openstack_cli(world, rabbit, ekko_hook, test_domains, agents,  # noqa: F811
                                                  tmp_path):
    w = world
    rnd = random.Random(SEED)
    p1 = w.ks.project_ids["p1"]
    uuid = str(uuidlib.UUID(int=rnd.getrandbits(128)))
    tree = str(tmp_path / "tree")
    files = guest_tree(tree, rnd)
    disk = os.path.join(w.work, "vda.qcow2")
    make_disk(disk, tree)
    g = start_domain(test_domains, w, disk, uuid, p1)

    # the host made one backup before (a schedule would): the instance has backups, ekko-api knows it
    ekko = agent_ekko(w.work, ekko_hook, bus={"transport_url": rabbit.transport_url, "host": AGENT_HOST,
                                              "heartbeat_interval": 0.5})
    ekko.run("backup", DOMAIN)
    agent = agents(ekko)
    wait_for(lambda: agent_reports(w, uuid), 60, "the agent's heartbeat naming the domain, in ekko-api")

    member, reader, other = Tenant(w, "p1-member"), Tenant(w, "p1-reader"), Tenant(w, "p2-member")
    listed = {i["ID"]: i for i in member.json("ekko", "instance", "list")}
    assert set(listed) == {uuid} and listed[uuid]["Name"] == "tenant-vm" and listed[uuid]["Backups"] == 1, listed
    (b0,) = backup_ids(member, uuid)

    # new data past the file system, then backup now through the bus, waited on
    g.write("vda", FS_SIZE + 2 * MiB, rnd.randbytes(700 * KiB))
    at_b1 = copy_disk(g, disk, str(tmp_path / "at-b1.raw"))
    job = member.json("ekko", "backup", "create", uuid, "--wait")
    assert job["State"] == "done" and job["Kind"] == "backup" and job["Host"] == AGENT_HOST, job
    b1 = job["Result"]["backup_id"]
    shown = member.json("ekko", "job", "show", job["ID"])
    assert shown["State"] == "done" and shown["Result"]["backup_id"] == b1, shown
    assert backup_ids(member, uuid) == [b1, b0]
    b = member.json("ekko", "backup", "show", b1)
    print(f"backup {b1}: {b['Kind']} ({b['Reason']})")
    assert b["Instance ID"] == uuid and b["Project ID"] == p1 and b["Kind"] == "incremental", b

    # the files of the backup: one directory listed, one file downloaded
    rows = member.json("ekko", "file", "list", b1, "--path", "/home/alice")
    got = {r["Name"]: (r["Type"], r["Size"]) for r in rows}
    assert got == {os.path.basename(p): ("file", len(data)) for p, data in files.items()
                   if p.startswith("/home/alice/")}, got
    out = str(tmp_path / "report.bin")
    member.run("ekko", "file", "get", b1, "--path", "/home/alice/report.bin", "--file", out)
    with open(out, "rb") as f:
        assert f.read() == files["/home/alice/report.bin"]

    # restore as a Glance image of the project; the image is the disk at b1's instant
    name = f"restored-{uuidlib.UUID(int=rnd.getrandbits(128)).hex[:8]}"
    job = member.json("ekko", "backup", "restore", b1, "--image-name", name, "--wait")
    assert job["State"] == "done", job
    image_id = job["Result"]["image_id"]
    try:
        img = member.json("image", "show", image_id)
        assert img["name"] == name and img["disk_format"] == "qcow2" and img["status"] == "active", img
        assert img["properties"]["ekko_backup_id"] == b1 and img["properties"]["ekko_instance_uuid"] == uuid, img
        saved = str(tmp_path / "image.qcow2")
        member.run("image", "save", "--file", saved, image_id)
        cmp = qemu_compare(saved, "qcow2", at_b1, "raw")
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        member.run("image", "delete", image_id)

    # a second backup, then the older one (b1) deleted: usage drops by it
    g.write("vda", FS_SIZE + 9 * MiB, rnd.randbytes(300 * KiB))
    b2 = member.json("ekko", "backup", "create", uuid, "--wait")["Result"]["backup_id"]
    assert backup_ids(member, uuid) == [b2, b1, b0]
    before = usage(member)
    member.run("ekko", "backup", "delete", b1)
    after = usage(member)
    assert backup_ids(member, uuid) == [b2, b0]
    assert after["Logical Bytes"] == before["Logical Bytes"] - DISK, (before, after)
    assert after["Stored Bytes"] < before["Stored Bytes"] and after["Objects"] < before["Objects"], (before, after)

    # the reader lists but cannot back up; the other project's member does not see the backup at all
    r = reader.run("ekko", "backup", "create", uuid, ok=False)
    assert "ekko-api answered 403" in r.stderr and "ekko:backup:create" in r.stderr, r.stderr
    assert backup_ids(reader, uuid) == [b2, b0]
    r = other.run("ekko", "backup", "show", b2, ok=False)
    assert f"ekko-api answered 404 to GET /backups/{b2}" in r.stderr, r.stderr
    r = other.run("ekko", "backup", "restore", b2, "--image-name", "stolen", ok=False)
    assert "ekko-api answered 404" in r.stderr, r.stderr
    assert member.json("ekko", "usage", "show") == after                # nothing of theirs changed p1

    assert agent.terminate() == 0
    secrets_absent(w, agent.text())


def secrets_absent(w: World, agent_log: str) -> None:
    """Names only in the failures: a failing check must not print the secret it found."""
    with open(w.api_log, errors="replace") as f:
        api_log = f.read()
    assert "POST /v1/instances/" in api_log                             # the log is the one written
    assert w.transport_password not in api_log, "the bus password is in ekko-api's log"
    assert w.transport_password not in agent_log, "the bus password is in the agent's log"
    found: Optional[Any] = FERNET.search(api_log)
    assert found is None, f"a Fernet-shaped token in ekko-api's log at offset {found and found.start()}"
    passwords = [u.name for u in w.ks.users.values() if u.password in api_log or u.password in agent_log]
    assert not passwords, f"the password(s) of {passwords} are in a log"


def test_zz_ekko_api_stops_on_sigterm(world):
    """Last: the served ekko-api (its bus started, files browsed, an image uploaded) ends on SIGTERM
    within 20 s; what kept it, if anything, is in the log (stack dump). It hung 30 s (until
    gunicorn's graceful_timeout) before ekko-api's worker_exit hook (api/cmd.py)."""
    t0 = time.monotonic()
    stopped = world.api.stop(grace=20)
    print(f"ekko-api stop: {'SIGTERM' if stopped else 'killed'} after {time.monotonic() - t0:.1f} s")
    assert stopped, "ekko-api still ran 20 s after SIGTERM; its log's end:\n" + world.api.log_tail(6000)

"""A small world for ekko-api's unit tests: a real local store holding Nova instances' backups of
two projects (manifests committed as the backup pipeline commits them, all-zero disks so no
segment is needed), a fake bus, a fake Glance upload and a fake guest file system."""

import contextlib
import datetime
import random
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ekko_libvirt import config as ekko_config
from ekko_libvirt.api import conf as api_conf
from ekko_libvirt.format import manifest as mf
from ekko_libvirt.serve import files
from ekko_libvirt.store import catalog
from ekko_libvirt.store.factory import open_store

SEG = 1 << 20


def backup_id(n: int) -> str:
    t = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(hours=n)
    return catalog.new_backup_id(t)


def commit(cfg: ekko_config.Config, project: Optional[str], inst: str, name: str, disk: str, bid: str,
           size: int = 4 * SEG, kind: str = "full", nova: bool = True) -> str:
    table = mf.SegmentTable(mf.segment_count(size, SEG))
    for i in range(table.count):
        table.set_zero(i)
    labels = {"domain_uuid": inst, "domain_name": f"instance-{name}"}
    if nova:
        labels.update(instance_uuid=inst, instance_name=name, project_id=project or "")
    m = mf.Manifest(backup_id=bid, target=f"instance-{name}.{disk}", virtual_size=size, segment_size=SEG,
                    table=table, kind=kind, reason="first backup of this disk" if kind == "full" else "",
                    created=bid, counts={"stored_bytes": 1000 + len(bid)}, labels=labels,
                    consistency={"level": "crash", "reason": "the domain is shut off"})
    store = open_store(cfg, project)
    try:
        return catalog.commit(store, m)
    finally:
        store.close()


@dataclass
class World:
    root: str
    cfg: ekko_config.Config
    p1: str
    p2: str
    instances: Dict[str, List[str]] = field(default_factory=dict)     # instance uuid -> backup ids, oldest first
    project_of: Dict[str, str] = field(default_factory=dict)


def make_world(root: str, rng: Optional[random.Random] = None) -> World:
    """p1: instance a (disks vda+vdb, 3 backups), instance b (vda, 2); p2: instance c (vda, 2);
    plus a plain (non-Nova) backup in the default namespace, which the API never shows."""
    cfg = ekko_config.build({"store": {"type": "local", "path": root}})
    w = World(root, cfg, uuid.uuid4().hex, uuid.uuid4().hex)
    n = 0
    for project, name, disks, count in ((w.p1, "a", ("vda", "vdb"), 3), (w.p1, "b", ("vda",), 2),
                                        (w.p2, "c", ("vda",), 2)):
        inst = str(uuid.UUID(int=(rng or random).getrandbits(128)))
        w.instances[inst], w.project_of[inst] = [], project
        for i in range(count):
            n += 1
            bid = backup_id(n)
            for d in disks:
                commit(cfg, project, inst, name, d, bid, kind="full" if i == 0 else "incremental")
            w.instances[inst].append(bid)
    commit(cfg, None, str(uuid.uuid4()), "plain", "vda", backup_id(n + 1), nova=False)
    return w


def api_conf_for(index_path: str, **over) -> object:
    conf = api_conf.load([], files=[])
    conf.set_override("index_path", index_path, group="api")
    conf.set_override("index_max_age", 0, group="api")
    conf.set_override("www_authenticate_uri", "http://127.0.0.1:5000/v3", group="keystone_authtoken")
    for k, v in over.items():
        conf.set_override(k, v, group="api")
    return conf


class FakeBus:
    """Bus's interface (bus.py): backup_now(host, uuid, force_full) -> job id; job(id); hosts()."""

    def __init__(self, domains: List[str], fail: Optional[Exception] = None):
        self.domains, self.fail, self.calls = domains, fail, []

    def hosts(self):
        if self.fail:
            raise self.fail
        return [{"host": "cmp1", "last_heartbeat": "2026-12-05T08:00:00+00:00", "version": "0.1.0",
                 "domains": list(self.domains), "failing": 0}]

    def backup_now(self, host, domain_uuid, force_full):
        self.calls.append((host, domain_uuid, force_full))
        return f"job-{len(self.calls)}"

    def job(self, job_id):
        return {"id": job_id, "state": "done", "result": {"backup_id": "x"}, "error": None}


class FakeGlance:
    def __init__(self):
        self.calls = []

    def upload_backup_as_image(self, cfg, store, namespace, manifest_key, image_name, disk_format, session):
        self.calls.append((store, namespace, manifest_key, image_name, disk_format))
        return "image-1"


class FakeGuest:
    """A guest file system of a few files: what files.Guest answers, without an appliance."""

    TREE = {"/": "directory", "/etc": "directory", "/etc/hostname": b"vm-a\n", "/big": b"x" * (5 * 1024 * 1024 + 7)}

    def __init__(self):
        self.reads = 0

    def _entry(self, path: str) -> files.Entry:
        if path not in self.TREE:
            raise files.ApplianceError(f"lstatns: {path}: No such file or directory")
        v = self.TREE[path]
        kind, size = ("directory", 4096) if v == "directory" else ("file", len(v))
        name = path.rsplit("/", 1)[1] or "/"
        return files.Entry(name, path, kind, size, 0o644, 0)

    def stat(self, path: str) -> files.Entry:
        return self._entry(path)

    def listdir(self, path: str):
        top = self._entry(path)
        if top.type != "directory":
            return [top], []
        pre = path.rstrip("/") + "/"
        return [self._entry(p) for p in sorted(self.TREE) if p.startswith(pre) and "/" not in p[len(pre):]
                and p != path], []

    def read(self, path: str, size: int, offset: int) -> bytes:
        self.reads += 1
        v = self.TREE[path]
        assert isinstance(v, bytes)
        return v[offset:offset + size]


class GuestOpener:
    def __init__(self):
        self.opened, self.closed = [], 0

    def __call__(self, cfg, namespace, key):
        self.opened.append((namespace, key))

        @contextlib.contextmanager
        def cm():
            try:
                yield FakeGuest()
            finally:
                self.closed += 1
        return cm()

"""Restore a domain backup: every disk of one backup id (or the ones asked for) into a directory,
one file per disk, and optionally a new libvirt domain on those files.

The new domain comes from the domain XML stored with the backup (label `domain_xml`, see
backup/domain.py), rewritten by domain_xml.restored_domain_xml: new name and UUID, Nova
metadata gone, its disks on the restored files, no network identity of the original. A domain of
that name must not exist; if defining fails, the restored files are removed again.
"""

import contextlib
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from ..store import catalog
from ..store.base import Store
from ..engine import domain_xml as dx
from ..errors import EngineError, UsageError
from .disk import RestoreResult, restore


@dataclass(frozen=True)
class RestoredDisk:
    dev: str
    key: str                 # manifest key
    path: str
    format: str
    result: RestoreResult


@dataclass
class DomainRestore:
    backup_id: str
    directory: str
    disks: List[RestoredDisk] = field(default_factory=list)
    name: Optional[str] = None            # the defined domain
    uuid: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def holes(self) -> int:
        return sum(len(d.result.holes) for d in self.disks)


def disk_of(key: str) -> str:
    """'manifests/<domain>.<dev>/<id>' -> dev."""
    return key[len(catalog.PREFIX):].rsplit("/", 1)[0].rsplit(".", 1)[-1]


S = TypeVar("S")       # whatever travels with each manifest key: its store


def select(found: Sequence[Tuple[S, str]], disks: Sequence[str], backup: str) -> List[Tuple[S, str]]:
    """The manifests of one backup id, restricted to `disks` (all when empty). Pure."""
    ids = {k.rsplit("/", 1)[1] for _, k in found}
    if not found:
        raise UsageError(f"no backup {backup!r} in the store (see `ekko list`)")
    if len(ids) > 1:
        raise UsageError(f"backup {backup!r} is ambiguous ({', '.join(sorted(ids)[:6])}): give a longer id")
    by_dev = {disk_of(k): (st, k) for st, k in found}
    unknown = [d for d in disks if d not in by_dev]
    if unknown:
        raise UsageError(f"backup {ids.pop()} has no disk {unknown[0]!r} (disks: {', '.join(sorted(by_dev))})")
    return [by_dev[d] for d in (disks or sorted(by_dev))]


def restore_domain(found: Sequence[Tuple[Store, str]], directory: str, *, define: Optional[str] = None,
                   conn=None, fmt: Optional[str] = None, workers: int = 4, allow_damaged: bool = False,
                   overwrite: bool = False, progress_for: Optional[Callable[[str], Callable]] = None) -> DomainRestore:
    """Restore the manifests `found` (one backup id; see `select`) into `directory` as <dev>.qcow2
    (disks backed up from qcow2) or <dev>.raw; with `define`, define a domain of that name on them."""
    manifests = [(st, k, catalog.load(st, k)) for st, k in found]
    out = DomainRestore(manifests[0][2].backup_id, directory)
    xml = next((m.labels["domain_xml"] for _, _, m in manifests if m.labels.get("domain_xml")), None)
    if define is not None:
        if conn is None:
            raise UsageError("--define needs libvirt")
        if xml is None:
            raise UsageError(f"backup {out.backup_id} holds no domain definition (made before ekko stored it): "
                             "restore its disks with --to and define the domain yourself")
        if _domain_exists(conn, define):
            raise UsageError(f"a domain named {define!r} exists already: choose another name")
    _make_dir(directory)
    plan = [(st, k, m, disk_of(k), fmt or ("qcow2" if (m.disk or {}).get("format") == "qcow2" else "raw"))
            for st, k, m in manifests]
    for _, _, _, dev, f in plan:
        path = os.path.join(directory, f"{dev}.{f}")
        if os.path.exists(path) and not overwrite:
            raise UsageError(f"{path} exists: refusing to overwrite it (another --to, or --force)")
    try:
        for st, k, m, dev, f in plan:
            path = os.path.join(directory, f"{dev}.{f}")
            res = restore(st, m, path, f, workers=workers, allow_damaged=allow_damaged, overwrite=overwrite,
                          progress=progress_for(dev) if progress_for else None)
            out.disks.append(RestoredDisk(dev, k, path, f, res))
        if define is not None:
            assert xml is not None      # checked before anything was written
            out.uuid = str(uuidlib.uuid4())
            new_xml, out.notes = dx.restored_domain_xml(xml, define, out.uuid,
                                                        {d.dev: (d.path, d.format) for d in out.disks})
            _define(conn, new_xml, define)
            out.name = define
    except BaseException:
        for d in out.disks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d.path)
        raise
    return out


def _make_dir(path: str) -> None:
    """The directory, reachable by QEMU (it runs as libvirt-qemu and must open the files)."""
    from ..engine.libvirt import qemu_accessible_dir
    existed = os.path.isdir(path)
    os.makedirs(path, mode=0o711, exist_ok=True)
    if not existed:
        qemu_accessible_dir(path)


def _domain_exists(conn, name: str) -> bool:
    return any(d.name() == name for d in conn.listAllDomains())


def _define(conn, xml: str, name: str) -> None:
    import libvirt
    try:
        conn.defineXML(xml)
    except libvirt.libvirtError as e:
        raise EngineError(f"libvirt refused to define {name}: {e.get_error_message()}; the restored files "
                          "were removed") from e


def as_dict(r: DomainRestore) -> Dict:
    return {"backup_id": r.backup_id, "directory": r.directory, "domain": r.name, "uuid": r.uuid, "notes": r.notes,
            "disks": [{"dev": d.dev, "key": d.key, "path": d.path, "format": d.format,
                       "written_bytes": d.result.written_bytes, "holes": [h.__dict__ for h in d.result.holes]}
                      for d in r.disks]}

"""What an argument names: the project namespaces to search (--project, else every one), the
manifests of BACKUP in them (a backup id or a unique prefix of one, or a target or libvirt domain
name: its newest backup; catalog.matching), and a libvirt connection to look a domain up."""

from typing import List, Optional, Tuple

from .. import config
from ..errors import UsageError
from ..store import catalog
from ..store.base import Store
from ..store.factory import namespaces, open_store


def namespaces_of(cfg: config.Config, project: Optional[str]) -> List[Optional[str]]:
    """The project given with --project, else every namespace of the store."""
    return [project] if project else namespaces(cfg)


def locate(cfg: config.Config, project: Optional[str], backup: str, disk: Optional[str]) -> Tuple[Store, str]:
    """(store, manifest key) of BACKUP, searched in every project namespace unless --project."""
    found = []
    for ns in namespaces_of(cfg, project):
        store = open_store(cfg, ns)
        found += [(store, k) for k in catalog.matching(store, backup, disk)]
    key = catalog.choose([k for _, k in found], backup, disk)
    return next(st for st, k in found if k == key), key


def locate_all(cfg: config.Config, project: Optional[str], backup: str,
               disk: Optional[str]) -> List[Tuple[Store, str]]:
    """(store, manifest key) of every disk of BACKUP (one backup id; or a target or domain name:
    its newest backup), across namespaces."""
    found = []
    for ns in namespaces_of(cfg, project):
        store = open_store(cfg, ns)
        found += [(store, k) for k in catalog.matching(store, backup, disk)]
    if len({k.rsplit("/", 1)[1] for _, k in found}) != 1:
        catalog.choose([k for _, k in found], backup, disk)   # raises the UsageError
    return found


def libvirt_connect(cfg: config.Config, what: str):
    """A connection to libvirt, to look `what` up as a domain; a UsageError naming `what` when
    libvirt cannot be asked."""
    # Imported here: libvirt-python is only needed for libvirt domains, and loads in ~30 ms.
    try:
        import libvirt
    except ImportError:
        raise UsageError(f"unknown target {what!r} (configured: {', '.join(t.name for t in cfg.targets) or 'none'}), "
                         "and libvirt-python is not installed to look it up as a domain") from None
    uri = config.libvirt_uri(cfg)
    # libvirt prints every error to stderr by default, even those we handle: ours say more.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise UsageError(f"unknown target {what!r} (configured: {', '.join(t.name for t in cfg.targets) or 'none'}), "
                         f"and libvirt at {uri} cannot be reached to look it up as a domain: "
                         f"{e.get_error_message()}") from e

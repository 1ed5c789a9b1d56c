"""config.Config -> Store. One namespace per project: a sub-directory (local) or a container (Swift).
(`cfg` is not annotated: config.py types its store section with store/swift.py, and the store
layer does not import back up.)"""

import os
import re
from typing import List, Optional

from ..errors import ConfigError
from .base import Store

_NS = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def open_store(cfg, namespace: Optional[str] = None) -> Store:
    """The store of one project namespace; sealed with the project's key when encryption is on
    (the key file is read on first use: see sealed.py, SealedStore)."""
    inner = open_raw_store(cfg, namespace)
    if not cfg.encryption.enabled:
        return inner
    from ..format.crypto import DEFAULT_PROJECT, key_loader
    from .sealed import SealedStore
    return SealedStore(inner, key_loader(cfg.encryption.key_file, namespace or DEFAULT_PROJECT, inner))


def open_raw_store(cfg, namespace: Optional[str] = None) -> Store:
    """The store as it is, objects unopened (`ekko key show` reads fingerprints with it)."""
    if namespace is not None and (not _NS.match(namespace) or namespace in (".", "..")):
        raise ConfigError("namespace", f"invalid project namespace {namespace!r}")
    if cfg.store.type == "local":
        from .local import LocalStore
        root = cfg.store.path if namespace is None else os.path.join(cfg.store.path, "projects", namespace)
        return LocalStore(root)
    if cfg.store.type == "swift":
        from .swift import open_swift_store
        return open_swift_store(dict(cfg.store.options), namespace)
    raise ConfigError("store.type", f"unknown store type {cfg.store.type!r}")


def namespaces(cfg) -> List[Optional[str]]:
    """Every namespace the configured store holds: None (the default) and one per project."""
    if cfg.store.type == "local":
        root = os.path.join(cfg.store.path, "projects")
        found = sorted(d for d in os.listdir(root) if _NS.match(d)) if os.path.isdir(root) else []
        return [None] + found
    if cfg.store.type == "swift":
        from .swift import list_namespaces
        return [None] + list_namespaces(dict(cfg.store.options))
    return [None]

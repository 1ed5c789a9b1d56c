"""`ekko key create` and `ekko key show`: encryption key files and their fingerprints (a key
itself is never shown), and the fingerprints the stored backups need."""

from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError, EkkoError, UsageError
from ..format import crypto
from ..format.codec import sealed_fingerprint
from ..store import catalog
from ..store.factory import namespaces, open_raw_store
from .render import EXIT_OK, emit


def cmd_key(cfg, args) -> int:
    project = args.project or crypto.DEFAULT_PROJECT
    if args.key_command == "create":
        if not (args.key_file or cfg.encryption.key_file):
            raise UsageError(f"no encryption.key_file in {cfg.source}: give --key-file PATH")
        path = args.key_file or crypto.key_path(cfg.encryption.key_file, project)
        fp = crypto.create_key(path)
        if args.json:
            emit({"ok": True, "project": project, "key_file": path, "fingerprint": fp})
        else:
            print(f"created key {path} for project {project}: fingerprint {fp}")
            print("keep a copy of it somewhere safe: backups sealed with it cannot be read without it")
        return EXIT_OK
    rows = [_key_row(cfg, ns, exists) for ns, exists in _key_namespaces(cfg, args.project)]
    if args.json:
        emit({"ok": True, "encryption": cfg.encryption.enabled, "keys": rows})
        return EXIT_OK
    print(f"encryption {'on' if cfg.encryption.enabled else 'off'} ({cfg.source})")
    for r in rows:
        key = (f"key {r['key_file']}: fingerprint {r['fingerprint']}" if r["fingerprint"]
               else r["problem"] or "no encryption.key_file configured")
        print(f"project {r['project']}: {key}")
        for fp, n in sorted(r["backups"].items()):
            mine = " (this key)" if fp == r["fingerprint"] else ""
            print(f"  {n} backup(s) {'not encrypted' if fp == 'none' else 'sealed with ' + fp}{mine}")
    return EXIT_OK


def _key_namespaces(cfg, project: Optional[str]) -> List[Tuple[Optional[str], bool]]:
    """(namespace, whether the store has it): every namespace, or the one of --project."""
    known = namespaces(cfg)
    if project is None:
        return [(ns, True) for ns in known]
    ns = None if project == crypto.DEFAULT_PROJECT else project
    return [(ns, ns in known)]


def _key_row(cfg, ns: Optional[str], exists: bool) -> Dict[str, Any]:
    """One project's configured key (fingerprint only) and the fingerprints its backups need."""
    project = ns or crypto.DEFAULT_PROJECT
    backups: Dict[str, int] = {}
    row: Dict[str, Any] = {"project": project, "namespace": ns, "key_file": None, "fingerprint": None,
                           "problem": None, "backups": backups}
    if cfg.encryption.key_file:
        row["key_file"] = path = crypto.key_path(cfg.encryption.key_file, project)
        try:
            row["fingerprint"] = crypto.fingerprint(crypto.load_key(path))
        except ConfigError as e:
            row["problem"] = e.problem
    if exists:
        store = open_raw_store(cfg, ns)
        for key in catalog.keys(store):
            try:
                fp = sealed_fingerprint(store.get(key)[:crypto.PREFIX_SIZE]) or "none"
            except EkkoError:
                continue
            backups[fp] = backups.get(fp, 0) + 1
    return row

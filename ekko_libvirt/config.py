"""The only place YAML is read. Built once into frozen dataclasses; every error names the key.

See ekko.yaml.example for every option, documented.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from . import units
from .errors import ConfigError

DEFAULT_PATH = "/etc/ekko/ekko.yaml"


@dataclass(frozen=True)
class StoreConfig:
    type: str = "local"                    # local | swift
    path: str = "/var/lib/ekko/store"      # local
    options: Tuple[Tuple[str, Any], ...] = ()   # backend-specific keys (swift), kept verbatim


@dataclass(frozen=True)
class TargetConfig:
    name: str
    engine: str                            # qmp | libvirt
    qmp_socket: str = ""
    node: str = ""
    domain: str = ""
    disks: Tuple[str, ...] = ()
    bitmap_prefix: str = "ekko-"


@dataclass(frozen=True)
class EncryptionConfig:
    """encryption: {enabled: true, key_file: /etc/ekko/keys/{project}.key}. The key file of a
    project is key_file with {project} replaced (the Nova project id of a domain; "default" for
    the store's root namespace). Giving the section turns encryption on unless enabled: false."""
    enabled: bool = False
    key_file: str = ""


@dataclass(frozen=True)
class Config:
    store: StoreConfig
    state_dir: str
    run_dir: str
    segment_size: int
    granularity: int
    compression_level: int
    compress: bool
    workers: int
    request_size: int
    in_flight: int
    qmp_timeout: float
    targets: Tuple[TargetConfig, ...] = ()
    scratch_reserve: int = units.DEFAULT_SCRATCH_RESERVE
    read_back: int = units.DEFAULT_READ_BACK     # units.READ_BACK_ALL: every segment
    source: str = ""
    extra: Tuple[Tuple[str, Any], ...] = field(default=())
    encryption: EncryptionConfig = EncryptionConfig()

    def target(self, name: str) -> Optional[TargetConfig]:
        return next((t for t in self.targets if t.name == name), None)

    @property
    def scratch_dir(self) -> str:
        return os.path.join(self.state_dir, "scratch")


_TOP_KEYS = {"store", "state_dir", "run_dir", "scratch_reserve", "segment_size", "bitmap_granularity", "compression",
             "workers", "read", "qmp_timeout", "targets", "encryption", "retention", "schedule",
             "agent", "libvirt", "domains"}


def load(path: Optional[str] = None) -> Config:
    path = path or os.environ.get("EKKO_CONFIG") or DEFAULT_PATH
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("(file)", f"{path} does not exist (use -c/--config or EKKO_CONFIG)") from None
    except OSError as e:
        raise ConfigError("(file)", f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError("(file)", f"{path} is not valid YAML: {e}") from e
    return build(raw if raw is not None else {}, source=path)


def build(raw: Any, source: str = "") -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError("(top)", "the config must be a mapping of keys")
    unknown = sorted(set(map(str, raw)) - _TOP_KEYS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    state_dir = _str(raw, "state_dir", "/var/lib/ekko")
    seg = _size(raw, "segment_size", units.DEFAULT_SEGMENT_SIZE)
    if not units.is_power_of_two(seg) or not units.MIN_SEGMENT_SIZE <= seg <= units.MAX_SEGMENT_SIZE:
        raise ConfigError("segment_size", f"{seg} must be a power of two between "
                          f"{units.human(units.MIN_SEGMENT_SIZE)} and {units.human(units.MAX_SEGMENT_SIZE)}")
    gran = _size(raw, "bitmap_granularity", units.DEFAULT_GRANULARITY)
    if not units.is_power_of_two(gran) or not 512 <= gran <= 2 * units.GiB or gran > seg:
        raise ConfigError("bitmap_granularity", f"{gran} must be a power of two, >= 512 and <= segment_size")
    comp = _section(raw, "compression", {"enabled", "level"})
    read = _section(raw, "read", {"request_size", "in_flight", "read_back"})
    level = _int(comp, "compression.level", 1, 1, 19, key="level")
    cfg = Config(
        store=_store(raw.get("store")),
        state_dir=state_dir,
        run_dir=_str(raw, "run_dir", os.path.join(state_dir, "run")),
        segment_size=seg,
        granularity=gran,
        compression_level=level,
        compress=_bool(comp, "compression.enabled", True, key="enabled"),
        workers=_int(raw, "workers", units.DEFAULT_WORKERS, 1, 64),
        request_size=_sized(read, "read.request_size", units.DEFAULT_REQUEST_SIZE, "request_size"),
        in_flight=_int(read, "read.in_flight", units.DEFAULT_IN_FLIGHT, 1, 64, key="in_flight"),
        qmp_timeout=float(_int(raw, "qmp_timeout", 30, 1, 3600)),
        scratch_reserve=_size(raw, "scratch_reserve", units.DEFAULT_SCRATCH_RESERVE),
        read_back=_read_back(read),
        targets=_targets(raw.get("targets")),
        source=source,
        encryption=_encryption(raw.get("encryption")),
        extra=tuple((k, raw[k]) for k in ("encryption", "retention", "schedule", "agent", "libvirt", "domains")
                    if k in raw),
    )
    if len(os.path.join(cfg.run_dir, "x" * 20)) > 100:
        raise ConfigError("run_dir", f"{cfg.run_dir} is too long for a unix socket path (keep it under 80 chars)")
    if "retention" in raw:
        from .prune import RetentionConfig      # typed there; checked here so a bad key fails fast
        RetentionConfig.from_mapping(raw["retention"])
    if any(k in raw for k in ("agent", "schedule", "domains")):
        from .agent.settings import AgentSettings   # typed there; checked here so a bad key fails fast
        AgentSettings.from_mapping(raw)
    return cfg


def _section(raw: Mapping, key: str, allowed: set) -> Mapping:
    val = raw.get(key) or {}
    if not isinstance(val, Mapping):
        raise ConfigError(key, "must be a mapping")
    for k in val:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", f"unknown key (known: {', '.join(sorted(allowed))})")
    return val


def _str(raw: Mapping, key: str, default: str, label: Optional[str] = None) -> str:
    val = raw.get(key, default)
    if not isinstance(val, str) or not val:
        raise ConfigError(label or key, f"must be a non-empty string, got {val!r}")
    return val


def _read_back(read: Mapping) -> int:
    """read.read_back: how many segments to re-read before a commit (first and last always), or 'all'."""
    if read.get("read_back") == "all":
        return units.READ_BACK_ALL
    return _int(read, "read.read_back", units.DEFAULT_READ_BACK, 2, 1 << 40, key="read_back")


def _int(raw: Mapping, label: str, default: int, lo: int, hi: int, key: Optional[str] = None) -> int:
    val = raw.get(key or label, default)
    if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
        raise ConfigError(label, f"must be an integer from {lo} to {hi}, got {val!r}")
    return val


def _bool(raw: Mapping, label: str, default: bool, key: Optional[str] = None) -> bool:
    val = raw.get(key or label, default)
    if not isinstance(val, bool):
        raise ConfigError(label, f"must be true or false, got {val!r}")
    return val


def _size(raw: Mapping, key: str, default: int) -> int:
    return _sized(raw, key, default, key)


def _sized(raw: Mapping, label: str, default: int, key: str) -> int:
    try:
        return units.parse_size(raw.get(key, default))
    except ValueError as e:
        raise ConfigError(label, str(e)) from None


def _store(raw: Any) -> StoreConfig:
    if raw is None:
        return StoreConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError("store", "must be a mapping with a 'type'")
    typ = raw.get("type", "local")
    if typ == "local":
        for k in raw:
            if k not in ("type", "path"):
                raise ConfigError(f"store.{k}", "unknown key for a local store (known: type, path)")
        return StoreConfig("local", _str(raw, "path", StoreConfig.path, "store.path"))
    if typ == "swift":
        return StoreConfig("swift", "", tuple(sorted((str(k), v) for k, v in raw.items() if k != "type")))
    raise ConfigError("store.type", f"unknown store type {typ!r} (known: local, swift)")


def _encryption(raw: Any) -> EncryptionConfig:
    if raw is None:
        return EncryptionConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError("encryption", "must be a mapping: {enabled: true, key_file: /etc/ekko/keys/{project}.key}")
    for k in raw:
        if k not in ("enabled", "key_file"):
            raise ConfigError(f"encryption.{k}", "unknown key (known: enabled, key_file)")
    enabled = _bool(raw, "encryption.enabled", True, key="enabled")
    if "key_file" not in raw:
        if not enabled:
            return EncryptionConfig()
        raise ConfigError("encryption.key_file", "required when encryption is on: the key file's path, "
                          "e.g. /etc/ekko/keys/{project}.key")
    key_file = _str(raw, "key_file", "", "encryption.key_file")
    if re.sub(r"\{project\}", "", key_file).count("{") or "}" in re.sub(r"\{project\}", "", key_file):
        raise ConfigError("encryption.key_file", f"{key_file!r}: the only placeholder is {{project}}")
    return EncryptionConfig(enabled, key_file)


def _targets(raw: Any) -> Tuple[TargetConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError("targets", "must be a mapping of target name -> settings")
    out = []
    for name, t in raw.items():
        label = f"targets.{name}"
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "._-" for c in name):
            raise ConfigError(label, "target names use letters, digits, '.', '_' and '-' only")
        if not isinstance(t, Mapping):
            raise ConfigError(label, "must be a mapping")
        engine = t.get("engine", "qmp")
        allowed = {"engine", "qmp_socket", "node", "bitmap_prefix", "domain", "disks"}
        for k in t:
            if k not in allowed:
                raise ConfigError(f"{label}.{k}", f"unknown key (known: {', '.join(sorted(allowed))})")
        prefix = _str(t, "bitmap_prefix", "ekko-", f"{label}.bitmap_prefix")
        if engine == "qmp":
            out.append(TargetConfig(name, "qmp", qmp_socket=_str(t, "qmp_socket", "", f"{label}.qmp_socket"),
                                    node=_str(t, "node", "", f"{label}.node"), bitmap_prefix=prefix))
        elif engine == "libvirt":
            disks = t.get("disks", [])
            if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
                raise ConfigError(f"{label}.disks", "must be a list of disk targets like [vda, vdb]")
            out.append(TargetConfig(name, "libvirt", domain=_str(t, "domain", name, f"{label}.domain"),
                                    disks=tuple(disks), bitmap_prefix=prefix))
        else:
            raise ConfigError(f"{label}.engine", f"unknown engine {engine!r} (known: qmp, libvirt)")
    return tuple(out)


def libvirt_uri(cfg: Config) -> str:
    section = dict(cfg.extra).get("libvirt") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("libvirt", "must be a mapping (keys: uri)")
    for k in section:
        if k != "uri":
            raise ConfigError(f"libvirt.{k}", "unknown key (known: uri)")
    return _str(section, "uri", "qemu:///system", "libvirt.uri")


def store_options(cfg: Config) -> Dict[str, Any]:
    return dict(cfg.store.options)

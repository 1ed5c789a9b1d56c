"""The only place YAML is read. Built once into frozen dataclasses; every error names the key.

See ekko.yaml.example for every option, documented.
"""

import dataclasses
import io
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from . import units
from .errors import ConfigError, UsageError

DEFAULT_PATH = "/etc/ekko/ekko.yaml"
DEFAULT_STORE = "default"        # the name of `store:` among the named stores (`stores:`, ekko sync)
MAX_FILE_SIZE = 1 << 20          # a config file is a few KiB; anything near this is not one

# How a bad value is shown in an error: short, one line, bounded work even for a YAML alias
# bomb (nested references: its full repr would be exponential). Values of secret fields are
# never shown (store/swift.py SECRET_FIELDS).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def _show(val: Any) -> str:
    try:
        return _REPR.repr(val)
    except ValueError:                  # an int too long for str()
        return f"a {type(val).__name__}"


def _label(key: Any) -> str:
    """A key of the file as part of a dotted name: itself if it is plain text, else its repr."""
    if isinstance(key, str) and key.isprintable() and len(key) <= 80:
        return key
    return _show(key)


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
    bitmap_prefix: str = units.DEFAULT_BITMAP_PREFIX
    consistency: Optional[str] = None      # auto | filesystem | crash; None: the top-level one
    guest_agent_socket: str = ""           # qmp: the host end of the guest agent's channel ("": none)


@dataclass(frozen=True)
class EncryptionConfig:
    """encryption: {enabled: true, key_file: /etc/ekko/keys/{project}.key}. The key file of a
    project is key_file with {project} replaced (the Nova project id of a domain; "default" for
    the store's root namespace). Giving the section turns encryption on unless enabled: false."""
    enabled: bool = False
    key_file: str = ""


@dataclass(frozen=True)
class ServeConfig:
    """serve: {cache: 64MiB}: the servers of `ekko serve`, `mount` and `files` (`--cache` wins)."""
    cache: int = units.DEFAULT_SERVE_CACHE     # bytes of decoded segments kept in memory, per server


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
    serve: ServeConfig = ServeConfig()
    source: str = ""
    extra: Tuple[Tuple[str, Any], ...] = field(default=())
    encryption: EncryptionConfig = EncryptionConfig()
    stores: Tuple[Tuple[str, StoreConfig], ...] = ()    # `stores:` by name; DEFAULT_STORE is `store:`
    consistency: str = "auto"                  # engine/freeze.py: auto | filesystem | crash
    guest_agent_timeout: float = 10.0          # seconds, every guest agent call
    domain_consistency: Tuple[Tuple[str, str], ...] = ()    # domains.<name or UUID>.consistency
    project_consistency: Tuple[Tuple[str, str], ...] = ()   # projects.<Nova project id>.consistency

    def target(self, name: str) -> Optional[TargetConfig]:
        return next((t for t in self.targets if t.name == name), None)

    def consistency_for(self, name: str, uuid: str = "", target: Optional[TargetConfig] = None) -> str:
        """The consistency policy of a domain or target: targets.<t>.consistency, else
        domains.<UUID>.consistency, else domains.<name>.consistency, else the top-level one."""
        if target is not None and target.consistency:
            return target.consistency
        by_key = dict(self.domain_consistency)
        return by_key.get(uuid.lower()) or by_key.get(name) or self.consistency

    def store_names(self) -> Tuple[str, ...]:
        return (DEFAULT_STORE,) + tuple(n for n, _ in self.stores)

    def named_store(self, name: str) -> StoreConfig:
        """`store:` for DEFAULT_STORE, else `stores.<name>`. Raises UsageError naming the known ones."""
        if name == DEFAULT_STORE:
            return self.store
        found = dict(self.stores).get(name)
        if found is None:
            raise UsageError(f"no store named {name!r} in the config (known: {', '.join(self.store_names())}; "
                             f"{DEFAULT_STORE!r} is `store:`, the others are under `stores:`)")
        return found

    def with_store(self, name: str) -> "Config":
        """This config with the named store as its store: every command's code then works on it."""
        return dataclasses.replace(self, store=self.named_store(name))

    @property
    def scratch_dir(self) -> str:
        return os.path.join(self.state_dir, "scratch")


_TOP_KEYS = {"store", "state_dir", "run_dir", "scratch_reserve", "segment_size", "bitmap_granularity", "compression",
             "serve", "workers", "read", "qmp_timeout", "targets", "encryption", "retention", "schedule",
             "agent", "libvirt", "domains", "stores",
             "consistency", "guest_agent_timeout", "projects"}


def load(path: Optional[str] = None) -> Config:
    path = path or os.environ.get("EKKO_CONFIG") or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError("(file)", f"{path} does not exist (use -c/--config or EKKO_CONFIG)") from None
    except OSError as e:
        raise ConfigError("(file)", f"cannot read {path}: {e.strerror}") from e
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError("(file)", f"{path} is larger than {MAX_FILE_SIZE // 1024} KiB: not a config file")
    try:
        # A stream, not a str: PyYAML then puts no snippet of the file (a key's line) in its errors.
        text = io.StringIO(data.decode("utf-8"))
        text.name = path
        raw = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError("(file)", f"{path} is not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:         # one line: the problem and where
        raise ConfigError("(file)", f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    except RecursionError as e:
        raise ConfigError("(file)", f"{path} nests too deeply to be a config file") from e
    except Exception as e:  # noqa: BLE001
        # PyYAML's constructors fail on some values with plain exceptions (ValueError for a date
        # that does not exist or an int of more than 4300 digits; `!!int ` -> IndexError,
        # `!!bool x` -> KeyError, `!!timestamp x` -> AttributeError), whose text is the value:
        # named by type only, it could be a key's.
        raise ConfigError("(file)", f"{path}: a value cannot be read ({type(e).__name__}): a date that does "
                          "not exist, an integer of more than 4300 digits, or a !!tag that does not fit it") from e
    return build(raw if raw is not None else {}, source=path)


def build(raw: Any, source: str = "") -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError("(top)", "the config must be a mapping of keys")
    unknown = sorted(_label(k) for k in raw if k not in _TOP_KEYS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    state_dir = _str(raw, "state_dir", units.DEFAULT_STATE_DIR)
    seg = _size(raw, "segment_size", units.DEFAULT_SEGMENT_SIZE)
    if not units.is_power_of_two(seg) or not units.MIN_SEGMENT_SIZE <= seg <= units.MAX_SEGMENT_SIZE:
        raise ConfigError("segment_size", f"{seg} must be a power of two between "
                          f"{units.human(units.MIN_SEGMENT_SIZE)} and {units.human(units.MAX_SEGMENT_SIZE)}")
    gran = _size(raw, "bitmap_granularity", units.DEFAULT_GRANULARITY)
    if not units.is_power_of_two(gran) or not 512 <= gran <= 2 * units.GiB or gran > seg:
        raise ConfigError("bitmap_granularity", f"{gran} must be a power of two, >= 512 and <= segment_size")
    comp = _section(raw, "compression", {"enabled", "level"})
    read = _section(raw, "read", {"request_size", "in_flight", "read_back"})
    level = _int(comp, "compression.level", units.DEFAULT_COMPRESSION_LEVEL, 1, 19, key="level")
    cfg = Config(
        store=_store(raw.get("store")),
        state_dir=state_dir,
        run_dir=_str(raw, "run_dir", os.path.join(state_dir, "run")),
        segment_size=seg,
        granularity=gran,
        compression_level=level,
        compress=_bool(comp, "compression.enabled", True, key="enabled"),
        workers=_int(raw, "workers", units.DEFAULT_WORKERS, 1, 64),
        request_size=_request_size(read),
        in_flight=_int(read, "read.in_flight", units.DEFAULT_IN_FLIGHT, 1, 64, key="in_flight"),
        qmp_timeout=float(_int(raw, "qmp_timeout", 30, 1, 3600)),
        scratch_reserve=_size(raw, "scratch_reserve", units.DEFAULT_SCRATCH_RESERVE),
        read_back=_read_back(read),
        serve=_serve(raw),
        targets=_targets(raw.get("targets")),
        source=source,
        encryption=_encryption(raw.get("encryption")),
        consistency=_consistency(raw, "consistency", "consistency") or "auto",
        guest_agent_timeout=float(_int(raw, "guest_agent_timeout", 10, 1, 600)),
        domain_consistency=_domain_consistency(raw.get("domains")),
        project_consistency=_project_consistency(raw.get("projects")),
        stores=_stores(raw.get("stores")),
        extra=tuple((k, raw[k]) for k in ("encryption", "retention", "schedule", "agent", "libvirt", "domains")
                    if k in raw),
    )
    if len(os.path.join(cfg.run_dir, "x" * 20)) > 100:
        raise ConfigError("run_dir",
                          f"{_show(cfg.run_dir)} is too long for a unix socket path (keep it under 80 chars)")
    if "libvirt" in raw:
        libvirt_uri(cfg)
    # `retention`, `agent`, `schedule`, `domains` are typed by the layers that use them
    # (lifecycle/prune.RetentionConfig, agent/settings.AgentSettings): the entry points check them
    # right after loading (cli.check_sections, agent.daemon.main), so a bad key still fails first.
    return cfg


def _section(raw: Mapping, key: str, allowed: set) -> Mapping:
    val = raw.get(key)
    if val is None:
        return {}
    if not isinstance(val, Mapping):
        raise ConfigError(key, f"must be a mapping (keys: {', '.join(sorted(allowed))}), got {_show(val)}")
    for k in val:
        if k not in allowed:
            raise ConfigError(f"{key}.{_label(k)}", f"unknown key (known: {', '.join(sorted(allowed))})")
    return val


def _str(raw: Mapping, key: str, default: str, label: Optional[str] = None) -> str:
    val = raw.get(key, default)
    if not isinstance(val, str) or not val:
        raise ConfigError(label or key, f"must be a non-empty string, got {_show(val)}")
    if not val.isprintable():
        raise ConfigError(label or key, f"must not contain control characters, got {_show(val)}")
    return val


def _read_back(read: Mapping) -> int:
    """read.read_back: how many segments to re-read before a commit (first and last always), or 'all'."""
    if read.get("read_back") == "all":
        return units.READ_BACK_ALL
    return _int(read, "read.read_back", units.DEFAULT_READ_BACK, 2, 1 << 40, key="read_back")


def _serve(raw: Mapping) -> ServeConfig:
    section = _section(raw, "serve", {"cache"})
    return ServeConfig(cache=serve_cache(_sized(section, "serve.cache", units.DEFAULT_SERVE_CACHE, "cache"),
                                         "serve.cache"))


def serve_cache(size: int, label: str = "serve.cache") -> int:
    """A server's segment cache: at least 1MiB (a few segments), at most 64GiB (it is memory).
    Shared with `ekko serve --cache` (label '--cache': a UsageError's text there)."""
    if not units.MIN_SERVE_CACHE <= size <= units.MAX_SERVE_CACHE:
        raise ConfigError(label, f"must be from {units.human(units.MIN_SERVE_CACHE)} to "
                          f"{units.human(units.MAX_SERVE_CACHE)} (a size like 256MiB), got {size}")
    return size


def _int(raw: Mapping, label: str, default: int, lo: int, hi: int, key: Optional[str] = None) -> int:
    val = raw.get(key or label, default)
    if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
        raise ConfigError(label, f"must be an integer from {lo} to {hi}, got {_show(val)}")
    return val


def _bool(raw: Mapping, label: str, default: bool, key: Optional[str] = None) -> bool:
    val = raw.get(key or label, default)
    if not isinstance(val, bool):
        raise ConfigError(label, f"must be true or false, got {_show(val)}")
    return val


def _size(raw: Mapping, key: str, default: int) -> int:
    return _sized(raw, key, default, key)


def _request_size(read: Mapping) -> int:
    """read.request_size: 512 B .. 32 MiB (QEMU's NBD server refuses larger requests)."""
    size = _sized(read, "read.request_size", units.DEFAULT_REQUEST_SIZE, "request_size")
    if not 512 <= size <= 32 * units.MiB:
        raise ConfigError("read.request_size", f"must be from 512 bytes to 32MiB, got {size}")
    return size


def _sized(raw: Mapping, label: str, default: int, key: str) -> int:
    val = raw.get(key, default)
    if isinstance(val, bool) or not isinstance(val, (str, int)) or (isinstance(val, str) and len(val) > 40):
        raise ConfigError(label, f"must be a size like 1MiB, 64KiB or a number of bytes, got {_show(val)}")
    try:
        return units.parse_size(val)
    except ValueError:
        raise ConfigError(label, f"not a size: {_show(val)} (use e.g. 4MiB, 64KiB, 1GiB; never negative)") from None


def _stores(raw: Any) -> Tuple[Tuple[str, StoreConfig], ...]:
    """stores: {NAME: <a store: section>}: more stores by name (`ekko sync SOURCE DEST`)."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError("stores", "must be a mapping of store name -> {type: local|swift, ...}")
    out = []
    for name, section in raw.items():
        label = f"stores.{_label(name)}"
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "._-" for c in name):
            raise ConfigError(label, "store names use letters, digits, '.', '_' and '-' only")
        if name == DEFAULT_STORE:
            raise ConfigError(label, f"{DEFAULT_STORE!r} is the name of `store:`: choose another")
        if section is None:
            raise ConfigError(label, "must be a mapping with a 'type'")
        out.append((name, _store(section, label)))
    return tuple(out)


def _store(raw: Any, label: str = "store") -> StoreConfig:
    if raw is None:
        return StoreConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(label, "must be a mapping with a 'type'")
    typ = raw.get("type", "local")
    if typ == "local":
        for k in raw:
            if k not in ("type", "path"):
                raise ConfigError(f"{label}.{_label(k)}", "unknown key for a local store (known: type, path)")
        return StoreConfig("local", _str(raw, "path", StoreConfig.path, f"{label}.path"))
    if typ == "swift":
        for k in raw:
            if not isinstance(k, str):
                raise ConfigError(f"{label}.{_label(k)}", "unknown key for a swift store")
        options = tuple(sorted((k, v) for k, v in raw.items() if k != "type"))
        # Checked now, file and environment together (as every command will open it), so a bad
        # key fails every command, before anything is done. Errors about a credential name the
        # key only, never its value.
        from .store.swift import swift_config
        try:
            swift_config(dict(options))
        except ConfigError as e:        # its errors name keys of `store:`; name this section's
            if label == "store" or not e.key.startswith("store"):
                raise
            raise ConfigError(label + e.key[len("store"):], e.problem) from e
        return StoreConfig("swift", "", options)
    raise ConfigError(f"{label}.type", f"unknown store type {_show(typ)} (known: local, swift)")


def _encryption(raw: Any) -> EncryptionConfig:
    if raw is None:
        return EncryptionConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError("encryption", "must be a mapping: {enabled: true, key_file: /etc/ekko/keys/{project}.key}")
    for k in raw:
        if k not in ("enabled", "key_file"):
            raise ConfigError(f"encryption.{_label(k)}", "unknown key (known: enabled, key_file)")
    enabled = _bool(raw, "encryption.enabled", True, key="enabled")
    if "key_file" not in raw:
        if not enabled:
            return EncryptionConfig()
        raise ConfigError("encryption.key_file", "required when encryption is on: the key file's path, "
                          "e.g. /etc/ekko/keys/{project}.key")
    key_file = _str(raw, "key_file", "", "encryption.key_file")
    if re.sub(r"\{project\}", "", key_file).count("{") or "}" in re.sub(r"\{project\}", "", key_file):
        raise ConfigError("encryption.key_file", f"{_show(key_file)}: the only placeholder is {{project}}")
    return EncryptionConfig(enabled, key_file)


CONSISTENCY = ("auto", "filesystem", "crash")      # engine/freeze.py POLICIES


def _consistency(raw: Mapping, key: str, label: str) -> Optional[str]:
    val = raw.get(key)
    if val is None:
        return None
    if val not in CONSISTENCY:
        raise ConfigError(label, f"must be one of {', '.join(CONSISTENCY)}, got {_show(val)}")
    return str(val)


def _project_consistency(raw: Any) -> Tuple[Tuple[str, str], ...]:
    """projects.<Nova project id>.consistency: the policy of every domain of that project that
    has none of its own (domains.<UUID or name>.consistency)."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError("projects", f"must be a mapping of Nova project ids, got {_show(raw)}")
    out = []
    for key, val in raw.items():
        label = f"projects.{_label(key)}"
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(label, "must be a Nova project id")
        if not isinstance(val, Mapping):
            raise ConfigError(label, f"must be a mapping (consistency: ...), got {_show(val)}")
        extra = sorted(str(k)[:40] for k in val if k != "consistency")
        if extra:
            raise ConfigError(f"{label}.{extra[0]}", "unknown key (a project takes consistency)")
        policy = _consistency(val, "consistency", f"{label}.consistency")
        if policy is not None:
            out.append((key, policy))
    return tuple(out)


def _domain_consistency(raw: Any) -> Tuple[Tuple[str, str], ...]:
    """domains.<name or UUID>.consistency (the rest of `domains:` is typed by agent/settings.py)."""
    if not isinstance(raw, Mapping):
        return ()
    out = []
    for key, val in raw.items():
        if isinstance(key, str) and isinstance(val, Mapping):
            policy = _consistency(val, "consistency", f"domains.{_label(key)}.consistency")
            if policy is not None:
                out.append((key.lower() if _UUID.match(key) else key, policy))
    return tuple(out)


_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _targets(raw: Any) -> Tuple[TargetConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError("targets", "must be a mapping of target name -> settings")
    out = []
    for name, t in raw.items():
        label = f"targets.{_label(name)}"
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "._-" for c in name):
            raise ConfigError(label, "target names use letters, digits, '.', '_' and '-' only")
        if not isinstance(t, Mapping):
            raise ConfigError(label, "must be a mapping")
        engine = t.get("engine", "qmp")
        allowed = {"engine", "qmp_socket", "node", "bitmap_prefix", "domain", "disks", "consistency",
                   "guest_agent_socket"}
        for k in t:
            if k not in allowed:
                raise ConfigError(f"{label}.{_label(k)}", f"unknown key (known: {', '.join(sorted(allowed))})")
        prefix = _str(t, "bitmap_prefix", units.DEFAULT_BITMAP_PREFIX, f"{label}.bitmap_prefix")
        disks = t.get("disks", [])
        if not isinstance(disks, list) or not all(isinstance(d, str) and d.isprintable() for d in disks):
            raise ConfigError(f"{label}.disks", "must be a list of disk targets like [vda, vdb]")
        policy = _consistency(t, "consistency", f"{label}.consistency")
        if engine == "qmp":
            agent = _str(t, "guest_agent_socket", "-", f"{label}.guest_agent_socket")
            out.append(TargetConfig(name, "qmp", qmp_socket=_str(t, "qmp_socket", "", f"{label}.qmp_socket"),
                                    node=_str(t, "node", "", f"{label}.node"), bitmap_prefix=prefix,
                                    consistency=policy, guest_agent_socket="" if agent == "-" else agent))
        elif engine == "libvirt":
            if "guest_agent_socket" in t:
                raise ConfigError(f"{label}.guest_agent_socket", "only for engine: qmp (libvirt owns a domain's "
                                  "guest agent channel)")
            out.append(TargetConfig(name, "libvirt", domain=_str(t, "domain", name, f"{label}.domain"),
                                    disks=tuple(disks), bitmap_prefix=prefix, consistency=policy))
        else:
            raise ConfigError(f"{label}.engine", f"unknown engine {_show(engine)} (known: qmp, libvirt)")
    return tuple(out)


def libvirt_uri(cfg: Config) -> str:
    section = dict(cfg.extra).get("libvirt") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("libvirt", "must be a mapping (keys: uri)")
    for k in section:
        if k != "uri":
            raise ConfigError(f"libvirt.{_label(k)}", "unknown key (known: uri)")
    return _str(section, "uri", "qemu:///system", "libvirt.uri")


def store_options(cfg: Config) -> Dict[str, Any]:
    return dict(cfg.store.options)

"""The agent's part of ekko.yaml, typed: `agent:`, `schedule:`, `domains:` (and `retention:`). Pure.

    agent:      spool_dir, max_concurrent, poll_interval, shared_storage, hook_path, keep_jobs_days,
                spool_max_events (events waiting before the hook coalesces; baked into the hook by
                `ekko hook install`);
                lifecycle work: prune_after_backup, gc_interval, verify: {interval, sample, deep,
                since_days} (absent: the agent runs no gc / no verify)
    schedule:   the default backup policy of every domain (scheduler.policy_from_mapping)
    domains:    per domain (by libvirt name or UUID): {schedule: {...}} over the default
                (scheduler.override_from_mapping); the keys a domain leaves out are inherited;
                {retention: {keep_*: N}}: the domain's retention policy, REPLACING the default one
    retention:  prune.RetentionConfig: the default policy and per-target ones (`retention_for`)

config.build checks these sections when it loads the file, so a bad key fails at once, naming
the key, whichever command runs.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, overload

from ..errors import ConfigError
from ..lifecycle.prune import Policy as RetentionPolicy
from ..lifecycle.prune import RetentionConfig
from . import hookformat
from .scheduler import Policy, PolicyOverride, override_from_mapping, parse_interval, policy_from_mapping
from .spool import DEFAULT_HOOK_PATH, DEFAULT_SPOOL_DIR

_AGENT_KEYS = ("spool_dir", "max_concurrent", "poll_interval", "shared_storage", "hook_path", "keep_jobs_days",
               "prune_after_backup", "gc_interval", "verify", "spool_max_events", "metrics", "sync", "bus")
_VERIFY_KEYS = ("interval", "sample", "deep", "since_days")
_METRICS_KEYS = ("listen", "textfile", "interval")
_SYNC_KEYS = ("to", "source", "interval", "retention")
_BUS_KEYS = ("transport_url", "host", "heartbeat_interval")
BUS_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")    # the API checks reports with the same rule
_DOMAIN_KEYS = ("schedule", "retention", "consistency")     # consistency: typed by config.py


@dataclass(frozen=True)
class VerifySettings:
    """agent.verify: the agent's scheduled `ekko verify --sample S [--deep] [--since-days N]`."""
    interval_s: int = 24 * 3600
    sample: float = 1.0              # fraction of the distinct segments checked, (0, 1]
    deep: bool = False               # download, decode and re-hash (else: the segments exist)
    since_days: Optional[float] = None   # skip backups that passed an equally thorough verify this recently


@dataclass(frozen=True)
class MetricsSettings:
    """agent.metrics: Prometheus metrics (agent/metrics.py), served over HTTP on `listen` (GET
    /metrics), or written to a node_exporter textfile (a file name ending in .prom), or both;
    gathered again every `interval`."""
    listen_host: Optional[str] = None      # None: no HTTP endpoint
    listen_port: int = 0                   # 0 with a host: any free port (tests; logged at start)
    textfile: Optional[str] = None         # None: no textfile
    interval_s: int = 60


@dataclass(frozen=True)
class SyncSettings:
    """agent.sync: the agent's scheduled `ekko sync SOURCE DEST` for each DEST in `to` (store names of
    the config: `default` is `store:`, the others under `stores:`; config.Config.named_store checks
    them when the agent starts)."""
    dests: Tuple[str, ...]
    source: str = "default"
    interval_s: int = 6 * 3600
    retention: Tuple[Tuple[str, RetentionPolicy], ...] = ()   # per destination: pruned (and gc'd) after its sync

    def retention_of(self, dest: str) -> Optional[RetentionPolicy]:
        return dict(self.retention).get(dest)


@dataclass(frozen=True)
class BusSettings:
    """agent.bus: the agent on the message bus (api/bus_agent.py, oslo.messaging; imported only when
    this is given)."""
    transport_url: str = field(repr=False)      # rabbit://user:password@host:port/vhost: never logged
    host: str = ""                              # the name the API addresses this agent by ("" -> hostname)
    heartbeat_interval_s: float = 10.0


@dataclass(frozen=True)
class AgentSettings:
    spool_dir: str = DEFAULT_SPOOL_DIR
    max_concurrent: int = 1          # backups running at once on this host
    poll_interval_s: float = 1.0     # how often the spool is read when nothing wakes the agent
    shared_storage: bool = False     # instance disks are on storage shared between hosts (migration)
    hook_path: str = DEFAULT_HOOK_PATH
    keep_jobs_days: int = 14         # finished job records are deleted after this many days
    spool_max_events: int = hookformat.DEFAULT_BOUND    # the hook coalesces the spool above this
    schedule: Policy = Policy()
    domains: Tuple[Tuple[str, PolicyOverride], ...] = ()    # (name or UUID, override)
    prune_after_backup: bool = True  # apply the domain's retention policy after each scheduled backup
    gc_interval_s: Optional[int] = None          # None: the agent runs no gc
    verify: Optional[VerifySettings] = None      # None: the agent runs no verify
    metrics: Optional[MetricsSettings] = None    # None: no metrics
    sync: Optional[SyncSettings] = None          # None: the agent replicates nothing
    bus: Optional[BusSettings] = None            # None: no message bus (api/bus_agent.py)
    retention: RetentionConfig = RetentionConfig()
    domain_retention: Tuple[Tuple[str, RetentionPolicy], ...] = ()   # (name or UUID, policy)

    @classmethod
    def from_config(cls, cfg) -> "AgentSettings":
        return cls.from_mapping(dict(cfg.extra))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "AgentSettings":
        """The top level of ekko.yaml (only `agent`, `schedule` and `domains` are read)."""
        agent = raw.get("agent")
        if agent is None:
            agent = {}
        if not isinstance(agent, Mapping):
            raise ConfigError("agent", "must be a mapping (keys: " + ", ".join(_AGENT_KEYS) + ")")
        unknown = sorted(set(map(str, agent)) - set(_AGENT_KEYS))
        if unknown:
            raise ConfigError(f"agent.{unknown[0]}", f"unknown key (known: {', '.join(_AGENT_KEYS)})")
        return cls(
            spool_dir=_path(agent, "spool_dir", DEFAULT_SPOOL_DIR),
            max_concurrent=_int(agent, "max_concurrent", 1, 1, 64),
            poll_interval_s=_seconds(agent, "poll_interval", 1.0, 0.1, 60.0),
            shared_storage=_bool(agent, "shared_storage", False),
            hook_path=_path(agent, "hook_path", DEFAULT_HOOK_PATH),
            keep_jobs_days=_int(agent, "keep_jobs_days", 14, 1, 3650),
            spool_max_events=_int(agent, "spool_max_events", hookformat.DEFAULT_BOUND, 10, 10_000_000),
            schedule=policy_from_mapping(raw.get("schedule"), "schedule"),
            domains=_domains(raw.get("domains")),
            prune_after_backup=_bool(agent, "prune_after_backup", True),
            gc_interval_s=_interval(agent, "gc_interval"),
            verify=_verify(agent.get("verify")),
            metrics=_metrics(agent.get("metrics")),
            sync=_sync(agent.get("sync")),
            bus=_bus(agent.get("bus")),
            retention=RetentionConfig.from_mapping(raw.get("retention")),
            domain_retention=_domain_retention(raw.get("domains")),
        )

    def retention_for(self, target: str, uuid: Optional[str] = None,
                      name: Optional[str] = None) -> Optional[RetentionPolicy]:
        """The retention policy of a disk target of a domain: retention.targets.<target> if given,
        else domains.<UUID or name>.retention (a UUID entry wins over a name entry), else the
        default of `retention:`. None: no policy (nothing of the target is pruned)."""
        per_target = dict(self.retention.targets)
        if target in per_target:
            return per_target[target]
        by_key = dict(self.domain_retention)
        own = (by_key.get(uuid.lower()) if uuid else None) or (by_key.get(name) if name else None)
        return own if own is not None else self.retention.default

    def has_retention(self) -> bool:
        """Any retention policy at all (default, per target, or per domain)."""
        return self.retention.default is not None or bool(self.retention.targets) or bool(self.domain_retention)

    def overrides(self, domains: Iterable[Tuple[str, Optional[str]]]) -> Dict[str, PolicyOverride]:
        """{uuid: override} for the domains given as (uuid, name); an entry keyed by the UUID wins
        over one keyed by the name."""
        by_key = dict(self.domains)
        out = {}
        for uuid, name in domains:
            ov = by_key.get(uuid.lower()) or (by_key.get(name) if name else None)
            if ov is not None:
                out[uuid] = ov
        return out


def _domains(raw: Any) -> Tuple[Tuple[str, PolicyOverride], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError("domains", "must be a mapping of libvirt domain name or UUID -> {schedule: {...}}")
    out = []
    for key, val in raw.items():
        label = f"domains.{key}"
        if not isinstance(key, str) or not key:
            raise ConfigError(label, "domain keys are libvirt domain names or UUIDs")
        if val is None:
            val = {}
        if not isinstance(val, Mapping):
            raise ConfigError(label, f"must be a mapping (keys: {', '.join(_DOMAIN_KEYS)})")
        for k in val:
            if k not in _DOMAIN_KEYS:
                raise ConfigError(f"{label}.{k}", f"unknown key (known: {', '.join(_DOMAIN_KEYS)})")
        out.append((_uuid_or_name(key), override_from_mapping(val.get("schedule"), f"{label}.schedule")))
    return tuple(out)


def _domain_retention(raw: Any) -> Tuple[Tuple[str, RetentionPolicy], ...]:
    """domains.<name>.retention: {keep_last: N, ...} (checked by _domains for the rest)."""
    out = []
    for key, val in (raw or {}).items():
        if not isinstance(val, Mapping) or "retention" not in val:
            continue
        label = f"domains.{key}.retention"
        rules = val["retention"]
        if not isinstance(rules, Mapping) or not rules:
            raise ConfigError(label, "must be a mapping of keep_* rules (keep_last, keep_hourly, keep_daily, "
                                     "keep_weekly, keep_monthly, keep_yearly), at least one")
        out.append((_uuid_or_name(key), RetentionPolicy.from_mapping(rules, label)))
    return tuple(out)


@overload
def _interval(raw: Mapping, key: str, label: Optional[str] = None, default: None = None) -> Optional[int]: ...


@overload
def _interval(raw: Mapping, key: str, label: Optional[str], default: int) -> int: ...


def _interval(raw: Mapping, key: str, label: Optional[str] = None, default: Optional[int] = None) -> Optional[int]:
    """An interval (24h, 30m, 1d, seconds); absent or null: `default`."""
    val = raw.get(key)
    if val is None:
        return default
    try:
        return parse_interval(val)
    except ValueError as e:
        raise ConfigError(label or f"agent.{key}", str(e)) from e


def _verify(raw: Any) -> Optional[VerifySettings]:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("agent.verify", "must be a mapping (keys: " + ", ".join(_VERIFY_KEYS) + ")")
    unknown = sorted(set(map(str, raw)) - set(_VERIFY_KEYS))
    if unknown:
        raise ConfigError(f"agent.verify.{unknown[0]}", f"unknown key (known: {', '.join(_VERIFY_KEYS)})")
    deep = raw.get("deep", False)
    if not isinstance(deep, bool):
        raise ConfigError("agent.verify.deep", f"must be true or false, got {deep!r}")
    since = raw.get("since_days")
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float)) or since < 0):
        raise ConfigError("agent.verify.since_days", f"must be a number of days >= 0, got {since!r}")
    return VerifySettings(interval_s=_interval(raw, "interval", "agent.verify.interval", 24 * 3600),
                          sample=_sample(raw.get("sample", 1.0)), deep=deep,
                          since_days=None if since is None else float(since))


def _metrics(raw: Any) -> Optional[MetricsSettings]:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("agent.metrics", "must be a mapping (keys: " + ", ".join(_METRICS_KEYS) + ")")
    unknown = sorted(set(map(str, raw)) - set(_METRICS_KEYS))
    if unknown:
        raise ConfigError(f"agent.metrics.{unknown[0]}", f"unknown key (known: {', '.join(_METRICS_KEYS)})")
    host, port = (None, 0) if raw.get("listen") is None else _listen(raw["listen"])
    textfile = raw.get("textfile")
    if textfile is not None and (not isinstance(textfile, str) or not textfile.startswith("/")
                                 or not textfile.endswith(".prom") or not textfile.isprintable()):
        raise ConfigError("agent.metrics.textfile", "must be an absolute path ending in .prom (node_exporter's "
                          f"textfile collector reads only those), got {textfile!r}")
    if host is None and textfile is None:
        raise ConfigError("agent.metrics", "give listen (e.g. 127.0.0.1:9597), textfile "
                          "(e.g. /var/lib/prometheus/node-exporter/ekko.prom), or both")
    interval = _interval(raw, "interval", "agent.metrics.interval", 60)
    return MetricsSettings(host, port, textfile, interval)


def _sync(raw: Any) -> Optional[SyncSettings]:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("agent.sync", "must be a mapping (keys: " + ", ".join(_SYNC_KEYS) + ")")
    unknown = sorted(set(map(str, raw)) - set(_SYNC_KEYS))
    if unknown:
        raise ConfigError(f"agent.sync.{unknown[0]}", f"unknown key (known: {', '.join(_SYNC_KEYS)})")
    to = raw.get("to")
    to = [to] if isinstance(to, str) else to
    if not isinstance(to, list) or not to or not all(isinstance(d, str) and d for d in to) or len(set(to)) != len(to):
        raise ConfigError("agent.sync.to", f"must be a store name or a list of distinct ones, got {raw.get('to')!r}")
    source = raw.get("source", "default")
    if not isinstance(source, str) or not source or source in to:
        raise ConfigError("agent.sync.source", f"must be a store name other than the destinations, got {source!r}")
    return SyncSettings(tuple(to), source, _interval(raw, "interval", "agent.sync.interval", 6 * 3600),
                        _sync_retention(raw.get("retention"), to))


def _bus(raw: Any) -> Optional[BusSettings]:
    """agent.bus: {transport_url: rabbit://USER:PASSWORD@HOST:5672/, host: NAME, heartbeat_interval: 10}.
    The URL is checked for its form only (never echoed back: it holds the password)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("agent.bus", "must be a mapping (keys: " + ", ".join(_BUS_KEYS) + ")")
    unknown = sorted(set(map(str, raw)) - set(_BUS_KEYS))
    if unknown:
        raise ConfigError(f"agent.bus.{unknown[0]}", f"unknown key (known: {', '.join(_BUS_KEYS)})")
    url = raw.get("transport_url")
    if not isinstance(url, str) or "://" not in url or not url.isprintable():
        raise ConfigError("agent.bus.transport_url", "must be an oslo.messaging transport URL such as "
                          "rabbit://USER:PASSWORD@HOST:5672/ (value not shown: it may hold a password)")
    host = raw.get("host", "")
    if not isinstance(host, str) or (host and not BUS_HOST.match(host)):
        raise ConfigError("agent.bus.host", "must be a host name of letters, digits, '.', '_', ':' or '-' "
                          f"(default: this host's), got {str(host)[:80]!r}")
    beat = raw.get("heartbeat_interval", 10)
    if isinstance(beat, bool) or not isinstance(beat, (int, float)) or not 0.2 <= beat <= 3600:   # NaN fails too
        raise ConfigError("agent.bus.heartbeat_interval", f"must be a number of seconds from 0.2 to 3600, got {beat!r}")
    return BusSettings(url, host, float(beat))


def _sync_retention(raw: Any, dests: list) -> Tuple[Tuple[str, RetentionPolicy], ...]:
    """agent.sync.retention: {DEST: {keep_daily: 30, ...}}: each destination's own policy."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError("agent.sync.retention", "must be a mapping of destination -> {keep_*: N}")
    out = []
    for dest, rules in raw.items():
        label = f"agent.sync.retention.{dest}"
        if dest not in dests:
            raise ConfigError(label, f"not a destination of agent.sync.to ({', '.join(dests)})")
        if not isinstance(rules, Mapping) or not rules:
            raise ConfigError(label, "must be a mapping of keep_* rules, at least one")
        out.append((str(dest), RetentionPolicy.from_mapping(rules, label)))
    return tuple(out)


def _listen(val: Any) -> Tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets), or a port alone: 127.0.0.1."""
    text = str(val) if isinstance(val, (str, int)) and not isinstance(val, bool) else ""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not host.isprintable() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("agent.metrics.listen", f"must be HOST:PORT or a port (e.g. 127.0.0.1:9597), got {val!r}")
    return host, int(port)


def _sample(val: Any) -> float:
    """'5%' or a fraction in (0, 1]."""
    try:
        if isinstance(val, str) and val.strip().endswith("%"):
            f = float(val.strip()[:-1]) / 100
        elif isinstance(val, (int, float)) and not isinstance(val, bool):
            f = float(val)
        else:
            f = -1.0
    except ValueError:
        f = -1.0
    if not 0 < f <= 1:
        raise ConfigError("agent.verify.sample", f"must be a percentage (5%) or a fraction in (0, 1], got {val!r}")
    return f


def _uuid_or_name(key: str) -> str:
    k = key.lower()
    if len(k) == 36 and all((c == "-") if i in (8, 13, 18, 23) else c in "0123456789abcdef" for i, c in enumerate(k)):
        return k
    return key


def _path(raw: Mapping, key: str, default: str) -> str:
    val = raw.get(key, default)
    if not isinstance(val, str) or not val.startswith("/"):
        raise ConfigError(f"agent.{key}", f"must be an absolute path, got {val!r}")
    return val


def _int(raw: Mapping, key: str, default: int, lo: int, hi: int) -> int:
    val = raw.get(key, default)
    if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
        raise ConfigError(f"agent.{key}", f"must be an integer from {lo} to {hi}, got {val!r}")
    return val


def _bool(raw: Mapping, key: str, default: bool) -> bool:
    val = raw.get(key, default)
    if not isinstance(val, bool):
        raise ConfigError(f"agent.{key}", f"must be true or false, got {val!r}")
    return val


def _seconds(raw: Mapping, key: str, default: float, lo: float, hi: float) -> float:
    val = raw.get(key, default)
    try:
        sec = float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else float(parse_interval(val))
    except ValueError:
        sec = -1.0
    if not lo <= sec <= hi:
        raise ConfigError(f"agent.{key}", f"must be a number of seconds from {lo:g} to {hi:g}, got {val!r}")
    return sec

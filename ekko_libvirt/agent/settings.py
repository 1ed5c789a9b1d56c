"""The agent's part of ekko.yaml, typed: `agent:`, `schedule:` and `domains:`. Pure.

    agent:      spool_dir, max_concurrent, poll_interval, shared_storage, hook_path, keep_jobs_days
    schedule:   the default backup policy of every domain (scheduler.policy_from_mapping)
    domains:    per domain (by libvirt name or UUID): {schedule: {...}} over the default
                (scheduler.override_from_mapping); the keys a domain leaves out are inherited

config.build checks these sections when it loads the file, so a bad key fails at once, naming
the key, whichever command runs.
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from ..errors import ConfigError
from .scheduler import Policy, PolicyOverride, override_from_mapping, parse_interval, policy_from_mapping
from .spool import DEFAULT_HOOK_PATH, DEFAULT_SPOOL_DIR

_AGENT_KEYS = ("spool_dir", "max_concurrent", "poll_interval", "shared_storage", "hook_path", "keep_jobs_days")


@dataclass(frozen=True)
class AgentSettings:
    spool_dir: str = DEFAULT_SPOOL_DIR
    max_concurrent: int = 1          # backups running at once on this host
    poll_interval_s: float = 1.0     # how often the spool is read when nothing wakes the agent
    shared_storage: bool = False     # instance disks are on storage shared between hosts (migration)
    hook_path: str = DEFAULT_HOOK_PATH
    keep_jobs_days: int = 14         # finished job records are deleted after this many days
    schedule: Policy = Policy()
    domains: Tuple[Tuple[str, PolicyOverride], ...] = ()    # (name or UUID, override)

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
            schedule=policy_from_mapping(raw.get("schedule"), "schedule"),
            domains=_domains(raw.get("domains")),
        )

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
            raise ConfigError(label, "must be a mapping (keys: schedule)")
        for k in val:
            if k != "schedule":
                raise ConfigError(f"{label}.{k}", "unknown key (known: schedule)")
        out.append((_uuid_or_name(key), override_from_mapping(val.get("schedule"), f"{label}.schedule")))
    return tuple(out)


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

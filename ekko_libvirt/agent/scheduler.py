"""Which domains are due for a backup now. Pure: the caller passes the clock and the facts.

    policy     = default policy, with the domain's override merged over it (`Policy.merged`)
    decision   = in this order, the first that applies:
                   DISABLED        policy.enabled is false
                   JOB_RUNNING     a job runs on the domain (it is counted against the host limit)
                   STOPPED         the domain is shut off and policy.backup_stopped is false
                   NOT_DUE         last backup + interval is in the future
                   OUTSIDE_WINDOW  the time window is closed now
                   NEVER_BACKED_UP / INTERVAL_ELAPSED   due
    plan       = due domains sorted most overdue first (never backed up before all others), the
                 first (max_concurrent - running jobs) start now, the rest wait (HOST_LIMIT);
                 `next_wakeup` is the earliest time a waiting domain becomes due by the clock.
    tasks_plan = the host-wide lifecycle tasks (gc, verify): each due when it never ran, or its
                 interval after the start of its last run (a failed run: after at most an hour);
                 the due ones run one after the other, and none starts while one runs.

Times are timezone-aware datetimes; windows ("22:00-06:00", may wrap midnight; end is exclusive;
"00:00-24:00" is the whole day) are read in the timezone of `now`.
"""

import enum
import re
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError


class _Inherit:
    __slots__ = ()

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()


@dataclass(frozen=True)
class TimeWindow:
    start_min: int      # minutes after midnight, 0..1439
    end_min: int        # 1..1440, != start_min

    def __post_init__(self) -> None:
        if not (0 <= self.start_min < 1440 and 0 < self.end_min <= 1440) or self.start_min == self.end_min:
            raise ValueError(f"bad time window {self.start_min}-{self.end_min} (minutes)")

    @classmethod
    def parse(cls, text: str) -> "TimeWindow":
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", str(text))
        if not m:
            raise ValueError(f"not a time window: {text!r} (use HH:MM-HH:MM, e.g. 22:00-06:00)")
        h1, m1, h2, m2 = map(int, m.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"not a time window: {text!r} (hours 00-23, or 24:00 as an end)")
        try:
            return cls(h1 * 60 + m1, h2 * 60 + m2)
        except ValueError:
            raise ValueError(f"empty time window: {text!r} (use 00:00-24:00 for the whole day)") from None

    def __str__(self) -> str:
        return f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-{self.end_min // 60:02d}:{self.end_min % 60:02d}"

    def contains(self, at: datetime) -> bool:
        m = at.hour * 60 + at.minute
        if self.start_min < self.end_min:
            return self.start_min <= m < self.end_min
        return m >= self.start_min or m < self.end_min

    def next_open(self, at: datetime) -> datetime:
        """`at` if the window is open then, else the next time it opens."""
        if self.contains(at):
            return at
        opens = at.replace(hour=self.start_min // 60, minute=self.start_min % 60, second=0, microsecond=0)
        return opens if opens > at else opens + timedelta(days=1)


@dataclass(frozen=True)
class Policy:
    interval_s: int = 24 * 3600
    window: Optional[TimeWindow] = None          # None: any time
    disks: Optional[Tuple[str, ...]] = None      # None: every disk of the domain
    enabled: bool = True
    backup_stopped: bool = False                 # back up shut-off domains too (offline backup)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval must be positive, got {self.interval_s} s")

    @property
    def interval(self) -> timedelta:
        return timedelta(seconds=self.interval_s)

    def merged(self, override: Optional["PolicyOverride"]) -> "Policy":
        if override is None:
            return self
        return replace(self, **{f.name: getattr(override, f.name) for f in fields(override)
                                if getattr(override, f.name) is not INHERIT})


@dataclass(frozen=True)
class PolicyOverride:
    """Per-domain: every field left INHERIT takes the default policy's value."""
    interval_s: Any = INHERIT
    window: Any = INHERIT                        # a TimeWindow, None (any time), or INHERIT
    disks: Any = INHERIT
    enabled: Any = INHERIT
    backup_stopped: Any = INHERIT


@dataclass(frozen=True)
class DomainStatus:
    uuid: str
    last_backup: Optional[datetime]              # start of the last successful backup
    job_running: bool = False
    active: bool = True


class Why(enum.Enum):
    NEVER_BACKED_UP = "never-backed-up"
    INTERVAL_ELAPSED = "interval-elapsed"
    DISABLED = "disabled"
    JOB_RUNNING = "job-running"
    STOPPED = "stopped"
    NOT_DUE = "not-due"
    OUTSIDE_WINDOW = "outside-window"
    HOST_LIMIT = "host-limit"


DUE = frozenset((Why.NEVER_BACKED_UP, Why.INTERVAL_ELAPSED))


@dataclass(frozen=True)
class Decision:
    uuid: str
    why: Why
    policy: Policy
    next_due: Optional[datetime] = None          # when it becomes due by the clock, if known

    @property
    def due(self) -> bool:
        return self.why in DUE


@dataclass(frozen=True)
class Plan:
    start: Tuple[Decision, ...]                  # start these now, in this order
    waiting: Tuple[Decision, ...]                # everything else, with the reason
    next_wakeup: Optional[datetime]              # earliest next_due among the waiting


def _aware(t: datetime, what: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware: {t!r}")
    return t


def decide(now: datetime, dom: DomainStatus, policy: Policy) -> Decision:
    """One domain, ignoring the host limit."""
    _aware(now, "now")
    if not policy.enabled:
        return Decision(dom.uuid, Why.DISABLED, policy)
    if dom.job_running:
        return Decision(dom.uuid, Why.JOB_RUNNING, policy)
    if not dom.active and not policy.backup_stopped:
        return Decision(dom.uuid, Why.STOPPED, policy)
    if dom.last_backup is not None:
        due_at = _aware(dom.last_backup, f"last_backup of {dom.uuid}").astimezone(now.tzinfo) + policy.interval
        if now < due_at:
            nxt = policy.window.next_open(due_at) if policy.window else due_at
            return Decision(dom.uuid, Why.NOT_DUE, policy, nxt)
    if policy.window is not None and not policy.window.contains(now):
        return Decision(dom.uuid, Why.OUTSIDE_WINDOW, policy, policy.window.next_open(now))
    return Decision(dom.uuid, Why.NEVER_BACKED_UP if dom.last_backup is None else Why.INTERVAL_ELAPSED,
                    policy, now)


def plan(now: datetime, domains: Sequence[DomainStatus], default: Policy = Policy(),
         overrides: Optional[Mapping[str, PolicyOverride]] = None, max_concurrent: int = 1) -> Plan:
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
    overrides = overrides or {}
    decisions = [decide(now, d, default.merged(overrides.get(d.uuid))) for d in domains]
    by_uuid = {d.uuid: d for d in domains}
    running = sum(1 for d in domains if d.job_running)
    epoch = datetime.min.replace(tzinfo=now.tzinfo)

    def urgency(dec: Decision) -> tuple:
        last = by_uuid[dec.uuid].last_backup
        return (last is not None, (last + dec.policy.interval) if last else epoch, dec.uuid)

    due = sorted((d for d in decisions if d.due), key=urgency)
    slots = max(0, max_concurrent - running)
    start = tuple(due[:slots])
    limited = tuple(replace(d, why=Why.HOST_LIMIT, next_due=None) for d in due[slots:])
    waiting = tuple(d for d in decisions if not d.due) + limited
    wakeups = [d.next_due for d in waiting if d.next_due is not None]
    return Plan(start, waiting, min(wakeups) if wakeups else None)


def retry_delay_s(failures: int, interval_s: int, first_s: int = 60, cap_s: int = 3600) -> int:
    """How long a domain whose last `failures` scheduled backups failed in a row waits before the
    next try: 1, 2, 4, ... minutes, at most an hour and never longer than its interval."""
    if failures <= 0:
        return 0
    return max(1, min(first_s * 2 ** min(failures - 1, 20), cap_s, interval_s))


# --- from config mappings (the YAML loader hands these over) -----------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_interval(value: Any) -> int:
    """'24h', '30m', '1d', '2w', '90s', or a number of seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError(f"not an interval: {value!r}")
    if isinstance(value, int):
        seconds = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", str(value).lower())
        if not m:
            raise ValueError(f"not an interval: {value!r} (use e.g. 24h, 30m, 1d)")
        seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"interval must be positive: {value!r}")
    return seconds


def format_interval(seconds: int) -> str:
    """Seconds -> the largest unit of parse_interval that divides them: 21600 -> '6h', 90 -> '90s'.
    parse_interval(format_interval(s)) == s."""
    for unit in "wdhm":
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def _field(raw: Mapping[str, Any], key: str, label: str) -> Any:
    value = raw[key]
    try:
        if key == "interval":
            return parse_interval(value)
        if key == "window":
            return None if value in (None, "", "any") else TimeWindow.parse(value)
        if key == "disks":
            if value is None or value == "all":
                return None
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(d, str) and d for d in value):
                raise ValueError("expected a list of disk targets (e.g. [vda, vdb]) or 'all'")
            return tuple(value)
        if key in ("enabled", "backup_stopped"):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
    except ValueError as e:
        raise ConfigError(f"{label}.{key}", str(e)) from e
    raise AssertionError(key)   # pragma: no cover


_KEYS = {"interval": "interval_s", "window": "window", "disks": "disks", "enabled": "enabled",
         "backup_stopped": "backup_stopped"}


def _check_keys(raw: Any, label: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(label, "expected a mapping")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{label}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_KEYS))})")
    return raw


def policy_from_mapping(raw: Any, label: str = "schedule", base: Policy = Policy()) -> Policy:
    """e.g. {interval: 24h, window: "22:00-06:00", disks: all} -> Policy. Raises ConfigError."""
    raw = _check_keys(raw, label)
    try:
        return replace(base, **{_KEYS[k]: _field(raw, k, label) for k in raw})
    except ValueError as e:
        raise ConfigError(label, str(e)) from e


def override_from_mapping(raw: Any, label: str) -> PolicyOverride:
    """A per-domain override; absent keys inherit. Raises ConfigError."""
    raw = _check_keys(raw, label)
    return PolicyOverride(**{_KEYS[k]: _field(raw, k, label) for k in raw})



# --- lifecycle work on an interval: gc, verify -------------------------------------------------

TASK_RETRY_S = 3600         # a failed gc/verify is tried again after this (or its interval, if shorter)


@dataclass(frozen=True)
class TaskRun:
    """The last run of a periodic lifecycle task (gc, verify) as the agent recorded it."""
    started: datetime
    ok: bool


@dataclass(frozen=True)
class TaskDecision:
    name: str
    due: bool
    next_due: Optional[datetime]                 # None: the task is off (no interval configured)


@dataclass(frozen=True)
class TaskPlan:
    run: Tuple[str, ...]                         # run these now, one after the other, in this order
    decisions: Tuple[TaskDecision, ...]
    next_wakeup: Optional[datetime]              # earliest next_due of the tasks not run now


def task_due(now: datetime, name: str, interval_s: Optional[int], last: Optional[TaskRun]) -> TaskDecision:
    """Due when it never ran, or `interval_s` after the start of its last run (after a failed run:
    after at most TASK_RETRY_S). interval_s None: the task is off."""
    _aware(now, "now")
    if interval_s is None:
        return TaskDecision(name, due=False, next_due=None)
    if last is None:
        return TaskDecision(name, due=True, next_due=now)
    wait = interval_s if last.ok else min(interval_s, TASK_RETRY_S)
    at = _aware(last.started, f"last run of {name}").astimezone(now.tzinfo) + timedelta(seconds=wait)
    return TaskDecision(name, due=now >= at, next_due=max(at, now))


def tasks_plan(now: datetime, tasks: Sequence[Tuple[str, Optional[int], Optional[TaskRun]]],
               busy: bool) -> TaskPlan:
    """`tasks`: (name, interval_s, last run) in the order they run. They run one at a time, never
    two at once: while `busy` (a run is in progress) nothing starts, and the due ones of one round
    run one after the other."""
    decisions = tuple(task_due(now, name, interval, last) for name, interval, last in tasks)
    run = () if busy else tuple(d.name for d in decisions if d.due)
    wakeups = [d.next_due for d in decisions if d.name not in run and d.next_due is not None]
    return TaskPlan(run, decisions, None if busy else (min(wakeups) if wakeups else None))

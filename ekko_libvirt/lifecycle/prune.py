"""Retention: which backups to keep and which rule keeps each. Pure: the caller passes the
backups (id, target, time, protected, readable) and the policy; nothing here touches a store.

Rules (the restic / PBS vocabulary), applied to each target's backups separately, newest first:

    last N      the N newest backups
    hourly N    the newest backup of each of the N newest clock hours that have a backup
    daily N     ... calendar days;  weekly N: ISO weeks (Monday first);  monthly N;  yearly N

Each rule is counted on its own (a backup kept by `last` still fills its day for `daily`), and a
backup is kept if any rule keeps it. Whatever the policy, two more reasons keep a backup:

    newest      the newest readable backup of the target: what the next incremental builds on
    protected   `ekko protect` put a protected/<target>/<backup-id> marker in the store

Every other backup goes, including those whose manifest is damaged (they cannot be restored, and
they stop gc from knowing which segments are garbage). A manifest that is merely locked (sealed
with a key this host does not hold) is never pruned: with the right key it is a good backup.

Deleting a backup deletes only its manifest: every manifest is a synthetic full, so no other
backup depends on it; gc frees the segments that nothing references any more. Periods are
calendar periods in `tz` (the CLI passes the host's local time zone; UTC by default).
"""

import datetime
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from ..errors import ConfigError

UTC = datetime.timezone.utc

# rule name -> period of a local datetime, and how to print it
_PERIODS: Tuple[Tuple[str, Callable[[datetime.datetime], Tuple], Callable[[Tuple], str]], ...] = (
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour), lambda p: "%04d-%02d-%02d %02d:00" % p),
    ("daily", lambda t: (t.year, t.month, t.day), lambda p: "%04d-%02d-%02d" % p),
    ("weekly", lambda t: tuple(t.isocalendar())[:2], lambda p: "%04d-W%02d" % p),
    ("monthly", lambda t: (t.year, t.month), lambda p: "%04d-%02d" % p),
    ("yearly", lambda t: (t.year,), lambda p: "%04d" % p[0]),
)
RULES = ("last",) + tuple(name for name, _, _ in _PERIODS)


@dataclass(frozen=True)
class Policy:
    """How many of each to keep; 0 means the rule is off."""
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"keep-{f.name} must be an integer >= 0, not {v!r}")

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        return " ".join(f"--keep-{f.name} {getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)) \
            or "(no rule)"

    @classmethod
    def from_mapping(cls, raw: Mapping, label: str) -> "Policy":
        """From `keep_last: 7, keep_daily: 14, ...` (config keys); unknown keys are errors."""
        values = {}
        for k, v in raw.items():
            name = str(k)[len("keep_"):] if str(k).startswith("keep_") else None
            if name not in RULES:
                raise ConfigError(f"{label}.{k}", f"unknown key (known: {', '.join('keep_' + r for r in RULES)})")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{label}.{k}", f"must be an integer >= 0, got {v!r}")
            values[name] = v
        return cls(**values)


@dataclass(frozen=True)
class Backup:
    backup_id: str
    target: str
    time: Optional[datetime.datetime]   # None: the id carries no time (not written by ekko)
    protected: bool = False
    readable: bool = True               # False: the manifest is damaged (or locked)
    locked: bool = False                # sealed with a key we do not hold: kept, never judged


@dataclass(frozen=True)
class Decision:
    backup: Backup
    keep: bool
    reasons: Tuple[str, ...]            # why it is kept, or why it goes


_STAMP = re.compile(r"[0-9]{8}T[0-9]{9}Z", re.ASCII)


def backup_time(backup_id: str) -> Optional[datetime.datetime]:
    """The UTC time in a backup id ('YYYYMMDDTHHMMSSmmmZ-<hex>', see catalog.new_backup_id)."""
    stamp = backup_id.split("-", 1)[0]
    # ASCII digits only: int() and strptime() also take ' 12', '+12', '1_2' and non-ASCII digits,
    # which would give an id ekko never wrote a time (and make it prunable)
    if not _STAMP.fullmatch(stamp):
        return None
    try:
        t = datetime.datetime.strptime(stamp[:15], "%Y%m%dT%H%M%S")
    except ValueError:
        return None
    return t.replace(microsecond=int(stamp[15:18]) * 1000, tzinfo=UTC)


def plan_target(backups: Iterable[Backup], policy: Optional[Policy],
                tz: datetime.tzinfo = UTC) -> List[Decision]:
    """Decisions for the backups of ONE target, oldest first."""
    items = sorted(backups, key=lambda b: (b.time or datetime.datetime.max.replace(tzinfo=UTC), b.backup_id))
    reasons: Dict[str, List[str]] = {b.backup_id: [] for b in items}
    for b in items:
        if b.protected:
            reasons[b.backup_id].append("protected")
        if b.time is None:
            reasons[b.backup_id].append("no time in its id: never pruned")
        if b.locked:
            reasons[b.backup_id].append("locked: sealed with a key this host does not hold")
    readable = [b for b in items if b.readable and b.time is not None]
    timed = [b for b in items if b.time is not None]
    if readable or timed:
        # the newest readable one; if every manifest is damaged, the newest all the same
        reasons[(readable or timed)[-1].backup_id].append("newest")
    if policy is None:
        for b in items:
            reasons[b.backup_id].append("no retention policy for this target")
    else:
        newest_first = readable[::-1]
        for k, b in enumerate(newest_first[:policy.last]):
            reasons[b.backup_id].append(f"last {k + 1}/{policy.last}")
        for name, period, label in _PERIODS:
            n = getattr(policy, name)
            seen: Set[Tuple] = set()
            for b in newest_first:
                if len(seen) >= n:
                    break
                assert b.time is not None       # every readable one has a time (above)
                p = period(b.time.astimezone(tz))
                if p not in seen:
                    seen.add(p)
                    reasons[b.backup_id].append(f"{name} {label(p)} ({len(seen)}/{n})")
    out = []
    for b in items:
        why = reasons[b.backup_id]
        if why:
            out.append(Decision(b, keep=True, reasons=tuple(why)))
        else:
            out.append(Decision(b, keep=False,
                                reasons=("unreadable manifest",) if not b.readable else ("no rule keeps it",)))
    return out


def plan(backups: Iterable[Backup], policy_for: Callable[[str], Optional[Policy]],
         tz: datetime.tzinfo = UTC) -> List[Decision]:
    """Decisions for backups of any number of targets: by target, each target oldest first."""
    by_target: Dict[str, List[Backup]] = {}
    for b in backups:
        by_target.setdefault(b.target, []).append(b)
    out: List[Decision] = []
    for target in sorted(by_target):
        out.extend(plan_target(by_target[target], policy_for(target), tz))
    return out


# -- the `retention:` section of ekko.yaml -------------------------------------------------------
DEFAULT_GC_GRACE_HOURS = 24.0


@dataclass(frozen=True)
class RetentionConfig:
    """retention:
         keep_last: 7            # default policy, for every target
         keep_daily: 14
         targets:                # per-target policies, each replacing the default
           web1-vda: {keep_last: 3, keep_weekly: 4}
         gc_grace_hours: 24      # gc keeps unreferenced segments younger than this
    """
    default: Optional[Policy] = None
    targets: Tuple[Tuple[str, Policy], ...] = ()
    gc_grace_hours: float = DEFAULT_GC_GRACE_HOURS

    def policy_for(self, target: str) -> Optional[Policy]:
        return dict(self.targets).get(target, self.default)

    @classmethod
    def from_mapping(cls, raw: Any) -> "RetentionConfig":
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError("retention", "must be a mapping (keep_last, keep_daily, ..., targets, gc_grace_hours)")
        rules = {k: v for k, v in raw.items() if k not in ("targets", "gc_grace_hours")}
        default = Policy.from_mapping(rules, "retention") if rules else None
        per_target = raw.get("targets") or {}
        if not isinstance(per_target, Mapping):
            raise ConfigError("retention.targets", "must be a mapping of target name -> keep_* rules")
        targets = []
        for name, r in per_target.items():
            if not isinstance(r, Mapping):
                raise ConfigError(f"retention.targets.{name}", "must be a mapping of keep_* rules")
            targets.append((str(name), Policy.from_mapping(r, f"retention.targets.{name}")))
        grace = raw.get("gc_grace_hours", DEFAULT_GC_GRACE_HOURS)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
            raise ConfigError("retention.gc_grace_hours", f"must be a number of hours >= 0, got {grace!r}")
        return cls(default, tuple(targets), float(grace))

    @classmethod
    def from_config(cls, cfg) -> "RetentionConfig":
        return cls.from_mapping(dict(cfg.extra).get("retention"))

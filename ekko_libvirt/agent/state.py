"""The agent's state on disk: per-domain state, job records, per-domain locks, offline markers.

Layout under the state directory (config `state_dir`, default /var/lib/ekko):

    agent/domains/UUID.json      DomainState: last hook event, running, clean_shutdown, job_id,
                                 chain state. Changed only through `update_domain` (read-modify-
                                 write under locks/UUID.state.lock, a short flock).
    agent/jobs/JOB_ID.json       JobRecord: one per job, kept after the job ends; a record that
                                 says "running" but whose process is gone is *stale* (found by
                                 `find_stale_jobs` after an agent restart).
    agent/lifecycle.json         the agent's lifecycle work (agent/maintenance.py): the last gc and
                                 the last verify run ({started, ok, error, summary, stores}) and per
                                 domain UUID the last prune after a scheduled backup. Changed only
                                 through `update_lifecycle` (under locks/lifecycle.lock).
    locks/UUID.domain.lock       flock(LOCK_EX) held for a whole job: two jobs never run on one
                                 domain at once. The kernel drops it when the holder dies.
    locks/UUID.offline-backup    marker the hook reads at `prepare begin`: while it exists (and
                                 its owner pid + start time are alive) libvirt refuses to start
                                 the domain. Format: JSON {uuid, name, since, since_ns, pid,
                                 pid_start, job_id}. The hook duplicates this path rule.

Every JSON file is written to a temp file in the same directory, fsynced, renamed over the old
one, and the directory fsynced: a crash leaves the old or the new version, never a mix.

The pure transitions (`apply_reactions`, `record_backup`, `JobRecord.progressed`, ...) return new
frozen values; the `StateDir` methods do the I/O.
"""

import dataclasses
import enum
import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .. import durable
from ..errors import EkkoError, LockBusy
from ..procs import process_alive, process_start_ticks
from . import hookformat
from .events import Action, DomainContext, HookEvent, Reaction, decide

MAX_STATE_FILE = 1 << 20
OFFLINE_SUFFIX = hookformat.OFFLINE_SUFFIX


class StateError(EkkoError):
    """A state file cannot be read or written."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"agent state {path}: {problem}")


class DomainBusy(LockBusy):
    """Another job holds the domain's lock."""

    def __init__(self, uuid: str, holder: Dict[str, Any]):
        self.uuid = uuid
        self.holder = holder
        who = ", ".join(f"{k} {v}" for k, v in holder.items()) or "holder unknown"
        super().__init__(f"domain {uuid} is busy: another job holds its lock ({who}); "
                         f"nothing was done, try again after it ends")


# --- values ----------------------------------------------------------------------------------------

class ChainStatus(enum.Enum):
    NONE = "none"                      # no backup yet: the next one is a full
    OK = "ok"                          # the next backup may be an incremental
    CHECK_REQUIRED = "check-required"  # verify checkpoints/bitmaps before the next incremental
    FULL_REQUIRED = "full-required"    # the next backup must be a full (reason says why)


@dataclass(frozen=True)
class ChainState:
    status: ChainStatus = ChainStatus.NONE
    reason: str = ""
    last_backup_id: Optional[str] = None
    last_checkpoint: Optional[str] = None
    last_backup_ns: Optional[int] = None     # start of the last committed backup (wall clock)
    last_full_ns: Optional[int] = None       # start of the last committed FULL backup (None: not known)
    backup_clock: Optional[Tuple[str, int]] = None   # (boot id, CLOCK_MONOTONIC ns) of that start
    full_clock: Optional[Tuple[str, int]] = None     # the same for the last full
    marked_ns: Optional[int] = None                  # when the newest cause of the status happened
    marked_clock: Optional[Tuple[str, int]] = None
    check_ns: Optional[int] = None                   # when the newest cause of a chain check happened
    check_clock: Optional[Tuple[str, int]] = None    # (kept under full-required: a full may settle only that)


@dataclass(frozen=True)
class DomainState:
    uuid: str
    name: Optional[str] = None
    last_event: Optional[str] = None        # EventKind value
    last_event_ns: Optional[int] = None
    boot_id: Optional[str] = None           # boot of the host when the last event was written
    last_event_mono_ns: Optional[int] = None    # CLOCK_MONOTONIC of that event (orders events of one boot)
    running: bool = False
    clean_shutdown: Optional[bool] = None   # None: running, or never seen stopping
    job_id: Optional[str] = None
    job_kind: Optional[str] = None          # kind of that job: online | offline (a shut-off domain)
    chain: ChainState = field(default_factory=ChainState)
    updated_ns: int = 0

    def context(self, shared_storage: bool = False) -> DomainContext:
        return DomainContext(was_running=self.running, job_running=self.job_id is not None,
                             job_offline=self.job_kind == "offline", shared_storage=shared_storage)


class JobStatus(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABANDONED = "abandoned"             # found running after its process died (agent restart)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    uuid: str
    kind: str                            # online | offline (a shut-off domain's images)
    status: JobStatus
    started_ns: int
    updated_ns: int
    pid: int
    pid_start: Optional[int] = None      # start time of `pid`, so a reused pid is not taken as alive
    bytes_done: int = 0
    bytes_total: Optional[int] = None
    backup_id: Optional[str] = None
    error: Optional[str] = None
    cause: Optional[str] = None          # why it failed, one word (jobs.failure_cause): the metrics' label

    def progressed(self, bytes_done: int, bytes_total: Optional[int], now_ns: int) -> "JobRecord":
        return dataclasses.replace(self, bytes_done=bytes_done, bytes_total=bytes_total, updated_ns=now_ns)

    def finished(self, status: JobStatus, now_ns: int, *, backup_id: Optional[str] = None,
                 error: Optional[str] = None, cause: Optional[str] = None) -> "JobRecord":
        if status is JobStatus.RUNNING:
            raise ValueError("a job cannot finish as running")
        return dataclasses.replace(self, status=status, updated_ns=now_ns,
                                   backup_id=backup_id or self.backup_id, error=error, cause=cause)


# --- pure transitions ----------------------------------------------------------------------------

def happened_before(wall_ns: int, clock: Optional[Tuple[Optional[str], int]], other_wall_ns: Optional[int],
                    other_clock: Optional[Tuple[Optional[str], int]]) -> bool:
    """Whether a moment (wall clock, (boot id, CLOCK_MONOTONIC)) is before another one. Within one
    boot the monotonic clock decides (a wall clock stepped back by NTP does not reorder events);
    across boots, or without a boot id, the wall clock. Nothing is before an unknown moment."""
    if other_wall_ns is None:
        return False
    if clock is not None and other_clock is not None and clock[0] is not None and clock[0] == other_clock[0]:
        return clock[1] < other_clock[1]
    return wall_ns < other_wall_ns


def _event_clock(event: HookEvent) -> Optional[Tuple[Optional[str], int]]:
    return (event.boot_id, event.mono_ns) if event.boot_id else None


def is_stale(st: DomainState, event: HookEvent) -> bool:
    """The event is older than the last one the state took in (a replay, a file moved back from
    bad/): it must not override what newer events said."""
    last = (st.boot_id, st.last_event_mono_ns) if st.boot_id and st.last_event_mono_ns is not None else None
    return happened_before(event.wall_ns, _event_clock(event), st.last_event_ns, last)


def apply_reactions(st: DomainState, event: HookEvent, reactions: Sequence[Reaction]) -> DomainState:
    """The state after `event` and the reactions `events.decide` chose for it.

    An event changes only what it is newer than:

        running, clean shutdown, last event    only if not older than the last event taken in
        check required (CHECK_CHAIN)           only if newer than the start of the last backup:
                                               that backup validated the chain after the event
                                               (under full-required: remembered, see record_backup)
        full required (REQUIRE_FULL)           only if newer than the start of the last FULL
                                               backup (an incremental taken after the event
                                               did not know it: the full is still due)

    "Newer" is `happened_before`: the monotonic clock within one boot, else the wall clock.
    """
    if event.uuid != st.uuid:
        raise ValueError(f"event for {event.uuid} applied to the state of {st.uuid}")
    actions = {r.action for r in reactions}
    if not actions or actions == {Action.IGNORE}:
        return st
    chain = st.chain
    current = not is_stale(st, event)
    changes: Dict[str, Any] = dict(name=event.domain, last_event=event.kind.value, last_event_ns=event.wall_ns,
                                   boot_id=event.boot_id, last_event_mono_ns=event.mono_ns) if current else {}
    for r in reactions:
        if r.action is Action.MARK_RUNNING and current:
            changes.update(running=True, clean_shutdown=None)
        elif r.action is Action.MARK_STOPPED and current:
            changes.update(running=False, clean_shutdown=True)
        elif r.action is Action.MARK_UNCLEAN and current:
            changes.update(running=False, clean_shutdown=False)
        elif r.action is Action.REQUIRE_FULL and not _before(event, chain.last_full_ns, chain.full_clock):
            chain = _mark(chain, ChainStatus.FULL_REQUIRED, r.reason, event.wall_ns, _event_clock(event))
        elif (r.action is Action.CHECK_CHAIN and chain.status is not ChainStatus.NONE
              and not _before(event, chain.last_backup_ns, chain.backup_clock)):
            chain = _check(chain, r.reason, event.wall_ns, _event_clock(event))
    return dataclasses.replace(st, chain=chain, **changes)


def _newest(ns: int, clock, old_ns: Optional[int], old_clock) -> Tuple[int, Any]:
    if old_ns is not None and happened_before(ns, clock, old_ns, old_clock):
        return old_ns, old_clock
    return ns, clock


def _mark(chain: ChainState, status: ChainStatus, reason: str, ns: int, clock) -> ChainState:
    """Set check/full-required, remembering when the cause happened (the newest cause wins)."""
    ns, clock = _newest(ns, clock, chain.marked_ns, chain.marked_clock)
    return dataclasses.replace(chain, status=status, reason=reason, marked_ns=ns, marked_clock=clock)


def _check(chain: ChainState, reason: str, ns: int, clock) -> ChainState:
    """A chain check is due (from a cause at ns/clock): check-required over ok; under
    full-required only remembered, for when a backup settles the full but not the check."""
    ns, clock = _newest(ns, clock, chain.check_ns, chain.check_clock)
    chain = dataclasses.replace(chain, check_ns=ns, check_clock=clock)
    if chain.status is ChainStatus.OK:
        chain = _mark(chain, ChainStatus.CHECK_REQUIRED, reason, ns, clock)
    return chain


def _before(event: HookEvent, ns: Optional[int], clock: Optional[Tuple[str, int]]) -> bool:
    return happened_before(event.wall_ns, _event_clock(event), ns, clock)


def react(st: DomainState, event: HookEvent, shared_storage: bool = False) -> Tuple[DomainState, Tuple[Reaction, ...]]:
    """decide + apply_reactions, with the domain's context from the state. For a stale event
    (`is_stale`) that context is newer than the event; a prepare then still requires a full when
    the state says "running" (when in doubt, the chain restarts), unless a full came after it."""
    reactions = decide(event, st.context(shared_storage))
    return apply_reactions(st, event, reactions), reactions


def host_clock() -> Tuple[Optional[str], int]:
    """(boot id, CLOCK_MONOTONIC ns) now: the clock the hook stamps events with."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot: Optional[str] = f.read(64).strip().lower() or None
    except OSError:
        boot = None
    return boot, time.monotonic_ns()


def _known_clock(clock: Optional[Tuple[Optional[str], int]]) -> Optional[Tuple[str, int]]:
    """`clock` when its boot id is known, else None (host_clock could not read it)."""
    return (clock[0], clock[1]) if clock is not None and clock[0] else None


def record_backup(st: DomainState, backup_id: str, checkpoint: Optional[str], now_ns: int,
                  full: bool = False, clock: Optional[Tuple[Optional[str], int]] = None) -> DomainState:
    """A backup was committed (`now_ns` and `clock` (host_clock): when it started; `full`: it
    was a full): the chain continues from it. What the backup did not settle stays: full-required
    unless it was a full that started after the cause, check-required unless it started after
    the cause (events the agent takes in while a backup runs may be older or newer than it)."""
    started = _known_clock(clock)
    last_full, full_clock = (now_ns, started) if full else (st.chain.last_full_ns, st.chain.full_clock)
    old = st.chain
    chain = ChainState(ChainStatus.OK, "", backup_id, checkpoint, now_ns, last_full, started, full_clock)

    def after_start(ns: Optional[int], at) -> bool:
        return ns is not None and not happened_before(ns, at, now_ns, started)
    if old.check_ns is not None and after_start(old.check_ns, old.check_clock):
        chain = dataclasses.replace(chain, check_ns=old.check_ns, check_clock=old.check_clock)
    if old.status is ChainStatus.FULL_REQUIRED and (not full or after_start(old.marked_ns, old.marked_clock)):
        chain = dataclasses.replace(chain, status=old.status, reason=old.reason, marked_ns=old.marked_ns,
                                    marked_clock=old.marked_clock)
    elif old.status is ChainStatus.CHECK_REQUIRED and after_start(old.marked_ns, old.marked_clock):
        chain = dataclasses.replace(chain, status=old.status, reason=old.reason, marked_ns=old.marked_ns,
                                    marked_clock=old.marked_clock)
    elif chain.check_ns is not None:
        chain = _mark(chain, ChainStatus.CHECK_REQUIRED, "the domain started while the last backup ran: verify "
                      "checkpoints and bitmaps before the next one", chain.check_ns, chain.check_clock)
    return dataclasses.replace(st, chain=chain)


def require_full(st: DomainState, reason: str, now_ns: Optional[int] = None,
                 clock: Optional[Tuple[Optional[str], int]] = None) -> DomainState:
    """The next backup must be a full; `now_ns`/`clock`: when the cause happened (default: now)."""
    if now_ns is None:
        now_ns, clock = time.time_ns(), host_clock()
    return dataclasses.replace(st, chain=_mark(st.chain, ChainStatus.FULL_REQUIRED, reason, now_ns,
                                               clock if clock is not None and clock[0] else None))


def chain_checked(st: DomainState) -> DomainState:
    """CHECK_CHAIN found the checkpoints and bitmaps consistent."""
    if st.chain.status is not ChainStatus.CHECK_REQUIRED:
        return st
    return dataclasses.replace(st, chain=dataclasses.replace(st.chain, status=ChainStatus.OK, reason=""))


def apply_lifecycle(st: DomainState, reactions: Sequence[Reaction]) -> DomainState:
    """libvirt's own lifecycle event (events.lifecycle_reactions) refines what the hook said:
    only clean_shutdown and the chain change; the last hook event stays."""
    for r in reactions:
        if r.action is Action.MARK_UNCLEAN:
            st = dataclasses.replace(st, clean_shutdown=False)
        elif r.action is Action.REQUIRE_FULL:
            st = require_full(st, r.reason)
    return st


def seed_chain(st: DomainState, backup_id: str, checkpoint: Optional[str], backup_ns: int) -> DomainState:
    """The store holds a backup the state does not know (made before the agent ran, or its state
    was lost): remember it as the last backup, keeping any chain status already decided."""
    if st.chain.last_backup_id is not None:
        return st
    status = ChainStatus.OK if st.chain.status is ChainStatus.NONE else st.chain.status
    return dataclasses.replace(st, chain=dataclasses.replace(st.chain, status=status, last_backup_id=backup_id,
                                                             last_checkpoint=checkpoint, last_backup_ns=backup_ns))


def stale_jobs(records: Sequence[JobRecord], is_alive: Callable[[int, Optional[int]], bool]) -> Tuple[JobRecord, ...]:
    """Jobs recorded as running whose process is gone."""
    return tuple(r for r in records if r.status is JobStatus.RUNNING and not is_alive(r.pid, r.pid_start))


# --- (de)serialization ---------------------------------------------------------------------------

def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_json(x) for x in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def domain_from_dict(d: Dict[str, Any]) -> DomainState:
    chain = d.get("chain") or {}
    return DomainState(
        uuid=d["uuid"], name=d.get("name"), last_event=d.get("last_event"), last_event_ns=d.get("last_event_ns"),
        last_event_mono_ns=d.get("last_event_mono_ns"),
        boot_id=d.get("boot_id"), running=bool(d.get("running", False)), clean_shutdown=d.get("clean_shutdown"),
        job_id=d.get("job_id"), job_kind=d.get("job_kind"), updated_ns=int(d.get("updated_ns", 0)),
        chain=ChainState(status=ChainStatus(chain.get("status", "none")), reason=chain.get("reason", ""),
                         last_backup_id=chain.get("last_backup_id"), last_checkpoint=chain.get("last_checkpoint"),
                         last_backup_ns=chain.get("last_backup_ns"), last_full_ns=chain.get("last_full_ns"),
                         backup_clock=_clock(chain.get("backup_clock")), full_clock=_clock(chain.get("full_clock")),
                         marked_ns=chain.get("marked_ns"), marked_clock=_clock(chain.get("marked_clock")),
                         check_ns=chain.get("check_ns"), check_clock=_clock(chain.get("check_clock"))))


def _clock(raw: Any) -> Optional[Tuple[str, int]]:
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and isinstance(raw[0], str) and isinstance(raw[1], int):
        return raw[0], raw[1]
    return None


def job_from_dict(d: Dict[str, Any]) -> JobRecord:
    return JobRecord(job_id=d["job_id"], uuid=d["uuid"], kind=d["kind"], status=JobStatus(d["status"]),
                     started_ns=int(d["started_ns"]), updated_ns=int(d["updated_ns"]), pid=int(d["pid"]),
                     pid_start=d.get("pid_start"), bytes_done=int(d.get("bytes_done", 0)),
                     bytes_total=d.get("bytes_total"), backup_id=d.get("backup_id"), error=d.get("error"),
                     cause=d.get("cause"))


# --- I/O helpers ---------------------------------------------------------------------------------

def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    """durable.write_json_atomic of the state's dataclasses. Raises StateError."""
    try:
        durable.write_json_atomic(path, _to_json(obj))
    except OSError as e:
        raise StateError(path, f"cannot write: {e.strerror or e}") from e


def read_json(path: str) -> Optional[Any]:
    """The decoded file, or None if it does not exist. Raises StateError."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(path, f"cannot read: {e.strerror or e}") from e
    if len(raw) > MAX_STATE_FILE:
        raise StateError(path, f"larger than {MAX_STATE_FILE} bytes")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise StateError(path, f"not valid JSON: {e}") from e


def _check_uuid(uuid: str) -> str:
    u = uuid.lower()
    if len(u) != 36 or any((c != "-") if i in (8, 13, 18, 23) else (c not in "0123456789abcdef")
                           for i, c in enumerate(u)):
        raise ValueError(f"not a domain UUID: {uuid!r}")
    return u


def new_job_id(uuid: str, now_ns: int) -> str:
    stamp = datetime.fromtimestamp(now_ns / 1e9, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid[:8]}-{os.urandom(3).hex()}"


def _valid_job_id(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and all(c.isalnum() or c in "-_." for c in job_id) and not job_id.startswith(".")


# --- the state directory -------------------------------------------------------------------------

@dataclass(frozen=True)
class StateDir:
    root: str

    @property
    def domains_dir(self) -> str:
        return os.path.join(self.root, "agent", "domains")

    @property
    def jobs_dir(self) -> str:
        return os.path.join(self.root, "agent", "jobs")

    @property
    def locks_dir(self) -> str:
        return os.path.join(self.root, "locks")

    def domain_path(self, uuid: str) -> str:
        return os.path.join(self.domains_dir, _check_uuid(uuid) + ".json")

    def job_path(self, job_id: str) -> str:
        if not _valid_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return os.path.join(self.jobs_dir, job_id + ".json")

    def offline_marker_path(self, uuid: str) -> str:
        return hookformat.offline_marker_path(self.root, _check_uuid(uuid))

    def ensure(self) -> "StateDir":
        for d in (self.domains_dir, self.jobs_dir, self.locks_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        return self

    # -- domains ----------------------------------------------------------------------------------
    def load_domain(self, uuid: str) -> Optional[DomainState]:
        path = self.domain_path(uuid)
        raw = read_json(path)
        if raw is None:
            return None
        try:
            return domain_from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(path, f"not a domain state: {e}") from e

    def save_domain(self, st: DomainState, now_ns: Optional[int] = None) -> DomainState:
        st = dataclasses.replace(st, updated_ns=now_ns if now_ns is not None else time.time_ns())
        write_json_atomic(self.domain_path(st.uuid), st)
        return st

    @contextmanager
    def _short_lock(self, name: str) -> Iterator[None]:
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.locks_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update_domain(self, uuid: str, change: Callable[[DomainState], DomainState],
                      now_ns: Optional[int] = None) -> DomainState:
        """Read-modify-write of one domain's state, serialized across threads and processes."""
        uuid = _check_uuid(uuid)
        with self._short_lock(uuid + ".state.lock"):
            old = self.load_domain(uuid) or DomainState(uuid=uuid)
            new = change(old)
            if new.uuid != uuid:
                raise ValueError(f"state of {uuid} changed into the state of {new.uuid}")
            return self.save_domain(new, now_ns) if new != old else old

    def apply_event(self, event: HookEvent, shared_storage: bool = False) -> Tuple[DomainState, Tuple[Reaction, ...]]:
        """Decide the reactions to a hook event and apply them to the domain's state, atomically.
        -> (new state, reactions); the caller performs the reactions in `events.EFFECTS`.
        Events without a UUID change nothing (reactions say IGNORE)."""
        if event.uuid is None:
            return DomainState(uuid=""), decide(event)
        out: List[Tuple[Reaction, ...]] = []

        def change(st: DomainState) -> DomainState:
            new, reactions = react(st, event, shared_storage)
            out.append(reactions)
            return new
        return self.update_domain(event.uuid, change), out[-1]

    def list_domains(self) -> List[DomainState]:
        out = []
        for name in sorted(_listdir(self.domains_dir)):
            if name.endswith(".json") and not name.startswith("."):
                st = self.load_domain(name[:-5])
                if st is not None:
                    out.append(st)
        return out

    # -- lifecycle record (gc, verify, prune) -------------------------------------------------------
    @property
    def lifecycle_path(self) -> str:
        return os.path.join(self.root, "agent", "lifecycle.json")

    def load_lifecycle(self) -> Dict[str, Any]:
        """{gc: {...}, verify: {...}, prune: {uuid: {...}}}; {} if none yet or unreadable (it only
        informs: an unreadable one is replaced by the next record)."""
        try:
            raw = read_json(self.lifecycle_path)
        except StateError:
            return {}
        return raw if isinstance(raw, dict) else {}

    def update_lifecycle(self, change: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
        """Read-modify-write of the lifecycle record, serialized across threads and processes."""
        with self._short_lock("lifecycle.lock"):
            new = change(dict(self.load_lifecycle()))
            write_json_atomic(self.lifecycle_path, new)
            return new

    # -- the per-domain job lock ------------------------------------------------------------------
    @contextmanager
    def lock_domain(self, uuid: str, purpose: str = "backup", job_id: Optional[str] = None) -> Iterator[None]:
        """Exclusive, non-blocking: raises DomainBusy (with the holder's pid/purpose/job) if taken."""
        uuid = _check_uuid(uuid)
        os.makedirs(self.locks_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.locks_dir, uuid + ".domain.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StateError(path, f"cannot lock: {e.strerror}") from e
                raise DomainBusy(uuid, _read_holder(fd)) from e
            holder = {"pid": os.getpid(), "purpose": purpose, "job_id": job_id,
                      "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)           # releases the flock

    # -- jobs -------------------------------------------------------------------------------------
    def save_job(self, job: JobRecord) -> JobRecord:
        write_json_atomic(self.job_path(job.job_id), job)
        return job

    def load_job(self, job_id: str) -> Optional[JobRecord]:
        path = self.job_path(job_id)
        raw = read_json(path)
        if raw is None:
            return None
        try:
            return job_from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(path, f"not a job record: {e}") from e

    def list_jobs(self) -> List[JobRecord]:
        """Every readable job record, oldest first. Unreadable records are skipped, not fatal."""
        out = []
        for name in _listdir(self.jobs_dir):
            if name.endswith(".json") and not name.startswith("."):
                try:
                    job = self.load_job(name[:-5])
                except (StateError, ValueError):
                    continue
                if job is not None:
                    out.append(job)
        return sorted(out, key=lambda j: (j.started_ns, j.job_id))

    def begin_job(self, uuid: str, kind: str, now_ns: Optional[int] = None) -> JobRecord:
        """Record a running job and point the domain state at it. Call with `lock_domain` held."""
        now_ns = now_ns if now_ns is not None else time.time_ns()
        uuid = _check_uuid(uuid)
        pid = os.getpid()
        job = JobRecord(job_id=new_job_id(uuid, now_ns), uuid=uuid, kind=kind, status=JobStatus.RUNNING,
                        started_ns=now_ns, updated_ns=now_ns, pid=pid, pid_start=process_start_ticks(pid))
        self.save_job(job)
        self.update_domain(uuid, lambda st: dataclasses.replace(st, job_id=job.job_id, job_kind=kind), now_ns)
        return job

    def end_job(self, job: JobRecord, status: JobStatus, now_ns: Optional[int] = None, *,
                backup_id: Optional[str] = None, error: Optional[str] = None,
                cause: Optional[str] = None) -> JobRecord:
        now_ns = now_ns if now_ns is not None else time.time_ns()
        done = self.save_job(job.finished(status, now_ns, backup_id=backup_id, error=error, cause=cause))
        self.update_domain(job.uuid, lambda st: dataclasses.replace(st, job_id=None, job_kind=None)
                           if st.job_id == job.job_id else st, now_ns)
        return done

    def find_stale_jobs(self, is_alive: Callable[[int, Optional[int]], bool] = process_alive) -> Tuple[JobRecord, ...]:
        return stale_jobs(self.list_jobs(), is_alive)

    def recover_stale_jobs(self, now_ns: Optional[int] = None,
                           is_alive: Callable[[int, Optional[int]], bool] = process_alive) -> Tuple[JobRecord, ...]:
        """After an agent restart: mark stale running jobs ABANDONED, unlink their domains from them,
        and remove offline markers whose owner is gone. Returns the abandoned jobs (as now recorded)."""
        out = []
        for job in self.find_stale_jobs(is_alive):
            out.append(self.end_job(job, JobStatus.ABANDONED, now_ns,
                                    error=f"the agent process {job.pid} ended while the job ran", cause="abandoned"))
        for name in _listdir(self.locks_dir):
            if name.endswith(OFFLINE_SUFFIX):
                uuid = name[:-len(OFFLINE_SUFFIX)]
                marker = self.read_offline_marker(uuid)
                if marker is not None and not _marker_owner_alive(marker, is_alive):
                    self.clear_offline_backup(uuid)
        return tuple(out)

    def prune_jobs(self, older_than_ns: int) -> int:
        """Delete finished job records last updated before `older_than_ns`. -> count deleted."""
        n = 0
        for job in self.list_jobs():
            if job.status is not JobStatus.RUNNING and job.updated_ns < older_than_ns:
                try:
                    os.unlink(self.job_path(job.job_id))
                    n += 1
                except FileNotFoundError:
                    pass
        return n

    # -- offline backup marker (read by the hook) -------------------------------------------------
    def mark_offline_backup(self, uuid: str, name: str, job_id: Optional[str] = None,
                            now_ns: Optional[int] = None) -> str:
        """Make libvirt refuse to start the domain (the hook vetoes `prepare begin`). -> marker path.

        Race: a start that passed `prepare begin` just before the marker appeared is not stopped.
        So: write the marker FIRST, THEN check through libvirt that the domain is inactive; if it is
        active, clear the marker and do not run the offline backup. Clear it in a `finally`."""
        now_ns = now_ns if now_ns is not None else time.time_ns()
        pid = os.getpid()
        path = self.offline_marker_path(uuid)
        write_json_atomic(path, {
            "uuid": _check_uuid(uuid), "name": name, "job_id": job_id, "pid": pid,
            "pid_start": process_start_ticks(pid), "since_ns": now_ns,
            "since": datetime.fromtimestamp(now_ns / 1e9, timezone.utc).isoformat(timespec="seconds")})
        return path

    def clear_offline_backup(self, uuid: str) -> bool:
        path = self.offline_marker_path(uuid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(self.locks_dir)
        return True

    def read_offline_marker(self, uuid: str) -> Optional[Dict[str, Any]]:
        try:
            raw = read_json(self.offline_marker_path(uuid))
        except StateError:
            return {}          # present but unreadable: the hook refuses starts for it too
        return raw if isinstance(raw, dict) or raw is None else {}

    @contextmanager
    def offline_backup(self, uuid: str, name: str, job_id: Optional[str] = None) -> Iterator[str]:
        """`with sd.offline_backup(uuid, name, job):` marker present inside, removed on every exit."""
        path = self.mark_offline_backup(uuid, name, job_id)
        try:
            yield path
        finally:
            self.clear_offline_backup(uuid)


def _marker_owner_alive(marker: Dict[str, Any], is_alive: Callable[[int, Optional[int]], bool]) -> bool:
    pid = marker.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True        # no owner recorded: only an operator removes it
    start = marker.get("pid_start")
    return is_alive(pid, start if isinstance(start, int) else None)


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []

"""Hook events and what the agent does about them. Pure: no I/O, no clock.

libvirt calls the hook once per lifecycle step (order measured with libvirt 9.0):

    start (also paused)        prepare begin -> start begin -> started begin
    destroy/shutdown/save/kill stopped end -> release end
    restore                    restore begin -> prepare -> start -> started
    libvirtd restart, running  reconnect begin (from a thread, after libvirtd already answers)
    start refused by a hook    prepare begin (non-zero exit) -> stopped end -> release end
    incoming migration         migrate begin (then prepare -> start -> started)

`decide(event, context)` maps each event to a tuple of `Reaction`s -- data, so the table can be
read and tested without a daemon. The agent applies the state-changing ones with
`state.apply_reactions` and performs the others (CHECK_CHAIN, RECONCILE, FAIL_JOB) through the
libvirt API; it never acts inside the hook.

What a hook cannot tell: `stopped end` looks the same for a clean guest shutdown, `virsh destroy`
and QEMU killed with SIGKILL. After SIGKILL the bitmaps in the qcow2 are inconsistent; that is
found by CHECK_CHAIN at the next start (libvirt reports VIR_ERR_CHECKPOINT_INCONSISTENT), and the
agent may refine "clean" with the reason of libvirt's own lifecycle event.
"""

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ..errors import EkkoError

FORMAT_VERSION = 1


class EventKind(enum.Enum):
    PREPARE = "prepare"
    START = "start"
    STARTED = "started"
    STOPPED = "stopped"
    RELEASED = "release"
    MIGRATE = "migrate"
    RESTORE = "restore"
    RECONNECT = "reconnect"
    ATTACH = "attach"
    UNKNOWN = "unknown"


_BY_OP = {k.value: k for k in EventKind if k is not EventKind.UNKNOWN}


def classify(op: str, subop: str = "") -> EventKind:
    """Hook (operation, sub-operation) -> EventKind. The operation decides; libvirt pairs each
    operation with one sub-operation (begin for the start side, end for the stop side)."""
    return _BY_OP.get(op, EventKind.UNKNOWN)


class MalformedEvent(EkkoError):
    """An event file that does not follow the hook's format; `spool` quarantines it."""

    def __init__(self, reason: str, source: str = ""):
        self.reason = reason
        self.source = source
        super().__init__(f"malformed hook event{' ' + source if source else ''}: {reason}")


@dataclass(frozen=True)
class NovaInfo:
    name: Optional[str] = None
    project_uuid: Optional[str] = None
    user_uuid: Optional[str] = None
    flavor: Optional[str] = None


@dataclass(frozen=True)
class HookEvent:
    kind: EventKind
    op: str
    subop: str
    domain: str                 # name from argv (validated by the hook)
    uuid: Optional[str]         # from the XML; None when the XML was missing or unusable
    wall_ns: int
    mono_ns: int
    pid: int
    boot_id: Optional[str] = None
    extra: Optional[str] = None
    xml_status: str = "ok"      # ok | empty | oversize | unreadable | malformed | name-mismatch
    vetoed: bool = False        # prepare refused by the hook: the domain did not start
    nova: Optional[NovaInfo] = None


def _uuid(value: Any, field: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 36:
        raise MalformedEvent(f"{field} is not a UUID: {value!r}")
    v = value.lower()
    for i, c in enumerate(v):
        if (c != "-") if i in (8, 13, 18, 23) else (c not in "0123456789abcdef"):
            raise MalformedEvent(f"{field} is not a UUID: {value!r}")
    return v


def _str(raw: Mapping[str, Any], key: str, *, optional: bool = False, max_len: int = 255) -> Optional[str]:
    value = raw.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len or not value.isprintable():
        raise MalformedEvent(f"{key}: expected a printable string of at most {max_len} characters, got {value!r}")
    return value


def _int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedEvent(f"{key}: expected a non-negative integer, got {value!r}")
    return value


def parse_event(raw: Any, source: str = "") -> HookEvent:
    """The decoded JSON of one event file -> HookEvent. Raises MalformedEvent."""
    try:
        if not isinstance(raw, dict):
            raise MalformedEvent(f"expected a JSON object, got {type(raw).__name__}")
        if raw.get("v") != FORMAT_VERSION:
            raise MalformedEvent(f"unsupported format version {raw.get('v')!r} (this agent reads {FORMAT_VERSION})")
        op = _str(raw, "op", max_len=16)
        subop = _str(raw, "subop", max_len=16)
        nova_raw = raw.get("nova")
        nova = None
        if nova_raw is not None:
            if not isinstance(nova_raw, dict):
                raise MalformedEvent("nova: expected an object")
            nova = NovaInfo(name=_str(nova_raw, "name", optional=True),
                            project_uuid=_uuid(nova_raw.get("project_uuid"), "nova.project_uuid"),
                            user_uuid=_uuid(nova_raw.get("user_uuid"), "nova.user_uuid"),
                            flavor=_str(nova_raw, "flavor", optional=True))
        vetoed = raw.get("vetoed", False)
        if not isinstance(vetoed, bool):
            raise MalformedEvent(f"vetoed: expected true/false, got {vetoed!r}")
        return HookEvent(
            kind=classify(op, subop), op=op, subop=subop,
            domain=_str(raw, "domain", max_len=128),
            uuid=_uuid(raw.get("uuid"), "uuid"),
            wall_ns=_int(raw, "wall_ns"), mono_ns=_int(raw, "mono_ns"), pid=_int(raw, "pid"),
            boot_id=_uuid(raw.get("boot_id"), "boot_id"),
            extra=_str(raw, "extra", optional=True, max_len=64),
            xml_status=_str(raw, "xml", max_len=32),
            vetoed=vetoed, nova=nova)
    except MalformedEvent as e:
        if source and not e.source:
            raise MalformedEvent(e.reason, source) from e
        raise


# --- reactions -----------------------------------------------------------------------------------

class Action(enum.Enum):
    RECORD = "record"                # remember the event as the domain's last one; nothing else
    MARK_RUNNING = "mark-running"    # the domain runs: clean_shutdown is unknown until it stops
    MARK_STOPPED = "mark-stopped"    # libvirt saw it stop: clean shutdown (refine with libvirt's reason)
    MARK_UNCLEAN = "mark-unclean"    # the previous run ended without stop events (host crash)
    CHECK_CHAIN = "check-chain"      # verify checkpoints/bitmaps before the next incremental
    REQUIRE_FULL = "require-full"    # the next backup must be a full: the chain restarts
    RECONCILE = "reconcile"          # libvirtd restarted: compare jobs/checkpoints with libvirt
    FAIL_JOB = "fail-job"            # the domain stopped under a running backup job
    IGNORE = "ignore"                # unknown operation, or an event without a domain UUID


# Actions the daemon performs through libvirt (the others only change DomainState).
EFFECTS = frozenset((Action.CHECK_CHAIN, Action.RECONCILE, Action.FAIL_JOB))


@dataclass(frozen=True)
class Reaction:
    action: Action
    reason: str


@dataclass(frozen=True)
class DomainContext:
    """What the agent knows about the domain when the event arrives (built from DomainState)."""
    was_running: bool = False       # last event seen was a start-side one, no stop since
    job_running: bool = False       # a backup job of this agent runs on the domain
    job_offline: bool = False       # ... and it is an offline backup (the domain is meant to be off)
    shared_storage: bool = False    # the domain's disks are on storage shared with the other host


def decide(event: HookEvent, ctx: DomainContext = DomainContext()) -> Tuple[Reaction, ...]:
    """The reaction table:

        event       reactions
        --------    -----------------------------------------------------------------------
        PREPARE     RECORD; if the state says "running": MARK_UNCLEAN + REQUIRE_FULL
        START       RECORD
        STARTED     MARK_RUNNING + CHECK_CHAIN
        STOPPED     MARK_STOPPED (+ FAIL_JOB if an online backup job runs)
        RELEASED    MARK_STOPPED (+ FAIL_JOB if an online backup job runs)
        RECONNECT   MARK_RUNNING + RECONCILE
        MIGRATE     RECORD + CHECK_CHAIN if storage is shared, else REQUIRE_FULL
        RESTORE     RECORD (prepare/start/started follow and do the rest)
        ATTACH      RECORD
        UNKNOWN     IGNORE
        any event without a UUID, or a vetoed prepare: IGNORE / RECORD only
    """
    k = event.kind
    if k is EventKind.UNKNOWN:
        return (Reaction(Action.IGNORE, f"unknown hook operation {event.op!r}"),)
    if event.uuid is None:
        return (Reaction(Action.IGNORE, f"no domain UUID in the event (XML {event.xml_status})"),)
    if event.vetoed:
        return (Reaction(Action.RECORD, "start refused by the hook: offline backup in progress"),)

    unclean = (Reaction(Action.MARK_UNCLEAN, "the domain starts again but its previous run never reported a "
                                             "stop (host crash or power loss): its bitmaps may be incomplete"),
               Reaction(Action.REQUIRE_FULL, "previous run ended uncleanly"))
    if k is EventKind.PREPARE:
        return (Reaction(Action.RECORD, "domain is being prepared"),) + (unclean if ctx.was_running else ())
    if k in (EventKind.START, EventKind.ATTACH):
        return (Reaction(Action.RECORD, f"hook {event.op} {event.subop}"),)
    if k is EventKind.STARTED:
        return (Reaction(Action.MARK_RUNNING, "domain started"),
                Reaction(Action.CHECK_CHAIN, "domain started: verify checkpoints and bitmaps before the next backup"))
    if k in (EventKind.STOPPED, EventKind.RELEASED):
        out = (Reaction(Action.MARK_STOPPED, f"libvirt reported {event.op} {event.subop}"),)
        if ctx.job_running and not ctx.job_offline:
            out += (Reaction(Action.FAIL_JOB, "the domain stopped during the backup"),)
        return out
    if k is EventKind.RECONNECT:
        return (Reaction(Action.MARK_RUNNING, "libvirtd reconnected to the running domain"),
                Reaction(Action.RECONCILE, "libvirtd restarted: check running jobs and checkpoints against libvirt"))
    if k is EventKind.MIGRATE:
        if ctx.shared_storage:
            return (Reaction(Action.RECORD, "incoming migration"),
                    Reaction(Action.CHECK_CHAIN, "incoming migration on shared storage: the chain may continue"))
        return (Reaction(Action.RECORD, "incoming migration"),
                Reaction(Action.REQUIRE_FULL, "incoming migration without shared storage: the disks were copied, "
                                              "the chain restarts with a full backup on this host"))
    if k is EventKind.RESTORE:
        return (Reaction(Action.RECORD, "domain is being restored from a saved state"),)
    raise AssertionError(f"unhandled event kind {k}")   # pragma: no cover


# --- libvirt's own domain lifecycle events -------------------------------------------------------
# The hook cannot tell a clean stop from QEMU killed; libvirt's lifecycle event can (its detail).
# Numbers from libvirt.h (virDomainEventType and its detail enums), so this module needs no libvirt.

LV_STARTED, LV_STOPPED = 2, 5
LV_STARTED_FROM_SNAPSHOT = 3
LV_STOPPED_FAILED, LV_STOPPED_FROM_SNAPSHOT = 5, 6


def lifecycle_reactions(event: int, detail: int) -> Tuple[Reaction, ...]:
    """A libvirt domain lifecycle event (event, detail) -> what it changes in the chain state:

        STOPPED / FAILED            QEMU died (killed, crashed): bitmaps not written back
                                    -> MARK_UNCLEAN + REQUIRE_FULL
        STARTED|STOPPED / FROM_SNAPSHOT   the disks were reverted under the chain -> REQUIRE_FULL
        anything else               nothing (the hook events carry the rest)
    """
    if event == LV_STOPPED and detail == LV_STOPPED_FAILED:
        why = "QEMU ended unexpectedly (libvirt: stopped, failed): its dirty bitmaps were not saved"
        return (Reaction(Action.MARK_UNCLEAN, why), Reaction(Action.REQUIRE_FULL, why))
    if (event, detail) in ((LV_STARTED, LV_STARTED_FROM_SNAPSHOT), (LV_STOPPED, LV_STOPPED_FROM_SNAPSHOT)):
        return (Reaction(Action.REQUIRE_FULL, "the domain was reverted to a snapshot: its disks changed "
                                              "outside the chain"),)
    return ()

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
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from ..errors import EkkoError
from . import hookformat
from .hookformat import FORMAT_VERSION  # noqa: F401 -- re-exported


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
    domain: str                 # name from argv (hookformat.check_name)
    uuid: Optional[str]         # from the XML; None when the XML was missing or unusable
    wall_ns: int
    mono_ns: int
    pid: int
    boot_id: Optional[str] = None
    extra: Optional[str] = None
    xml_status: str = "ok"      # hookformat.XML_STATUSES, or "unknown"
    vetoed: bool = False        # prepare refused by the hook: the domain did not start
    nova: Optional[NovaInfo] = None
    notes: Tuple[str, ...] = field(default=(), compare=False)   # fields kept as unknown (hookformat)


def parse_event(raw: Any, source: str = "") -> HookEvent:
    """The decoded JSON of one event file -> HookEvent. Raises MalformedEvent.

    The rule is hookformat.check_event, the one the hook applies before it writes: the agent
    refuses exactly what the hook would not have written. Unusable informational fields (a bad
    extra, UUID, nova member, ...) are kept as unknown and listed in `notes`."""
    try:
        ev, notes = hookformat.check_event(raw)
    except hookformat.Refused as e:
        raise MalformedEvent(e.reason, source) from e
    nova = ev["nova"]
    return HookEvent(
        kind=classify(ev["op"], ev["subop"]), op=ev["op"], subop=ev["subop"], domain=ev["domain"],
        uuid=ev["uuid"], wall_ns=ev["wall_ns"], mono_ns=ev["mono_ns"], pid=ev["pid"], boot_id=ev["boot_id"],
        extra=ev["extra"], xml_status=ev["xml"], vetoed=ev["vetoed"],
        nova=NovaInfo(**nova) if nova else None, notes=notes)


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
        out: Tuple[Reaction, ...] = (Reaction(Action.MARK_STOPPED, f"libvirt reported {event.op} {event.subop}"),)
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

"""Events into the domain state: the hook's events from the spool, libvirt's lifecycle events from
the agent's connection. What each event means is decided by the pure tables (events.decide through
StateDir.apply_event, events.lifecycle_reactions); this module applies them and says so in the log.

The reactions that touch running jobs (RECONCILE, FAIL_JOB) are returned, not performed: the
agent hands them to its job runner, so that this module knows nothing of workers.
"""

import logging
from typing import Callable, Tuple

from .connection import LifecycleEvent
from .events import Action, HookEvent, Reaction, lifecycle_reactions
from .spool import Spool
from .state import StateDir, apply_lifecycle

log = logging.getLogger("ekko.agent")

JOB_EFFECTS = frozenset((Action.RECONCILE, Action.FAIL_JOB))      # of events.EFFECTS, those on jobs

HookEventHandler = Callable[[HookEvent], None]


def open_spool(spool: Spool) -> None:
    """At start: the spool exists, half-written files are gone, and events an older agent
    quarantined that the current rule accepts are back in line (processed in time order)."""
    spool.ensure()
    spool.cleanup_tmp()
    back = spool.requeue_bad()
    if back:
        log.warning("%d hook event(s) quarantined by an earlier agent are valid events: moved back from %s "
                    "and processed in time order (an event older than the state changes only what it "
                    "is newer than)", len(back), spool.bad_dir)


def drain_spool(spool: Spool, handle: HookEventHandler) -> None:
    """Every pending hook event, in order, through `handle`. A malformed one is quarantined; one
    that fails stays in the spool and is tried again next round (spool.drain keeps its order)."""
    res = spool.drain(handle)
    for name in res.quarantined:
        log.warning("malformed hook event %s moved to %s", name, spool.bad_dir)
    if res.error is not None:
        log.error("hook event %s not processed (kept, tried again): %s", res.stopped_at, res.error)


def apply_hook_event(sd: StateDir, ev: HookEvent, shared_storage: bool) -> Tuple[Reaction, ...]:
    """One hook event into its domain's state (an event older than the state changes only what it
    is newer than). -> the reactions the job runner must act on (JOB_EFFECTS)."""
    for note in ev.notes:
        log.warning("hook event %s %s %s (%s): %s", ev.domain, ev.op, ev.subop, ev.wall_ns, note)
    _st, reactions = sd.apply_event(ev, shared_storage=shared_storage)
    log.debug("hook event %s %s %s: %s", ev.domain, ev.op, ev.subop, ", ".join(r.action.value for r in reactions))
    for r in reactions:
        if r.action is Action.REQUIRE_FULL:
            log.warning("%s: %s: its next backup is a full", ev.domain, r.reason)
        elif r.action is Action.CHECK_CHAIN:
            # nothing to do now: the next backup redefines the checkpoint with REDEFINE_VALIDATE
            log.info("%s: %s (the next backup redefines and validates its checkpoint)", ev.domain, r.reason)
    return tuple(r for r in reactions if r.action in JOB_EFFECTS)


def apply_lifecycle_event(sd: StateDir, ev: LifecycleEvent) -> None:
    """libvirt's own view of a state change: it tells what a hook cannot (QEMU died -> the
    bitmaps cannot be trusted -> the next backup is a full)."""
    reactions = lifecycle_reactions(ev.event, ev.detail)
    if not reactions:
        return
    sd.update_domain(ev.uuid, lambda s: apply_lifecycle(s, reactions))
    for r in reactions:
        if r.action is Action.REQUIRE_FULL:
            log.warning("%s: %s: its next backup is a full", ev.name, r.reason)


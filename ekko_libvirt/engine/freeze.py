"""Application consistency: the guest's file systems frozen (guest-fsfreeze-freeze) around the one
engine transaction that creates the new generation and the point-in-time view, thawed right after.

    consistency: crash        never freeze; every manifest says `crash` (configured)
    consistency: auto         freeze when the guest agent answers; otherwise a crash-consistent
                              backup whose manifest says why (no channel, no answer, refused)
    consistency: filesystem   freeze, or fail the backup before anything is committed
                              (FreezeRequired, exit 1; the generations are merged back as for any
                              failure). Nova: a domain whose image asks for quiescing
                              (os_require_quiesce) gets it whatever the config says

    prepare()   before engine.begin(): asks the agent which file systems it would freeze (this is
                also the liveness probe, under the agent timeout; an agent that refuses the
                question, e.g. guest-get-fsinfo blocked, is alive: the freeze is tried, and the
                manifest names no mount points); decides freeze or not (pure:
                decide()); under `filesystem` a guest that cannot be frozen stops here, before
                QEMU is touched
    window      engine.begin() wraps its transaction in it: a thaw reaper is started, the guest
                frozen, the transaction runs, the guest thawed. A failed transaction leaves the
                window first (thaw), and only then does the engine undo.

Thaw is guaranteed three ways: every agent call has a hard timeout (guest_agent.py); a failed or
timed-out thaw hands over to the thaw reaper, which keeps thawing (its pipe closes without
"done"); and a SIGKILLed ekko closes that pipe too. A freeze that timed out may still happen
later in the guest: it is thawed the same way.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..errors import FreezeRequired, GuestAgentError
from ..faults import crash_point, pause_point
from .guest_agent import GuestAgent
from .reaper import Reaper

log = logging.getLogger(__name__)

AUTO, FILESYSTEM, CRASH = "auto", "filesystem", "crash"
POLICIES = (AUTO, FILESYSTEM, CRASH)


@dataclass(frozen=True)
class Consistency:
    """What a backup achieved: `filesystem` (frozen: mount points, freeze duration) or `crash` (why)."""
    level: str
    reason: str = ""
    mountpoints: Tuple[str, ...] = ()
    freeze_ms: Optional[int] = None

    def as_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"level": self.level}
        if self.level == FILESYSTEM:
            d.update(mountpoints=list(self.mountpoints), freeze_ms=self.freeze_ms)
        else:
            d["reason"] = self.reason
        return d


@dataclass(frozen=True)
class AgentAccess:
    """How an engine reaches its guest's agent: `agent`, or None and why not. `guest_running`
    False: no guest to freeze (a shut-off domain's images): nothing to be inconsistent about,
    so even `filesystem` goes on, recorded as crash-consistent with that reason."""
    agent: Optional[GuestAgent]
    reason: str = ""
    guest_running: bool = True


@dataclass(frozen=True)
class Decision:
    freeze: bool
    outcome: Optional[Consistency] = None    # set when not freezing
    error: Optional[str] = None              # set when the backup must not go on


def decide(policy: str, access: AgentAccess, probe_error: Optional[str] = None) -> Decision:
    """Pure: freeze or not, and what the manifest says when not. `probe_error`: why the agent
    did not answer the probe (None: it answered, or was not asked)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown consistency policy {policy!r}")
    if policy == CRASH:
        return Decision(False, Consistency(CRASH, "consistency: crash (configured)"))
    if not access.guest_running:
        return Decision(False, Consistency(CRASH, access.reason or "no guest is running"))
    why = access.reason if access.agent is None else probe_error
    if why is None:
        return Decision(True)
    if policy == FILESYSTEM:
        return Decision(False, error=why)
    return Decision(False, Consistency(CRASH, why))


class Quiescer:
    """One backup's freeze: prepare() once, then the window around the engine's transaction."""

    def __init__(self, policy: str, access: AgentAccess, target: str, reaper_log: str = ""):
        self.policy = policy
        self.access = access
        self.target = target
        self.reaper_log = reaper_log
        self.mountpoints: Tuple[str, ...] = ()
        self.decision: Optional[Decision] = None
        self.result: Optional[Consistency] = None

    def prepare(self) -> None:
        probe_error = None
        agent = self.access.agent
        if agent is not None and self.policy != CRASH and self.access.guest_running:
            try:
                self.mountpoints = tuple(agent.filesystems())
            except GuestAgentError as e:
                if e.refused:
                    log.info("%s: %s; freezing without knowing the mount points", self.target, e.reason)
                else:
                    probe_error = e.reason
        self.decision = decide(self.policy, self.access, probe_error)
        if self.decision.error is not None:
            raise FreezeRequired(self.target, self.decision.error)
        if not self.decision.freeze:
            self.result = self.decision.outcome
            log.info("%s: crash-consistent backup: %s", self.target, self.result.reason if self.result else "")

    def window(self) -> "FreezeWindow":
        return FreezeWindow(self)

    def close(self) -> None:
        if self.access.agent is not None:
            self.access.agent.close()


@dataclass
class FreezeWindow:
    """`with quiescer.window(): <the engine's transaction>`; see the module docstring."""
    q: Quiescer
    reaper: Optional[Reaper] = None
    frozen_at: float = 0.0
    frozen: bool = False
    notes: list = field(default_factory=list)

    def __enter__(self) -> "FreezeWindow":
        q = self.q
        if q.decision is None:
            q.prepare()
        if q.decision is None or not q.decision.freeze or q.access.agent is None:
            return self
        agent = q.access.agent
        self.reaper = Reaper({"kind": "thaw", "name": q.target, "agent": agent.reaper_fields()},
                             q.reaper_log).start() if q.reaper_log else None
        self.frozen_at = time.monotonic()
        try:
            agent.freeze()
        except GuestAgentError as e:
            self._thaw()                    # a freeze that timed out may still land in the guest
            if q.policy == FILESYSTEM:
                raise FreezeRequired(q.target, e.reason) from e
            q.result = Consistency(CRASH, f"guest-fsfreeze-freeze failed: {e.reason}")
            log.warning("%s: %s; the backup goes on crash-consistent", q.target, q.result.reason)
            return self
        self.frozen = True
        crash_point("while-frozen")
        pause_point("while-frozen")
        return self

    def __exit__(self, *exc) -> None:
        if not self.frozen:
            return
        thawed_at = self._thaw()
        ms = int(round((thawed_at - self.frozen_at) * 1000))
        self.q.result = Consistency(FILESYSTEM, mountpoints=self.q.mountpoints, freeze_ms=ms)
        log.info("%s: file systems frozen for %d ms: %s", self.q.target, ms, ", ".join(self.q.mountpoints))

    def _thaw(self) -> float:
        """Thaw now; when that fails, the reaper goes on thawing (its pipe closes without "done").
        -> when the thaw returned (or failed)."""
        agent = self.q.access.agent
        assert agent is not None
        try:
            agent.thaw()
        except GuestAgentError as e:
            log.warning("%s: thaw failed (%s): the thaw reaper keeps trying", self.q.target, e.reason)
            self.notes.append(f"thaw failed ({e.reason}); handed to the thaw reaper")
            if self.reaper is not None:
                self.reaper.abandon()
                self.reaper = None
            return time.monotonic()
        thawed_at = time.monotonic()
        if self.reaper is not None:
            self.reaper.done()
            self.reaper = None
        return thawed_at

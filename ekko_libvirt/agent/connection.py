"""The agent's own connection to libvirt: opened, kept alive, reopened after libvirtd restarts,
and the domain lifecycle events that come over it.

    EventLoop          libvirt's default event loop in a daemon thread: keepalive, the close
                       callback and domain events are delivered only while it runs
    LibvirtConnection  open -> keepalive (5 s x 3) -> close callback -> lifecycle subscription;
                       a lost connection is dropped and reopened, at most every RECONNECT_S;
                       `ensure()` says when it came back after an earlier one, because what
                       libvirtd did while it restarted must then be reconciled (the caller does)

The callbacks run in libvirt's event thread: they only queue and set `wakeup`, so that every
decision is taken in the agent's loop, in one thread. Backup workers do not use this
connection: each opens its own (job_runner).
libvirt-python has no type stubs: its objects are typed `Any` here.
"""

import logging
import queue
import threading
import time
from typing import Any, List, NamedTuple, Optional

log = logging.getLogger("ekko.agent")

RECONNECT_S = 2.0


class EventLoop:
    """libvirt's default event loop, run in a daemon thread. Registered once per process, before
    the first connection is opened (libvirt requires that order for events on it)."""

    def __init__(self) -> None:
        import libvirt
        self.libvirt = libvirt
        libvirt.virEventRegisterDefaultImpl()
        libvirt.virEventAddTimeout(500, lambda _t, _o: None, None)     # so the loop sees `stopping`
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ekko-libvirt-events", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            if self.libvirt.virEventRunDefaultImpl() < 0:
                time.sleep(0.1)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(2)


class LifecycleEvent(NamedTuple):
    """One VIR_DOMAIN_EVENT_ID_LIFECYCLE callback, as events.lifecycle_reactions takes it."""
    uuid: str
    name: str
    event: int
    detail: int


class LibvirtConnection:
    def __init__(self, uri: str, wakeup: threading.Event):
        self.uri = uri
        self.wakeup = wakeup                # set when the loop has something to do at once
        self.conn: Any = None               # libvirt.virConnect, or None while libvirt is not reachable
        self._lost = False                  # set by the close callback (libvirt's event thread)
        self._ever_connected = False
        self._next_attempt = 0.0
        self._events: "queue.SimpleQueue[LifecycleEvent]" = queue.SimpleQueue()
        self._loop: Optional[EventLoop] = None

    def start(self) -> None:
        """The event loop, then the first connection attempt (libvirtd may not answer yet: the
        agent starts anyway and keeps trying)."""
        self._loop = EventLoop()
        self.ensure()

    def ensure(self) -> bool:
        """Connected if it can be. -> True when a connection was opened again after an earlier
        one was lost (libvirtd restarted: its jobs and checkpoints must be reconciled)."""
        import libvirt
        if self.conn is not None:
            if not self._lost and self.conn.isAlive():
                return False
            log.warning("lost the connection to libvirt at %s (libvirtd restarted?): reconnecting", self.uri)
            self._drop()
        if time.monotonic() < self._next_attempt:
            return False
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            self._next_attempt = time.monotonic() + RECONNECT_S
            log.debug("libvirt at %s not reachable: %s", self.uri, e.get_error_message())
            return False
        try:
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._on_close, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        except libvirt.libvirtError as e:
            log.warning("libvirt at %s: cannot subscribe to domain events: %s", self.uri, e.get_error_message())
            conn.close()
            self._next_attempt = time.monotonic() + RECONNECT_S
            return False
        self.conn, self._lost = conn, False
        reconnected, self._ever_connected = self._ever_connected, True
        return reconnected

    def take_lifecycle_events(self) -> List[LifecycleEvent]:
        """The lifecycle events received since the last call, oldest first."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def close(self) -> None:
        self._drop()
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        for step in (conn.unregisterCloseCallback, conn.close):
            try:
                step()
            except Exception as e:   # noqa: BLE001 -- a dead connection fails every call; it goes anyway
                log.debug("closing the libvirt connection: %s", e)

    def _on_close(self, _conn: Any, _reason: int, _opaque: Any) -> None:      # libvirt's event thread
        self._lost = True
        self.wakeup.set()

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:   # event thread
        self._events.put(LifecycleEvent(dom.UUIDString().lower(), dom.name(), event, detail))
        self.wakeup.set()

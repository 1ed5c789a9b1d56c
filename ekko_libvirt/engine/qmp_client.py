"""A small synchronous face on qemu.qmp's async QMPClient: connect with a deadline, execute
with a deadline, and wait for an event with a deadline. Errors become ekko errors with the
command, the QEMU error class and message, and the cause kept."""

import asyncio
import logging
import os
from typing import Any, Callable, Dict, Optional

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from ..errors import EngineError, QMPUnavailable

log = logging.getLogger(__name__)

WATCHED_EVENTS = ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", "BLOCK_EXPORT_DELETED", "BLOCK_JOB_ERROR")


class QMPCommandError(EngineError):
    def __init__(self, command: str, error_class: str, desc: str):
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {desc} ({error_class})")


class QMPDisconnected(EngineError):
    """The QMP connection is gone (QEMU exited or closed it): no later command can succeed."""


class QMPConnection:
    def __init__(self, socket_path: str, timeout: float = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("ekko")
        self._listener = EventListener(WATCHED_EVENTS)
        self._client.register_listener(self._listener)

    def _run(self, coro, timeout: Optional[float]):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def connect(self, timeout: float = 10.0) -> "QMPConnection":
        if not os.path.exists(self.socket_path):
            raise QMPUnavailable(self.socket_path, "no such socket")
        try:
            self._run(self._client.connect(self.socket_path), timeout)
        except asyncio.TimeoutError as e:
            self._close_quietly()
            raise QMPUnavailable(self.socket_path, f"no QMP greeting within {timeout:.0f} s") from e
        except (QMPError, OSError) as e:
            self._close_quietly()
            raise QMPUnavailable(self.socket_path, str(e) or type(e).__name__) from e
        return self

    def execute(self, command: str, args: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> Any:
        log.debug("qmp> %s %s", command, args or "")
        try:
            return self._run(self._client.execute(command, args or {}), timeout or self.timeout)
        except ExecuteError as e:
            raise QMPCommandError(command, e.error_class, e.error.error.desc) from e
        except asyncio.TimeoutError as e:
            raise EngineError(f"QMP {command}: no answer within {timeout or self.timeout:.0f} s") from e
        except QMPError as e:
            raise QMPDisconnected(f"QMP {command}: lost the connection to {self.socket_path} "
                                  f"(did QEMU exit?): {e}") from e

    def wait_event(self, name: str, match: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """Wait for event `name` whose data satisfies `match`; events for others are dropped."""
        async def _wait():
            while True:
                ev = await self._listener.get()
                data = ev.get("data", {})       # a JSON object in every QMP event that has data
                if ev["event"] == name and isinstance(data, dict) and match(data):
                    return ev
        try:
            return self._run(_wait(), timeout)
        except asyncio.TimeoutError as e:
            raise EngineError(f"QEMU did not send {name} within {timeout:.0f} s") from e

    def drain_events(self) -> None:
        self._listener.clear()

    def _close_quietly(self) -> None:
        try:
            self._loop.run_until_complete(self._client.disconnect())
        except Exception:  # noqa: BLE001 - closing after a failure: the first error is what matters
            pass

    def close(self) -> None:
        self._close_quietly()
        self._loop.close()

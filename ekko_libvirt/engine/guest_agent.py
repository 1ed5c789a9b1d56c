"""The QEMU guest agent (qemu-ga in the guest), reached two ways, every call under a hard timeout:

    SocketAgent    plain QEMU: the host end of the virtio-serial channel org.qemu.guest_agent.0, a
                   unix socket QEMU listens on (`-chardev socket,path=...,server=on,wait=off`),
                   given in the config (targets.<name>.guest_agent_socket)
    LibvirtAgent   a libvirt domain: virDomainFSFreeze / FSThaw / GetFSInfo; libvirt owns the
                   channel. A libvirt call cannot be interrupted, so it runs in a thread that ekko
                   stops waiting for at the deadline (libvirt's own agent timeout ends it later)

The socket protocol is QMP-like JSON, one command at a time, but it has no greeting and no
framing against stale replies: a reply to a command whose client gave up (a timeout, a killed
ekko) is still delivered to the next client. So every connection starts with
`guest-sync-delimited` and a random id, preceded by 0xFF (qemu-ga resets its parser on it); the
agent answers with 0xFF before the reply, and everything before it, or any reply with another
id, is someone else's and dropped. A call that times out closes the connection: the next call
reconnects and syncs again.

None of this decides anything: freeze.py says when to freeze and what a failure means.
"""

import json
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from ..errors import GuestAgentError

log = logging.getLogger(__name__)

CHANNEL = "org.qemu.guest_agent.0"
DELIMITER = b"\xff"
MAX_REPLY = 4 << 20         # guest-get-fsinfo of a guest with many mounts is a few KiB


class GuestAgent(Protocol):
    describe: str

    def filesystems(self) -> List[str]: ...     # mount points the agent would freeze

    def freeze(self) -> int: ...                # number of file systems frozen

    def thaw(self) -> int: ...

    def is_frozen(self) -> Optional[bool]: ...  # None: cannot be asked (libvirt)

    def reaper_fields(self) -> Dict[str, Any]: ...  # how a reaper process reaches the same agent

    def close(self) -> None: ...


class SocketAgent:
    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self.describe = f"guest agent socket {path}"
        self.sock: Optional[socket.socket] = None
        self.buf = b""

    # -- the calls -------------------------------------------------------------------------
    def filesystems(self) -> List[str]:
        return sorted(fs.get("mountpoint", "?") for fs in self.call("guest-get-fsinfo") or [])

    def freeze(self) -> int:
        return int(self.call("guest-fsfreeze-freeze"))

    def thaw(self) -> int:
        return int(self.call("guest-fsfreeze-thaw"))

    def is_frozen(self) -> Optional[bool]:
        return self.call("guest-fsfreeze-status") == "frozen"

    def reaper_fields(self) -> Dict[str, Any]:
        return {"kind": "socket", "path": self.path, "timeout": self.timeout}

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def call(self, command: str, arguments: Optional[dict] = None) -> Any:
        """One command; its `return`, or GuestAgentError (with timed_out) within self.timeout."""
        deadline = time.monotonic() + self.timeout
        try:
            if self.sock is None:
                self._connect(deadline)
            msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
            self._send(json.dumps(msg).encode() + b"\n", deadline)
            reply = self._read_json(deadline)
        except GuestAgentError:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise GuestAgentError(f"{self.describe}: {command}: {e.strerror or e}") from e
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise GuestAgentError(f"{self.describe}: {command} refused: {err.get('desc', reply['error'])}",
                                  refused=True)
        return reply.get("return")

    # -- the wire --------------------------------------------------------------------------
    def _connect(self, deadline: float) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            s.connect(self.path)
        except FileNotFoundError as e:
            s.close()
            raise GuestAgentError(f"{self.describe} does not exist (no guest agent channel)") from e
        except OSError as e:
            s.close()
            raise GuestAgentError(f"{self.describe}: cannot connect: {e.strerror or e}") from e
        self.sock = s
        sync_id = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        self._send(DELIMITER + json.dumps({"execute": "guest-sync-delimited",
                                           "arguments": {"id": sync_id}}).encode() + b"\n", deadline)
        while DELIMITER not in self.buf:        # whatever came before the delimiter is stale
            self.buf = self._recv(deadline)[-MAX_REPLY:]
        self.buf = self.buf[self.buf.rindex(DELIMITER) + 1:]
        while True:
            reply = self._read_json(deadline)
            if reply.get("return") == sync_id:
                return
            log.debug("%s: dropped a stale reply %r", self.describe, reply)

    def _send(self, data: bytes, deadline: float) -> None:
        assert self.sock is not None
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            self.sock.sendall(data)
        except socket.timeout as e:
            raise GuestAgentError(f"{self.describe}: no room to send in {self.timeout:g} s", timed_out=True) from e

    def _recv(self, deadline: float) -> bytes:
        assert self.sock is not None
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise GuestAgentError(f"{self.describe}: the guest agent did not answer within {self.timeout:g} s "
                                  "(not running in the guest, or hung)", timed_out=True)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise GuestAgentError(f"{self.describe}: QEMU closed the channel")
        return self.buf + chunk

    def _read_json(self, deadline: float) -> dict:
        while True:
            line, nl, rest = self.buf.partition(b"\n")
            if nl:
                self.buf = rest
                line = line.strip().lstrip(DELIMITER)
                if not line:
                    continue
                try:
                    reply = json.loads(line)
                except ValueError:
                    log.debug("%s: dropped a line that is not JSON: %r", self.describe, line[:200])
                    continue
                if isinstance(reply, dict):
                    return reply
                continue
            if len(self.buf) > MAX_REPLY:
                raise GuestAgentError(f"{self.describe}: a reply longer than {MAX_REPLY} bytes")
            self.buf = self._recv(deadline)


def _in_thread(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """fn() with a deadline: a daemon thread ekko stops waiting for at the deadline."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    t = threading.Thread(target=run, name=f"guest-agent {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise GuestAgentError(f"{what}: no answer within {timeout:g} s (libvirt still waits on the guest agent)",
                              timed_out=True)
    if "error" in box:
        raise box["error"]
    return box.get("value")


class LibvirtAgent:
    def __init__(self, dom, timeout: float):
        self.dom = dom
        self.timeout = timeout
        self.describe = f"guest agent of domain {dom.name()}"

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        import libvirt
        try:
            return _in_thread(fn, self.timeout, f"{self.describe}: {what}")
        except libvirt.libvirtError as e:
            # an agent that answered with an error is alive; one libvirt cannot reach is not
            refused = e.get_error_code() in (getattr(libvirt, "VIR_ERR_OPERATION_UNSUPPORTED", -1),
                                             getattr(libvirt, "VIR_ERR_AGENT_COMMAND_FAILED", -1))
            raise GuestAgentError(f"{self.describe}: {what}: {e.get_error_message() or e}", refused=refused) from e

    def filesystems(self) -> List[str]:
        return sorted(fs[0] for fs in self._call("getFSInfo", lambda: self.dom.fsInfo(0)) or [])

    def freeze(self) -> int:
        return int(self._call("fsFreeze", lambda: self.dom.fsFreeze(None, 0)))

    def thaw(self) -> int:
        return int(self._call("fsThaw", lambda: self.dom.fsThaw(None, 0)))

    def is_frozen(self) -> Optional[bool]:
        return None

    def reaper_fields(self) -> Dict[str, Any]:
        return {"kind": "libvirt", "uri": self.dom.connect().getURI(), "uuid": self.dom.UUIDString(),
                "timeout": self.timeout}

    def close(self) -> None:
        pass


def channel_state(domain_xml: str) -> Tuple[bool, str]:
    """(has the channel, why not / its state) from a domain's live XML (pure)."""
    import xml.etree.ElementTree as ET
    root = ET.fromstring(domain_xml)
    for ch in root.findall("./devices/channel"):
        target = ch.find("target")
        if target is not None and target.get("name") == CHANNEL:
            state = target.get("state", "")
            if state == "disconnected":
                return False, f"the {CHANNEL} channel is disconnected (qemu-ga is not running in the guest)"
            return True, state or "present"
    return False, f"the domain has no guest agent channel ({CHANNEL})"


def agent_from_fields(fields: Dict[str, Any]) -> GuestAgent:
    """The reaper's way back to the agent a backup froze (reaper_fields)."""
    if fields["kind"] == "socket":
        return SocketAgent(fields["path"], float(fields["timeout"]))
    import libvirt
    conn = libvirt.open(fields["uri"])
    return LibvirtAgent(conn.lookupByUUIDString(fields["uuid"]), float(fields["timeout"]))

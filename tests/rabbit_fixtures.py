"""The real RabbitMQ of the bus tests (`from rabbit_fixtures import rabbit  # noqa: F401`).

- rabbit (session): one RabbitServer (tests/harness/rabbitmq.py) in a temp dir, shared by every
  module that imports it (each import makes its own session fixture: without the shared instance a
  second module would boot a second node); the last user stops it by PID (the node, then its own
  epmd) and checks every process it started is gone. A test that restarts it leaves it running.
  Missing rabbitmq-server: skip, or fail under CI=true (harness.in_ci).
"""

import shutil
import tempfile

import pytest

from harness import in_ci
from harness.rabbitmq import RabbitServer, missing_prerequisites

_SHARED = {"server": None, "dir": None, "users": 0}


def require_rabbit(missing=None, environ=None) -> None:
    missing = missing_prerequisites() if missing is None else missing
    if not missing:
        return
    msg = "RabbitMQ is not installed (missing: " + ", ".join(missing) + "; Debian: rabbitmq-server)"
    if in_ci(environ):
        pytest.fail(msg + "; CI must run the message bus tests", pytrace=False)
    pytest.skip(msg)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def rabbit():
    require_rabbit()
    if _SHARED["server"] is None:
        d = tempfile.mkdtemp(prefix="ekko-rabbit-", dir="/tmp")
        server = RabbitServer(d)
        try:
            server.start()
        except BaseException:
            server.stop()
            shutil.rmtree(d, ignore_errors=True)
            raise
        _SHARED.update(server=server, dir=d)
    _SHARED["users"] += 1
    try:
        yield _SHARED["server"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            server, d = _SHARED["server"], _SHARED["dir"]
            _SHARED.update(server=None, dir=None)
            server.stop()
            shutil.rmtree(d, ignore_errors=True)
            left = [p for p in server.all_pids if _alive(p)]
            assert not left, f"RabbitMQ processes still running after stop(): {left}"

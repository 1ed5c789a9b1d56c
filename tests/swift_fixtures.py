"""pytest fixtures for a real Swift: import them into a test module
(`from tests.swift_fixtures import swift_server, make_swift_store`) or list this module in
`pytest_plugins`.

- swift_server (session): one SwiftServer in a temp dir for the whole run; stopped at the end, and
  the teardown checks that no process it started is left.
- make_swift_store (function): factory for SwiftStore objects on that server, each in a fresh
  container unless one is given; keyword arguments override SwiftConfig fields.

Without Swift installed the tests are skipped, except under CI (env CI=true/1/yes): there a
missing Swift is a failure, so a broken CI image cannot pass by skipping.
"""

import uuid

import pytest

from ekko_libvirt.store.swift import SwiftConfig, SwiftStore
from tests.harness import in_ci
from tests.harness.swift import SwiftServer, missing_prerequisites


def require_swift(missing=None, environ=None) -> None:
    """Skip (or fail under CI) when this machine cannot run SwiftServer."""
    missing = missing_prerequisites() if missing is None else missing
    if not missing:
        return
    msg = "OpenStack Swift is not installed (missing: " + ", ".join(missing) + ")"
    if in_ci(environ):
        pytest.fail(msg + "; CI must run the Swift tests", pytrace=False)
    pytest.skip(msg)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def swift_server(tmp_path_factory):
    require_swift()
    server = SwiftServer(tmp_path_factory.mktemp("swift"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        left = [p for p in server.all_pids if _alive(p)]
        assert not left, f"Swift processes still running after stop(): {left}"


@pytest.fixture
def make_swift_store(swift_server):
    stores = []

    def make(container=None, account="test", **overrides) -> SwiftStore:
        user, key = swift_server.credentials(account)
        values = dict(
            auth_url=swift_server.auth_url,
            user=user,
            key=key,
            container=container or f"ekko-{uuid.uuid4().hex[:12]}",
            retries=3,
            starting_backoff=0.1,
            max_backoff=1.0,
            timeout=30.0,
        )
        values.update(overrides)
        store = SwiftStore(SwiftConfig(**values))
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()

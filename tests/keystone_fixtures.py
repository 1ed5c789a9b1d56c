"""pytest fixtures for a real Keystone: import them into a test module
(`from tests.keystone_fixtures import keystone_server`) or list this module in `pytest_plugins`.

- keystone_server (session): one KeystoneServer (tests/harness/keystone.py) in a temp dir for the
  whole run, with projects p1, p2, a reader and a member in each, and the admin; stopped at the
  end, and the teardown checks that no process it started is left.

Without the Keystone venv (`python -m tests.harness.keystone install`) the tests are skipped,
except under CI (env CI=true/1/yes): there it is a failure, so a broken CI image cannot pass by
skipping.
"""

import pytest

from tests.harness import in_ci
from tests.harness.keystone import KeystoneServer, missing_prerequisites


def require_keystone(missing=None, environ=None) -> None:
    """Skip (or fail under CI) when this machine cannot run KeystoneServer."""
    missing = missing_prerequisites() if missing is None else missing
    if not missing:
        return
    msg = ("Keystone is not installed (missing: " + ", ".join(missing) + "; "
           "run: python -m tests.harness.keystone install)")
    if in_ci(environ):
        pytest.fail(msg + "; CI must run the Keystone tests", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def keystone_server(tmp_path_factory):
    require_keystone()
    server = KeystoneServer(str(tmp_path_factory.mktemp("keystone")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        left = server.running_pids()
        assert not left, f"Keystone processes still running after stop(): {left}"

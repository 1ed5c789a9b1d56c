"""pytest fixture for a real Glance (tests/harness/glance.py): import `glance_server` into a test
module. Session scope: one Glance for the run, stopped at the end, and the teardown checks that
no process it started is left. The Glance venv is made on first use (a cache directory, ~1 min);
where it cannot be (no Python 3.11, no package index) the tests are skipped, except under CI
(env CI=true/1/yes), where a missing Glance is a failure."""

import subprocess

import pytest

from tests.harness import in_ci
from tests.harness.glance import GlanceServer, install, missing_prerequisites


def require_glance() -> None:
    if missing_prerequisites():
        try:
            install()
        except (OSError, subprocess.CalledProcessError) as e:
            msg = f"Glance could not be installed for the tests ({e}); missing: {missing_prerequisites()}"
            if in_ci():
                pytest.fail(msg + "; CI must run the Glance tests", pytrace=False)
            pytest.skip(msg)


@pytest.fixture(scope="session")
def glance_server(tmp_path_factory):
    require_glance()
    server = GlanceServer(str(tmp_path_factory.mktemp("glance")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        left = server.running_pids()
        assert not left, f"Glance processes still running after stop(): {left}"

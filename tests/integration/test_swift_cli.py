"""The CLI on a real Swift: what -v / -vv print (never a token or the key; no 404s of existence
checks at -v), and the warning while swiftclient retries an unreachable store."""

import logging
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import Ekko, make_config, manifest_of, swift_section  # noqa: E402
from ekko_libvirt.store import catalog  # noqa: E402
from ekko_libvirt.errors import StoreError  # noqa: E402
from ekko_libvirt.store.swift import SwiftConfig, SwiftStore  # noqa: E402
from tests.swift_fixtures import make_swift_store, swift_server  # noqa: E402,F401

SEG = 64 * 1024


def _token(server) -> str:
    """The account's token: tempauth hands out the same one to every client until it expires,
    so it is the one the CLI's requests carried."""
    store = SwiftStore(SwiftConfig(auth_url=server.auth_url, user=server.user, key=server.key, container="x"))
    try:
        url, token = store._conn().get_auth()
    finally:
        store.close()
    assert token.startswith("AUTH_tk")
    return token


@pytest.fixture
def swift_ekko(workdir, swift_server):
    cfg = make_config(workdir, {})
    cfg["store"] = swift_section(swift_server)
    return Ekko(workdir, cfg)


def test_verbose_prints_no_token_no_key_and_no_404_of_existence_checks(swift_ekko, swift_server):
    ekko = swift_ekko
    # an empty store first: listing a container that does not exist yet is a 404
    outputs = {"-v list (empty)": ekko.run("-v", "list")}
    store = ekko.store()
    m = manifest_of(store, [os.urandom(SEG), None, b"x" * SEG], SEG)
    catalog.commit(store, m)
    for name, args in {"-v list": ("-v", "list"), "-v show": ("-v", "show", m.backup_id),
                       "-v show by target": ("-v", "show", "t1"), "-v verify": ("-v", "verify"),
                       "-v protect": ("-v", "protect", m.backup_id),
                       "-v show missing": ("-v", "show", "nosuchbackup"),
                       "-vv list": ("-vv", "list"), "-vv show": ("-vv", "show", m.backup_id)}.items():
        outputs[name] = ekko.run(*args, check=False)
    token = _token(swift_server)
    for name, p in outputs.items():
        text = p.stdout + p.stderr
        assert token not in text and token[:12] not in text and "AUTH_tk" not in text, (name, text)
        assert swift_server.key not in text, (name, text)
        assert p.returncode == (2 if "missing" in name else 0), (name, text)
        if name.startswith("-v "):
            assert "404" not in text and "X-Auth-Token" not in text and "REQ:" not in text, (name, text)
    # -vv shows swiftclient's request lines (the redaction is what hides the token there)
    assert "REQ: curl" in outputs["-vv show"].stderr and "X-Auth-Token: ***" in outputs["-vv show"].stderr


def _closed_port() -> socket.socket:
    """A bound, never listening TCP socket: connecting to it is refused, and no one else gets
    the port while the test holds it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def test_an_unreachable_store_is_told_once_while_retried(workdir):
    closed = _closed_port()
    port = closed.getsockname()[1]
    try:
        cfg = make_config(workdir, {})
        cfg["store"] = {"type": "swift", "auth_url": f"http://127.0.0.1:{port}/auth/v1.0", "user": "acct:user",
                        "key": "k3y-never-shown", "retries": 3, "starting_backoff": 0.01, "max_backoff": 0.02}
        ekko = Ekko(workdir, cfg)
        for verbose in ((), ("-v",)):
            p = ekko.run(*verbose, "list", check=False)
            assert p.returncode == 1, p.stderr
            told = [line for line in p.stderr.splitlines() if "retrying" in line]
            assert len(told) == 1, p.stderr
            assert told[0].startswith("ekko: WARNING: swift ") and f"127.0.0.1:{port}/auth/v1.0" in told[0]
            assert "Connection refused" in told[0] and "up to 3 times" in told[0]
            assert p.stderr.index(told[0]) < p.stderr.index("ekko: error: ")
            assert "k3y-never-shown" not in p.stderr + p.stdout
    finally:
        closed.close()


def test_each_outage_is_told_once(make_swift_store, swift_server, caplog):
    store = make_swift_store(retries=2, starting_backoff=0.01, max_backoff=0.02)
    store.put("before", b"ok")
    token = store._conn().token
    caplog.set_level(logging.WARNING, logger="ekko_libvirt.store.swift")

    def told():
        return [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    for outage in (1, 2):
        swift_server.stop_proxy()
        try:
            for _ in range(2):                      # two failed requests, one outage: one warning
                with pytest.raises(StoreError):
                    store.put("during", b"data")
        finally:
            swift_server.start_proxy()
        assert len(told()) == outage, told()
        store.put("after", b"ok")                   # back: the next outage is told again
    msg = told()[0]
    assert swift_server.storage_url() in msg and "is unreachable" in msg and "Connection refused" in msg
    assert token not in msg and swift_server.key not in msg

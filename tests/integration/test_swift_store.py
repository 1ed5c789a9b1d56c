"""The Store contract on MemoryStore, LocalStore and SwiftStore (a real Swift all-in-one), plus
Swift-only cases: listing beyond one 10,000-name page, per-thread connections, MD5 checking,
proxy down, object server killed mid-series, and cross-account isolation.

Runtime: ~20 s, most of it Swift start-up and the fault cases. The listing test with 10,050
real PUTs (60-100 s here) runs only with EKKO_SWIFT_SLOW=1; the default one seeds 10,050 names into
the container database and lists them through the proxy.
"""

import hashlib
import os
import random
import re
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `tests.*` importable however pytest was started
    sys.path.insert(0, str(ROOT))

from ekko_libvirt.errors import ConfigError, ObjectNotFound, StoreError  # noqa: E402
from ekko_libvirt.store import swift as swift_module  # noqa: E402
from ekko_libvirt.store.local import LocalStore  # noqa: E402
from ekko_libvirt.store.memory import MemoryStore  # noqa: E402
from ekko_libvirt.store.swift import SwiftConfig  # noqa: E402
from tests.swift_fixtures import make_swift_store, require_swift, swift_server  # noqa: E402,F401


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(params=["memory", "local", "swift"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore()
    if request.param == "local":
        return LocalStore(str(tmp_path / "store"))
    return request.getfixturevalue("make_swift_store")()


# ---- the contract, on every backend ---------------------------------------------------------


def test_put_get_roundtrip(store):
    data = blob(1, 1 << 20)
    store.put("segments/ab/abcdef", data)
    store.put("empty", b"")
    assert store.get("segments/ab/abcdef") == data
    assert store.get("empty") == b""


def test_get_missing_raises_object_not_found(store):
    with pytest.raises(ObjectNotFound) as ei:
        store.get("no/such/object")
    assert ei.value.key == "no/such/object"


def test_exists(store):
    assert not store.exists("manifests/vm1/0001")
    store.put("manifests/vm1/0001", b"m")
    assert store.exists("manifests/vm1/0001")
    assert not store.exists("manifests/vm1")  # a "directory" is not an object


def test_delete_is_idempotent(store):
    store.put("x/y", b"1")
    store.delete("x/y")
    store.delete("x/y")
    store.delete("never/was/there")
    assert not store.exists("x/y")
    with pytest.raises(ObjectNotFound, match="object not found in store: x/y"):
        store.get("x/y")


def test_list_with_prefix(store):
    assert sorted(store.list()) == []
    keys = ["seg/aa/1", "seg/aa/2", "seg/ab/3", "seg2/zz", "manifest/vm/1", "top"]
    for k in keys:
        store.put(k, k.encode())
    assert sorted(store.list()) == sorted(keys)
    assert sorted(store.list("seg/")) == ["seg/aa/1", "seg/aa/2", "seg/ab/3"]
    assert sorted(store.list("seg")) == ["seg/aa/1", "seg/aa/2", "seg/ab/3", "seg2/zz"]
    assert sorted(store.list("seg/aa/")) == ["seg/aa/1", "seg/aa/2"]
    assert sorted(store.list("nothing/")) == []


def test_overwrite_same_key(store):
    store.put("k", b"first version, longer")
    store.put("k", b"second")
    assert store.get("k") == b"second"
    assert list(store.list("k")) == ["k"]


def test_keys_with_slashes(store):
    deep = "a/b/c/d/e/f/g/h.seg"
    store.put(deep, b"deep")
    store.put("a/b/c/x", b"sibling")
    store.put("a/z", b"shallow")
    assert store.get(deep) == b"deep" and store.get("a/b/c/x") == b"sibling"
    assert sorted(store.list("a/")) == [deep, "a/b/c/x", "a/z"]
    assert sorted(store.list("a/b/c/")) == [deep, "a/b/c/x"]
    store.delete(deep)
    assert sorted(store.list("a/")) == ["a/b/c/x", "a/z"]


def test_invalid_keys_are_refused(store):
    for bad in ["", "/abs", "a//b", "../x", "a/./b", "sp ace", "a/"]:
        with pytest.raises(ValueError, match=f"^invalid store key: {re.escape(repr(bad))}$"):
            store.put(bad, b"x")


def test_describe_has_no_credentials(store):
    store.put("k", b"v")
    text = store.describe()
    assert text
    assert "testing" not in text and "tester" not in text


# ---- SwiftConfig ---------------------------------------------------------------------------


def test_config_repr_hides_secrets():
    c = SwiftConfig(auth_url="http://h:8080/auth/v1.0", user="u:v", key="s3cr3t-key", container="c")
    assert "s3cr3t-key" not in repr(c) and "s3cr3t-key" not in str(c)
    c3 = SwiftConfig(auth_url="https://ks/v3", auth_version="3", container="c",
                     application_credential_id="id1", application_credential_secret="appsecret")
    assert "appsecret" not in repr(c3)


def test_config_from_env_v1_and_v3():
    c = SwiftConfig.from_env(environ={"ST_AUTH": "http://h:1/auth/v1.0", "ST_USER": "a:b",
                                      "ST_KEY": "k", "EKKO_SWIFT_CONTAINER": "ekko-p"})
    assert (c.auth_version, c.user, c.key, c.container) == ("1", "a:b", "k", "ekko-p")
    c = SwiftConfig.from_env(
        "ekko-proj",
        environ={"OS_AUTH_URL": "https://ks:5000/v3", "OS_USERNAME": "u", "OS_PASSWORD": "p",
                 "OS_PROJECT_NAME": "proj", "OS_USER_DOMAIN_NAME": "Default",
                 "OS_PROJECT_DOMAIN_NAME": "Default", "OS_REGION_NAME": "RegionOne",
                 "OS_INTERFACE": "internal", "OS_IDENTITY_API_VERSION": "3"},
        threads=4,
    )
    assert (c.auth_version, c.project_name, c.region_name, c.interface, c.threads) == (
        "3", "proj", "RegionOne", "internal", 4)
    c = SwiftConfig.from_env("c", environ={"OS_AUTH_URL": "https://ks/v3",
                                           "OS_APPLICATION_CREDENTIAL_ID": "i",
                                           "OS_APPLICATION_CREDENTIAL_SECRET": "s"})
    assert c.application_credential_id == "i"
    with pytest.raises(ConfigError, match=r"store\.auth_url: set ST_AUTH \(tempauth\) or OS_AUTH_URL \(keystone\)"):
        SwiftConfig.from_env("c", environ={})
    with pytest.raises(ConfigError, match="store.container: pass a container or set EKKO_SWIFT_CONTAINER"):
        SwiftConfig.from_env(environ={"ST_AUTH": "http://h/auth/v1.0", "ST_USER": "a", "ST_KEY": "b"})


@pytest.mark.parametrize("bad", [
    dict(auth_version="2"), dict(container="a/b"), dict(container=""), dict(key=""),
    dict(auth_url="ftp://x"), dict(threads=0), dict(retries=-1), dict(timeout=0),
    dict(listing_page_size=0), dict(interface="private"),
])
def test_config_validation(bad):
    values = dict(auth_url="http://h:8080/auth/v1.0", user="u:v", key="k", container="c")
    values.update(bad)
    with pytest.raises(ConfigError, match=rf"^config: store\.{next(iter(bad))}: "):     # names the bad option
        SwiftConfig(**values)


def test_config_from_mapping():
    c = SwiftConfig.from_mapping({"type": "swift", "auth_url": "http://h/auth/v1.0", "user": "a:b",
                                  "key": "k", "container": "ekko-p", "threads": 4, "retries": 2})
    assert (c.threads, c.retries) == (4, 2)
    with pytest.raises(ConfigError, match="store.colour: unknown key for a swift store"):
        SwiftConfig.from_mapping({"auth_url": "http://h/auth/v1.0", "container": "c", "colour": 1})


def test_store_section_to_config_and_containers():
    opts = {"type": "swift", "auth_url": "https://ks:5000/v3", "auth_version": "3",
            "project_name": "service", "user_domain_name": "Default", "container_prefix": "bk"}
    env = {"OS_USERNAME": "ekko", "OS_PASSWORD": "pw", "OS_AUTH_URL": "https://elsewhere/v3"}
    c = swift_module.swift_config(opts, None, environ=env)
    assert (c.container, c.auth_url, c.user, c.key) == ("bk", "https://ks:5000/v3", "ekko", "pw")
    assert swift_module.swift_config(opts, "p1", environ=env).container == "bk-p1"
    v1 = {"auth_url": "http://h/auth/v1.0", "user": "a:b", "key": "k"}
    assert swift_module.container_for(v1, "proj") == "ekko-proj"
    assert swift_module.swift_config(v1, environ={}).auth_version == "1"
    with pytest.raises(ConfigError, match="store.container: give container or container_prefix, not both"):
        swift_module.swift_config(dict(v1, container="a", container_prefix="b"), environ={})
    with pytest.raises(ConfigError, match="store.unknown_option: unknown key for a swift store"):
        swift_module.swift_config(dict(v1, unknown_option=1), environ={})
    with pytest.raises(ConfigError, match="store.user: auth_version 1 needs user and key"):  # none in file or env
        swift_module.swift_config({"auth_url": "http://h/auth/v1.0"}, environ={})


def test_missing_swift_fails_under_ci_and_skips_otherwise():
    with pytest.raises(pytest.fail.Exception):
        require_swift(missing=["/usr/bin/swift-proxy-server"], environ={"CI": "true"})
    with pytest.raises(pytest.skip.Exception):
        require_swift(missing=["/usr/bin/swift-proxy-server"], environ={})
    require_swift(missing=[], environ={"CI": "true"})  # nothing missing: no-op


# ---- Swift only ----------------------------------------------------------------------------


def test_list_follows_markers_across_pages(make_swift_store, monkeypatch):
    store = make_swift_store(listing_page_size=7)
    keys = sorted(f"seg/{i:03d}" for i in range(30))
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: store.put(k, k.encode()), keys))
    calls = []
    conn = store._conn()
    real = conn.get_container
    monkeypatch.setattr(conn, "get_container", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    assert list(store.list("seg/")) == keys
    assert len(calls) == 6  # 5 pages of <= 7 names, then an empty page
    assert all(kw["limit"] == 7 for kw in calls)
    assert [kw["marker"] for kw in calls] == [None, keys[6], keys[13], keys[20], keys[27], keys[29]]


def test_list_beyond_one_server_page(make_swift_store, swift_server):
    """10,050 names: Swift answers at most 10,000 per request; list() must get them all."""
    store = make_swift_store()
    store.put("real/object", b"x")  # creates the container
    names = [f"seg/{i:05x}" for i in range(10050)]
    swift_server.seed_listing(store.container, names)
    _, first_page = store._conn().get_container(store.container, prefix="seg/")
    assert len(first_page) == 10000  # the server really pages here
    listed = list(store.list("seg/"))
    assert len(listed) == 10050 and set(listed) == set(names)
    assert len(list(store.list())) == 10051


@pytest.mark.skipif(os.environ.get("EKKO_SWIFT_SLOW") != "1", reason="60-100 s; set EKKO_SWIFT_SLOW=1")
def test_list_beyond_one_page_with_real_puts(make_swift_store):
    store = make_swift_store()
    keys = [f"s/{i:05d}" for i in range(10010)]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: store.put(k, b""), keys))
    assert sorted(store.list("s/")) == keys


def test_concurrent_puts_use_one_connection_per_thread(make_swift_store):
    store = make_swift_store()
    conns = {}
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait(timeout=30)  # all 8 threads really overlap
        key = f"par/{i:02d}"
        store.put(key, blob(i, 256 << 10))
        conns[threading.get_ident()] = store._conn()
        return key

    with ThreadPoolExecutor(8) as ex:
        keys = list(ex.map(work, range(8)))
    assert len({id(c) for c in conns.values()}) == 8
    for i, k in enumerate(keys):
        assert store.get(k) == blob(i, 256 << 10)


def test_swift_verifies_the_md5_we_send(make_swift_store, monkeypatch):
    store = make_swift_store()
    store.put("first", b"creates the container")

    class WrongMD5:
        @staticmethod
        def md5(data, **kw):
            return hashlib.md5(b"not the body", **kw)

    monkeypatch.setattr(swift_module, "hashlib", WrongMD5)
    with pytest.raises(StoreError, match="422"):
        store.put("corrupt", b"the body")
    monkeypatch.undo()
    assert not store.exists("corrupt")


def test_put_recreates_a_container_deleted_behind_its_back(make_swift_store):
    store = make_swift_store()
    store.put("a", b"1")
    store.delete("a")
    store._conn().delete_container(store.container)  # e.g. an operator cleaned up
    assert list(store.list()) == [] and not store.exists("a")
    store.put("b", b"2")
    assert store.get("b") == b"2"


def test_open_swift_store_and_list_namespaces(swift_server):
    prefix = f"ns{time.time_ns() % 10**9}"
    opts = {"type": "swift", "auth_url": swift_server.auth_url, "user": swift_server.user,
            "key": swift_server.key, "container_prefix": prefix, "retries": 1}
    default = swift_module.open_swift_store(opts, None)
    default.put("x", b"0")
    for ns in ("p-b", "p-a"):
        st = swift_module.open_swift_store(opts, ns)
        st.put("x", ns.encode())
        assert st.container == f"{prefix}-{ns}"
        st.close()
    assert swift_module.list_namespaces(opts) == ["p-a", "p-b"]
    assert swift_module.open_swift_store(opts, "p-a").get("x") == b"p-a"
    assert default.get("x") == b"0"
    default.close()


def _assert_no_secrets(exc: BaseException, *secrets: str) -> None:
    text = str(exc)
    chain = "".join(traceback.format_exception(exc))
    for s in secrets:
        assert s and s not in text, f"secret in message: {text}"
        assert s not in chain, "secret in formatted exception chain"


def test_proxy_down_raises_clear_store_error(make_swift_store, swift_server):
    store = make_swift_store(retries=2, starting_backoff=0.05, max_backoff=0.1)
    store.put("before", b"ok")  # authenticated: the connection holds a token now
    token = store._conn().token
    assert token
    swift_server.stop_proxy()
    try:
        with pytest.raises(StoreError, match="unreachable") as ei:
            store.put("during", b"data")
        assert store._conn().attempts == 3          # retries=2: three tries, then the error
        assert not isinstance(ei.value, ObjectNotFound)
        msg = str(ei.value)
        assert "unreachable" in msg and "Connection refused" in msg
        assert f"127.0.0.1:{swift_server.ports['proxy']}" in msg and store.container in msg
        _assert_no_secrets(ei.value, swift_server.key, token)
        with pytest.raises(StoreError) as ei:
            store.get("before")
        assert not isinstance(ei.value, ObjectNotFound)
        _assert_no_secrets(ei.value, swift_server.key, token)
    finally:
        swift_server.start_proxy()
    assert store.get("before") == b"ok"


def test_wrong_key_raises_store_error_without_the_key(make_swift_store):
    store = make_swift_store(key="wrong-secret-value")
    with pytest.raises(StoreError) as ei:
        store.put("k", b"v")
    assert "401" in str(ei.value) and "authentication failed" in str(ei.value)
    _assert_no_secrets(ei.value, "wrong-secret-value")


def test_object_server_killed_during_puts(make_swift_store, swift_server):
    """8 puts acknowledged; the object server is SIGKILLed; 40 more puts in 4 threads; the
    object server is restarted once the proxy has answered one of their tries 503. Every put is
    acknowledged (swiftclient re-sends the rewound body, well inside the retries' window), at
    least one after a retry, and every one reads back byte-exact."""
    # ~13 s of retries: the restarted object server answers ~2-3 s after the kill here
    store = make_swift_store(retries=15, starting_backoff=0.2, max_backoff=1.0)
    store.put("warmup", b"w")
    n = 48
    payload = {f"seg/{i:03d}": blob(1000 + i, 64 << 10) for i in range(n)}
    keys = sorted(payload)
    acked, failed, attempts = [], [], []
    lock = threading.Lock()

    def put(key):
        try:
            store.put(key, payload[key])
        except StoreError as e:
            with lock:
                failed.append((key, str(e)))
            return
        with lock:
            acked.append(key)
            attempts.append(store._conn().attempts)

    for key in keys[:8]:
        put(key)
    assert len(acked) == 8, failed
    proxy_log = swift_server.log_path("proxy")
    try:
        swift_server.kill_server("object")
        logged = proxy_log.stat().st_size
        with ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(put, k) for k in keys[8:]]
            deadline = time.monotonic() + 60
            while b" 503 " not in proxy_log.read_bytes()[logged:]:      # a try failed: come back
                assert time.monotonic() < deadline, "the proxy answered no 503 within 60 s"
                time.sleep(0.05)
            swift_server.start_server("object")
            for f in futures:
                f.result()
    finally:
        if "object" not in swift_server.pids():
            swift_server.start_server("object")
    print(f"acked {len(acked)}, failed {len(failed)}, max attempts {max(attempts)}")
    assert failed == [] and sorted(acked) == keys
    assert max(attempts) > 1, "no put needed a retry"
    for key in acked:
        assert store.get(key) == payload[key], key


def test_other_account_is_refused(make_swift_store, swift_server):
    owner = make_swift_store()
    owner.put("seg/secret", b"tenant data")
    # account test2, pointed at test's storage URL and container
    intruder = make_swift_store(container=owner.container, account="test2",
                                storage_url=swift_server.storage_url("test"))
    for op in (lambda: intruder.get("seg/secret"), lambda: list(intruder.list()),
               lambda: intruder.exists("seg/secret"), lambda: intruder.put("seg/evil", b"x"),
               lambda: intruder.delete("seg/secret")):
        with pytest.raises(StoreError) as ei:
            op()
        assert not isinstance(ei.value, ObjectNotFound)
        assert "403" in str(ei.value)
        _assert_no_secrets(ei.value, swift_server.key2)
    # test2's own account is a separate namespace: same container name, nothing in it
    own = make_swift_store(container=owner.container, account="test2")
    assert list(own.list()) == []
    with pytest.raises(ObjectNotFound, match="object not found in store: seg/secret"):
        own.get("seg/secret")
    assert owner.get("seg/secret") == b"tenant data"
    assert list(owner.list()) == ["seg/secret"]

"""The lifecycle through the same Store contract on a real Swift (all-in-one, tests/harness/swift.py):
stat() from X-Timestamp, gc with its grace period, verify's markers."""

import time

import pytest

from ekko_libvirt.store import catalog, markers
from ekko_libvirt.lifecycle import gc, verify
from ekko_libvirt.format import segment
from ekko_libvirt.errors import ObjectNotFound
from tests.unit.test_gc import blocks, key_of, put_backup


@pytest.fixture
def swift(swift_server):
    """The session's Swift (tests/swift_fixtures.py): missing Swift fails under CI, never skips."""
    return swift_server


@pytest.fixture
def store(swift, request):
    from ekko_libvirt.store.swift import SwiftConfig, SwiftStore
    name = "lc-" + request.node.name.replace("_", "-")[:40]
    st = SwiftStore(SwiftConfig(auth_url=swift.auth_url, container=name, user=swift.user, key=swift.key))
    yield st
    st.close()


def test_swift_stat(store):
    # The proxy stamps the PUT (X-Timestamp) with this machine's clock, rounded to 10 us.
    before = time.time()
    store.put("a/b", b"hello")
    after = time.time()
    info = store.stat("a/b")
    assert info.size == 5 and before - 1e-5 <= info.mtime <= after + 1e-5, (before, info.mtime, after)
    with pytest.raises(ObjectNotFound, match="a/none"):
        store.stat("a/none")


def test_swift_gc_grace_and_verify_markers(store):
    b = blocks("keep", "gone", "shared")
    k1, m1 = put_backup(store, "t1", [b[0], b[2]])
    k2, m2 = put_backup(store, "t1", [b[1], b[2]])
    store.delete(k2)
    assert gc.collect(store, grace_hours=1).deleted == 0          # too young
    rep = gc.collect(store, grace_hours=0)
    assert rep.deleted == 1 and rep.manifests == 1
    assert set(store.list("segments/")) == {key_of(b[0]), key_of(b[2])}

    store.delete(key_of(b[2]))
    run = verify.run(store, [k1])
    assert not run.report.ok and run.marked == [markers.damaged_key(segment.digest(b[2]))]
    assert not markers.read_verify(store, "t1", m1.backup_id).ok
    markers.protect(store, "t1", m1.backup_id)
    assert markers.protected(store) == {f"t1/{m1.backup_id}"}
    assert catalog.keys(store) == [k1]

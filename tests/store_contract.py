"""The Store contract of ekko_libvirt/store/base.py, as tests every store must pass: memory,
local and sealed (tests/unit/test_store_contract.py), Swift and sealed Swift
(tests/integration/test_store_contract_swift.py). Each function takes a fresh, empty store."""

import os

import pytest

from ekko_libvirt.errors import ObjectNotFound
from ekko_libvirt.store.base import Batch, Store


def put_get_exists_delete(store: Store) -> None:
    assert isinstance(store, Store)
    assert not store.exists("segments/abc/x") and list(store.list("")) == []
    data = os.urandom(3000)
    store.put("segments/abc/x", data)
    assert store.get("segments/abc/x") == data and store.exists("segments/abc/x")
    store.put("segments/abc/x", data)                     # idempotent
    assert store.get("segments/abc/x") == data
    store.delete("segments/abc/x")
    assert not store.exists("segments/abc/x")
    with pytest.raises(ObjectNotFound) as e:
        store.get("segments/abc/x")
    assert e.value.key == "segments/abc/x"
    store.delete("segments/abc/x")                       # deleting a missing key is no error


def empty_and_binary_objects(store: Store) -> None:
    store.put("a/empty", b"")
    assert store.get("a/empty") == b""
    every_byte = bytes(range(256)) * 17
    store.put("a/bytes", every_byte)
    assert store.get("a/bytes") == every_byte


def list_by_prefix_is_complete(store: Store) -> None:
    keys = {f"manifests/t{i % 3}/{i:04d}" for i in range(40)} | {"segments/abc/1", "verify/t0/x"}
    for k in keys:
        store.put(k, k.encode())
    assert set(store.list("")) == keys
    assert set(store.list("manifests/")) == {k for k in keys if k.startswith("manifests/")}
    assert set(store.list("manifests/t1/")) == {k for k in keys if k.startswith("manifests/t1/")}
    assert list(store.list("nothing/")) == []


def list_sorted_is_in_byte_order(store: Store) -> None:
    """Byte order of the whole key, across directories: 'abc-1' < 'abc/x' < 'abc0' ('-' < '/' <
    '0'), uppercase before lowercase; gc and verify merge it with sorted digests."""
    keys = ["segments/abc/abc" + "0" * 29, "segments/abc/abc" + "f" * 29, "segments/abc-1", "segments/abc0",
            "segments/ABC/x", "segments/abc/sub/y", "segments/fff/fff" + "1" * 29, "segments/000/z", "zz/top"]
    for k in keys:
        store.put(k, b"x")
    assert list(store.list_sorted("segments/")) == sorted(k for k in keys if k.startswith("segments/"))
    assert list(store.list_sorted("")) == sorted(keys)
    assert list(store.list_sorted("segments/abc/")) == sorted(k for k in keys if k.startswith("segments/abc/"))
    assert list(store.list_sorted("nothing/")) == []


def stat_gives_size_and_time(store: Store) -> None:
    store.put("k/one", b"x" * 1234)
    info = store.stat("k/one")
    # the bytes it takes in the store: a sealing store adds its envelope
    assert info.key == "k/one" and (info.size == 1234 if not store.codec.encrypted else info.size > 1234)
    again = store.stat("k/one").mtime
    assert info.mtime == again > 0
    with pytest.raises(ObjectNotFound):
        store.stat("k/none")


def bad_keys_are_refused(store: Store) -> None:
    for bad in ("", "/abs", "a/../b", "a//b", "a/./b", "ä/b", "a b"):
        with pytest.raises(ValueError, match="invalid store key"):
            store.put(bad, b"x")
    assert list(store.list("")) == []


def a_flushed_batch_is_visible(store: Store) -> None:
    batch = store.batch()
    assert isinstance(batch, Batch)
    for i in range(5):
        batch.put(f"segments/b/{i}", bytes([i]) * 100)
    batch.flush()
    assert all(store.get(f"segments/b/{i}") == bytes([i]) * 100 for i in range(5))
    batch.put("segments/b/late", b"late")
    batch.flush()
    assert store.get("segments/b/late") == b"late"


def an_aborted_batch_leaves_no_partial_object(store: Store) -> None:
    batch = store.batch()
    batch.put("segments/c/1", b"1" * 100)
    batch.abort()
    # a store may have made it visible at put (Swift, memory), or not (local): never a part of it
    assert not store.exists("segments/c/1") or store.get("segments/c/1") == b"1" * 100
    assert store.clean_temp(older_than=0) >= 0


def describe_says_where_and_close_is_safe(store: Store) -> None:
    assert isinstance(store.describe(), str) and store.describe()
    store.close()


CONTRACT = [put_get_exists_delete, empty_and_binary_objects, list_by_prefix_is_complete, list_sorted_is_in_byte_order,
            stat_gives_size_and_time,
            bad_keys_are_refused, a_flushed_batch_is_visible, an_aborted_batch_leaves_no_partial_object,
            describe_says_where_and_close_is_safe]

"""The Store contract (tests/store_contract.py) on the memory, local and sealed stores."""

import pytest

from ekko_libvirt.format import crypto
from ekko_libvirt.store.local import LocalStore
from ekko_libvirt.store.memory import MemoryStore
from ekko_libvirt.store.sealed import SealedStore
from tests.store_contract import CONTRACT


def _sealed(inner):
    return SealedStore(inner, lambda: crypto.SealedCodec(bytes(range(32)), "/k/test.key"))


STORES = {
    "memory": lambda tmp: MemoryStore(),
    "local": lambda tmp: LocalStore(str(tmp / "store")),
    "sealed-memory": lambda tmp: _sealed(MemoryStore()),
    "sealed-local": lambda tmp: _sealed(LocalStore(str(tmp / "store"))),
}


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", STORES)
def test_store_contract(kind, check, tmp_path):
    check(STORES[kind](tmp_path))


def test_sealed_store_declares_every_method_of_the_contract():
    """No forwarding by __getattr__: a method the contract gains must be written in SealedStore,
    else SealedStore stays abstract and cannot be made (the batch that once leaked unsealed)."""
    assert not getattr(SealedStore, "__abstractmethods__", None)
    assert "__getattr__" not in vars(SealedStore)
    sealed = _sealed(MemoryStore())
    batch = sealed.batch()
    batch.put("segments/x/1", b"secret")
    batch.flush()
    assert sealed.inner.get("segments/x/1") != b"secret" and sealed.get("segments/x/1") == b"secret"

"""The Store contract (tests/store_contract.py) on a real Swift, plain and sealed."""

import pytest

from ekko_libvirt.format import crypto
from ekko_libvirt.store.sealed import SealedStore
from tests.store_contract import CONTRACT
from tests.swift_fixtures import make_swift_store, swift_server  # noqa: F401


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
@pytest.mark.parametrize("sealed", [False, True], ids=["swift", "sealed-swift"])
def test_store_contract_on_swift(sealed, check, make_swift_store):  # noqa: F811
    store = make_swift_store()
    if sealed:
        store = SealedStore(store, lambda: crypto.SealedCodec(bytes(range(32)), "/k/test.key"))
    check(store)

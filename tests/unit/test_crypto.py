"""Encryption at rest: key files, derivation, the sealed envelope, keyed names, the chain check.

test_spec_decrypts_with_stdlib_hkdf re-implements docs/format.md "Encryption" from the spec text
alone (HKDF by hand with hmac), so the spec and the code cannot drift apart."""

import hashlib
import hmac
import os
import stat

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ekko_libvirt.store.sealed import SealedStore
from ekko_libvirt.store import catalog
from ekko_libvirt import config
from ekko_libvirt.format import crypto, segment
from ekko_libvirt.format import manifest as mf
from ekko_libvirt.format.codec import PLAIN, chain_key_reason, refuse_sealed, sealed_fingerprint
from ekko_libvirt.engine.base import BitmapInfo, DiskInfo
from ekko_libvirt.engine.bitmaps import ChainHead, plan_generation
from ekko_libvirt.errors import (ConfigError, EkkoError, IncrementalImpossible, IntegrityError, KeyMismatch, ManifestError, UsageError)
from ekko_libvirt.store.memory import MemoryStore

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
SEG = 1 << 20


def sealed(key=KEY_A):
    return SealedStore(MemoryStore(), lambda: crypto.SealedCodec(key, "/k/test.key"))


# -- the spec, from its text ---------------------------------------------------------------------
def hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()         # RFC 5869, salt absent = HashLen zeros
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def test_spec_decrypts_with_stdlib_hkdf():
    store = sealed()
    raw = os.urandom(5000) + b"known text" * 100
    name = store.codec.name(raw)
    enc = segment.encode(raw, codec=store.codec)
    store.put(enc.key, enc.blob)
    blob = store.inner.get(enc.key)

    data_key = hkdf_sha256(KEY_A, b"ekko/v1/data", 32)
    name_key = hkdf_sha256(KEY_A, b"ekko/v1/name", 32)
    fp = hkdf_sha256(KEY_A, b"ekko/v1/fingerprint", 16)
    assert name == hmac.new(name_key, raw, hashlib.sha256).digest()[:16]
    assert enc.key == f"segments/{name.hex()[:3]}/{name.hex()}"
    assert blob[:4] == b"EKE1" and blob[4:20] == fp and len(blob) == 32 + len(enc.blob) + 16
    plain = AESGCM(data_key).decrypt(blob[20:32], blob[32:], blob[:32] + enc.key.encode())
    assert plain == enc.blob                                  # the plain segment object format
    assert plain[12:28] == segment.digest(raw)                # its header holds the xxh3-128
    assert segment.decode(plain, name, codec=store.codec) == raw
    assert crypto.fingerprint(KEY_A) == fp.hex() == store.codec.fingerprint


# -- the envelope ---------------------------------------------------------------------------------
def test_seal_open_roundtrip_and_fresh_nonce():
    c = crypto.SealedCodec(KEY_A)
    a, b = c.seal("segments/abc/x", b"data"), c.seal("segments/abc/x", b"data")
    assert a != b and a[20:32] != b[20:32]
    assert c.open("segments/abc/x", a) == c.open("segments/abc/x", b) == b"data"


def test_every_byte_of_a_sealed_object_is_authenticated():
    c = crypto.SealedCodec(KEY_A)
    blob = c.seal("manifests/t1/B1", b"EKKOMAN1 payload of some length")
    for pos in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= bit
            with pytest.raises(IntegrityError, match="manifests/t1/B1"):
                c.open("manifests/t1/B1", bytes(bad))
    for cut in (1, 16, len(blob) - 32, len(blob) - 1):
        left = len(blob) - cut          # a header's worth or less: no object; more: a cut tag
        why = "authentication failed" if left > 32 else \
            rf"not a sealed ekko object \(bad magic, or truncated to {left} bytes\)"
        with pytest.raises(IntegrityError, match=f"^manifests/t1/B1: {why}"):
            c.open("manifests/t1/B1", blob[:-cut])


def test_object_is_bound_to_its_name():
    c = crypto.SealedCodec(KEY_A)
    blob = c.seal("manifests/t1/B1", b"x")
    with pytest.raises(IntegrityError, match="another name"):
        c.open("manifests/t1/B2", blob)


def test_other_key_and_plain_objects_are_key_mismatches_naming_fingerprints():
    a, b = crypto.SealedCodec(KEY_A), crypto.SealedCodec(KEY_B)
    blob = a.seal("manifests/t1/B1", b"x")
    assert sealed_fingerprint(blob) == a.fingerprint
    with pytest.raises(KeyMismatch) as e:
        b.open("manifests/t1/B1", blob)
    assert e.value.needed == a.fingerprint and e.value.have == b.fingerprint
    assert a.fingerprint in str(e.value) and b.fingerprint in str(e.value)
    with pytest.raises(KeyMismatch, match="is not encrypted") as e:
        b.open("manifests/t1/B1", b"EKKOMAN1...")
    assert e.value.needed is None
    with pytest.raises(KeyMismatch, match="encryption is not configured"):
        refuse_sealed("manifests/t1/B1", blob)
    assert refuse_sealed("k", b"EKKOMAN1") == b"EKKOMAN1"


def test_keys_never_show():
    c = crypto.SealedCodec(KEY_A, "/k/a.key")
    text = repr(c) + str(c.describe()) + repr(sealed().codec)
    for secret in [KEY_A] + list(crypto.derive(KEY_A)[:2]):
        assert secret.hex() not in text and repr(secret) not in text
    assert c.fingerprint in repr(c)


# -- names ----------------------------------------------------------------------------------------
def test_names_keyed_dedupe_within_a_key_only():
    a, b = crypto.SealedCodec(KEY_A), crypto.SealedCodec(KEY_B)
    raw = os.urandom(4096)
    assert a.name(raw) == a.name(bytes(raw))
    assert a.name(raw) != b.name(raw)
    assert a.name(raw) != segment.digest(raw) == PLAIN.name(raw)


def test_plain_codec_keeps_todays_bytes():
    raw = b"plain" * 1000
    enc = segment.encode(raw, compress=False)
    assert enc.blob == b"EKS1" + bytes([0, 1, 0, 0]) + len(raw).to_bytes(4, "little") + segment.digest(raw) + raw
    assert segment.encode(raw, codec=PLAIN).blob == segment.encode(raw).blob
    t = mf.SegmentTable(2)
    t.set_data(0, segment.digest(raw))
    m = mf.Manifest("20260101T000000000Z-abcdef", "t1", 2 * SEG, SEG, t)
    assert "encryption" not in m.header() and b"encryption" not in mf.encode(m)
    store = MemoryStore()
    catalog.commit(store, m)
    assert store.get(catalog.manifest_key("t1", m.backup_id)) == mf.encode(m)


# -- the sealed store with catalog, segments and manifests -----------------------------------------
def manifest_for(store, raws):
    codec = store.codec
    t = mf.SegmentTable(len(raws))
    for i, raw in enumerate(raws):
        enc = segment.encode(raw, codec=codec)
        store.put(enc.key, enc.blob)
        t.set_data(i, enc.digest)
    return mf.Manifest(catalog.new_backup_id(), "t1", len(raws) * SEG, SEG, t, hash=codec.naming,
                       encryption=codec.describe())


def test_sealed_store_roundtrip_through_catalog():
    store = sealed()
    raws = [os.urandom(SEG), b"\x07" * SEG]
    m = manifest_for(store, raws)
    key = catalog.commit(store, m)
    back = catalog.load(store, key)
    assert back.encryption == {"cipher": "aes-256-gcm", "key_fingerprint": crypto.fingerprint(KEY_A),
                               "naming": "hmac-sha256-128"}
    assert back.hash == "hmac-sha256-128"
    for i, d in back.table.data_entries():
        assert segment.decode(store.get(segment.segment_key(d)), d, codec=store.codec) == raws[i]
    (e,) = catalog.entries(store)
    assert e.header["backup_id"] == m.backup_id and not e.locked and e.key_fingerprint == crypto.fingerprint(KEY_A)
    # nothing of the content, the target's disk path or the header is in the store's bytes
    for k in store.inner.list():
        assert b"\x07" * 64 not in store.inner.get(k) and b"backup_id" not in store.inner.get(k)


def test_commit_refuses_a_table_named_by_another_codec():
    store = sealed()
    t = mf.SegmentTable(1)
    m = mf.Manifest(catalog.new_backup_id(), "t1", SEG, SEG, t)     # xxh3 names, no encryption
    with pytest.raises(EkkoError, match=r"names segments by xxh3-128 \(encryption None\), this store by "
                       r"hmac-sha256-128 .*: refusing to commit it") as e:
        catalog.commit(store, m)
    assert type(e.value) is EkkoError
    assert not list(store.inner.list())


def test_tampered_segment_and_manifest_are_integrity_errors_naming_the_object():
    store = sealed()
    m = manifest_for(store, [os.urandom(SEG)])
    key = catalog.commit(store, m)
    d = m.table.get(0)
    skey = segment.segment_key(d)
    for k in (skey, key):
        blob = bytearray(store.inner.get(k))
        blob[len(blob) // 2] ^= 0x04
        store.inner.put(k, bytes(blob))
    with pytest.raises(IntegrityError, match=skey):
        store.get(skey)
    with pytest.raises(ManifestError, match=key):
        catalog.load(store, key)
    (e,) = catalog.entries(store)
    assert e.header is None and not e.locked and key in e.error


def test_wrong_key_and_plain_config_see_locked_manifests():
    a = sealed(KEY_A)
    key = catalog.commit(a, manifest_for(a, [os.urandom(1000)]))
    b = SealedStore(a.inner, lambda: crypto.SealedCodec(KEY_B))
    with pytest.raises(KeyMismatch) as e:
        catalog.load(b, key)
    assert e.value.needed == crypto.fingerprint(KEY_A)
    (entry,) = catalog.entries(b)
    assert entry.locked and entry.key_fingerprint == crypto.fingerprint(KEY_A)
    assert catalog.head(b, "t1") == entry
    with pytest.raises(KeyMismatch, match="encryption is not configured"):
        catalog.load(a.inner, key)
    assert catalog.head(a.inner, "t1").locked
    # a segment sealed with another key where ours should be: replaced, i.e. damage
    skey = next(iter(a.inner.list("segments/")))
    with pytest.raises(IntegrityError, match="another key"):
        b.get(skey)


def test_damaged_fingerprint_of_our_own_object_is_damage_not_another_key():
    store = sealed()
    store.put("manifests/t1/B1", b"EKKOMAN1 whatever")
    blob = bytearray(store.inner.get("manifests/t1/B1"))
    blob[7] ^= 0x10                    # inside the fingerprint
    store.inner.put("manifests/t1/B1", bytes(blob))
    with pytest.raises(IntegrityError, match="fingerprint .* damaged"):
        store.get("manifests/t1/B1")


def test_plain_objects_in_an_encrypted_store_are_not_read():
    store = sealed()
    store.inner.put("manifests/t1/B0", b"EKKOMAN1...")
    with pytest.raises(KeyMismatch, match="is not encrypted"):
        store.get("manifests/t1/B0")
    store.inner.put("segments/000/x", segment.encode(b"x" * 100).blob)
    with pytest.raises(IntegrityError, match="not encrypted"):
        store.get("segments/000/x")


# -- key files ------------------------------------------------------------------------------------
def test_create_key_private_never_overwrites(tmp_path):
    path = str(tmp_path / "keys" / "p1.key")
    fp = crypto.create_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.path.getsize(path) == 32
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert crypto.fingerprint(crypto.load_key(path)) == fp
    with open(path, "rb") as f:
        before = f.read()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        crypto.create_key(path)
    with open(path, "rb") as f:
        assert f.read() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_open_to_others_is_refused(tmp_path, mode):
    path = str(tmp_path / "k.key")
    crypto.create_key(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=f"encryption.key_file.*{oct(mode)[2:]}.*chmod 600") as e:
        crypto.load_key(path)
    with open(path, "rb") as f:
        assert f.read().hex() not in str(e.value)


def test_key_file_missing_or_malformed(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        crypto.load_key(str(tmp_path / "nope.key"))
    for content in (b"short", bytes(33)):
        p = tmp_path / "bad.key"
        p.write_bytes(content)
        os.chmod(p, 0o600)
        with pytest.raises(ConfigError, match="exactly 32"):
            crypto.load_key(str(p))


def test_missing_key_names_the_fingerprint_the_store_needs(tmp_path):
    store = sealed()
    catalog.commit(store, manifest_for(store, [b"z" * 100]))
    load = crypto.key_loader(str(tmp_path / "{project}.key"), "p1", store.inner)
    with pytest.raises(ConfigError, match=f"p1.key.*does not exist.*{crypto.fingerprint(KEY_A)}"):
        load()
    with pytest.raises(ConfigError, match="ekko key create --project p2"):
        crypto.key_loader(str(tmp_path / "{project}.key"), "p2", MemoryStore())()


def test_key_path_template_and_project_names():
    assert crypto.key_path("/etc/ekko/keys/{project}.key", "a1-b2") == "/etc/ekko/keys/a1-b2.key"
    assert crypto.key_path("/etc/ekko/one.key", "x") == "/etc/ekko/one.key"
    for bad in ("..", "a/b", "", "x y"):
        with pytest.raises(UsageError):
            crypto.key_path("/k/{project}.key", bad)


# -- config ---------------------------------------------------------------------------------------
def test_config_encryption_section():
    c = config.build({"encryption": {"enabled": True, "key_file": "/etc/ekko/keys/{project}.key"}})
    assert c.encryption == config.EncryptionConfig(True, "/etc/ekko/keys/{project}.key")
    assert config.build({"encryption": {"key_file": "/k.key"}}).encryption.enabled      # the section turns it on
    assert not config.build({}).encryption.enabled
    assert not config.build({"encryption": {"enabled": False}}).encryption.enabled


@pytest.mark.parametrize("raw, key", [
    ({"encryption": "yes"}, "encryption"),
    ({"encryption": {"enabled": True}}, "encryption.key_file"),
    ({"encryption": {"enabled": "yes", "key_file": "/k"}}, "encryption.enabled"),
    ({"encryption": {"key_file": "/k/{tenant}.key"}}, "encryption.key_file"),
    ({"encryption": {"key_file": "/k", "cipher": "des"}}, "encryption.cipher"),
])
def test_config_encryption_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        config.build(raw)
    assert e.value.key == key


# -- the chain check ------------------------------------------------------------------------------
def test_chain_key_reason():
    k = "manifests/t1/B1"
    assert chain_key_reason(k, None, None, False) is None
    assert chain_key_reason(k, "aa", "aa", False) is None
    assert "encryption is on now" in chain_key_reason(k, None, "aa", False)
    with pytest.raises(KeyMismatch, match="aa.*bb.*--full"):
        chain_key_reason(k, "aa", "bb", False)
    with pytest.raises(KeyMismatch, match="encryption is not configured"):
        chain_key_reason(k, "aa", None, False)
    assert "key changed" in chain_key_reason(k, "aa", "bb", True)
    assert "encryption is off now" in chain_key_reason(k, "aa", None, True)


def test_key_mismatch_forces_a_full_with_the_reason():
    info = DiskInfo("disk0", "/x.qcow2", "qcow2", 1 << 30, (BitmapInfo("ekko-B1", 65536, True, False, False, True),))
    head = ChainHead("B1", "ekko-B1", 65536, 1 << 30, 4 << 20)
    args = dict(backup_id="B2", prefix="ekko-", granularity=65536, segment_size=4 << 20)
    assert plan_generation(info, head, **args).kind == "incremental"
    p = plan_generation(info, head, key_mismatch_reason="key changed", **args)
    assert p.kind == "full" and p.reason == "key changed" and p.parent is None
    with pytest.raises(IncrementalImpossible, match="key changed"):
        plan_generation(info, head, key_mismatch_reason="key changed", require_incremental=True, **args)


# -- the lifecycle commands see a sealed store like any other -----------------------------------------
def test_gc_and_verify_on_a_sealed_store():
    from ekko_libvirt.lifecycle import gc, verify
    clock_now = [1_700_000_000.0]
    inner = MemoryStore(clock=lambda: clock_now[0])
    store = SealedStore(inner, lambda: crypto.SealedCodec(KEY_A))
    kept = manifest_for(store, [b"k" * 5000])
    catalog.commit(store, kept)
    gone = manifest_for(store, [b"g" * 5000])        # segments stored, manifest never committed
    clock_now[0] += 48 * 3600
    rep = gc.collect(store, grace_hours=24, now=lambda: clock_now[0])
    assert rep.deleted == 1 and rep.ok
    assert store.exists(segment.segment_key(kept.table.get(0)))
    assert not store.exists(segment.segment_key(gone.table.get(0)))
    assert verify.verify(store, catalog.keys(store), deep=True).ok
    # with another key gc stops before deleting anything
    other = SealedStore(inner, lambda: crypto.SealedCodec(KEY_B))
    before = sorted(inner.list())
    with pytest.raises(UsageError, match=f"gc stopped before deleting anything: .* key fingerprint "
                                         f"{crypto.fingerprint(KEY_A)}, but") as e:
        gc.collect(other, grace_hours=0, now=lambda: clock_now[0] + 10 ** 6)
    assert e.value.exit_code == 2
    assert sorted(inner.list()) == before

"""How a store names segments and holds objects: the seam between the format and encryption.

    PLAIN               today's format: a segment is named by the xxh3-128 of its raw bytes and
                        every object is stored as it is (docs/format.md, "Layout")
    crypto.SealedCodec  an encrypted store: a segment is named by a keyed hash, and every object
                        is sealed in an AEAD envelope (docs/format.md, "Encryption")

Both keep the `Codec` protocol below. Sealing is done by the store wrapper SealedStore
(store/sealed.py), so every reader of objects (catalog, restore, verify, prune, gc, markers)
gets it without knowing; what the wrapper cannot do is choose names, so the writers of
segments ask `store.codec` for the naming. A chain never mixes the two: an incremental copies
its parent's table only when the parent was read with the same codec (backup/transaction.py,
codec.chain_key_reason).

Nothing here needs the `cryptography` package: a plain store never imports it.
"""

import os
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Protocol

import xxhash

from ..errors import KeyMismatch

# Every sealed object starts with: magic (4) | key fingerprint (16) | nonce (12).
SEALED_MAGIC = b"EKE1"
FINGERPRINT_SIZE = 16


class Codec(Protocol):
    """What the writers and readers of segments and manifests ask of `store.codec`."""

    @property
    def encrypted(self) -> bool: ...

    @property
    def fingerprint(self) -> Optional[str]: ...    # the key's (hex); None: not encrypted

    @property
    def naming(self) -> str: ...                   # the manifest header's `hash`

    def name(self, raw: Any) -> bytes: ...         # a segment's name (raw: bytes-like)

    def describe(self) -> Optional[Dict[str, Any]]: ...     # the manifest header's `encryption`


def native() -> Optional[ModuleType]:
    """The C extension _segcore (segment.py's and crypto.py's work with the GIL released), or None
    when it is not built or EKKO_NATIVE is "0" (then the pure-Python paths: the same bytes)."""
    if os.environ.get("EKKO_NATIVE", "1") == "0":
        return None
    try:
        from . import _segcore
    except ImportError:
        return None
    return _segcore


def _xxh3_128() -> Callable[[Any], bytes]:
    """xxh3-128 as segment.digest computes it: the C extension's, GIL released, else
    python-xxhash's; the same 16 bytes either way."""
    mod = native()
    return xxhash.xxh3_128_digest if mod is None else mod.xxh3_128


class PlainCodec:
    """Segments named by xxh3-128 of their raw bytes; objects stored as they are."""

    encrypted = False
    fingerprint: Optional[str] = None
    naming = "xxh3-128"          # the manifest header's `hash`: what the table's digests are

    name = staticmethod(_xxh3_128())

    @staticmethod
    def describe() -> Optional[Dict[str, Any]]:
        """The manifest header's `encryption` value (None: the key is left out)."""
        return None

    def __repr__(self) -> str:
        return "PlainCodec()"


PLAIN = PlainCodec()


def sealed_fingerprint(blob: bytes) -> Optional[str]:
    """The key fingerprint in a sealed object's plaintext prefix (hex), or None when the object
    is not sealed. Readable without the key."""
    if len(blob) >= len(SEALED_MAGIC) + FINGERPRINT_SIZE and blob[:len(SEALED_MAGIC)] == SEALED_MAGIC:
        return bytes(blob[len(SEALED_MAGIC):len(SEALED_MAGIC) + FINGERPRINT_SIZE]).hex()
    return None


def refuse_sealed(key: str, blob: bytes) -> bytes:
    """What a plain store returned for `key`, unless it is sealed (then no key is configured)."""
    fp = sealed_fingerprint(blob)
    if fp is not None:
        raise KeyMismatch(key, fp, None, "Configure encryption with the key that has this fingerprint "
                                         "(see `ekko key show`)")
    return blob


def chain_key_reason(head_key: str, head_fp: Optional[str], have_fp: Optional[str],
                     force_full: bool) -> Optional[str]:
    """Why the next backup cannot continue the chain whose newest manifest `head_key` is sealed
    with `head_fp` (None: not encrypted), when this run seals with `have_fp`; None if it can.

    Turning encryption on needs no key to read the old chain: it just starts a new one. A head
    sealed with a key we do not hold is more likely a wrong key_file than a decision, so it is an
    error (KeyMismatch, raised before anything is changed) unless --full says "new chain"."""
    if head_fp == have_fp:
        return None
    head_id = head_key.rsplit("/", 1)[1]
    if head_fp is None:
        return f"encryption is on now: previous backup {head_id} is not encrypted (a new chain starts)"
    if not force_full:
        raise KeyMismatch(head_key, head_fp, have_fp,
                          "The chain can only continue with that key (check encryption.key_file); "
                          "`ekko backup --full` starts a new chain instead. Nothing was changed")
    if have_fp is None:
        return f"encryption is off now (--full): previous backup {head_id} was encrypted with key {head_fp}"
    return f"key changed (--full): previous backup {head_id} was encrypted with key {head_fp}, not {have_fp}"

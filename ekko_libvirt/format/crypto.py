"""Encryption at rest: project keys, derived sub-keys, sealed objects, keyed segment names.

The byte-level format is in docs/format.md, "Encryption". In short:

    key file       32 random bytes, mode 0600 (refused when group or others may read it)
    sub-keys       HKDF-SHA256(key, no salt, info) for info = "ekko/v1/data" (AES-256-GCM key),
                   "ekko/v1/name" (HMAC key), "ekko/v1/fingerprint" (16 bytes: the fingerprint)
    segment name   first 16 bytes of HMAC-SHA256(name key, raw segment bytes)
    sealed object  'EKE1' | fingerprint (16) | nonce (12, random) | ciphertext | tag (16)
                   AES-256-GCM, associated data = the first 32 bytes || the object's key (ASCII)

What it protects: whoever reads the store learns the number, sizes and times of the objects and
what their keys say (target names, backup ids), nothing of any disk; a segment name is a keyed
hash, so equal data under two keys gets unrelated names and a name cannot be tested against a
guessed content. Whoever can write the store can delete objects, but cannot alter, truncate,
swap (the key is authenticated) or forge one without restore and verify reporting it.

The key itself never leaves this module: SealedCodec keeps only derived sub-keys, its repr shows
the fingerprint, and no message prints more than a fingerprint or a path.

AES-256-GCM runs in the C extension (_segcore.c, OpenSSL's EVP, GIL released) when it is built
and EKKO_NATIVE is not "0", else through cryptography's AESGCM, which holds the GIL for the whole
object (44.x): the same envelopes either way (GCM is deterministic given key, nonce and
associated data; the nonce is os.urandom's in both).
"""

import hmac
import os
import re
import secrets
import stat
from typing import Callable, List, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .codec import FINGERPRINT_SIZE, SEALED_MAGIC, native, sealed_fingerprint
from ..directio import fsync_path, write_new_file
from ..errors import ConfigError, EkkoError, IntegrityError, KeyMismatch, UsageError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
PREFIX_SIZE = len(SEALED_MAGIC) + FINGERPRINT_SIZE + NONCE_SIZE     # 32
NAME_SIZE = 16
INFO_DATA = b"ekko/v1/data"
INFO_NAME = b"ekko/v1/name"
INFO_FINGERPRINT = b"ekko/v1/fingerprint"
CIPHER = "aes-256-gcm"
NAMING = "hmac-sha256-128"
DEFAULT_PROJECT = "default"
_PROJECT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Objects of the plain format: found where a sealed one is expected, they were written without
# encryption (a KeyMismatch, not damage).
_PLAIN_MAGICS = (b"EKS1", b"EKKOMAN1", b"{")
MANIFESTS = "manifests/"


def _hkdf(key: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def derive(key: bytes) -> Tuple[bytes, bytes, bytes]:
    """(data key, name key, fingerprint) of a project key."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"an ekko key is {KEY_SIZE} bytes, not {len(key)}")
    return _hkdf(key, INFO_DATA, 32), _hkdf(key, INFO_NAME, 32), _hkdf(key, INFO_FINGERPRINT, FINGERPRINT_SIZE)


def fingerprint(key: bytes) -> str:
    return derive(key)[2].hex()


class SealedCodec:
    """Names segments with the keyed hash and seals/opens objects under one project key."""

    encrypted = True
    naming = NAMING

    def __init__(self, key: bytes, source: str = "(in memory)", use_native: Optional[bool] = None):
        self._data_key, self._name_key, self._fp = derive(key)
        self._aead = AESGCM(self._data_key)
        self.fingerprint = self._fp.hex()
        self.source = source        # where the key came from (a path), for messages
        # the C extension's AES-256-GCM (None: when built and EKKO_NATIVE is not "0")
        self._native = native() if use_native is None else native() if use_native else None
        if use_native and self._native is None:
            raise ValueError("the C extension ekko_libvirt/format/_segcore is not built, or EKKO_NATIVE=0")

    def __repr__(self) -> str:
        return f"SealedCodec(fingerprint={self.fingerprint}, source={self.source})"

    def describe(self):
        return {"cipher": CIPHER, "key_fingerprint": self.fingerprint, "naming": NAMING}

    def name(self, raw) -> bytes:
        return hmac.digest(self._name_key, raw, "sha256")[:NAME_SIZE]

    def seal(self, key: str, data) -> bytes:
        return self._seal(key, data, os.urandom(NONCE_SIZE))

    def _seal(self, key: str, data, nonce: bytes) -> bytes:
        """The envelope of `data` stored under `key`, with this nonce (seal's, from the CSPRNG)."""
        prefix = SEALED_MAGIC + self._fp + nonce
        if self._native is not None:
            return self._native.gcm_seal(self._data_key, prefix, key.encode("ascii"), data)
        return prefix + self._aead.encrypt(nonce, bytes(data), prefix + key.encode("ascii"))

    def _decrypt(self, blob, aad_prefix: bytes, aad_key: bytes) -> Optional[bytes]:
        """The plaintext of `blob` opened with associated data aad_prefix || aad_key; None when
        the tag does not match."""
        if self._native is not None:
            return self._native.gcm_open(self._data_key, aad_prefix, blob, aad_key)
        nonce = bytes(blob[len(SEALED_MAGIC) + FINGERPRINT_SIZE:PREFIX_SIZE])
        body = bytes(blob[PREFIX_SIZE:])     # cryptography < 42 takes bytes only
        try:
            return self._aead.decrypt(nonce, body, aad_prefix + aad_key)
        except InvalidTag:
            return None

    def open(self, key: str, blob: bytes) -> bytes:
        """The plaintext of the object stored under `key`. IntegrityError when it was altered,
        truncated or stored under another key; KeyMismatch when it is sealed with another key
        or not sealed at all."""
        if len(blob) < PREFIX_SIZE + TAG_SIZE or blob[:len(SEALED_MAGIC)] != SEALED_MAGIC:
            if any(blob[:len(m)] == m for m in _PLAIN_MAGICS):
                raise KeyMismatch(key, None, self.fingerprint, "A chain is either encrypted or not: "
                                  "read it with a config without encryption")
            raise IntegrityError(f"{key}: not a sealed ekko object (bad magic, or truncated to {len(blob)} bytes)")
        fp = bytes(blob[len(SEALED_MAGIC):len(SEALED_MAGIC) + FINGERPRINT_SIZE])
        nonce = bytes(blob[len(SEALED_MAGIC) + FINGERPRINT_SIZE:PREFIX_SIZE])
        aad_key = key.encode("ascii")
        if fp == self._fp:
            plain = self._decrypt(blob, bytes(blob[:PREFIX_SIZE]), aad_key)
            if plain is None:
                raise IntegrityError(f"{key}: authentication failed: the object was altered, damaged or "
                                     "stored under another name")
            return plain
        # Another key's object, or ours with a damaged fingerprint: only ours opens with our own
        # fingerprint in its place.
        if self._decrypt(blob, SEALED_MAGIC + self._fp + nonce, aad_key) is None:
            raise KeyMismatch(key, fp.hex(), self.fingerprint,
                              f"Check encryption.key_file ({self.source}); `ekko key show` lists the "
                              "fingerprints in use")
        raise IntegrityError(f"{key}: the key fingerprint in its header is damaged")


# -- key files ---------------------------------------------------------------------------------
def check_project(project: str) -> str:
    if not _PROJECT.match(project) or project in (".", ".."):
        raise UsageError(f"invalid project name {project!r} (letters, digits, '.', '_', '-')")
    return project


def key_path(template: str, project: str) -> str:
    """encryption.key_file with {project} filled in."""
    return template.replace("{project}", check_project(project))


def load_key(path: str) -> bytes:
    """The 32 bytes of a key file; ConfigError when it is missing, not private, or malformed."""
    label = "encryption.key_file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(label, f"key file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(label, f"cannot read key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(label, f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(label, f"key file {path} is accessible by group or others (mode "
                                     f"{stat.S_IMODE(st.st_mode):04o}): refusing to use it; chmod 600 {path}")
        data = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        size = f"{len(data)} bytes" if len(data) < KEY_SIZE else f"more than {KEY_SIZE} bytes"
        raise ConfigError(label, f"key file {path} holds {size}; an ekko key is exactly {KEY_SIZE} random "
                                 "bytes (`ekko key create` makes one)")
    return data


def create_key(path: str) -> str:
    """Write a new random key to `path` (0600; never over an existing file). Returns its fingerprint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key = secrets.token_bytes(KEY_SIZE)
    try:
        write_new_file(path, key)
    except FileExistsError:
        raise UsageError(f"key file {path} exists: refusing to overwrite a key (the backups sealed with it "
                         "could never be read again)") from None
    os.chmod(path, 0o600)           # exactly 0600, whatever the umask left
    fsync_path(directory)
    return fingerprint(key)


def fingerprints_in(store) -> List[str]:
    """The distinct key fingerprints of the sealed manifests in a (raw, unwrapped) store."""
    found = set()
    for key in store.list(MANIFESTS):
        try:
            fp = sealed_fingerprint(store.get(key)[:PREFIX_SIZE])
        except EkkoError:
            continue
        if fp:
            found.add(fp)
    return sorted(found)


def key_loader(template: str, project: str, inner) -> Callable[[], SealedCodec]:
    """What SealedStore calls on first use: the project's key file -> codec. A missing file is
    reported with the fingerprints the store's backups need."""
    def load() -> SealedCodec:
        path = key_path(template, project)
        if not os.path.lexists(path):
            try:
                needed = fingerprints_in(inner)
            except EkkoError:
                needed = []
            hint = (f"; the backups in {inner.describe()} need the key with fingerprint {', '.join(needed)}"
                    if needed else f"; `ekko key create --project {project}` makes a new one")
            raise ConfigError("encryption.key_file", f"key file {path} (project {project}) does not exist{hint}")
        return SealedCodec(load_key(path), path)
    return load

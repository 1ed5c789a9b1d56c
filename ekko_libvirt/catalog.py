"""Backups as the store knows them: manifests under 'manifests/<target>/<backup_id>'.

The store is the only source of truth: a new host lists and restores with nothing but the
config. A manifest is committed by one put under a name no other backup uses; there is no
index to update and no pointer to overwrite.

In an encrypted store every manifest is sealed (crypto.SealedStore). One sealed with a key we do
not hold, or a plain one where a key is configured, is listed as `locked`: its id and (from the
envelope's plaintext prefix) its key fingerprint are known, nothing else.
"""

import datetime
import secrets
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

from . import manifest as mf
from .codec import codec_of, refuse_sealed
from .errors import EkkoError, IntegrityError, KeyMismatch, ManifestError, ObjectNotFound, UsageError

PREFIX = "manifests/"


def new_backup_id(now: Optional[datetime.datetime] = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    # Sorts by time; the random tail keeps two backups in the same second apart.
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def manifest_key(target: str, backup_id: str) -> str:
    return f"{PREFIX}{target}/{backup_id}"


def commit(store, m: mf.Manifest) -> str:
    key = manifest_key(m.target, m.backup_id)
    codec = codec_of(store)
    if m.hash != codec.naming or m.encryption != codec.describe():
        raise EkkoError(f"manifest {key} names segments by {m.hash} (encryption {m.encryption}), this store "
                        f"by {codec.naming} (encryption {codec.describe()}): refusing to commit it")
    if store.exists(key):
        raise EkkoError(f"manifest {key} already exists: refusing to overwrite a committed backup")
    store.put(key, mf.encode(m))
    return key


@dataclass(frozen=True)
class Entry:
    key: str
    header: Optional[Dict]       # None when the manifest is damaged or locked
    error: Optional[str] = None
    locked: bool = False         # sealed with another key, or not sealed where a key is configured
    key_fingerprint: Optional[str] = None   # the key it is sealed with; None: not encrypted

    @property
    def backup_id(self) -> str:
        return self.key.rsplit("/", 1)[1]

    @property
    def target(self) -> str:
        return self.key[len(PREFIX):].rsplit("/", 1)[0]


def keys(store, target: Optional[str] = None) -> List[str]:
    prefix = f"{PREFIX}{target}/" if target else PREFIX
    return sorted(store.list(prefix), key=lambda k: k.rsplit("/", 1)[1])


def entries(store, target: Optional[str] = None) -> Iterator[Entry]:
    fp = codec_of(store).fingerprint
    for key in keys(store, target):
        try:
            yield Entry(key, mf.decode_header(_read(store, key), key), key_fingerprint=fp)
        except ManifestError as e:
            yield Entry(key, None, str(e), key_fingerprint=fp)
        except KeyMismatch as e:
            yield Entry(key, None, str(e), locked=True, key_fingerprint=e.needed)
        except ObjectNotFound:
            continue     # deleted between list and get


def head(store, target: str) -> Optional[Entry]:
    """The newest readable (or locked) manifest of a target: what the next incremental builds
    on, or (locked) what tells the next backup that it cannot (codec.chain_key_reason)."""
    newest = None
    for e in entries(store, target):
        if e.header is not None or e.locked:
            newest = e
    return newest


def matching(store, backup_id: str, disk: Optional[str] = None) -> List[str]:
    """Keys of the backups with this id (or id prefix; an exact id wins); one per disk of a
    domain backup unless `disk` picks one (the target's '.<disk>' suffix)."""
    matches = [k for k in keys(store) if k.rsplit("/", 1)[1].startswith(backup_id)]
    if disk:
        matches = [k for k in matches if k[len(PREFIX):].rsplit("/", 1)[0].endswith("." + disk)]
    exact = [k for k in matches if k.rsplit("/", 1)[1] == backup_id]
    return exact or matches


def choose(matches: List[str], backup_id: str, disk: Optional[str] = None) -> str:
    if not matches:
        what = f"{backup_id!r}" + (f" of disk {disk}" if disk else "")
        raise UsageError(f"no backup {what} in the store (see `ekko list`)")
    if len(matches) > 1:
        names = ", ".join(k[len(PREFIX):] for k in matches[:6])
        raise UsageError(f"backup {backup_id!r} is ambiguous ({names}): give a longer id, or --disk")
    return matches[0]


def find(store, backup_id: str, disk: Optional[str] = None) -> str:
    """Key of a backup by id or unique id prefix."""
    return choose(matching(store, backup_id, disk), backup_id, disk)


def load(store, key: str) -> mf.Manifest:
    """The manifest; KeyMismatch when it is sealed with another key (or sealed/not sealed
    against the config), ManifestError when it is damaged."""
    m = mf.decode(_read(store, key), key)
    codec = codec_of(store)
    if m.hash != codec.naming or m.encryption != codec.describe():
        raise ManifestError(f"manifest {key}: names its segments by {m.hash}, the store by {codec.naming}")
    return m


def _read(store, key: str) -> bytes:
    """A manifest's bytes, opened by the store when it seals. A sealed manifest in a plain store
    means no key is configured; a failed opening is damage, reported like any other."""
    try:
        return refuse_sealed(key, store.get(key))
    except (KeyMismatch, ManifestError, ObjectNotFound):
        raise
    except IntegrityError as e:
        raise ManifestError(f"manifest {e}") from e

"""Backups as the store knows them: manifests under 'manifests/<target>/<backup_id>'.

The store is the only source of truth: a new host lists and restores with nothing but the
config. A manifest is committed by one put under a name no other backup uses; there is no
index to update and no pointer to overwrite.

In an encrypted store every manifest is sealed (sealed.py: SealedStore). One sealed with a key we do
not hold, or a plain one where a key is configured, is listed as `locked`: its id and (from the
envelope's plaintext prefix) its key fingerprint are known, nothing else.
"""

import datetime
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

from .base import Store
from ..format import manifest as mf
from ..format.codec import refuse_sealed
from ..errors import EkkoError, IntegrityError, KeyMismatch, ManifestError, ObjectNotFound, UsageError

PREFIX = "manifests/"


def new_backup_id(now: Optional[datetime.datetime] = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    # Sorts by time; the random tail keeps two backups in the same second apart.
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def manifest_key(target: str, backup_id: str) -> str:
    return f"{PREFIX}{target}/{backup_id}"


def commit(store: Store, m: mf.Manifest) -> str:
    key = manifest_key(m.target, m.backup_id)
    codec = store.codec
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


def keys(store: Store, target: Optional[str] = None) -> List[str]:
    prefix = f"{PREFIX}{target}/" if target else PREFIX
    return sorted(store.list(prefix), key=lambda k: k.rsplit("/", 1)[1])


def entries(store: Store, target: Optional[str] = None) -> Iterator[Entry]:
    fp = store.codec.fingerprint
    for key in keys(store, target):
        try:
            yield Entry(key, mf.decode_header(_read(store, key), key), key_fingerprint=fp)
        except ManifestError as e:
            yield Entry(key, None, str(e), key_fingerprint=fp)
        except KeyMismatch as e:
            yield Entry(key, None, str(e), locked=True, key_fingerprint=e.needed)
        except ObjectNotFound:
            continue     # deleted between list and get


def head(store: Store, target: str) -> Optional[Entry]:
    """The newest readable (or locked) manifest of a target: what the next incremental builds
    on, or (locked) what tells the next backup that it cannot (codec.chain_key_reason)."""
    return chain(store, target).head


@dataclass(frozen=True)
class Chain:
    """Every manifest of one target, oldest first, read once (headers only)."""
    entries: tuple

    @property
    def head(self) -> Optional[Entry]:
        """The newest readable (or locked) entry."""
        return next((e for e in reversed(self.entries) if e.header is not None or e.locked), None)

    @property
    def newest(self) -> Optional[Entry]:
        """The newest entry, readable or not: a damaged newest manifest must not pass unnoticed
        as 'the chain ends one backup earlier'."""
        return self.entries[-1] if self.entries else None

    @property
    def backup_ids(self) -> List[str]:
        return [e.backup_id for e in self.entries]

    @property
    def bitmaps(self) -> List[Optional[str]]:
        """The generation bitmaps the readable headers name (None: a generation without one)."""
        return [(e.header.get("generation") or {}).get("bitmap") for e in self.entries
                if e.header is not None and isinstance(e.header.get("generation"), dict)]


def chain(store: Store, target: str) -> Chain:
    return Chain(tuple(entries(store, target)))


def matching(store: Store, backup_id: str, disk: Optional[str] = None) -> List[str]:
    """Keys of the backups with this id (or id prefix; an exact id wins); one per disk of a
    domain backup unless `disk` picks one (the target's '.<disk>' suffix). What no backup id
    starts with may be the name of a target or of a libvirt domain (`named`): it stands for its
    newest backup, every disk's manifest of the newest backup id among its targets."""
    all_keys = keys(store)
    matches = [k for k in all_keys if k.rsplit("/", 1)[1].startswith(backup_id)]
    by_name = not matches and bool(backup_id)
    if by_name:
        targets = set(named(store, backup_id, all_keys))
        matches = [k for k in all_keys if _target_of(k) in targets]
    if disk:
        matches = [k for k in matches if _target_of(k).endswith("." + disk)]
    if by_name:
        newest = max((k.rsplit("/", 1)[1] for k in matches), default=None)
        return [k for k in matches if k.rsplit("/", 1)[1] == newest]
    exact = [k for k in matches if k.rsplit("/", 1)[1] == backup_id]
    return exact or matches


_SHOWN = 6          # matches an ambiguity error lists


def choose(matches: List[str], backup_id: str, disk: Optional[str] = None) -> str:
    if not matches:
        what = f"{backup_id!r}" + (f" of disk {disk}" if disk else "")
        raise UsageError(f"no backup {what} in the store: no backup id starts with it, and no target or "
                         "libvirt domain of that name has backups there (see `ekko list`)")
    if len(matches) > 1:
        names = ", ".join(k[len(PREFIX):] for k in matches[:_SHOWN])
        more = f" and {len(matches) - _SHOWN} more" if len(matches) > _SHOWN else ""
        raise UsageError(f"backup {backup_id!r} is ambiguous ({names}{more}): give a longer id, or --disk")
    return matches[0]


def find(store: Store, backup_id: str, disk: Optional[str] = None) -> str:
    """Key of a backup by id, unique id prefix, or target or domain name (its newest backup)."""
    return choose(matching(store, backup_id, disk), backup_id, disk)


_DISK = re.compile(r"^[A-Za-z0-9_-]+$")       # a libvirt target dev: vda, sdb, hdc, nvme0n1


def named(store: Store, name: str, all_keys: Optional[List[str]] = None) -> List[str]:
    """The targets NAME stands for, as the store alone knows them (no libvirtd needed): NAME
    itself if it has backups; else the disks of the libvirt domain so named, the targets
    '<domain>.<disk>' (engine/domain_xml.target_name); else, NAME being a UUID, the targets
    whose newest manifest carries it as domain_uuid or instance_uuid. [] if none."""
    from ..engine.domain_xml import target_name
    all_keys = keys(store) if all_keys is None else all_keys
    newest = {_target_of(k): k for k in all_keys}      # keys are sorted by id: the last one wins
    if name in newest:
        return [name]
    prefix = target_name(name, "")
    disks = sorted(t for t in newest if t.startswith(prefix) and _DISK.match(t[len(prefix):]))
    if disks or not _is_uuid(name):
        return disks
    found = []
    for target, key in sorted(newest.items()):
        try:
            labels = mf.decode_header(_read(store, key), key).get("labels") or {}
        except EkkoError:               # damaged or locked: it cannot tell
            continue
        if name.lower() in (str(labels.get(k, "")).lower() for k in ("domain_uuid", "instance_uuid")):
            found.append(target)
    return found


def _target_of(key: str) -> str:
    return key[len(PREFIX):].rsplit("/", 1)[0]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def load(store: Store, key: str) -> mf.Manifest:
    """The manifest; KeyMismatch when it is sealed with another key (or sealed/not sealed
    against the config), ManifestError when it is damaged."""
    m = mf.decode(_read(store, key), key)
    _check_naming(store, key, m.hash, m.encryption)
    return m


def load_stream(store: Store, key: str) -> mf.TableStream:
    """As load(), with the table read a block at a time (gc, verify: only the digests count)."""
    ts = mf.decode_stream(_read(store, key), key)
    _check_naming(store, key, ts.hash, ts.encryption)
    return ts


def _check_naming(store: Store, key: str, naming: str, encryption) -> None:
    codec = store.codec
    if naming != codec.naming or encryption != codec.describe():
        raise ManifestError(f"manifest {key}: names its segments by {naming}, the store by {codec.naming}")


def _read(store: Store, key: str) -> bytes:
    """A manifest's bytes, opened by the store when it seals. A sealed manifest in a plain store
    means no key is configured; a failed opening is damage, reported like any other."""
    try:
        return refuse_sealed(key, store.get(key))
    except (KeyMismatch, ManifestError, ObjectNotFound):
        raise
    except IntegrityError as e:
        raise ManifestError(f"manifest {e}") from e

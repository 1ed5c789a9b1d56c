"""Small state objects beside the manifests (format in docs/format.md, "Lifecycle objects"):

    protected/<target>/<backup-id>  the backup is kept whatever the retention policy says
    damaged/<digest-hex>            verify (or gc) found segment <digest> missing or corrupt; the
                                    next backup of a disk whose newest manifest uses it reads it
                                    from the disk again and stores it (self-healing)
    verify/<target>/<backup-id>     when and how the backup was last verified, what was found

The <target>/<backup-id> part is the one of the backup's manifest key (a domain backup has one
manifest per disk under one backup id, so the id alone does not name a manifest).

Each is one small UTF-8 JSON object. The key carries the fact; the body only informs (who uses
a damaged segment, what the problem was). None of them takes part in a backup's commit: losing
one never loses data (a lost damaged/ marker only delays healing until the next verify).
"""

import datetime
import json
import logging
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set

from .base import Store
from ..errors import ObjectNotFound, StoreError

log = logging.getLogger(__name__)

PROTECTED = "protected/"
DAMAGED = "damaged/"
VERIFY = "verify/"


def _now_iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds")


def _put_json(store: Store, key: str, obj: Dict) -> None:
    store.put(key, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def _get_json(store: Store, key: str) -> Optional[Dict]:
    try:
        obj = json.loads(store.get(key))
    except ObjectNotFound:
        return None
    except ValueError:
        log.warning("%s is not JSON: ignoring it", key)
        return None
    return obj if isinstance(obj, dict) else None


def _ids(store: Store, prefix: str) -> Iterable[str]:
    for key in store.list(prefix):
        yield key[len(prefix):]


# -- protected/<target>/<backup-id> ------------------------------------------------------------
def protected_key(target: str, backup_id: str) -> str:
    return f"{PROTECTED}{target}/{backup_id}"


def protect(store: Store, target: str, backup_id: str, now: Optional[float] = None) -> None:
    now = time.time() if now is None else now
    _put_json(store, protected_key(target, backup_id), {"backup_id": backup_id, "target": target,
                                                        "protected_at": _now_iso(now)})


def unprotect(store: Store, target: str, backup_id: str) -> bool:
    """Remove the protection; False if there was none."""
    key = protected_key(target, backup_id)
    if not store.exists(key):
        return False
    store.delete(key)
    return True


def is_protected(store: Store, target: str, backup_id: str) -> bool:
    return store.exists(protected_key(target, backup_id))


def protected(store: Store) -> Set[str]:
    """'<target>/<backup-id>' of every protected backup."""
    return set(_ids(store, PROTECTED))


# -- damaged/<digest-hex> ----------------------------------------------------------------------
def damaged_key(d: bytes) -> str:
    return DAMAGED + d.hex()


def mark_damaged(store: Store, d: bytes, segment_key: str, problem: str, used_by: Iterable[str],
                 now: Optional[float] = None) -> None:
    now = time.time() if now is None else now
    _put_json(store, damaged_key(d), {"digest": d.hex(), "segment": segment_key, "problem": problem,
                                      "found": _now_iso(now), "used_by": sorted(used_by)})


def clear_damaged(store: Store, d: bytes) -> None:
    store.delete(damaged_key(d))


def damaged_digests(store: Store) -> Set[bytes]:
    out = set()
    for name in _ids(store, DAMAGED):
        try:
            out.add(bytes.fromhex(name))
        except ValueError:
            log.warning("%s%s is not a digest: ignoring it", DAMAGED, name)
    return out


def read_damaged(store: Store, d: bytes) -> Optional[Dict]:
    return _get_json(store, damaged_key(d))


# -- verify/<target>/<backup-id> ---------------------------------------------------------------
@dataclass(frozen=True)
class VerifyState:
    backup_id: str
    target: str
    verified: float                 # Unix seconds
    deep: bool
    sample: float                   # fraction of the backup's segments checked, (0, 1]
    ok: bool
    damaged_segments: tuple = ()    # segment keys found missing or corrupt
    problem: str = ""               # e.g. the manifest itself is unreadable

    def covers(self, deep: bool, sample: float, since: float) -> bool:
        """True if this result makes a new check with these settings unnecessary."""
        return self.ok and self.verified >= since and (self.deep or not deep) and self.sample >= sample


def verify_key(target: str, backup_id: str) -> str:
    return f"{VERIFY}{target}/{backup_id}"


def write_verify(store: Store, s: VerifyState) -> None:
    _put_json(store, verify_key(s.target, s.backup_id), {
        "backup_id": s.backup_id, "target": s.target, "verified": _now_iso(s.verified),
        "verified_ts": s.verified, "deep": s.deep, "sample": s.sample, "ok": s.ok,
        "damaged_segments": list(s.damaged_segments), "problem": s.problem})


def read_verify(store: Store, target: str, backup_id: str) -> Optional[VerifyState]:
    obj = _get_json(store, verify_key(target, backup_id))
    if obj is None:
        return None
    try:
        return VerifyState(backup_id, target, float(obj["verified_ts"]), bool(obj["deep"]),
                           float(obj["sample"]), bool(obj["ok"]), tuple(obj.get("damaged_segments") or ()),
                           str(obj.get("problem") or ""))
    except (KeyError, TypeError, ValueError):
        log.warning("%s has unexpected content: treating the backup as never verified", verify_key(target, backup_id))
        return None


def forget_backup(store: Store, target: str, backup_id: str) -> None:
    """The backup's manifest is gone: drop its verify state (protection is checked before)."""
    store.delete(verify_key(target, backup_id))


def stale(store: Store, live_backups: Set[str], live_digests_check) -> List[str]:
    """Marker keys that refer to nothing any more: verify/ and protected/ of backups that are
    gone (`live_backups` holds '<target>/<backup-id>' of those that exist), damaged/ of segments
    `live_digests_check(digest)` says no manifest references."""
    out = [k for prefix in (VERIFY, PROTECTED) for k in store.list(prefix) if k[len(prefix):] not in live_backups]
    for d in damaged_digests(store):
        if not live_digests_check(d):
            out.append(damaged_key(d))
    return out


def delete_quietly(store: Store, keys: Iterable[str]) -> int:
    """Delete markers; a store error is logged, not raised (a stale marker is harmless)."""
    n = 0
    for k in keys:
        try:
            store.delete(k)
            n += 1
        except StoreError as e:
            log.warning("cannot delete %s: %s", k, e)
    return n

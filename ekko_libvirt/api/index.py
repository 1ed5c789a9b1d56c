"""The API's index of backups: SQLite, one file, rebuildable from the stores at any time.

The store stays the source of truth (store/catalog.py): the index only saves reading manifests
on every request. `ekko-api reindex` rebuilds it from every project namespace; a request refreshes
its project's part when it is older than `index_max_age`: the manifests' names are listed, and
only the headers of new ones are read (removed ones are dropped), so a backup made while the API
was down, or pruned by an agent, shows up. Only backups that carry Nova's `instance_uuid` label
are indexed: the API speaks of instances.

    backups  one row per backup id of an instance (a domain backup: one manifest per disk); its
             index by instance carries `protected` too, so a page of instances (count, sum of
             protected, newest) is read from the index alone (it replaces backups_by_instance)
    disks    one row per manifest: the disk, its sizes, its manifest key
    scans    when each project was last refreshed
    jobs     jobs this API started (backup now, restore), and whose project they belong to
"""

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..errors import EkkoError, KeyMismatch, ManifestError, ObjectNotFound
from ..format import manifest as mf
from ..format.codec import refuse_sealed
from ..store import catalog, markers
from ..store.base import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS backups (
    project TEXT NOT NULL, backup_id TEXT NOT NULL, instance_id TEXT NOT NULL, instance_name TEXT,
    created TEXT, kind TEXT, reason TEXT, consistency TEXT, result TEXT, protected INTEGER NOT NULL,
    PRIMARY KEY (project, backup_id));
DROP INDEX IF EXISTS backups_by_instance;
CREATE INDEX IF NOT EXISTS backups_by_instance_p ON backups (project, instance_id, backup_id, protected);
CREATE TABLE IF NOT EXISTS disks (
    project TEXT NOT NULL, manifest_key TEXT NOT NULL, backup_id TEXT NOT NULL, disk TEXT NOT NULL,
    target TEXT NOT NULL, virtual_size INTEGER, stored_bytes INTEGER, segments INTEGER,
    PRIMARY KEY (project, manifest_key));
CREATE INDEX IF NOT EXISTS disks_by_backup ON disks (project, backup_id);
CREATE TABLE IF NOT EXISTS scans (project TEXT PRIMARY KEY, scanned REAL NOT NULL,
    objects INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, project TEXT NOT NULL, kind TEXT NOT NULL, host TEXT,
    state TEXT, result TEXT, error TEXT, created REAL NOT NULL);
"""


# scans.objects of a project claimed for its first refresh, until that refresh commits (rows
# written before this marker existed hold a count: they are built)
UNBUILT = -1


@dataclass(frozen=True)
class DiskRow:
    manifest_key: str
    backup_id: str
    disk: str
    target: str
    virtual_size: int
    stored_bytes: int
    segments: int


@dataclass(frozen=True)
class BackupRow:
    """What one manifest header says of its backup (the disk's share is in DiskRow)."""
    backup_id: str
    instance_id: str
    instance_name: str
    created: str
    kind: str
    reason: str
    consistency: Optional[Dict[str, Any]]


def rows_of(key: str, header: Dict[str, Any]) -> Optional[Tuple[BackupRow, DiskRow]]:
    """A manifest header -> its rows; None when it is not a Nova instance's (no instance_uuid)."""
    labels = header.get("labels") or {}
    inst = str(labels.get("instance_uuid") or "")
    if not inst:
        return None
    target = str(header.get("target", ""))
    counts = header.get("counts") or {}
    disk = target.rsplit(".", 1)[1] if "." in target else target
    b = BackupRow(str(header["backup_id"]), inst.lower(), str(labels.get("instance_name") or ""),
                  str(header.get("created") or ""), str(header.get("kind") or ""), str(header.get("reason") or ""),
                  header.get("consistency") if isinstance(header.get("consistency"), dict) else None)
    d = DiskRow(key, b.backup_id, disk, target, int(header.get("virtual_size") or 0),
                int(counts.get("stored_bytes") or 0), int(header.get("segment_count") or 0))
    return b, d


def read_header(store: Store, key: str) -> Optional[Dict[str, Any]]:
    """A manifest's header; None when it is gone, damaged or sealed with another key (the API
    lists what it can read: `ekko list` on the host names the others)."""
    try:
        return mf.decode_header(refuse_sealed(key, store.get(key)), key)
    except (ObjectNotFound, ManifestError, KeyMismatch):
        return None


class Index:
    """One connection per Index (an Index per request thread: sqlite3 connections are not shared)."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- refresh from the store --------------------------------------------------------------------
    def claim_refresh(self, project: str, max_age: float, now: Optional[float] = None) -> bool:
        """Whether this caller should refresh `project` now (its index is older than max_age), and
        if so, marks it refreshed so concurrent requests do not all do the same work."""
        now = time.time() if now is None else now
        # Read first: a fresh project costs no write. Every request wrote here before (an INSERT
        # OR IGNORE and an UPDATE matching nothing still take SQLite's one write lock), so the
        # workers' requests queued on it, and a busy one sleeps in SQLite's busy handler.
        row = self.db.execute("SELECT scanned FROM scans WHERE project = ?", (project,)).fetchone()
        if row is not None and row[0] > now - max_age:
            return False
        self.db.execute("INSERT OR IGNORE INTO scans (project, scanned, objects) VALUES (?, 0, ?)",
                        (project, UNBUILT))
        cur = self.db.execute("UPDATE scans SET scanned = ? WHERE project = ? AND scanned <= ?",
                              (now, project, now - max_age))
        return cur.rowcount == 1

    def release_claim(self, project: str) -> None:
        """A claimed refresh that failed: the next request claims it again."""
        self.db.execute("UPDATE scans SET scanned = 0 WHERE project = ?", (project,))

    def built(self, project: str) -> bool:
        """Whether a refresh of `project` has ever finished (before that, its index is empty or
        partial: it would answer 404 for instances the store holds)."""
        row = self.db.execute("SELECT objects FROM scans WHERE project = ?", (project,)).fetchone()
        return row is not None and row[0] != UNBUILT

    def refresh(self, project: str, store: Store) -> Tuple[int, int]:
        """Bring `project`'s rows in line with its store: (manifests added, removed). Object count
        for usage too (one listing)."""
        keys = set(catalog.keys(store))
        known = {r[0] for r in self.db.execute("SELECT manifest_key FROM disks WHERE project = ?", (project,))}
        added = []
        for key in sorted(keys - known):
            header = read_header(store, key)
            rows = rows_of(key, header) if header is not None else None
            if rows is not None:
                added.append(rows)
        gone = known - keys
        protected = markers.protected(store)
        objects = sum(1 for _ in store.list(""))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for key in gone:
                self.db.execute("DELETE FROM disks WHERE project = ? AND manifest_key = ?", (project, key))
            self.db.execute("DELETE FROM backups WHERE project = ? AND backup_id NOT IN "
                            "(SELECT backup_id FROM disks WHERE project = ?)", (project, project))
            for b, d in added:
                self._insert(project, b, d)
            self._set_protected(project, protected)
            self.db.execute("INSERT INTO scans (project, scanned, objects) VALUES (?, ?, ?) ON CONFLICT(project) "
                            "DO UPDATE SET objects = excluded.objects", (project, time.time(), objects))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return len(added), len(gone)

    def _insert(self, project: str, b: BackupRow, d: DiskRow) -> None:
        self.db.execute(
            "INSERT INTO backups (project, backup_id, instance_id, instance_name, created, kind, reason, consistency, "
            "result, protected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'ok', 0) ON CONFLICT(project, backup_id) DO NOTHING",
            (project, b.backup_id, b.instance_id, b.instance_name, b.created, b.kind, b.reason,
             json.dumps(b.consistency) if b.consistency is not None else None))
        self.db.execute(
            "INSERT OR REPLACE INTO disks (project, manifest_key, backup_id, disk, target, virtual_size, stored_bytes, "
            "segments) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (project, d.manifest_key, d.backup_id, d.disk, d.target, d.virtual_size, d.stored_bytes, d.segments))

    def _set_protected(self, project: str, protected: Iterable[str]) -> None:
        """protected: marker names '<target>/<backup-id>' (markers.protected)."""
        ids = {p.rsplit("/", 1)[1] for p in protected if "/" in p}
        self.db.execute("UPDATE backups SET protected = 0 WHERE project = ?", (project,))
        self.db.executemany("UPDATE backups SET protected = 1 WHERE project = ? AND backup_id = ?",
                            [(project, i) for i in ids])

    def add_rows(self, project: str, rows: Iterable[Tuple[BackupRow, DiskRow]]) -> None:
        """Rows straight in (the benchmark's synthetic index; tests)."""
        self.db.execute("BEGIN")
        for b, d in rows:
            self._insert(project, b, d)
        self.db.execute("COMMIT")

    def set_protected(self, project: str, backup_id: str, value: bool) -> None:
        self.db.execute("UPDATE backups SET protected = ? WHERE project = ? AND backup_id = ?",
                        (int(value), project, backup_id))

    def forget(self, project: str, backup_id: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM disks WHERE project = ? AND backup_id = ?", (project, backup_id))
        self.db.execute("DELETE FROM backups WHERE project = ? AND backup_id = ?", (project, backup_id))
        self.db.execute("COMMIT")

    # -- queries -----------------------------------------------------------------------------------
    def instances(self, project: Optional[str], limit: int, marker: Optional[str]) -> List[sqlite3.Row]:
        """Instances with backups, by id, after `marker`; project None: every project. Each row
        carries the aggregate (backups, protected, last) and the newest backup's own columns.

        Within one project the order is written as the GROUP BY's (project, instance_id): SQLite
        then walks backups_by_instance and stops after `limit` groups. Written (instance_id,
        project), it grouped all the project's rows and sorted them in a temporary B-tree first:
        14 ms of a first page's 17 at 1,000 instances x 30 backups (bench/api_list.py)."""
        where, args = self._scope(project)
        if marker:
            where += " AND instance_id > ?"
            args.append(marker)
        order = "project, instance_id" if project is not None else "instance_id, project"
        outer = "g.project, g.instance_id" if project is not None else "g.instance_id, g.project"
        # The newest backup's row joined in (one query, not one more per instance): each row is
        # also what render.last_backup reads (backup_id is `last`).
        return self.db.execute(
            f"SELECT g.*, b.backup_id, b.instance_name, b.created, b.kind, b.consistency, b.result FROM ("
            f"SELECT project, instance_id, count(*) AS backups, sum(protected) AS protected, max(backup_id) AS last "
            f"FROM backups WHERE {where} GROUP BY project, instance_id ORDER BY {order} LIMIT ?) g "
            f"JOIN backups b ON b.project = g.project AND b.backup_id = g.last ORDER BY {outer}",
            (*args, limit)).fetchall()

    def backups(self, project: Optional[str], instance_id: str, limit: int, marker: Optional[str]) -> List[sqlite3.Row]:
        """An instance's backups, newest first, after `marker` (a backup id)."""
        where, args = self._scope(project)
        where += " AND instance_id = ?"
        args.append(instance_id)
        if marker:
            where += " AND backup_id < ?"
            args.append(marker)
        return self.db.execute(f"SELECT * FROM backups WHERE {where} ORDER BY backup_id DESC LIMIT ?",
                               (*args, limit)).fetchall()

    def backup(self, project: Optional[str], backup_id: str) -> Optional[sqlite3.Row]:
        where, args = self._scope(project)
        return self.db.execute(f"SELECT * FROM backups WHERE {where} AND backup_id = ?",
                               (*args, backup_id)).fetchone()

    def newest_of(self, project: str, instance_id: str) -> Optional[str]:
        row = self.db.execute("SELECT max(backup_id) FROM backups WHERE project = ? AND instance_id = ?",
                              (project, instance_id)).fetchone()
        return row[0] if row else None

    def disks(self, project: str, backup_id: str) -> List[sqlite3.Row]:
        return self.db.execute("SELECT * FROM disks WHERE project = ? AND backup_id = ? ORDER BY disk",
                               (project, backup_id)).fetchall()

    def has_instance(self, project: str, instance_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM backups WHERE project = ? AND instance_id = ? LIMIT 1",
                               (project, instance_id)).fetchone() is not None

    def usage(self, project: str) -> Dict[str, int]:
        """logical: what restoring every backup would give (each is a synthetic full); stored: the
        bytes each backup added to the store (deduplicated, compressed); objects: in the namespace."""
        row = self.db.execute("SELECT coalesce(sum(virtual_size), 0), coalesce(sum(stored_bytes), 0) FROM disks "
                              "WHERE project = ?", (project,)).fetchone()
        objs = self.db.execute("SELECT objects FROM scans WHERE project = ?", (project,)).fetchone()
        return {"logical_bytes": int(row[0]), "stored_bytes": int(row[1]), "objects": int(objs[0]) if objs else 0}

    @staticmethod
    def _scope(project: Optional[str]) -> Tuple[str, List[Any]]:
        return ("project = ?", [project]) if project is not None else ("1 = 1", [])

    # -- jobs --------------------------------------------------------------------------------------
    def add_job(self, job_id: str, project: str, kind: str, host: Optional[str], state: str) -> None:
        self.db.execute("INSERT INTO jobs (job_id, project, kind, host, state, created) VALUES (?, ?, ?, ?, ?, ?)",
                        (job_id, project, kind, host, state, time.time()))

    def update_job(self, job_id: str, state: str, result: Any = None, error: Optional[str] = None) -> None:
        self.db.execute("UPDATE jobs SET state = ?, result = ?, error = ? WHERE job_id = ?",
                        (state, json.dumps(result) if result is not None else None, error, job_id))

    def job(self, project: Optional[str], job_id: str) -> Optional[sqlite3.Row]:
        where, args = self._scope(project)
        return self.db.execute(f"SELECT * FROM jobs WHERE {where} AND job_id = ?", (*args, job_id)).fetchone()


def reindex(index: Index, stores: Iterable[Tuple[str, Store]]) -> Dict[str, Tuple[int, int]]:
    """Every project's rows rebuilt from its store: {project: (added, removed)}."""
    out = {}
    for project, store in stores:
        try:
            out[project] = index.refresh(project, store)
        finally:
            store.close()
    return out


__all__ = ["Index", "reindex", "rows_of", "read_header", "EkkoError"]

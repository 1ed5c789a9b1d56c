"""The API side's record of the agents and of the backup-now jobs sent to them: a small SQLite file
of its own ([bus] state_path), shared by every API worker process (WAL, one connection per call).
It holds nothing the store holds: losing it loses only the job states of the last hours and who
heartbeated; the agents' next heartbeats fill the hosts in again.

    hosts   host PK, agent_id (a new one per agent start), version, interval_s, last_heartbeat
            (the API's clock when the report arrived, not the agent's), domains / failing (JSON)
    jobs    job_id PK, host, domain_uuid, state (queued | running | done | failed), result (JSON:
            {"backup_id": ...}), error, created, updated, agent_id (the agent process that accepted
            the request; NULL while it is on its way)

What a report or a silence means for the jobs is decided by the pure functions of busrules.py.
"""

import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from typing import Any, Dict, Iterator, List, Optional

from .busrules import FINAL, STATES, advances

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (host TEXT PRIMARY KEY, agent_id TEXT NOT NULL, version TEXT, interval_s REAL NOT NULL,
    last_heartbeat REAL NOT NULL, domains TEXT NOT NULL, failing TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, host TEXT NOT NULL, domain_uuid TEXT NOT NULL,
    state TEXT NOT NULL, result TEXT, error TEXT, created REAL NOT NULL, updated REAL NOT NULL, agent_id TEXT);
CREATE INDEX IF NOT EXISTS jobs_by_host ON jobs (host, state);
"""


class BusDB:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # one connection per call: the oslo.messaging server thread and the request threads share nothing
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            with db:                         # one transaction, committed on success
                yield db

    # -- hosts ------------------------------------------------------------------------------------
    def host(self, host: str) -> Optional[Dict[str, Any]]:
        with self._db() as db:
            row = db.execute("SELECT * FROM hosts WHERE host = ?", (host,)).fetchone()
        return _host(row) if row else None

    def hosts(self) -> List[Dict[str, Any]]:
        with self._db() as db:
            return [_host(r) for r in db.execute("SELECT * FROM hosts ORDER BY host")]

    def save_host(self, host: str, agent_id: str, version: str, interval_s: float, domains: List[Any],
                  failing: List[Any], now: float) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (host, agent_id, version, interval_s, now, json.dumps(domains), json.dumps(failing)))

    # -- jobs -------------------------------------------------------------------------------------
    def add_job(self, job_id: str, host: str, domain_uuid: str, state: str, error: Optional[str] = None,
                now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        with self._db() as db:
            db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, NULL, ?, ?, ?, NULL)",
                       (job_id, host, domain_uuid, state, error, now, now))

    def accepted(self, job_id: str, agent_id: str) -> None:
        """The agent process `agent_id` took the job (its restart then loses it)."""
        with self._db() as db:
            db.execute("UPDATE jobs SET agent_id = ? WHERE job_id = ?", (agent_id, job_id))

    def job(self, job_id: str) -> Optional[Dict[str, Any]]:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def open_jobs(self, host: str) -> List[Dict[str, Any]]:
        with self._db() as db:
            return [_job(r) for r in db.execute("SELECT * FROM jobs WHERE host = ? AND state NOT IN (?, ?)",
                                                (host, *FINAL))]

    def update_job(self, job_id: str, state: str, result: Optional[Dict[str, Any]] = None,
                   error: Optional[str] = None, now: Optional[float] = None, host: Optional[str] = None) -> bool:
        """Move a job to `state` if busrules.advances allows it (only forward, a final state never
        changes). `host`: only a job of that host (an agent's report never touches another host's
        jobs). -> changed."""
        now = time.time() if now is None else now
        olds = [s for s in STATES if advances(s, state)]     # in the UPDATE itself: atomic between workers
        if not olds:
            return False
        with self._db() as db:
            cur = db.execute(f"UPDATE jobs SET state = ?, result = ?, error = ?, updated = ? WHERE job_id = ? "
                             f"AND (? IS NULL OR host = ?) AND state IN ({', '.join('?' * len(olds))})",
                             (state, json.dumps(result) if result is not None else None, error, now, job_id,
                              host, host, *olds))
            return cur.rowcount > 0


def _host(r: sqlite3.Row) -> Dict[str, Any]:
    return {"host": r["host"], "agent_id": r["agent_id"], "version": r["version"], "interval_s": r["interval_s"],
            "last_heartbeat": r["last_heartbeat"], "domains": json.loads(r["domains"]),
            "failing": json.loads(r["failing"])}


def _job(r: sqlite3.Row) -> Dict[str, Any]:
    return {"id": r["job_id"], "host": r["host"], "domain_uuid": r["domain_uuid"], "state": r["state"],
            "result": json.loads(r["result"]) if r["result"] else None, "error": r["error"],
            "created": r["created"], "updated": r["updated"], "agent_id": r["agent_id"]}

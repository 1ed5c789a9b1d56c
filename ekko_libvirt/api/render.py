"""Index rows -> the JSON the API answers with (pure)."""

import json
from typing import Any, Dict, List, Optional


def error(code: int, message: str) -> Dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _consistency(text: Optional[str]) -> Optional[Dict[str, Any]]:
    return json.loads(text) if text else None


def last_backup(row) -> Optional[Dict[str, Any]]:
    if row is None:
        return None
    return {"id": row["backup_id"], "created": row["created"], "kind": row["kind"],
            "consistency": _consistency(row["consistency"]), "result": row["result"]}


def instance(agg, last) -> Dict[str, Any]:
    """agg: a row of Index.instances; last: the Index.backup row of its newest backup."""
    return {"id": agg["instance_id"], "name": last["instance_name"] if last is not None else None,
            "project_id": agg["project"], "last_backup": last_backup(last), "backups": int(agg["backups"]),
            "protected": int(agg["protected"] or 0)}


def backup(row, disks: Optional[List] = None) -> Dict[str, Any]:
    out = {"id": row["backup_id"], "instance_id": row["instance_id"], "instance_name": row["instance_name"],
           "project_id": row["project"], "created": row["created"], "kind": row["kind"], "reason": row["reason"],
           "consistency": _consistency(row["consistency"]), "result": row["result"],
           "protected": bool(row["protected"])}
    if disks is not None:
        out["disks"] = [{"disk": d["disk"], "virtual_size": d["virtual_size"], "stored_bytes": d["stored_bytes"],
                         "segments": d["segments"]} for d in disks]
    return out


def job(row, live: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A job as recorded here; `live`: what the bus says of it now (backup jobs)."""
    out = {"id": row["job_id"], "kind": row["kind"], "host": row["host"], "state": row["state"],
           "result": json.loads(row["result"]) if row["result"] else None, "error": row["error"]}
    if live:
        out.update({k: live.get(k) for k in ("state", "result", "error") if k in live})
    return out

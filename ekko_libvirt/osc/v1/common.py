"""What the commands share: the client, waiting for a job, row formatting."""

import time
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from osc_lib import exceptions

from ..client import Client

DONE = ("done", "failed", "error")


def client(app: Any) -> Client:
    return app.client_manager.ekko


def wait_job(c: Client, job: Dict[str, Any], timeout: float, interval: float = 2.0) -> Dict[str, Any]:
    """The job polled until it ends; a failed one or a timeout is an error (exit non-zero)."""
    deadline = time.monotonic() + timeout
    while job.get("state") not in DONE:
        if time.monotonic() > deadline:
            raise exceptions.CommandError(f"job {job.get('id')} is still {job.get('state')} after {timeout:.0f} s "
                                          f"(see: openstack ekko job show {job.get('id')})")
        if not isinstance(job.get("id"), str):
            raise exceptions.CommandError(f"the API's job has no id to wait on: {str(job)[:200]}")
        time.sleep(interval)
        job = c.job(job["id"])
    if job["state"] != "done":
        raise exceptions.CommandError(f"job {job.get('id')} {job['state']}: {job.get('error') or 'no reason given'}")
    return job


def sub(item: Dict[str, Any], key: str) -> Dict[str, Any]:
    """item[key] when it is an object, else {} (a field the API left out or gave another shape)."""
    value = item.get(key)
    return value if isinstance(value, dict) else {}


def rows(items: Iterable[Dict[str, Any]], keys: Sequence[str]) -> List[Tuple[Any, ...]]:
    return [tuple(item.get(k) for k in keys) for item in items]


def show(item: Dict[str, Any], keys: Sequence[str], labels: Sequence[str]) -> Tuple[Tuple[str, ...], Tuple[Any, ...]]:
    return tuple(labels), tuple(item.get(k) for k in keys)

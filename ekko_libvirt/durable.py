"""The one way ekko writes a small file that must survive a crash whole or not at all:
a temporary name (0600, created exclusively) -> write all -> fsync -> rename over the target ->
fsync the directory. Journals, job records, checkpoint XML, the ledger and the agent's state all
go through here; the store has its own (store/local.py), for objects.
"""

import json
import os
from typing import Any

from .directio import fsync_path, write_new_file


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Raises OSError; nothing half-written is left, under either name."""
    d, base = os.path.split(path)
    os.makedirs(d or ".", mode=0o700, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{base}-{os.getpid()}-{os.urandom(4).hex()}")
    write_new_file(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_path(d or ".")


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode())


def read_json(path: str) -> Any:
    """FileNotFoundError when absent; ValueError when it is not JSON."""
    with open(path, "rb") as f:
        return json.loads(f.read())

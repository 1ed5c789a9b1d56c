"""What a command shows: the exit codes, JSON on stdout (--json), the one-line error on stderr,
the progress line, and the human lines for a backup that more than one command prints."""

import datetime
import json
import sys
from typing import Any, Dict, Optional

from .. import units
from ..errors import ConfigError
from ..format.manifest import Manifest
from ..progress import Progress

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_DAMAGED = 0, 1, 2, 3


def fail(as_json: bool, e: Exception, code: int) -> None:
    if isinstance(e, ConfigError):      # one line, whatever the file held
        e = ConfigError(" ".join(str(e.key).split()), " ".join(e.problem.split()))
    sys.stderr.write(f"ekko: error: {e}\n")
    if as_json:
        emit({"ok": False, "error": str(e), "error_type": type(e).__name__, "exit_code": code})


def emit(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def progress_bar(label: str, as_json: bool, unit: str = "B") -> Progress:
    """The progress line of long work: on a terminal's stderr, never with --json."""
    return Progress(label, enabled=None if not as_json else False, unit=unit)


def summary(h: Dict, key: str) -> Dict:
    """One backup as `backup --json` and `list --json` give it, from its manifest header."""
    c = h.get("counts") or {}
    return {"backup_id": h["backup_id"], "target": h["target"], "kind": h["kind"], "reason": h["reason"],
            "parent": h["parent"], "created": h["created"], "virtual_size": h["virtual_size"],
            "segment_size": h["segment_size"], "stored_bytes": c.get("stored_bytes"),
            "read_bytes": c.get("read_bytes"), "data_segments": c.get("data_segments"),
            "generation": h.get("generation"), "timings": h.get("timings"),
            "consistency": h.get("consistency"), "key": key}


def describe_consistency(c: Optional[Dict], long: bool = False) -> str:
    """A manifest's `consistency` in a few words (list) or with its details (show)."""
    if not isinstance(c, dict):
        return "-" if not long else "not recorded (a backup written before ekko recorded it: crash-consistent)"
    level = str(c.get("level"))
    if not long:
        return f"{level}({c.get('freeze_ms')}ms)" if level == "filesystem" else level
    if level == "filesystem":
        mounts = ", ".join(map(str, c.get("mountpoints") or ())) or "-"
        return f"filesystem (frozen {c.get('freeze_ms')} ms: {mounts})"
    return f"{level}: {c.get('reason') or '-'}"


def verified(state) -> Optional[Dict]:
    """The verify/ marker of a backup as output: when, how, what was found; None: never verified."""
    if state is None:
        return None
    return {"time": datetime.datetime.fromtimestamp(state.verified, datetime.timezone.utc).isoformat(
        timespec="seconds"), "ok": state.ok, "deep": state.deep, "sample": state.sample,
        "damaged_segments": list(state.damaged_segments), "problem": state.problem or None}


def describe_verified(v: Optional[Dict]) -> str:
    if v is None:
        return "never verified"
    how = ("deep" if v["deep"] else "existence") + ("" if v["sample"] >= 1 else f", {v['sample']:.1%} sample")
    if v["ok"]:
        return f"verified ok {v['time']} ({how})"
    what = v["problem"] or f"{len(v['damaged_segments'])} damaged segment(s)"
    return f"VERIFY FAILED {v['time']} ({how}): {what}"


def print_backup(m: Manifest, marks: Dict) -> None:
    """`ekko show`: one backup's manifest and markers, a line per fact."""
    c = m.counts
    print(f"backup      {m.backup_id}")
    print(f"target      {m.target}   disk {m.disk.get('node')} ({m.disk.get('format')}) {m.disk.get('filename')}")
    print(f"kind        {m.kind}")
    print(f"reason      {m.reason}")
    print(f"parent      {m.parent or '-'}")
    print(f"created     {m.created}   took {m.timings.get('seconds', 0):.1f} s")
    print(f"disk size   {units.human(m.virtual_size)} in {m.table.count} segments of {units.human(m.segment_size)}"
          f" ({m.table.data_count()} with data)")
    print(f"this backup read {units.human(c.get('read_bytes', 0))}, stored {c.get('new_segments', 0)} new segments "
          f"({units.human(c.get('stored_bytes', 0))}), reused {c.get('reused_segments', 0)}")
    gen = m.generation or {}
    print(f"bitmap      {gen.get('bitmap') or '-'} (granularity {gen.get('granularity') or '-'})")
    print(f"consistency {describe_consistency(m.consistency, long=True)}")
    enc = m.encryption or {}
    print(f"encryption  {enc.get('cipher', 'none')}" + (f", key fingerprint {enc['key_fingerprint']}" if enc else ""))
    print(f"protected   {'yes (never pruned: ekko unprotect to let retention decide)' if marks['protected'] else 'no'}")
    v = marks["verified"]
    print(f"verified    {describe_verified(v)}")
    for seg in (v or {}).get("damaged_segments") or ():
        print(f"  DAMAGED {seg}")

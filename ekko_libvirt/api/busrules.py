"""What the API concludes from the agents' reports and silences. Pure: rows and reports in,
decisions out (busdb.py stores them, bus.py does the messaging).

A report comes off the bus, so it is checked before anything believes it (parse_report,
parse_job_update: ReportInvalid names the field); a bad one is dropped and logged, never stored.

An agent is answering while its last heartbeat is at most DEAD_AFTER heartbeat intervals old (its
own interval, reported with each heartbeat; at least MIN_DEAD_S). A job moves only forward
(queued -> running -> done | failed; a final state never changes), and it ends in one of three ways:

    its agent reports it       job_update, or the job list every heartbeat carries (which repairs
                               an update lost while the broker was away)
    its agent went silent      queued / running jobs of the host fail: "agent on HOST is not
                               answering (last heartbeat ...)"
    its agent restarted        a job accepted by another agent process (agent_id) than the one
                               now reporting, and not in its list, fails: the process that had it
                               is gone (the new one settles what it left in libvirt)

A job whose request is still on its way (no agent accepted it yet: agent_id None) is left to the
request's own bounded wait (bus.py: call_timeout).
"""

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

from ..agent.settings import BUS_HOST

DEAD_AFTER = 3            # heartbeat intervals without a report before an agent counts as down
MIN_DEAD_S = 5.0
STATES = ("queued", "running", "done", "failed")
FINAL = ("done", "failed")
_RANK = {"queued": 0, "running": 1, "done": 2, "failed": 2}

MAX_DOMAINS = 10_000      # a report with more is refused (a hypervisor runs hundreds at most)
MAX_JOBS = 1_000
MAX_TEXT = 4096           # errors and names longer than this are cut
_HOST = BUS_HOST                  # what agent.bus.host accepts
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ReportInvalid(ValueError):
    """A message from the bus that is not what an agent sends: `field` says where."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class JobReport(NamedTuple):
    state: str
    result: Optional[Dict[str, Any]]
    error: Optional[str]


@dataclass(frozen=True)
class Report:
    """A heartbeat (or register), checked."""
    host: str
    agent_id: str
    version: str
    interval_s: float
    domains: List[Dict[str, Any]]
    failing: List[Dict[str, Any]]
    jobs: Dict[str, JobReport]


class JobChange(NamedTuple):
    job_id: str
    state: str
    result: Optional[Dict[str, Any]]
    error: Optional[str]


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- checking what came off the bus ---------------------------------------------------------------------
def _text(field: str, v: Any, pattern: Optional["re.Pattern[str]"] = None) -> str:
    if not isinstance(v, str):
        raise ReportInvalid(field, f"must be a string, got {type(v).__name__}")
    if pattern is not None and not pattern.match(v):
        raise ReportInvalid(field, f"not a valid value: {v[:80]!r}")
    return v


def _opt_text(field: str, v: Any) -> Optional[str]:
    if v is None:
        return None
    return _text(field, v)[:MAX_TEXT]


def _dicts(field: str, v: Any, most: int) -> List[Dict[str, Any]]:
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > most or not all(isinstance(d, dict) for d in v):
        raise ReportInvalid(field, f"must be a list of at most {most} mappings")
    return v


def parse_job(field: str, raw: Any) -> JobReport:
    if not isinstance(raw, Mapping):
        raise ReportInvalid(field, "must be a mapping {state, result, error}")
    state = raw.get("state")
    if state not in STATES:
        raise ReportInvalid(f"{field}.state", f"must be one of {', '.join(STATES)}, got {str(state)[:40]!r}")
    result = raw.get("result")
    if result is not None and not isinstance(result, dict):
        raise ReportInvalid(f"{field}.result", "must be a mapping or null")
    return JobReport(state, result, _opt_text(f"{field}.error", raw.get("error")))


def parse_report(raw: Any) -> Report:
    """A heartbeat's payload -> Report; ReportInvalid names the first bad field."""
    if not isinstance(raw, Mapping):
        raise ReportInvalid("report", "must be a mapping")
    beat = raw.get("interval_s")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)) or not math.isfinite(beat) \
            or not 0.2 <= beat <= 3600:
        raise ReportInvalid("interval_s", f"must be seconds from 0.2 to 3600, got {str(beat)[:40]!r}")
    jobs = raw.get("jobs")
    jobs = {} if jobs is None else jobs
    if not isinstance(jobs, Mapping) or len(jobs) > MAX_JOBS:
        raise ReportInvalid("jobs", f"must be a mapping of at most {MAX_JOBS} job ids")
    return Report(host=_text("host", raw.get("host"), _HOST), agent_id=_text("agent_id", raw.get("agent_id"), _ID),
                  version=str(_opt_text("version", raw.get("version")) or "")[:64], interval_s=float(beat),
                  domains=_dicts("domains", raw.get("domains"), MAX_DOMAINS),
                  failing=_dicts("failing", raw.get("failing"), MAX_DOMAINS),
                  jobs={_text("jobs key", k, _ID): parse_job(f"jobs.{k}", v) for k, v in jobs.items()})


def parse_job_update(host: Any, job_id: Any, state: Any, result: Any, error: Any) -> JobChange:
    """A job_update's arguments -> JobChange (for that host); ReportInvalid names the bad one."""
    _text("host", host, _HOST)
    j = parse_job("job", {"state": state, "result": result, "error": error})
    return JobChange(_text("job_id", job_id, _ID), *j)


# -- decisions -----------------------------------------------------------------------------------------
def advances(old: str, new: str) -> bool:
    """May a job in state `old` move to `new`? Only forward, and never out of a final state (a
    late report of a job already failed for a silent agent does not revive it)."""
    return old not in FINAL and new in _RANK and _RANK[new] > _RANK.get(old, -1)


def not_answering(host: str, row: Optional[Mapping[str, Any]], now: float) -> Optional[str]:
    """None while the agent on `host` answers; else why not, for the job's error."""
    if row is None:
        return f"agent on {host} is not answering (no heartbeat from it ever reached the API)"
    age = now - row["last_heartbeat"]
    if age <= max(MIN_DEAD_S, DEAD_AFTER * row["interval_s"]):
        return None
    return f"agent on {host} is not answering (last heartbeat {when(row['last_heartbeat'])}, {age:.0f} s ago)"


def reconcile(report: Report, open_jobs: Sequence[Mapping[str, Any]]) -> List[JobChange]:
    """The open jobs of the report's host against the job list the report carries."""
    out = []
    for job in open_jobs:
        r = report.jobs.get(job["id"])
        if r is not None:
            if advances(job["state"], r.state):
                out.append(JobChange(job["id"], *r))
        elif job.get("agent_id") and job["agent_id"] != report.agent_id:
            out.append(JobChange(job["id"], "failed", None,
                                 f"agent on {report.host} restarted while the job was {job['state']}: the job "
                                 "was lost with the process that ran it (the new agent settled what it left; "
                                 "nothing was committed by it)"))
    return out


def silenced(open_jobs: Sequence[Mapping[str, Any]], why: str) -> List[JobChange]:
    """Every open job of a host whose agent is not answering fails with `why`."""
    return [JobChange(j["id"], "failed", None, why) for j in open_jobs]

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from ekko_libvirt.agent.events import Action, DomainContext, Reaction, decide, parse_event
from ekko_libvirt.agent.state import (ChainState, ChainStatus, DomainBusy, DomainState, JobRecord, JobStatus, StateDir,
                                      StateError, apply_reactions, chain_checked, record_backup, require_full, stale_jobs)
from ekko_libvirt.procs import process_alive, process_start_ticks
from ekko_libvirt.errors import LockBusy

UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"


def ev(op, subop="begin", **kw):
    d = {"v": 1, "wall_ns": kw.pop("wall_ns", 100), "mono_ns": 1, "pid": 1, "domain": "vm1", "op": op,
         "subop": subop, "uuid": UUID, "xml": "ok", "boot_id": None}
    d.update(kw)
    return parse_event(d)


def step(st, op, subop="begin", ctx=None, **kw):
    e = ev(op, subop, **kw)
    return apply_reactions(st, e, decide(e, ctx or st.context()))


# --- pure transitions ----------------------------------------------------------------------------

def test_lifecycle_transitions():
    st = DomainState(UUID)
    st = step(st, "prepare")
    assert (st.running, st.last_event, st.name) == (False, "prepare", "vm1")
    st = step(st, "started")
    assert (st.running, st.clean_shutdown) == (True, None)
    st = step(st, "stopped", "end")
    assert (st.running, st.clean_shutdown, st.last_event) == (False, True, "stopped")
    st = step(st, "release", "end", wall_ns=200)
    assert (st.last_event, st.last_event_ns) == ("release", 200)


def test_start_after_crash_requires_full():
    st = step(step(DomainState(UUID), "started"), "prepare")     # no stop between two runs
    assert (st.running, st.clean_shutdown) == (False, False)
    assert st.chain.status is ChainStatus.FULL_REQUIRED and "uncleanly" in st.chain.reason


def test_check_chain_only_downgrades_ok():
    ok = record_backup(DomainState(UUID), "b1", "cp1", 5)
    assert ok.chain == ChainState(ChainStatus.OK, "", "b1", "cp1", 5)
    checked = step(ok, "started")
    assert checked.chain.status is ChainStatus.CHECK_REQUIRED and checked.chain.last_backup_id == "b1"
    assert chain_checked(checked).chain.status is ChainStatus.OK
    full = require_full(ok, "migrated")
    assert step(full, "started").chain.status is ChainStatus.FULL_REQUIRED
    assert chain_checked(full) == full
    assert step(DomainState(UUID), "started").chain.status is ChainStatus.NONE


def test_migrate_without_shared_storage_requires_full():
    st = record_backup(DomainState(UUID), "b1", "cp1", 5)
    assert step(st, "migrate").chain.status is ChainStatus.FULL_REQUIRED
    assert step(st, "migrate", ctx=DomainContext(shared_storage=True)).chain.status is ChainStatus.CHECK_REQUIRED


def test_ignore_changes_nothing_and_uuid_must_match():
    st = DomainState(UUID)
    assert apply_reactions(st, ev("frobnicate"), [Reaction(Action.IGNORE, "x")]) is st
    other = DomainState("00000000-0000-0000-0000-000000000000")
    with pytest.raises(ValueError, match=f"event for {UUID} applied to the state of {other.uuid}"):
        apply_reactions(other, ev("started"), [Reaction(Action.MARK_RUNNING, "x")])


def test_context_from_state():
    st = DomainState(UUID, running=True, job_id="j", job_kind="offline")
    assert st.context(shared_storage=True) == DomainContext(True, True, True, True)
    assert DomainState(UUID).context() == DomainContext()


def test_stale_jobs_pure():
    def job(i, status, pid):
        return JobRecord(f"j{i}", UUID, "incremental", status, i, i, pid)
    jobs = [job(1, JobStatus.RUNNING, 10), job(2, JobStatus.RUNNING, 11), job(3, JobStatus.FAILED, 10)]
    assert [j.job_id for j in stale_jobs(jobs, lambda pid, _start: pid == 11)] == ["j1"]


def test_job_record_transitions():
    j = JobRecord("j1", UUID, "full", JobStatus.RUNNING, 1, 1, 10)
    p = j.progressed(50, 100, 2)
    assert (p.bytes_done, p.bytes_total, p.updated_ns, p.status) == (50, 100, 2, JobStatus.RUNNING)
    d = p.finished(JobStatus.SUCCEEDED, 3, backup_id="b1")
    assert (d.status, d.backup_id, d.updated_ns) == (JobStatus.SUCCEEDED, "b1", 3)
    with pytest.raises(ValueError, match="a job cannot finish as running"):
        p.finished(JobStatus.RUNNING, 4)


# --- on disk -------------------------------------------------------------------------------------

@pytest.fixture
def sd(tmp_path):
    return StateDir(str(tmp_path / "state")).ensure()


def test_domain_roundtrip_atomic_and_private(sd):
    st = record_backup(DomainState(UUID, name="vm1", running=True, job_kind="full"), "b1", "cp1", 7)
    saved = sd.save_domain(st, now_ns=99)
    assert saved.updated_ns == 99 and sd.load_domain(UUID) == saved
    assert os.stat(sd.domain_path(UUID)).st_mode & 0o777 == 0o600
    assert [n for n in os.listdir(sd.domains_dir) if n.startswith(".")] == []
    assert sd.load_domain("00000000-0000-0000-0000-000000000000") is None
    assert sd.list_domains() == [saved]
    with pytest.raises(ValueError, match=r"not a domain UUID: '\.\./\.\./etc/passwd'"):
        sd.domain_path("../../etc/passwd")


def test_update_domain_read_modify_write(sd):
    st = sd.update_domain(UUID, lambda s: dataclasses.replace(s, name="vm1"), now_ns=5)
    assert st.name == "vm1" and sd.load_domain(UUID).updated_ns == 5
    same = sd.update_domain(UUID, lambda s: s, now_ns=6)
    assert same.updated_ns == 5                            # unchanged: not rewritten


def test_corrupt_state_file_names_the_file(sd):
    os.makedirs(sd.domains_dir, exist_ok=True)
    with open(sd.domain_path(UUID), "w") as f:
        f.write("{not json")
    with pytest.raises(StateError) as e:
        sd.load_domain(UUID)
    assert sd.domain_path(UUID) in str(e.value) and e.value.__cause__ is not None


def test_domain_lock_is_exclusive_and_names_the_holder(sd):
    with sd.lock_domain(UUID, "backup", job_id="j1"):
        with pytest.raises(DomainBusy) as e:
            with sd.lock_domain(UUID, "offline-backup"):
                pass
        assert isinstance(e.value, LockBusy)
        assert e.value.holder["job_id"] == "j1" and e.value.holder["pid"] == os.getpid()
        # another process cannot take it either
        code = ("import sys; from ekko_libvirt.agent.state import StateDir, DomainBusy\n"
                f"try:\n with StateDir({sd.root!r}).lock_domain({UUID!r}): sys.exit(0)\n"
                "except DomainBusy: sys.exit(3)\n")
        assert subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(),
                              env=dict(os.environ, PYTHONPATH=os.getcwd())).returncode == 3
    with sd.lock_domain(UUID):
        pass                                              # released


def test_jobs_survive_restart_and_stale_ones_are_recovered(sd):
    job = sd.begin_job(UUID, "incremental", now_ns=10)
    assert sd.load_domain(UUID).job_id == job.job_id and sd.load_domain(UUID).job_kind == "incremental"
    sd.save_job(job.progressed(4096, 8192, 11))
    assert sd.load_job(job.job_id).bytes_done == 4096
    assert sd.find_stale_jobs() == ()                     # we are alive
    # a "restarted agent": the job's process is gone
    abandoned = sd.recover_stale_jobs(now_ns=20, is_alive=lambda pid, start: False)
    assert [(j.job_id, j.status) for j in abandoned] == [(job.job_id, JobStatus.ABANDONED)]
    assert sd.load_job(job.job_id).status is JobStatus.ABANDONED and "ended" in sd.load_job(job.job_id).error
    assert sd.load_domain(UUID).job_id is None
    assert sd.find_stale_jobs(lambda pid, start: False) == ()


def test_end_job_and_prune(sd):
    job = sd.begin_job(UUID, "full", now_ns=10)
    done = sd.end_job(job, JobStatus.SUCCEEDED, 30, backup_id="b1")
    assert done.backup_id == "b1" and sd.load_domain(UUID).job_id is None
    running = sd.begin_job(UUID, "incremental", now_ns=40)
    assert [j.job_id for j in sd.list_jobs()] == [job.job_id, running.job_id]
    assert sd.prune_jobs(older_than_ns=35) == 1
    assert [j.job_id for j in sd.list_jobs()] == [running.job_id]


def test_offline_marker_format_matches_the_hook(sd):
    path = sd.mark_offline_backup(UUID, "vm1", job_id="j9", now_ns=1_700_000_000_000_000_000)
    assert path == os.path.join(sd.root, "locks", UUID + ".offline-backup")
    m = json.load(open(path))
    assert (m["uuid"], m["name"], m["job_id"], m["pid"]) == (UUID, "vm1", "j9", os.getpid())
    assert m["since"] == "2023-11-14T22:13:20+00:00" and m["pid_start"] == process_start_ticks(os.getpid())
    assert sd.read_offline_marker(UUID) == m
    assert sd.clear_offline_backup(UUID) and not sd.clear_offline_backup(UUID)


def test_offline_backup_context_clears_on_error(sd):
    with pytest.raises(RuntimeError, match="^boom$"):
        with sd.offline_backup(UUID, "vm1"):
            assert os.path.exists(sd.offline_marker_path(UUID))
            raise RuntimeError("boom")
    assert not os.path.exists(sd.offline_marker_path(UUID))


def test_recover_removes_markers_of_dead_owners_only(sd):
    sd.mark_offline_backup(UUID, "vm1")
    sd.recover_stale_jobs(is_alive=lambda pid, start: True)
    assert sd.read_offline_marker(UUID) is not None
    sd.recover_stale_jobs(is_alive=lambda pid, start: False)
    assert sd.read_offline_marker(UUID) is None


def test_process_alive():
    me = os.getpid()
    assert process_alive(me, process_start_ticks(me)) and process_alive(me, None)
    assert not process_alive(me, process_start_ticks(me) + 1)
    p = subprocess.Popen(["true"])
    p.wait()
    assert not process_alive(p.pid, None)


def test_apply_event_decides_and_applies_atomically(sd):
    st, reactions = sd.apply_event(ev("started"))
    assert st.running and [r.action for r in reactions] == [Action.MARK_RUNNING, Action.CHECK_CHAIN]
    st, reactions = sd.apply_event(ev("prepare"))                 # no stop since the start: unclean
    assert st.chain.status is ChainStatus.FULL_REQUIRED and Action.REQUIRE_FULL in [r.action for r in reactions]
    assert sd.load_domain(UUID) == st
    st, reactions = sd.apply_event(ev("started", uuid=None, xml="oversize"))
    assert [r.action for r in reactions] == [Action.IGNORE] and sd.list_domains() == [sd.load_domain(UUID)]

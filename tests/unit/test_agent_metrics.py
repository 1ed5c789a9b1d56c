"""agent/metrics.py (pure: facts -> families) through prometheus_client's real exposition and
parser, agent.metrics settings, and jobs.failure_cause."""

import os
import random

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ekko_libvirt import errors
from ekko_libvirt.agent import metrics
from ekko_libvirt.agent.jobs import JobCancelled, failure_cause
from ekko_libvirt.agent.metrics import AgentFacts, DomainFacts
from ekko_libvirt.agent.metrics_runner import _Collector
from ekko_libvirt.agent.settings import AgentSettings
from ekko_libvirt.agent.state import ChainState, ChainStatus, DomainState, JobRecord, JobStatus
from ekko_libvirt.errors import ConfigError

U1 = "11111111-2222-3333-4444-555555555555"
U2 = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
S = 10**9


def scrape(fams):
    """The families as a Prometheus server would read them: {(name, labels): value}."""
    coll = _Collector()
    coll.families = fams
    reg = CollectorRegistry(auto_describe=False)
    reg.register(coll)
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"{key} exposed twice"
            out[key] = s.value
    return out, text


def job(i, status, cause=None, started=100, took=5, total=None, uuid=U1):
    return JobRecord(job_id=f"j{i:04d}", uuid=uuid, kind="online", status=status, started_ns=started * S,
                     updated_ns=(started + took) * S, pid=1, bytes_total=total, cause=cause,
                     error=None if status is JobStatus.SUCCEEDED else "boom")


def agent(**kw):
    return AgentFacts(**dict(dict(started_ns=50 * S, libvirt_connected=True, max_concurrent=2, jobs_running=1,
                                  spool_waiting=3, spool_quarantined=0, hook_ok=True, collected_ns=200 * S), **kw))


HEAD = {"backup_id": "20261205T070000000Z-abcdef", "target": "vm1.vda", "kind": "full",
        "reason": "first backup of this disk", "segment_size": 1 << 20, "virtual_size": 16 << 20,
        "timings": {"started": 1000.5, "finished": 1004.25, "seconds": 3.75},
        "counts": {"read_bytes": 3 << 20, "stored_bytes": 12345, "new_segments": 2, "reused_segments": 1}}

LIFECYCLE = {
    "gc": {"started_ns": 300 * S, "seconds": 1.5, "ok": True, "stores": [
        {"project": None, "ok": True, "manifests": 4, "segments": 40, "unreferenced": 3, "deleted": 2,
         "deleted_bytes": 2048, "kept_young": 1},
        {"project": "p1", "ok": False, "error": "store down"}]},
    "verify": {"started_ns": 400 * S, "seconds": 2.0, "ok": False, "stores": [
        {"project": None, "ok": False, "backups": 4, "segments_checked": 40, "damaged_segments": ["a", "b"],
         "damaged_backups": ["b1"], "bad_manifests": []}]},
}


def test_one_domain_every_figure():
    chain = ChainState(ChainStatus.FULL_REQUIRED, "QEMU ended unexpectedly", "b2", None, 900 * S, 800 * S)
    st = DomainState(U1, "vm1", chain=chain)
    jobs = (job(1, JobStatus.SUCCEEDED, started=100, took=7, total=32 << 20),
            job(2, JobStatus.FAILED, "store", started=200), job(3, JobStatus.ABANDONED, started=300),
            job(4, JobStatus.FAILED, "store", started=400, took=9))
    d = DomainFacts(U1, "vm1", st, jobs, {"vda": HEAD}, interval_s=3600, job_running=False)
    got, text = scrape(metrics.families([d], LIFECYCLE, agent()))
    dom = (("domain", "vm1"), ("uuid", U1))
    disk = tuple(sorted(dom + (("disk", "vda"), ("target", "vm1.vda"))))
    assert got[("ekko_agent_up", ())] == 1 and got[("ekko_agent_jobs_running", ())] == 1
    assert got[("ekko_agent_metrics_collect_errors_total", ())] == 0
    assert "# TYPE ekko_agent_metrics_collect_errors_total counter" in text
    assert got[("ekko_agent_spool_events_waiting", ())] == 3 and got[("ekko_agent_hook_ok", ())] == 1
    states = {s.value: got[("ekko_domain_chain_state", tuple(sorted(dom + (("state", s.value),))))]
              for s in ChainStatus}
    assert states == {"none": 0, "ok": 0, "check-required": 0, "full-required": 1}
    assert got[("ekko_domain_chain_info", tuple(sorted(dom + (("reason", "QEMU ended unexpectedly"),
                                                              ("state", "full-required")))))] == 1
    assert got[("ekko_domain_last_success_timestamp_seconds", dom)] == 900
    assert got[("ekko_domain_last_full_timestamp_seconds", dom)] == 800
    assert got[("ekko_domain_backup_interval_seconds", dom)] == 3600
    assert got[("ekko_domain_backup_running", dom)] == 0
    assert got[("ekko_domain_backup_failures", tuple(sorted(dom + (("cause", "store"),))))] == 2
    assert got[("ekko_domain_backup_failures", tuple(sorted(dom + (("cause", "abandoned"),))))] == 1
    assert got[("ekko_domain_backup_failures_since_success", dom)] == 3
    assert got[("ekko_domain_last_failure_timestamp_seconds", dom)] == 409
    assert got[("ekko_domain_last_backup_duration_seconds", dom)] == 7
    assert got[("ekko_domain_last_backup_bytes", dom)] == 32 << 20
    assert got[("ekko_disk_last_backup_full", disk)] == 1
    info = tuple(sorted(disk + (("backup_id", HEAD["backup_id"]), ("kind", "full"),
                                ("reason", "first backup of this disk"))))
    assert got[("ekko_disk_last_backup_info", info)] == 1
    assert got[("ekko_disk_last_backup_timestamp_seconds", disk)] == 1004.25
    assert got[("ekko_disk_last_backup_duration_seconds", disk)] == 3.75
    assert got[("ekko_disk_last_backup_read_bytes", disk)] == 3 << 20
    assert got[("ekko_disk_last_backup_stored_bytes", disk)] == 12345
    assert got[("ekko_disk_last_backup_reused_segments", disk)] == 1
    assert got[("ekko_disk_last_backup_reused_bytes", disk)] == 1 << 20
    assert got[("ekko_disk_size_bytes", disk)] == 16 << 20
    assert got[("ekko_gc_last_run_timestamp_seconds", ())] == 300 and got[("ekko_gc_last_run_ok", ())] == 1
    assert got[("ekko_store_gc_ok", (("project", "default"),))] == 1
    assert got[("ekko_store_gc_ok", (("project", "p1"),))] == 0
    assert ("ekko_store_segments", (("project", "p1"),)) not in got          # that namespace's gc failed
    assert got[("ekko_store_segments", (("project", "default"),))] == 40
    assert got[("ekko_store_gc_deleted_bytes", (("project", "default"),))] == 2048
    assert got[("ekko_verify_last_run_ok", ())] == 0
    assert got[("ekko_store_damaged_segments", (("project", "default"),))] == 2
    assert got[("ekko_store_damaged_backups", (("project", "default"),))] == 1
    assert got[("ekko_store_bad_manifests", (("project", "default"),))] == 0


def test_a_domain_never_backed_up_and_not_scheduled():
    d = DomainFacts(U2, "new", None, (), {}, interval_s=None, job_running=True)
    got, _ = scrape(metrics.families([d], {}, agent(hook_ok=None, spool_waiting=None)))
    dom = (("domain", "new"), ("uuid", U2))
    assert got[("ekko_domain_chain_state", tuple(sorted(dom + (("state", "none"),))))] == 1
    assert got[("ekko_domain_backup_running", dom)] == 1
    for absent in ("ekko_domain_last_success_timestamp_seconds", "ekko_domain_backup_interval_seconds",
                   "ekko_domain_last_backup_duration_seconds", "ekko_domain_last_failure_timestamp_seconds"):
        assert (absent, dom) not in got, absent
    assert not [k for k in got if k[0].startswith(("ekko_disk_", "ekko_store_", "ekko_gc_"))]
    assert ("ekko_agent_hook_ok", ()) not in got and ("ekko_agent_spool_events_waiting", ()) not in got
    assert got[("ekko_domain_backup_failures_since_success", dom)] == 0


def test_odd_headers_and_records_leave_figures_out_not_the_scrape():
    odd = {"backup_id": "x", "target": "t", "kind": "incremental", "reason": 'quote " and \\ and\nnewline',
           "timings": "nonsense", "counts": {"read_bytes": "12", "stored_bytes": True}}
    d = DomainFacts(U1, 'vm "1"', DomainState(U1), (), {"vda": odd})
    life = {"gc": {"started_ns": "yesterday", "stores": ["junk", {"project": "p", "ok": "yes"}]}, "verify": []}
    got, _ = scrape(metrics.families([d], life, agent()))
    disk = tuple(sorted((("domain", 'vm "1"'), ("uuid", U1), ("disk", "vda"), ("target", "t"))))
    assert got[("ekko_disk_last_backup_full", disk)] == 0
    info = [k for k in got if k[0] == "ekko_disk_last_backup_info"]
    assert dict(info[0][1])["reason"] == 'quote " and \\ and\nnewline'          # escaped and read back
    for absent in ("ekko_disk_last_backup_read_bytes", "ekko_disk_last_backup_stored_bytes",
                   "ekko_disk_last_backup_timestamp_seconds", "ekko_disk_last_backup_reused_bytes"):
        assert (absent, disk) not in got
    assert ("ekko_gc_last_run_timestamp_seconds", ()) not in got
    assert got[("ekko_store_gc_ok", (("project", "p"),))] == 0          # "yes" is not True


def test_failure_counts_match_a_reference_on_random_histories():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rnd = random.Random(seed)
    causes = ("store", "engine", "busy", None, "scratch-space-low")
    for _ in range(200):
        n = rnd.randint(0, 12)
        jobs = []
        for i in range(n):
            status = rnd.choice([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.ABANDONED, JobStatus.RUNNING])
            jobs.append(job(i, status, rnd.choice(causes) if status is JobStatus.FAILED else None, started=100 + i))
        got, _ = scrape(metrics.families([DomainFacts(U1, "vm", DomainState(U1), tuple(jobs))], {}, agent()))
        # reference: walk the history written out by hand
        want, streak = {}, 0
        for j in jobs:
            if j.status is JobStatus.SUCCEEDED:
                streak = 0
            elif j.status is not JobStatus.RUNNING:
                streak += 1
                c = "abandoned" if j.status is JobStatus.ABANDONED else (j.cause or "unknown")
                want[c] = want.get(c, 0) + 1
        have = {dict(k[1])["cause"]: v for k, v in got.items() if k[0] == "ekko_domain_backup_failures"}
        dom = (("domain", "vm"), ("uuid", U1))
        assert have == want, (seed, jobs)
        assert got[("ekko_domain_backup_failures_since_success", dom)] == streak, (seed, jobs)


@pytest.mark.parametrize("exc, cause", [
    (JobCancelled("x"), "cancelled"), (KeyboardInterrupt(), "interrupted"), (errors.LockBusy("x"), "busy"),
    (ConfigError("k", "p"), "config"), (errors.QMPUnavailable("/s", "r"), "qemu-unavailable"),
    (errors.DiskNotFound("x"), "disk-not-found"), (errors.EngineError("x"), "engine"),
    (errors.ObjectNotFound("x"), "store"), (errors.StoreError("x"), "store"),
    (errors.ManifestError("x"), "integrity"), (errors.EkkoError("x"), "other"), (ValueError("x"), "internal")])
def test_failure_cause(exc, cause):
    assert failure_cause(exc) == cause


def test_failure_cause_of_libvirt_errors():
    libvirt = pytest.importorskip("libvirt")
    assert failure_cause(libvirt.libvirtError("no domain")) == "libvirt"


@pytest.mark.parametrize("raw, want", [
    ({"listen": "127.0.0.1:9597"}, ("127.0.0.1", 9597, None, 60)),
    ({"listen": 9597, "interval": "30s"}, ("127.0.0.1", 9597, None, 30)),
    ({"listen": "[::1]:0", "textfile": "/var/lib/x/ekko.prom"}, ("::1", 0, "/var/lib/x/ekko.prom", 60)),
    ({"textfile": "/t/e.prom"}, (None, 0, "/t/e.prom", 60))])
def test_metrics_settings(raw, want):
    m = AgentSettings.from_mapping({"agent": {"metrics": raw}}).metrics
    assert (m.listen_host, m.listen_port, m.textfile, m.interval_s) == want


def test_metrics_off_by_default():
    assert AgentSettings.from_mapping({}).metrics is None


@pytest.mark.parametrize("raw, match", [
    ({"listen": "x"}, r"agent\.metrics\.listen: must be HOST:PORT"),
    ({"listen": "h:70000"}, r"agent\.metrics\.listen"), ({"listen": True}, r"agent\.metrics\.listen"),
    ({"textfile": "rel.prom"}, r"agent\.metrics\.textfile: must be an absolute path ending in \.prom"),
    ({"textfile": "/abs/ekko.txt"}, r"agent\.metrics\.textfile"),
    ({}, r"agent\.metrics: give listen"), ({"listen": 1, "interval": "soon"}, r"agent\.metrics\.interval"),
    ({"listen": 1, "port": 2}, r"agent\.metrics\.port: unknown key"), ("on", r"agent\.metrics: must be a mapping")])
def test_bad_metrics_settings(raw, match):
    with pytest.raises(ConfigError, match=match):
        AgentSettings.from_mapping({"agent": {"metrics": raw}})

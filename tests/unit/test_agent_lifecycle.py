"""The agent's lifecycle work without libvirt: when gc/verify are due (pure), the settings
(retention per domain, gc_interval, verify), the runs on a local store with synthetic backups and
their records, prune after a scheduled backup, `ekko status` rows, and `ekko list/show` showing
protection and the last verification."""

import datetime
import json
import threading
from datetime import timedelta, timezone
from types import SimpleNamespace

import pytest
import yaml

from ekko_libvirt.cli import check_sections
from ekko_libvirt.store import catalog, markers
from ekko_libvirt import cli, config
from ekko_libvirt.format import manifest as mf, segment
from ekko_libvirt.lifecycle import verify
from ekko_libvirt.agent import maintenance
from ekko_libvirt.agent.scheduler import TASK_RETRY_S, TaskRun, task_due, tasks_plan
from ekko_libvirt.agent.settings import AgentSettings, VerifySettings
from ekko_libvirt.agent.status import describe, describe_lifecycle, last_task_runs, lifecycle_info, row
from ekko_libvirt.errors import ConfigError
from ekko_libvirt.lifecycle.prune import Policy
from ekko_libvirt.store.local import LocalStore

UTC = timezone.utc
UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"
SEG = 4096
NOW = datetime.datetime(2024, 6, 10, 12, 0, tzinfo=UTC)


def day(d, hour=12):
    return datetime.datetime(2024, 6, d, hour, tzinfo=UTC)


def put(store, target, when, tag, labels=None):
    """A synthetic backup of one segment; -> backup id."""
    raw = tag.encode() * (SEG // len(tag)) + bytes(SEG % len(tag))
    enc = segment.encode(raw)
    store.put(enc.key, enc.blob)
    table = mf.SegmentTable(1)
    table.set_data(0, enc.digest)
    bid = catalog.new_backup_id(when)
    catalog.commit(store, mf.Manifest(bid, target, SEG, SEG, table, created=when.isoformat(),
                                      labels=dict(labels or {})))
    return bid


def ids(store, target):
    return [k.rsplit("/", 1)[1] for k in catalog.keys(store, target)]


# --- what is due (pure) ----------------------------------------------------------------------------

def test_task_due():
    assert task_due(NOW, "gc", None, None) == maintenance_off("gc")
    first = task_due(NOW, "gc", 3600, None)
    assert first.due and first.next_due == NOW                       # never ran: due now
    ran = TaskRun(NOW - timedelta(minutes=30), True)
    later = task_due(NOW, "gc", 3600, ran)
    assert not later.due and later.next_due == NOW + timedelta(minutes=30)
    assert task_due(NOW + timedelta(minutes=30), "gc", 3600, ran).due
    failed = TaskRun(NOW - timedelta(hours=2), False)                # failed: again after an hour
    assert task_due(NOW, "gc", 86400, failed).due
    assert not task_due(NOW, "gc", 86400, TaskRun(NOW - timedelta(minutes=10), False)).due
    assert task_due(NOW, "gc", 86400, TaskRun(NOW, False)).next_due == NOW + timedelta(seconds=TASK_RETRY_S)
    assert task_due(NOW, "gc", 60, TaskRun(NOW - timedelta(seconds=61), False)).due   # shorter interval wins
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        task_due(NOW.replace(tzinfo=None), "gc", 60, None)


def maintenance_off(name):
    from ekko_libvirt.agent.scheduler import TaskDecision
    return TaskDecision(name, False, None)


def test_tasks_plan_runs_due_ones_one_after_the_other_never_while_busy():
    tasks = [("gc", 3600, TaskRun(NOW - timedelta(hours=2), True)), ("verify", 7200, None), ("off", None, None)]
    p = tasks_plan(NOW, tasks, busy=False)
    assert p.run == ("gc", "verify") and p.next_wakeup is None
    busy = tasks_plan(NOW, tasks, busy=True)
    assert busy.run == () and busy.next_wakeup is None               # the running thread wakes the agent
    tasks = [("gc", 3600, TaskRun(NOW - timedelta(minutes=50), True)),
             ("verify", 7200, TaskRun(NOW - timedelta(minutes=100), True))]
    p = tasks_plan(NOW, tasks, busy=False)
    assert p.run == () and p.next_wakeup == NOW + timedelta(minutes=10)
    assert [d.next_due for d in p.decisions] == [NOW + timedelta(minutes=10), NOW + timedelta(minutes=20)]


# --- settings -------------------------------------------------------------------------------------

def test_lifecycle_settings_and_retention_precedence():
    s = AgentSettings.from_mapping({})
    assert s.prune_after_backup and s.gc_interval_s is None and s.verify is None and not s.has_retention()
    assert s.retention_for("vm.vda", UUID, "vm") is None
    s = AgentSettings.from_mapping({
        "agent": {"prune_after_backup": False, "gc_interval": "12h",
                  "verify": {"interval": "1d", "sample": "5%", "deep": True, "since_days": 30}},
        "retention": {"keep_last": 7, "targets": {"vm.vdb": {"keep_daily": 3}}},
        "domains": {"vm": {"retention": {"keep_last": 2}}, UUID.upper(): {"retention": {"keep_weekly": 4}},
                    "other": {"schedule": {"interval": "1h"}}}})
    assert not s.prune_after_backup and s.gc_interval_s == 12 * 3600
    assert s.verify == VerifySettings(86400, 0.05, True, 30.0)
    assert s.retention_for("vm.vdb", None, "vm") == Policy(daily=3)             # retention.targets wins
    assert s.retention_for("vm.vda", None, "vm") == Policy(last=2)              # then the domain's
    assert s.retention_for("vm.vda", UUID, "vm") == Policy(weekly=4)            # a UUID entry over a name one
    assert s.retention_for("x.vda", "0b6f2a4e-0000-4000-8000-000000000001", "x") == Policy(last=7)   # default
    assert AgentSettings.from_mapping({"agent": {"verify": {}}}).verify == VerifySettings()
    assert AgentSettings.from_mapping({"agent": {"verify": {"sample": 0.25}}}).verify.sample == 0.25
    only_domain = AgentSettings.from_mapping({"domains": {"vm": {"retention": {"keep_last": 1}}}})
    assert only_domain.has_retention() and only_domain.retention_for("other.vda") is None


@pytest.mark.parametrize("raw,key", [
    ({"agent": {"gc_interval": "often"}}, "agent.gc_interval"),
    ({"agent": {"gc_interval": 0}}, "agent.gc_interval"),
    ({"agent": {"prune_after_backup": "yes"}}, "agent.prune_after_backup"),
    ({"agent": {"verify": "daily"}}, "agent.verify"),
    ({"agent": {"verify": {"every": "1d"}}}, "agent.verify.every"),
    ({"agent": {"verify": {"interval": "1y"}}}, "agent.verify.interval"),
    ({"agent": {"verify": {"sample": "0%"}}}, "agent.verify.sample"),
    ({"agent": {"verify": {"sample": 5}}}, "agent.verify.sample"),
    ({"agent": {"verify": {"sample": "lots"}}}, "agent.verify.sample"),
    ({"agent": {"verify": {"deep": "yes"}}}, "agent.verify.deep"),
    ({"agent": {"verify": {"since_days": -1}}}, "agent.verify.since_days"),
    ({"domains": {"vm": {"retention": {"keep_lats": 2}}}}, "domains.vm.retention.keep_lats"),
    ({"domains": {"vm": {"retention": {"keep_last": -2}}}}, "domains.vm.retention.keep_last"),
    ({"domains": {"vm": {"retention": {}}}}, "domains.vm.retention"),
    ({"domains": {"vm": {"retention": 3}}}, "domains.vm.retention"),
    ({"domains": {"vm": {"prune": {}}}}, "domains.vm.prune"),
])
def test_lifecycle_settings_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        AgentSettings.from_mapping(raw)
    assert e.value.key == key
    with pytest.raises(ConfigError) as e:          # and every command fails as early
        check_sections(config.build(raw))
    assert e.value.key == key and key in str(e.value)


def test_example_config_loads_with_the_lifecycle_keys():
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "ekko.yaml.example")
    with open(path) as f:
        s = AgentSettings.from_config(config.build(yaml.safe_load(f)))
    assert s.gc_interval_s == 86400 and s.verify.sample == 0.05 and s.verify.deep
    assert s.retention_for("instance-0000002a.vda", None, "instance-0000002a") == Policy(last=4, daily=7)


# --- the runs on a store ---------------------------------------------------------------------------

def test_prune_domain_keeps_newest_n_and_protected(tmp_path):
    store = LocalStore(str(tmp_path))
    a = [put(store, "vm.vda", day(d), f"a{d}") for d in range(1, 6)]
    b = [put(store, "vm.vdb", day(d), f"b{d}") for d in range(1, 6)]
    other = [put(store, "web.vda", day(d), f"w{d}") for d in range(1, 4)]
    markers.protect(store, "vm.vda", a[0])
    rec = maintenance.prune_domain(store, None, ["vm.vda", "vm.vdb", "vm.vdc"],
                                   {"vm.vda": Policy(last=2), "vm.vdb": Policy(last=3)}.get)
    assert ids(store, "vm.vda") == [a[0], a[3], a[4]]
    assert ids(store, "vm.vdb") == b[2:]
    assert ids(store, "web.vda") == other                          # another domain's targets: untouched
    assert rec["ok"] and rec["kept"] == 6 and sorted(rec["deleted"]) == sorted(
        [f"vm.vda/{x}" for x in a[1:3]] + [f"vm.vdb/{x}" for x in b[:2]])
    assert rec["policies"] == {"vm.vda": "--keep-last 2", "vm.vdb": "--keep-last 3"}
    assert rec["summary"] == "deleted 4 backup(s), kept 6, of 2 disk(s)"


def test_run_gc_and_verify_over_namespaces(tmp_path):
    root = LocalStore(str(tmp_path))
    proj = LocalStore(str(tmp_path / "projects" / "p1"))
    stores = {None: root, "p1": proj}
    keep = put(root, "vm.vda", day(1), "keep")
    gone = put(root, "vm.vda", day(2), "gone")
    put(proj, "web.vda", day(1), "proj")
    root.delete(catalog.manifest_key("vm.vda", gone))                # its segment is garbage now
    rec = maintenance.run_gc(stores.get, [None, "p1"], grace_hours=0)
    assert rec["ok"] and rec["error"] is None and [s["project"] for s in rec["stores"]] == [None, "p1"]
    assert rec["stores"][0]["deleted"] == 1 and rec["stores"][1]["deleted"] == 0
    assert rec["summary"].startswith("deleted 1 segment(s)") and "2 of 2 namespace(s)" in rec["summary"]
    assert rec["started_ns"] <= rec["finished_ns"] and rec["grace_hours"] == 0

    vs = VerifySettings(sample=1.0, deep=True, since_days=30)
    rec = maintenance.run_verify(stores.get, [None, "p1"], vs)
    assert rec["ok"] and rec["deep"] and [s["backups"] for s in rec["stores"]] == [1, 1]
    assert markers.read_verify(root, "vm.vda", keep).ok
    again = maintenance.run_verify(stores.get, [None, "p1"], vs)
    assert [s["skipped"] for s in again["stores"]] == [1, 1]            # verified recently: skipped

    seg_key = next(iter(root.list("segments/")))
    root.delete(seg_key)                                              # damage
    bad = maintenance.run_verify(stores.get, [None, "p1"], VerifySettings(deep=True))
    assert not bad["ok"] and bad["stores"][0]["damaged_backups"] == [keep] and bad["stores"][1]["ok"]
    assert "damage found" in bad["error"] and "DAMAGE in backup(s)" in bad["summary"]


def test_one_failing_namespace_does_not_stop_the_others_and_cancel_stops(tmp_path):
    good = LocalStore(str(tmp_path))
    put(good, "vm.vda", day(1), "x")

    def open_store(ns):
        if ns == "broken":
            raise ConfigError("namespace", "cannot open it")
        return good
    rec = maintenance.run_gc(open_store, ["broken", None], 0)
    assert not rec["ok"] and rec["stores"][1]["ok"] and "broken: config: namespace" in rec["error"]
    stop = threading.Event()
    stop.set()
    rec = maintenance.run_verify(open_store, [None, "x"], VerifySettings(), cancel=stop)
    assert not rec["ok"] and rec["stores"] == [{"project": None, "ok": False, "error": maintenance.CANCELLED}]


def test_verify_skips_a_manifest_pruned_since_it_was_listed(tmp_path):
    store = LocalStore(str(tmp_path))
    bid = put(store, "vm.vda", day(1), "x")
    key = catalog.manifest_key("vm.vda", bid)
    store.delete(key)
    done = verify.run(store, [key], deep=True)
    assert done.report.ok and done.report.gone == [key] and done.report.bad_manifests == {}
    assert markers.read_verify(store, "vm.vda", bid) is None         # no marker for a backup that is gone


# --- status -------------------------------------------------------------------------------------------

def test_lifecycle_status_info_and_text():
    started = int((NOW - timedelta(hours=1)).timestamp() * 1e9)
    record = {"gc": {"started": "2024-06-10T11:00:00+00:00", "started_ns": started, "ok": True, "error": None,
                     "summary": "deleted 3 segment(s)", "grace_hours": 24},
              "verify": {"started": "2024-06-10T11:00:00+00:00", "started_ns": started, "ok": False,
                         "error": "default: damage found in backup(s) b1", "summary": "checked 2"},
              "prune": {UUID: {}}}
    runs = last_task_runs(record)
    assert runs == {"gc": TaskRun(NOW - timedelta(hours=1), True), "verify": TaskRun(NOW - timedelta(hours=1), False)}
    assert last_task_runs({"gc": {"started_ns": "x"}, "verify": 3}) == {}
    info = lifecycle_info(record, 86400, VerifySettings(interval_s=86400, sample=0.05, deep=True), NOW)
    assert info["gc"]["last"]["ok"] and not info["gc"]["due"] and info["gc"]["next"] == "2024-06-11T11:00:00+00:00"
    assert info["gc"]["last"]["grace_hours"] == 24
    assert info["verify"]["due"] and info["verify"]["sample"] == 0.05 and info["verify"]["deep"]  # failed: retried
    text = describe_lifecycle(info)
    assert "gc:     last 2024-06-10T11:00:00+00:00 ok: deleted 3 segment(s); next 2024-06-11T11:00:00+00:00" in text
    assert "verify: last 2024-06-10T11:00:00+00:00 FAILED: default: damage found in backup(s) b1; next now" in text
    off = lifecycle_info({}, None, None, NOW)
    assert not off["gc"]["enabled"] and off["gc"]["next"] is None and off["verify"]["last"] is None
    assert describe_lifecycle(off) == "gc:     off (no agent.gc_interval)\nverify: off (no agent.verify)"
    never = describe_lifecycle(lifecycle_info({}, 3600, None, NOW))
    assert never.startswith("gc:     never run; next now (every 1h)")


def test_status_row_shows_the_last_prune():
    pruned = {"time": "2024-06-10T12:00:00+00:00", "ok": True, "error": None, "summary": "deleted 2 backup(s)",
              "deleted": ["vm.vda/b1"], "kept": 2, "policies": {"vm.vda": "--keep-last 2"}, "project": None}
    r = row(UUID, "vm", True, None, [], {}, None, pruned)
    assert r["last_prune"]["deleted"] == ["vm.vda/b1"]
    assert "pruned  2024-06-10T12:00:00+00:00: deleted 2 backup(s) (vm.vda --keep-last 2)" in describe(r)
    failed = row(UUID, "vm", True, None, [], {}, None, {"time": "t", "ok": False, "error": "store down"})
    assert "pruned  t: FAILED: store down" in describe(failed)
    assert row(UUID, "vm", True, None, [], {}, None)["last_prune"] is None


# --- the daemon's part, without libvirt ---------------------------------------------------------------

def _agent(tmp_path, raw):
    from ekko_libvirt.agent.daemon import Agent
    raw = dict(raw, agent=dict({"spool_dir": str(tmp_path / "spool")}, **raw.get("agent", {})))
    cfg = config.build(dict({"state_dir": str(tmp_path / "state"),
                             "store": {"type": "local", "path": str(tmp_path / "store")}}, **raw))
    a = Agent(cfg, AgentSettings.from_config(cfg), "test:///default")
    a.sd.ensure()
    return a


def test_daemon_runs_gc_then_verify_records_them_and_waits_for_the_interval(tmp_path):
    a = _agent(tmp_path, {"agent": {"gc_interval": "1h", "verify": {"interval": "2h", "deep": True}},
                          "retention": {"gc_grace_hours": 0}})
    store = a.open_store(None)
    put(store, "vm.vda", day(1), "x")
    wait = a.maintenance.start_due()
    a.maintenance.thread.join(30)
    rec = a.sd.load_lifecycle()
    assert rec["gc"]["ok"] and rec["verify"]["ok"] and rec["gc"]["finished_ns"] <= rec["verify"]["started_ns"]
    assert wait == a.settings.poll_interval_s
    first = a.maintenance.thread
    wait = a.maintenance.start_due()                                 # not due again for an hour
    assert a.maintenance.thread is first and 3500 < wait <= 3600
    runs = last_task_runs(rec)                                       # what a restarted agent starts from
    assert set(runs) == {"gc", "verify"} and all(r.ok for r in runs.values())


def test_daemon_prunes_after_a_scheduled_backup_under_the_domain_lock(tmp_path):
    a = _agent(tmp_path, {"retention": {"keep_last": 5}, "domains": {"vm": {"retention": {"keep_last": 2}}}})
    store = a.open_store(None)
    bids = [put(store, "vm.vda", day(d), f"v{d}", labels={"domain_name": "vm"}) for d in range(1, 6)]
    markers.protect(store, "vm.vda", bids[0])
    results = [SimpleNamespace(manifest=SimpleNamespace(target="vm.vda", labels={"domain_name": "vm"}))]
    with a.sd.lock_domain(UUID, "backup"):                          # a backup by hand holds the domain
        a.maintenance.prune_after(UUID, "vm", results)
    assert ids(store, "vm.vda") == bids and "prune" not in a.sd.load_lifecycle()
    a.maintenance.prune_after(UUID, "vm", results)
    assert ids(store, "vm.vda") == [bids[0], bids[3], bids[4]]     # newest 2 + the protected one
    rec = a.sd.load_lifecycle()["prune"][UUID]
    assert rec["ok"] and len(rec["deleted"]) == 2 and rec["policies"] == {"vm.vda": "--keep-last 2"}

    a.settings = AgentSettings.from_config(config.build({"agent": {"prune_after_backup": False},
                                                         "retention": {"keep_last": 1}}))
    a.maintenance.prune_after(UUID, "vm", results)
    assert len(ids(store, "vm.vda")) == 3                           # switched off


# --- ekko prune / list / show ---------------------------------------------------------------------

@pytest.fixture
def cli_store(tmp_path):
    cfg = {"store": {"type": "local", "path": str(tmp_path / "store")}, "state_dir": str(tmp_path / "state"),
           "run_dir": str(tmp_path / "run")}
    path = tmp_path / "ekko.yaml"

    def run(*args):
        path.write_text(yaml.safe_dump(run.cfg))
        return cli.main(["-c", str(path), *args])
    run.store = LocalStore(str(tmp_path / "store"))
    run.cfg = cfg
    return run


def test_cli_prune_uses_the_domain_retention_as_the_agent_does(cli_store, capsys):
    store = cli_store.store
    vm = [put(store, "vm.vda", day(d), f"v{d}", labels={"domain_name": "vm", "domain_uuid": UUID})
          for d in range(1, 5)]
    web = [put(store, "web.vda", day(d), f"w{d}", labels={"domain_name": "web"}) for d in range(1, 5)]
    cli_store.cfg["domains"] = {UUID: {"retention": {"keep_last": 1}}}
    assert cli_store("prune") == 0                                  # a domain policy is a policy
    assert ids(store, "vm.vda") == vm[3:] and ids(store, "web.vda") == web   # web: no policy, all kept
    cli_store.cfg["retention"] = {"keep_last": 3}
    assert cli_store("prune", "--json") == 0
    assert ids(store, "web.vda") == web[1:]
    capsys.readouterr()


def test_cli_list_and_show_protection_and_verification(cli_store, capsys):
    store = cli_store.store
    b1 = put(store, "vm.vda", day(1), "one")
    b2 = put(store, "vm.vda", day(2), "two")
    assert cli_store("protect", b1) == 0
    assert cli_store("verify", "--deep") == 0
    store.delete(segment.segment_key(catalog.load(store, catalog.find(store, b2)).table.get(0)))   # b2's segment
    assert cli_store("verify", b2) == 3                               # damage found
    capsys.readouterr()

    assert cli_store("list", "--json") == 0
    rows = {r["backup_id"]: r for r in json.loads(capsys.readouterr().out)["backups"]}
    assert rows[b1]["protected"] is True and rows[b2]["protected"] is False
    v1 = rows[b1]["verified"]
    assert v1["ok"] is True and v1["deep"] is True and v1["sample"] == 1.0 and v1["time"].endswith("+00:00")
    assert cli_store("list") == 0
    text = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert "PROTECTED" in text[b1] and "verified ok" in text[b1] and "(deep)" in text[b1]
    assert "PROTECTED" not in text[b2]

    assert cli_store("show", b1, "--json") == 0
    out = json.loads(capsys.readouterr().out)["backup"]
    assert out["protected"] is True and out["verified"]["ok"] is True
    assert cli_store("unprotect", b1) == 0
    capsys.readouterr()
    assert cli_store("show", b1) == 0
    text = capsys.readouterr().out
    assert "protected   no" in text and "verified    verified ok" in text

    b3 = put(store, "vm.vda", day(3), "three")
    assert cli_store("show", b3) == 0
    assert "verified    never verified" in capsys.readouterr().out
    assert cli_store("show", b3, "--json") == 0
    out = json.loads(capsys.readouterr().out)["backup"]
    assert out["protected"] is False and out["verified"] is None


def test_cli_list_and_show_a_failed_verification(cli_store, capsys):
    store = cli_store.store
    b1 = put(store, "vm.vda", day(1), "one")
    store.delete(next(iter(store.list("segments/"))))
    assert cli_store("verify") == 3
    capsys.readouterr()
    assert cli_store("list", "--json") == 0
    (r,) = json.loads(capsys.readouterr().out)["backups"]
    assert r["verified"]["ok"] is False and len(r["verified"]["damaged_segments"]) == 1
    assert cli_store("show", b1) == 0
    text = capsys.readouterr().out
    assert "VERIFY FAILED" in text and "1 damaged segment(s)" in text and "  DAMAGED segments/" in text

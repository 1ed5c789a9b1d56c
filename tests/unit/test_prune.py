"""Retention rules (pure), the `retention:` config section, and `ekko prune/protect` on a local
store filled with synthetic manifests (no QEMU needed)."""

import datetime
import json
import os

import pytest
import yaml

from ekko_libvirt.cli import check_sections
from ekko_libvirt.store import catalog, markers
from ekko_libvirt import cli, config
from ekko_libvirt.format import manifest as mf, segment
from ekko_libvirt.errors import ConfigError
from ekko_libvirt.lifecycle.prune import Backup, Policy, RetentionConfig, backup_time, plan, plan_target
from ekko_libvirt.store.local import LocalStore

UTC = datetime.timezone.utc


def t(day, hour=12, minute=0, month=1, year=2024):
    return datetime.datetime(year, month, day, hour, minute, tzinfo=UTC)


def bk(when, target="t1", protected=False, readable=True, suffix="aaaaaa"):
    return Backup(catalog.new_backup_id(when).rsplit("-", 1)[0] + "-" + suffix, target, when, protected, readable)


def kept(decisions):
    return [d.backup.time for d in decisions if d.keep]


def why(decisions, when):
    return next(d.reasons for d in decisions if d.backup.time == when)


# -- the rules, one at a time ----------------------------------------------------------------------
def test_backup_id_time_roundtrip():
    now = datetime.datetime(2024, 3, 5, 7, 8, 9, 123456, tzinfo=UTC)
    assert backup_time(catalog.new_backup_id(now)) == now.replace(microsecond=123000)
    assert backup_time("not-an-id") is None
    assert backup_time("20240305T070809123X-abcdef") is None


def test_keep_last():
    bs = [bk(t(d)) for d in range(1, 11)]
    ds = plan_target(bs, Policy(last=3))
    assert kept(ds) == [t(8), t(9), t(10)]
    assert why(ds, t(10)) == ("newest", "last 1/3")
    assert why(ds, t(8)) == ("last 3/3",)
    assert why(ds, t(7)) == ("no rule keeps it",)
    assert [d.backup.time for d in ds] == [t(d) for d in range(1, 11)]          # oldest first


def test_keep_daily_takes_the_newest_of_each_day():
    bs = [bk(t(d, h)) for d in (1, 2, 3, 5) for h in (1, 13, 23)]
    ds = plan_target(bs, Policy(daily=3))
    assert kept(ds) == [t(2, 23), t(3, 23), t(5, 23)]
    assert why(ds, t(3, 23)) == ("daily 2024-01-03 (2/3)",)
    assert why(ds, t(5, 23)) == ("newest", "daily 2024-01-05 (1/3)")


def test_keep_hourly():
    bs = [bk(t(1, h, m)) for h in (9, 10, 11) for m in (0, 30)]
    ds = plan_target(bs, Policy(hourly=2))
    assert kept(ds) == [t(1, 10, 30), t(1, 11, 30)]
    assert why(ds, t(1, 10, 30)) == ("hourly 2024-01-01 10:00 (2/2)",)


def test_keep_weekly_uses_iso_weeks():
    # 2024-01-01 is a Monday: days 1-7 are week 1, 8-14 week 2, 15-21 week 3
    bs = [bk(t(d)) for d in (1, 3, 7, 8, 14, 15, 16)]
    ds = plan_target(bs, Policy(weekly=2))
    assert kept(ds) == [t(14), t(16)]
    assert why(ds, t(14)) == ("weekly 2024-W02 (2/2)",)


def test_keep_weekly_across_a_year_boundary():
    # 2024-12-30 (Mon) .. 2025-01-05 (Sun) is ISO week 2025-W01
    bs = [bk(t(29, month=12)), bk(t(30, month=12)), bk(t(3, year=2025))]
    ds = plan_target(bs, Policy(weekly=5))
    assert kept(ds) == [t(29, month=12), t(3, year=2025)]
    assert why(ds, t(3, year=2025)) == ("newest", "weekly 2025-W01 (1/5)")
    assert why(ds, t(29, month=12)) == ("weekly 2024-W52 (2/5)",)


def test_keep_monthly_and_yearly():
    bs = [bk(t(d, month=m, year=y)) for y in (2022, 2023) for m in (1, 6, 12) for d in (1, 20)]
    ds = plan_target(bs, Policy(monthly=2))
    assert kept(ds) == [t(20, month=6, year=2023), t(20, month=12, year=2023)]
    ds = plan_target(bs, Policy(yearly=5))
    assert kept(ds) == [t(20, month=12, year=2022), t(20, month=12, year=2023)]
    assert why(ds, t(20, month=12, year=2022)) == ("yearly 2022 (2/5)",)


def test_rules_combine_and_each_counts_on_its_own():
    # 30 days, one backup at 02:00 each day
    bs = [bk(t(d, 2)) for d in range(1, 31)]
    ds = plan_target(bs, Policy(last=2, daily=4, weekly=3, monthly=2))
    got = {d.backup.time.day for d in ds if d.keep}
    # last: 30, 29; daily: 30, 29, 28, 27; weekly (ISO weeks end on Sundays 28, 21, 14): 30, 28, 21
    assert got == {30, 29, 28, 27, 21}
    assert why(ds, t(28, 2)) == ("daily 2024-01-28 (3/4)", "weekly 2024-W04 (2/3)")
    assert why(ds, t(30, 2)) == ("newest", "last 1/2", "daily 2024-01-30 (1/4)", "weekly 2024-W05 (1/3)",
                                 "monthly 2024-01 (1/2)")


def test_newest_and_protected_survive_any_policy():
    bs = [bk(t(d), protected=(d == 2)) for d in range(1, 6)]
    ds = plan_target(bs, Policy())           # no rule at all: only the unconditional reasons
    assert kept(ds) == [t(2), t(5)]
    assert why(ds, t(2)) == ("protected",)
    assert why(ds, t(5)) == ("newest",)


def test_unreadable_manifests_go_unless_they_are_all_there_is():
    bs = [bk(t(1)), bk(t(2)), bk(t(3), readable=False)]
    ds = plan_target(bs, Policy(last=1))
    # the newest READABLE one is "newest"; the damaged newer one takes no rule's slot and goes
    assert kept(ds) == [t(2)]
    assert why(ds, t(2)) == ("newest", "last 1/1")
    assert why(ds, t(3)) == ("unreadable manifest",)
    only_damaged = plan_target([bk(t(1), readable=False), bk(t(2), readable=False)], Policy(last=1))
    assert kept(only_damaged) == [t(2)]


def test_locked_manifests_are_never_pruned():
    locked = Backup("20240101T120000000Z-bbbbbb", "t1", t(1), readable=False, locked=True)
    ds = plan_target([locked, bk(t(2)), bk(t(3))], Policy(last=1))
    assert kept(ds) == [t(1), t(3)]
    assert why(ds, t(1)) == ("locked: sealed with a key this host does not hold",)


def test_each_target_is_planned_separately():
    bs = [bk(t(d), target=tg) for tg in ("b", "a") for d in (1, 2, 3)]
    policies = {"a": Policy(last=1), "b": Policy(last=2)}
    ds = plan(bs, policies.get)
    assert [(d.backup.target, d.backup.time.day, d.keep) for d in ds] == [
        ("a", 1, False), ("a", 2, False), ("a", 3, True), ("b", 1, False), ("b", 2, True), ("b", 3, True)]
    # a target without a policy keeps everything
    ds = plan(bs, {"a": Policy(last=1)}.get)
    assert all(d.keep for d in ds if d.backup.target == "b")
    assert "no retention policy for this target" in why([d for d in ds if d.backup.target == "b"], t(1))


def test_periods_follow_the_given_time_zone():
    # 23:30 UTC on Jan 1 is already Jan 2 in UTC+2
    tz = datetime.timezone(datetime.timedelta(hours=2))
    bs = [bk(t(1, 23, 30)), bk(t(2, 12))]
    assert kept(plan_target(bs, Policy(daily=2))) == [t(1, 23, 30), t(2, 12)]
    assert kept(plan_target(bs, Policy(daily=2), tz)) == [t(2, 12)]


def test_policy_rejects_negative_counts():
    with pytest.raises(ValueError, match="keep-last must be an integer >= 0, not -1"):
        Policy(last=-1)


# -- config ------------------------------------------------------------------------------------------
def test_retention_config_section():
    rc = RetentionConfig.from_mapping({"keep_last": 7, "keep_daily": 14,
                                       "targets": {"db": {"keep_last": 2}}, "gc_grace_hours": 6})
    assert rc.policy_for("web") == Policy(last=7, daily=14)
    assert rc.policy_for("db") == Policy(last=2)
    assert rc.gc_grace_hours == 6
    assert RetentionConfig.from_mapping(None) == RetentionConfig()


@pytest.mark.parametrize("raw,key", [
    ({"keep_lats": 3}, "retention.keep_lats"),
    ({"keep_daily": -1}, "retention.keep_daily"),
    ({"keep_daily": "7"}, "retention.keep_daily"),
    ({"targets": {"db": {"keep_forever": 1}}}, "retention.targets.db.keep_forever"),
    ({"targets": ["db"]}, "retention.targets"),
    ({"gc_grace_hours": -2}, "retention.gc_grace_hours"),
    ([1, 2], "retention"),
])
def test_retention_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        RetentionConfig.from_mapping(raw)
    assert e.value.key == key


def test_config_load_checks_retention_early():
    with pytest.raises(ConfigError) as e:
        check_sections(config.build({"retention": {"keep_weekly": "lots"}}))
    assert e.value.key == "retention.keep_weekly"
    cfg = config.build({"retention": {"keep_weekly": 4}})
    assert RetentionConfig.from_config(cfg).default == Policy(weekly=4)


# -- the CLI on synthetic backups ------------------------------------------------------------------------
def put_backup(store, target, when, blocks, seg=4096):
    table = mf.SegmentTable(len(blocks))
    for i, raw in enumerate(blocks):
        enc = segment.encode(raw)
        store.put(enc.key, enc.blob)
        table.set_data(i, enc.digest)
    bid = catalog.new_backup_id(when)
    catalog.commit(store, mf.Manifest(bid, target, len(blocks) * seg, seg, table, created=when.isoformat()))
    return bid


@pytest.fixture
def cli_store(tmp_path):
    cfg = {"store": {"type": "local", "path": str(tmp_path / "store")}, "state_dir": str(tmp_path / "state"),
           "run_dir": str(tmp_path / "run")}
    path = tmp_path / "ekko.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def run(*args, capsys=None):
        return cli.main(["-c", str(path), *args])
    run.store = LocalStore(str(tmp_path / "store"))
    run.path = path
    run.cfg = cfg
    return run


def test_cli_prune_dry_run_protect_and_delete(cli_store, capsys):
    store = cli_store.store
    ids = [put_backup(store, "t1", t(d), [bytes([d]) * 4096, b"shared" * 600 + bytes(496)]) for d in range(1, 7)]
    other = put_backup(store, "t2", t(1), [b"x" * 4096])

    assert cli_store("protect", ids[1]) == 0
    assert "protected" in capsys.readouterr().out
    assert store.exists(markers.protected_key("t1", ids[1]))

    assert cli_store("prune", "--keep-last", "2", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "prune (dry run): 7 backup(s): keep 4, would delete 3" in out
    line = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("    ")}
    assert "protected" in line[ids[1]] and "keep" in line[ids[1]]
    assert "newest, last 1/2" in line[ids[5]]
    assert "would delete" in line[ids[0]] and "no rule keeps it" in line[ids[0]]
    assert "newest" in line[other]                       # t2's only backup: newest of its target
    assert len(catalog.keys(store)) == 7                 # dry run: nothing deleted

    assert cli_store("prune", "--keep-last", "2", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["deleted"] == 3 and data["kept"] == 4
    gone = sorted(r["backup_id"] for r in data["backups"] if r["deleted"])
    assert gone == sorted([ids[0], ids[2], ids[3]])
    assert sorted(k.rsplit("/", 1)[1] for k in catalog.keys(store)) == sorted([ids[1], ids[4], ids[5], other])
    # segments stay until gc
    assert store.exists(segment.segment_key(segment.digest(bytes([1]) * 4096)))

    # unprotect: the next prune may take it
    assert cli_store("unprotect", ids[1]) == 0
    assert "no longer protected" in capsys.readouterr().out
    assert cli_store("unprotect", ids[1]) == 0
    assert "was not protected" in capsys.readouterr().out
    assert cli_store("prune", "t1", "--keep-last", "2") == 0
    assert sorted(k.rsplit("/", 1)[1] for k in catalog.keys(store)) == sorted([ids[4], ids[5], other])


def test_cli_prune_uses_the_config_policy_and_refuses_without_one(cli_store, capsys):
    store = cli_store.store
    ids = [put_backup(store, "t1", t(d), [bytes([d]) * 4096]) for d in range(1, 5)]
    assert cli_store("prune") == 2
    assert "no retention rule" in capsys.readouterr().err
    cli_store.cfg["retention"] = {"keep_last": 1, "targets": {"t1": {"keep_last": 3}}}
    cli_store.path.write_text(yaml.safe_dump(cli_store.cfg))
    assert cli_store("prune") == 0
    assert "--keep-last 3" in capsys.readouterr().out
    assert [k.rsplit("/", 1)[1] for k in catalog.keys(store)] == ids[1:]


@pytest.mark.parametrize("args", [["prune", "--keep-last", "-1"], ["prune", "--keep-daily", "x"],
                                  ["verify", "--sample", "0%"], ["verify", "--sample", "150%"],
                                  ["gc", "--grace-hours", "-1"]])
def test_cli_bad_lifecycle_arguments_exit_2(cli_store, args, capsys):
    with pytest.raises(SystemExit) as e:
        cli_store(*args)
    assert e.value.code == 2


def test_cli_protect_unknown_backup_exits_2(cli_store, capsys):
    assert cli_store("protect", "2099") == 2
    assert "no backup" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(cli_store.cfg["store"]["path"], "protected"))

"""Retention: what the mutation run of lifecycle/prune.py showed no test pinned down
(docs/mutation.md): a `retention:` section with per-target rules only, 0 and `true` as counts,
key names that merely end like a rule, and the texts a user reads (reasons, policy, config errors)."""

import datetime
import re

import pytest

from ekko_libvirt.errors import ConfigError
from ekko_libvirt.lifecycle.prune import Backup, Policy, RetentionConfig, plan_target

UTC = datetime.timezone.utc


def bk(day, backup_id=None):
    when = datetime.datetime(2024, 1, day, 12, tzinfo=UTC)
    return Backup(backup_id or when.strftime("%Y%m%dT%H%M%S000Z-aaaaaa"), "t1", when)


def test_per_target_rules_alone_leave_the_other_targets_without_a_policy():
    """Not an empty policy: that one would prune every backup of the other targets but the newest."""
    rc = RetentionConfig.from_mapping({"targets": {"db": {"keep_last": 1}}})
    assert rc.default is None and rc.policy_for("web") is None
    decisions = plan_target([bk(1), bk(2), bk(3)], rc.policy_for("web"))
    assert all(d.keep for d in decisions)


def test_zero_turns_a_rule_off_and_is_accepted():
    assert Policy.from_mapping({"keep_last": 0, "keep_daily": 2}, "retention") == Policy(daily=2)
    assert RetentionConfig.from_mapping({"keep_weekly": 0, "gc_grace_hours": 0}).gc_grace_hours == 0.0


@pytest.mark.parametrize("bad", [True, "3", 2.0])
def test_a_count_must_be_an_int_not_a_bool_text_or_float(bad):
    with pytest.raises(ValueError, match=f"^keep-last must be an integer >= 0, not {re.escape(repr(bad))}$"):
        Policy(last=bad)


def config_error(raw, key, problem):
    with pytest.raises(ConfigError, match="^" + re.escape(f"config: {key}: {problem}") + "$"):
        RetentionConfig.from_mapping(raw)


KNOWN = "keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly"


def test_config_errors_name_the_key_and_say_what_is_expected():
    config_error({"kept_daily": 3}, "retention.kept_daily", f"unknown key (known: {KNOWN})")
    config_error({"targets": {"db": {"daily": 3}}}, "retention.targets.db.daily", f"unknown key (known: {KNOWN})")
    config_error({"keep_daily": True}, "retention.keep_daily", "must be an integer >= 0, got True")
    config_error([1], "retention", "must be a mapping (keep_last, keep_daily, ..., targets, gc_grace_hours)")
    config_error({"targets": ["db"]}, "retention.targets", "must be a mapping of target name -> keep_* rules")
    config_error({"targets": {"db": 7}}, "retention.targets.db", "must be a mapping of keep_* rules")
    config_error({"gc_grace_hours": True}, "retention.gc_grace_hours", "must be a number of hours >= 0, got True")
    config_error({"gc_grace_hours": "1"}, "retention.gc_grace_hours", "must be a number of hours >= 0, got '1'")


def test_the_policy_as_prune_prints_it():
    assert Policy(last=7, daily=14, yearly=1).describe() == "--keep-last 7 --keep-daily 14 --keep-yearly 1"
    assert Policy().describe() == "(no rule)"


def test_a_backup_whose_id_has_no_time_is_kept_and_says_why():
    odd = Backup("imported-disk", "t1", None)
    decisions = {d.backup.backup_id: d for d in plan_target([odd, bk(1), bk(2)], Policy(last=1))}
    assert decisions["imported-disk"].keep
    assert decisions["imported-disk"].reasons == ("no time in its id: never pruned",)

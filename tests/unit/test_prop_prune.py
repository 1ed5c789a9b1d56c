"""Property tests of retention (ekko_libvirt/lifecycle/prune.py) against a reference written from the rules
in docs/format.md ("Retention") and prune.py's docstring, not from its code:

    keep_last N                  the N newest readable backups
    keep_hourly/daily/weekly/monthly/yearly N
                                 group the readable backups by calendar period in `tz` (weeks are
                                 ISO weeks), take the N periods whose newest backup is newest,
                                 keep the newest backup of each
    always kept                  the newest readable backup (the newest with a time if none is
                                 readable), protected ones, locked ones, ids without a time;
                                 every backup when the target has no policy

Backup times come from their ids, clustered so that many fall into the same hour, day, week,
month and year, and around DST changes and Samoa's skipped day.
"""

import dataclasses
import datetime
from zoneinfo import ZoneInfo

from hypothesis import given, strategies as st

from ekko_libvirt.lifecycle import prune

UTC = datetime.timezone.utc
ZONES = [UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
         datetime.timezone(datetime.timedelta(hours=-8)), ZoneInfo("Europe/Berlin"),
         ZoneInfo("America/New_York"), ZoneInfo("Australia/Lord_Howe"), ZoneInfo("Pacific/Apia")]
# near interesting instants: DST changes (Berlin, New York), Samoa skipping 2011-12-30, ISO
# week-year boundaries (2020-12-28 .. 2021-01-03 is 2020-W53; 2026-01-01 is in 2026-W01)
STARTS = [datetime.datetime(2024, 10, 27, 0, 30, tzinfo=UTC), datetime.datetime(2024, 3, 10, 6, 0, tzinfo=UTC),
          datetime.datetime(2011, 12, 29, 9, 0, tzinfo=UTC), datetime.datetime(2020, 12, 31, 22, 0, tzinfo=UTC),
          datetime.datetime(2025, 12, 31, 23, 0, tzinfo=UTC), datetime.datetime(2026, 3, 1, 0, 0, tzinfo=UTC)]
HOUR = 3_600_000                                                     # milliseconds
SCALES = [HOUR, 24 * HOUR, 7 * 24 * HOUR, 30 * 24 * HOUR, 365 * 24 * HOUR]


def make_id(t: datetime.datetime, tail: str) -> str:
    return "%04d%02d%02dT%02d%02d%02d%03dZ-%s" % (t.year, t.month, t.day, t.hour, t.minute, t.second,
                                                  t.microsecond // 1000, tail)


@st.composite
def backups_of(draw, target):
    """Up to 20 backups spread over a few periods of one scale (hours .. years) around a start,
    so that periods hold several backups and the boundaries (local midnight, DST, ISO week-year)
    fall among them; a few ids carry no time; some backups are protected, damaged or locked."""
    base = draw(st.one_of(st.sampled_from(STARTS),
                          st.datetimes(datetime.datetime(2001, 1, 1), datetime.datetime(2037, 1, 1),
                                       timezones=st.just(UTC))))
    base = base.replace(microsecond=base.microsecond // 1000 * 1000)
    scale = draw(st.sampled_from(SCALES))
    offsets = draw(st.lists(st.one_of(st.integers(-3 * scale, 3 * scale), st.sampled_from([0, 1, -1])),
                            max_size=20))
    out, ids = [], set()
    for off in offsets:
        if draw(st.integers(0, 15)) == 0:
            bid = "manual-" + draw(st.text("abcdef0123456789", min_size=1, max_size=6))   # no time in it
        else:
            bid = make_id(base + datetime.timedelta(milliseconds=off),
                          draw(st.text("0123456789abcdef", min_size=6, max_size=6)))
        if bid in ids:
            continue
        ids.add(bid)
        readable, locked = draw(st.sampled_from([(True, False)] * 6 + [(False, False), (False, True)]))
        out.append(prune.Backup(bid, target, prune.backup_time(bid), protected=draw(st.integers(0, 7)) == 0,
                                readable=readable, locked=locked))
    return draw(st.permutations(out))


# no policy, one rule alone (where a wrong period shows), or any mix
policies = st.one_of(
    st.none(),
    st.builds(lambda rule, n: prune.Policy(**{rule: n}), st.sampled_from(prune.RULES), st.integers(1, 4)),
    st.builds(prune.Policy, *[st.integers(0, 4)] * 6))

PERIOD_FORMATS = {"hourly": "%Y-%m-%d %H", "daily": "%Y-%m-%d", "weekly": "%G-W%V", "monthly": "%Y-%m",
                  "yearly": "%Y"}


def newest_first(bs):
    return sorted(bs, key=lambda b: (b.time, b.backup_id), reverse=True)


def reference_kept(backups, policy, tz):
    """backup_id -> the set of rule names that keep it (empty: it goes)."""
    why = {b.backup_id: set() for b in backups}
    timed = [b for b in backups if b.time is not None]
    readable = [b for b in timed if b.readable]
    for b in backups:
        if b.protected:
            why[b.backup_id].add("protected")
        if b.locked:
            why[b.backup_id].add("locked")
        if b.time is None:
            why[b.backup_id].add("no time")
    if readable or timed:
        why[newest_first(readable or timed)[0].backup_id].add("newest")
    if policy is None:
        for b in backups:
            why[b.backup_id].add("no policy")
        return why
    for b in newest_first(readable)[:policy.last]:
        why[b.backup_id].add("last")
    for rule, fmt in PERIOD_FORMATS.items():
        groups = {}
        for b in readable:
            groups.setdefault(b.time.astimezone(tz).strftime(fmt), []).append(b)
        heads = newest_first([newest_first(g)[0] for g in groups.values()])
        for b in heads[:getattr(policy, rule)]:
            why[b.backup_id].add(rule)
    return why


@given(backups=backups_of("vm1.vda"), policy=policies, tz=st.sampled_from(ZONES))
def test_plan_target_keeps_exactly_what_the_rules_keep(backups, policy, tz):
    decisions = prune.plan_target(backups, policy, tz)
    want = reference_kept(backups, policy, tz)
    assert sorted(d.backup.backup_id for d in decisions) == sorted(want), "one decision per backup"
    got = {d.backup.backup_id: d for d in decisions}
    for bid, rules in want.items():
        d = got[bid]
        assert d.keep == bool(rules), f"{bid}: kept={d.keep}, the rules say {sorted(rules) or 'delete'}; {d.reasons}"
        assert d.reasons, f"{bid}: a decision without a reason"
        reasons = " | ".join(d.reasons)
        for rule in rules & {"last", "newest", "protected", *PERIOD_FORMATS}:
            assert rule in reasons, f"{bid} is kept by {rule}, its reasons say {d.reasons}"
        # the only rules a reason may name are the ones that keep it
        for rule in {"last", "newest", "protected", *PERIOD_FORMATS} - rules:
            assert not any(r.startswith(rule + " ") or r == rule for r in d.reasons), (bid, rule, d.reasons)
    # oldest first (ids without a time last), as the caller prints them
    key = [(d.backup.time or datetime.datetime.max.replace(tzinfo=UTC), d.backup.backup_id) for d in decisions]
    assert key == sorted(key)


RULE_SCALE = {"hourly": HOUR, "daily": 24 * HOUR, "weekly": 7 * 24 * HOUR, "monthly": 31 * 24 * HOUR,
              "yearly": 366 * 24 * HOUR}


@given(rule=st.sampled_from(sorted(RULE_SCALE)), n=st.integers(1, 4), tz=st.sampled_from(ZONES),
       y=st.integers(2001, 2036), m=st.integers(1, 12), d=st.integers(1, 28), h=st.integers(0, 23),
       year_end=st.booleans(), data=st.data())
def test_each_rule_alone_around_its_period_boundaries(rule, n, tz, y, m, d, h, year_end, data):
    """One rule, backups within two periods either side of a boundary of that rule's period in
    local time (the start of an hour, a day, a month, a year; for weeks often a new year, where
    the ISO week-year and the calendar year part)."""
    if rule == "yearly" or year_end:
        m, d, h = 1, 1, 0
    elif rule == "monthly":
        d, h = 1, 0
    elif rule in ("daily", "weekly"):
        h = 0
    boundary = datetime.datetime(y, m, d, h, tzinfo=tz).astimezone(UTC)
    scale = RULE_SCALE[rule]
    offsets = data.draw(st.lists(st.integers(-2 * scale, 2 * scale), min_size=1, max_size=16, unique=True))
    ids = [make_id(boundary + datetime.timedelta(milliseconds=o), "%06x" % k) for k, o in enumerate(offsets)]
    backups = [prune.Backup(bid, "t", prune.backup_time(bid)) for bid in ids]
    policy = prune.Policy(**{rule: n})
    want = {bid for bid, why in reference_kept(backups, policy, tz).items() if why}
    assert {x.backup.backup_id for x in prune.plan_target(backups, policy, tz) if x.keep} == want


@given(backups=backups_of("vm1.vda"), policy=policies, tz=st.sampled_from(ZONES))
def test_the_newest_readable_backup_is_never_pruned(backups, policy, tz):
    kept = {d.backup.backup_id for d in prune.plan_target(backups, policy, tz) if d.keep}
    readable = [b for b in backups if b.readable and b.time is not None]
    if readable:
        assert newest_first(readable)[0].backup_id in kept
    assert {b.backup_id for b in backups if b.protected or b.locked or b.time is None} <= kept


@given(backups=backups_of("vm1.vda"), policy=policies.filter(lambda p: p is not None), tz=st.sampled_from(ZONES),
       more=st.integers(1, 3), rule=st.sampled_from(prune.RULES))
def test_a_larger_policy_keeps_a_superset(backups, policy, tz, more, rule):
    """Raising any count never deletes a backup the smaller policy kept."""
    bigger = dataclasses.replace(policy, **{rule: getattr(policy, rule) + more})
    small = {d.backup.backup_id for d in prune.plan_target(backups, policy, tz) if d.keep}
    big = {d.backup.backup_id for d in prune.plan_target(backups, bigger, tz) if d.keep}
    assert small <= big


@given(a=backups_of("a.vda"), b=backups_of("b.vda"), pa=policies, pb=policies, tz=st.sampled_from(ZONES))
def test_targets_are_judged_separately(a, b, pa, pb, tz):
    pol = {"a.vda": pa, "b.vda": pb}
    mixed = list(a) + list(b)
    mixed.sort(key=lambda x: x.backup_id)       # interleaved
    got = [(d.backup, d.keep, d.reasons) for d in prune.plan(mixed, pol.get, tz)]
    want = [(d.backup, d.keep, d.reasons) for t, bs in (("a.vda", a), ("b.vda", b)) if bs
            for d in prune.plan_target(bs, pol[t], tz)]
    assert got == want


@given(t=st.datetimes(datetime.datetime(1970, 1, 1), datetime.datetime(9999, 12, 31), timezones=st.just(UTC)),
       tail=st.text("0123456789abcdef", min_size=6, max_size=6))
def test_backup_time_reads_back_the_time_of_an_id(t, tail):
    t = t.replace(microsecond=t.microsecond // 1000 * 1000)
    assert prune.backup_time(make_id(t, tail)) == t


@st.composite
def almost_ids(draw):
    """Valid ids with one character replaced, inserted or removed: what int() and strptime()
    forgive (' 12', '+12', '1_2', non-ASCII digits, one-digit months) must not read as a time."""
    t = draw(st.datetimes(datetime.datetime(1970, 1, 1), datetime.datetime(9999, 12, 31)))
    text = make_id(t, "a1b2c3")
    i = draw(st.integers(0, 19))
    c = draw(st.sampled_from(" +-_0Z\u0661\uff11\t"))
    return draw(st.sampled_from([text[:i] + c + text[i + 1:], text[:i] + c + text[i:], text[:i] + text[i + 1:]]))


@given(text=st.one_of(st.text(max_size=40), almost_ids()))
def test_backup_time_of_any_text_is_none_or_the_time_it_spells(text):
    """Never raises; a time comes only from an id that spells exactly that time."""
    t = prune.backup_time(text)
    if t is not None:
        assert t.tzinfo is UTC
        assert make_id(t, "")[:19] == text.split("-", 1)[0], f"{text!r} read as {t}"

import pytest

from ekko_libvirt.engine.base import BitmapInfo, DiskInfo
from ekko_libvirt.engine.bitmaps import ChainHead, Interrupted, known_generations, plan_generation, plan_recovery
from ekko_libvirt.engine.qmp import Names, QMPTarget, merge_back_actions, retire_actions, switch_actions
from ekko_libvirt.errors import EngineError, IncrementalImpossible

G = 65536


def bm(name, recording=True, busy=False, inconsistent=False, gran=G):
    return BitmapInfo(name, gran, recording, busy, inconsistent, True)


def disk(*bitmaps, size=1 << 30, fmt="qcow2"):
    return DiskInfo("disk0", "/x.qcow2", fmt, size, tuple(bitmaps))


HEAD = ChainHead("B1", "ekko-B1", G, 1 << 30, 4 << 20)


def plan(info, head=HEAD, **kw):
    args = dict(backup_id="B2", prefix="ekko-", granularity=G, segment_size=4 << 20)
    args.update(kw)
    return plan_generation(info, head, **args)


def test_incremental_when_chain_is_intact():
    p = plan(disk(bm("ekko-B1")))
    assert (p.kind, p.parent, p.base_bitmap, p.export_bitmap, p.new_bitmap) == \
        ("incremental", "B1", "ekko-B1", "ekko-B1", "ekko-B2")


@pytest.mark.parametrize("info, words", [
    (disk(), "missing"),
    (disk(bm("ekko-B1", inconsistent=True)), "uncleanly"),
    (disk(bm("ekko-B1", recording=False)), "not recording"),
    (disk(bm("ekko-B1", gran=2 * G)), "granularity changed"),
    (disk(bm("ekko-B1"), size=2 << 30), "disk size changed"),
])
def test_full_with_reason_when_chain_is_broken(info, words):
    p = plan(info)
    assert p.kind == "full" and words in p.reason and p.parent is None and p.export_bitmap is None
    with pytest.raises(IncrementalImpossible, match=words):
        plan(info, require_incremental=True)


def test_first_backup_forced_full_and_raw():
    assert plan(disk(), head=None).reason == "first backup of this disk"
    forced = plan(disk(bm("ekko-B1")), force_full=True)
    # a forced full still freezes the old generation, so a failure can merge it back
    assert forced.kind == "full" and forced.base_bitmap == "ekko-B1" and forced.export_bitmap is None
    raw = plan(disk(fmt="raw"), head=None)
    assert raw.kind == "full" and raw.new_bitmap is None and "raw" in raw.reason


def test_busy_head_bitmap_is_an_error_not_a_silent_full():
    with pytest.raises(EngineError, match="in use"):
        plan(disk(bm("ekko-B1", busy=True)))


B1, B2, B3 = "20260101T000000000Z-aaaaaa", "20260102T000000000Z-bbbbbb", "20260103T000000000Z-cccccc"
G1, G2, G3 = "ekko-" + B1, "ekko-" + B2, "ekko-" + B3
KNOWN = known_generations("ekko-", [B1])


def actions(r):
    return [(a["type"], a["data"].get("name") or a["data"].get("target")) for a in r.actions]


def test_recovery_after_an_interrupted_run_merges_back_and_re_enables():
    info = disk(bm(G1, recording=False), bm(G2), bm("other-tool"))
    r = plan_recovery(info, G1, "ekko-", interrupted=Interrupted(G1, G2), known=KNOWN | {G2})
    assert actions(r) == [("block-dirty-bitmap-merge", G1), ("block-dirty-bitmap-enable", G1),
                          ("block-dirty-bitmap-remove", G2)]
    assert r.broken_reason is None
    assert all("other-tool" not in str(a) for a in r.actions)


def test_a_head_disabled_outside_ekko_is_never_re_enabled_and_the_next_backup_is_a_full():
    """Loss path 2: re-enabling it hid the writes it missed; the incremental read nothing."""
    info = disk(bm(G1, recording=False))
    r = plan_recovery(info, G1, "ekko-", known=KNOWN)
    assert r.actions == () and r.broken_reason is None
    p = plan(info, head=ChainHead(B1, G1, G, 1 << 30, 4 << 20), backup_id=B2, known=KNOWN)
    assert p.kind == "full" and "not recording (disabled outside ekko)" in p.reason
    assert p.retire == (G1,)            # gone once the full is committed, not before


def test_a_journal_of_another_generation_does_not_re_enable_the_head():
    """The interrupted run disabled some other bitmap (its base was not our head): the head's
    disabled state is not ekko's doing."""
    info = disk(bm(G2, recording=False), bm(G3))
    r = plan_recovery(info, G2, "ekko-", interrupted=Interrupted(G1, G3), known=known_generations("ekko-", [B1, B2]))
    assert actions(r) == [("block-dirty-bitmap-remove", G3)]


@pytest.mark.parametrize("name", ["ekko-foo", "ekko-" + B3, "ekko-20260101T000000000Z-AAAAAA", "ekko-"])
def test_bitmaps_ekko_did_not_create_for_this_disk_are_never_touched(name):
    """Loss path 3: a user's `ekko-foo`, or another config's generation on the same node, is
    reported, never removed, whatever the state of the chain."""
    info = disk(bm(G1), bm(name))
    r = plan_recovery(info, G1, "ekko-", known=KNOWN)
    assert r.actions == ()
    assert any(name in n and "alone" in n for n in r.notes)
    p = plan(info, head=ChainHead(B1, G1, G, 1 << 30, 4 << 20), backup_id=B2, force_full=True, known=KNOWN)
    assert name not in p.retire


def test_older_generations_of_this_disk_are_removed():
    info = disk(bm(G1, recording=False), bm(G2))
    r = plan_recovery(info, G2, "ekko-", known=known_generations("ekko-", [B1, B2]))
    assert actions(r) == [("block-dirty-bitmap-remove", G1)]


def test_recovery_with_inconsistent_stray_breaks_chain():
    r = plan_recovery(disk(bm(G1, recording=False), bm(G2, inconsistent=True)), G1, "ekko-",
                      interrupted=Interrupted(G1, G2), known=KNOWN | {G2})
    assert "inconsistent" in r.broken_reason
    assert actions(r) == [("block-dirty-bitmap-remove", G2)]


def test_recovery_drops_inconsistent_head():
    r = plan_recovery(disk(bm(G1, inconsistent=True)), G1, "ekko-", known=KNOWN)
    assert "uncleanly" in r.broken_reason
    assert [a["data"]["name"] for a in r.actions] == [G1]


def test_broken_reason_makes_a_full_even_without_a_head():
    """A store that lost its backups, or a damaged newest manifest: no head, but 'first backup'
    would be a lie."""
    p = plan(disk(), head=None, broken_reason="backup X is gone from the store")
    assert p.kind == "full" and p.reason == "chain broken: backup X is gone from the store"
    p = plan(disk(bm("ekko-B1")), broken_reason="newest manifest m is unreadable")
    assert p.kind == "full" and "newest manifest m is unreadable" in p.reason
    with pytest.raises(IncrementalImpossible, match="unreadable"):
        plan(disk(bm("ekko-B1")), broken_reason="newest manifest m is unreadable", require_incremental=True)


def test_transactions_as_data():
    names = Names.for_target(QMPTarget("t", "/q.sock", "disk0", "/s", "/r"))
    p = plan(disk(bm("ekko-B1")))
    sw = switch_actions(p, "disk0", names)
    assert [a["type"] for a in sw] == ["block-dirty-bitmap-add", "block-dirty-bitmap-disable", "blockdev-backup"]
    assert sw[0]["data"]["persistent"] is True and sw[2]["data"]["sync"] == "none"
    back = merge_back_actions(p, "disk0")
    assert [a["type"] for a in back] == ["block-dirty-bitmap-enable", "block-dirty-bitmap-merge",
                                         "block-dirty-bitmap-remove"]
    assert back[1]["data"] == {"node": "disk0", "target": "ekko-B1", "bitmaps": ["ekko-B2"]}
    assert retire_actions(p, "disk0") == [{"type": "block-dirty-bitmap-remove",
                                           "data": {"node": "disk0", "name": "ekko-B1"}}]
    full = plan(disk(), head=None)
    assert retire_actions(full, "disk0") == []
    assert full.retire == ()
    assert [a["type"] for a in merge_back_actions(full, "disk0")] == ["block-dirty-bitmap-remove"]


def test_read_back_always_takes_the_first_and_the_last_segment():
    import random as _random
    from ekko_libvirt.backup.copy import read_back_indices
    from ekko_libvirt.units import READ_BACK_ALL
    for seed in range(200):
        rnd = _random.Random(seed)
        count = rnd.randint(1, 500)
        wanted = rnd.randint(2, 20)
        got = read_back_indices(count, wanted, rnd)
        assert got[0] == 0 and got[-1] == count - 1, seed
        assert len(got) == min(count, wanted) and got == sorted(set(got)), seed
    assert read_back_indices(7, READ_BACK_ALL, _random.Random(1)) == list(range(7))

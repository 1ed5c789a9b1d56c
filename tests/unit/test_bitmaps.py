import pytest

from ekko_libvirt.engine.base import BitmapInfo, DiskInfo
from ekko_libvirt.engine.bitmaps import ChainHead, plan_generation, plan_recovery
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


def test_recovery_merges_strays_back_and_never_touches_foreign_bitmaps():
    info = disk(bm("ekko-B1", recording=False), bm("ekko-B2"), bm("other-tool"))
    r = plan_recovery(info, "ekko-B1", "ekko-")
    kinds = [(a["type"], a["data"].get("name") or a["data"].get("target")) for a in r.actions]
    assert kinds == [("block-dirty-bitmap-merge", "ekko-B1"), ("block-dirty-bitmap-enable", "ekko-B1"),
                     ("block-dirty-bitmap-remove", "ekko-B2")]
    assert r.broken_reason is None
    assert all("other-tool" not in str(a) for a in r.actions)


def test_recovery_with_inconsistent_stray_breaks_chain():
    r = plan_recovery(disk(bm("ekko-B1", recording=False), bm("ekko-B2", inconsistent=True)), "ekko-B1", "ekko-")
    assert r.broken_reason and all(a["type"] == "block-dirty-bitmap-remove" for a in r.actions)


def test_recovery_drops_inconsistent_head():
    r = plan_recovery(disk(bm("ekko-B1", inconsistent=True)), "ekko-B1", "ekko-")
    assert "uncleanly" in r.broken_reason
    assert [a["data"]["name"] for a in r.actions] == ["ekko-B1"]


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
    assert [a["type"] for a in merge_back_actions(full, "disk0")] == ["block-dirty-bitmap-remove"]

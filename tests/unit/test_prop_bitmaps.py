"""Properties of the generation decisions (engine/bitmaps.py) against simple references.

plan_generation: a random disk (format, size, bitmaps in every state, foreign ones too) and a
random chain head and flags. The reference lists every condition that forbids an incremental;
the plan must be incremental exactly when the list is empty, and its reason must name one
of them. plan_recovery: its QMP transaction is applied to a model of the disk's bitmaps (each a
set of dirty clusters), and the end state is checked: no dirty cluster of ours lost, nothing
that is not a known generation touched, a disabled head re-enabled only when ekko disabled it.
"""

from hypothesis import given, strategies as st

from ekko_libvirt.engine.base import BitmapInfo, DiskInfo
from ekko_libvirt.engine.bitmaps import (FULL, INCREMENTAL, ChainHead, Interrupted, generation_name, known_generations, plan_generation, plan_recovery)
from ekko_libvirt.errors import EngineError, IncrementalImpossible

PREFIX = "ekko-"
G = 65536
IDS = [f"2026010{d}T000000000Z-{c * 6}" for d, c in zip(range(1, 7), "abcdef")]
FOREIGN = ["ekko-foo", "other", f"ekko-{IDS[5]}".upper(), "ekko-20990101T000000000Z-ffffff"]

bitmap_state = st.fixed_dictionaries({
    "recording": st.booleans(), "busy": st.booleans(), "inconsistent": st.booleans(),
    "granularity": st.sampled_from([G, 2 * G]), "dirty": st.frozensets(st.integers(0, 15), max_size=6)})


@st.composite
def scenes(draw):
    """A disk with bitmaps (ours of this chain, and foreign ones), and what the store says."""
    chain_ids = draw(st.lists(st.sampled_from(IDS[:5]), unique=True, max_size=4).map(sorted))
    present = {}
    for bid in chain_ids + [draw(st.sampled_from(IDS[:5]))]:
        if draw(st.booleans()):
            present[generation_name(PREFIX, bid)] = draw(bitmap_state)
    for name in draw(st.lists(st.sampled_from(FOREIGN), unique=True, max_size=3)):
        present[name] = draw(bitmap_state)
    size = draw(st.sampled_from([1 << 30, 2 << 30]))
    fmt = draw(st.sampled_from(["qcow2", "qcow2", "qcow2", "raw"]))
    head = None
    if chain_ids:
        bid = chain_ids[-1]
        head = ChainHead(bid, generation_name(PREFIX, bid) if draw(st.booleans()) or True else None,
                         draw(st.sampled_from([G, 2 * G, None])), draw(st.sampled_from([1 << 30, 2 << 30])), 4 << 20)
    interrupted = None
    if draw(st.booleans()):
        interrupted = Interrupted(draw(st.sampled_from([None] + [generation_name(PREFIX, b) for b in IDS[:5]])),
                                  generation_name(PREFIX, draw(st.sampled_from(IDS[:6]))))
    return chain_ids, present, size, fmt, head, interrupted


def info_of(present, size, fmt):
    return DiskInfo("disk0", "/d.qcow2", fmt, size, tuple(
        BitmapInfo(n, s["granularity"], s["recording"], s["busy"], s["inconsistent"], True)
        for n, s in sorted(present.items())))


def reasons_against_incremental(info, head, force_full, broken, key_reason):
    """The reference: every condition under which no incremental may be taken."""
    out = []
    b = info.bitmap(head.bitmap) if head is not None and head.bitmap else None
    if info.format != "qcow2":
        out.append("cannot hold a persistent dirty bitmap")
    if key_reason:
        out.append(key_reason)
    if force_full:
        out.append("--full")
    if broken:
        out.append(broken)
    if head is None:
        out.append("first backup")
    elif not head.bitmap:
        out.append("recorded no bitmap")
    elif b is None:
        out.append("missing")
    else:
        if b.inconsistent:
            out.append("inconsistent")
        if not b.recording:
            out.append("not recording")
        if head.granularity and b.granularity != head.granularity:
            out.append("granularity changed")
        if info.virtual_size != head.virtual_size:
            out.append("disk size changed")
    return out


@given(scenes(), st.booleans(), st.sampled_from([None, "the store lost backups"]),
       st.sampled_from([None, "sealed with another key"]), st.booleans())
def test_plan_generation_is_incremental_exactly_when_nothing_forbids_it(scene, force_full, broken, key_reason,
                                                                        require_incremental):
    chain_ids, present, size, fmt, head, _ = scene
    info = info_of(present, size, fmt)
    known = known_generations(PREFIX, chain_ids)
    against = reasons_against_incremental(info, head, force_full, broken, key_reason)
    b = info.bitmap(head.bitmap) if head is not None and head.bitmap else None
    healthy = b is not None and not b.inconsistent and b.recording
    args = dict(backup_id=IDS[5], prefix=PREFIX, granularity=G, segment_size=1 << 20, force_full=force_full,
                require_incremental=require_incremental, broken_reason=broken, key_mismatch_reason=key_reason,
                known=known)
    if healthy and b.busy:
        try:
            plan_generation(info, head, **args)
        except EngineError as e:
            assert "in use" in str(e)
            return
        raise AssertionError("a busy head bitmap must stop the backup, not be planned around")
    if against and require_incremental:
        try:
            plan_generation(info, head, **args)
        except IncrementalImpossible:
            return
        raise AssertionError(f"an incremental was demanded although {against}")
    p = plan_generation(info, head, **args)
    new = generation_name(PREFIX, IDS[5])
    assert p.new_bitmap == (new if fmt == "qcow2" else None)
    if not against:
        assert p.kind == INCREMENTAL and p.parent == head.backup_id
        assert p.export_bitmap == p.base_bitmap == head.bitmap and p.retire == (head.bitmap,)
        assert p.segment_size == head.segment_size and p.granularity == b.granularity
        return
    assert p.kind == FULL and p.parent is None and p.export_bitmap is None
    assert any(r in p.reason for r in against), (p.reason, against)
    assert p.segment_size == 1 << 20
    # a full freezes a healthy head (merged back on failure) and retires, once committed, every
    # generation of this chain on the disk, and nothing else
    assert p.base_bitmap == (head.bitmap if healthy and fmt == "qcow2" else None) or fmt != "qcow2"
    assert set(p.retire) <= (set(known) | {p.base_bitmap}) - {new}
    if fmt == "qcow2":
        assert set(p.retire) == {n for n in present if n in known} | ({p.base_bitmap} - {None})


def apply(actions, present):
    """The QMP transaction on a model: name -> state with a set of dirty clusters."""
    state = {n: dict(s) for n, s in present.items()}
    for a in actions:
        d = a["data"]
        if a["type"] == "block-dirty-bitmap-merge":
            for src in d["bitmaps"]:
                assert not state[src]["inconsistent"] and not state[d["target"]]["inconsistent"], "QEMU refuses"
                state[d["target"]]["dirty"] = state[d["target"]]["dirty"] | state[src]["dirty"]
        elif a["type"] == "block-dirty-bitmap-enable":
            assert not state[d["name"]]["inconsistent"], "QEMU refuses"
            state[d["name"]]["recording"] = True
        elif a["type"] == "block-dirty-bitmap-remove":
            del state[d["name"]]
        else:
            raise AssertionError(f"unexpected action {a['type']}")
    return state


@given(scenes())
def test_plan_recovery_loses_no_dirty_cluster_and_touches_only_what_ekko_made(scene):
    chain_ids, present, size, fmt, head, interrupted = scene
    info = info_of(present, size, fmt)
    known = known_generations(PREFIX, chain_ids)
    committed = head.bitmap if head is not None else None
    r = plan_recovery(info, committed, PREFIX, interrupted=interrupted, known=known)
    mine = known | known_generations(PREFIX, (), (), interrupted)
    after = apply(r.actions, present)
    for a in r.actions:
        name = a["data"].get("name") or a["data"].get("target")
        assert name in mine or name == committed, f"touched {name}, not a generation of this disk"
    for name in present:
        if name not in mine and name != committed:
            assert after.get(name) == present[name], f"foreign bitmap {name} changed"
    h = present.get(committed) if committed else None
    by_us = interrupted is not None and committed is not None and interrupted.base == committed
    if h is None:
        return
    if h["inconsistent"]:
        assert committed not in after and r.broken_reason
        return
    assert committed in after, "a consistent head generation is never removed by recovery"
    if not by_us:
        assert after[committed]["recording"] == h["recording"], "re-enabled a head ekko did not disable"
        return
    new = present.get(interrupted.new) if interrupted.new != committed else None
    if new is not None and (new["inconsistent"] or new["granularity"] != h["granularity"]):
        assert r.broken_reason
        return
    assert r.broken_reason is None
    assert after[committed]["recording"], "the head ekko disabled must record again"
    if new is not None:
        assert new["dirty"] <= after[committed]["dirty"], "writes the interrupted run's generation saw were lost"
    # every other generation of this disk is gone: none records for ever unseen
    assert {n for n in after if n in mine} <= {committed}

"""Bitmap planning: what the mutation run of engine/bitmaps.py showed no test pinned down
(docs/mutation.md): the granularity and segment size of a plan, the arguments of the recovery
transaction, the notes a recovery reports and the exact reasons a user reads."""

import pytest

from ekko_libvirt.engine.base import BitmapInfo, DiskInfo
from ekko_libvirt.engine.bitmaps import ChainHead, Interrupted, known_generations, plan_generation, plan_recovery
from ekko_libvirt.errors import EngineError

G = 65536
B1, B2, B3 = "20260101T000000000Z-aaaaaa", "20260102T000000000Z-bbbbbb", "20260103T000000000Z-cccccc"
G1, G2, G3 = "ekko-" + B1, "ekko-" + B2, "ekko-" + B3


def bm(name, recording=True, busy=False, inconsistent=False, gran=G):
    return BitmapInfo(name, gran, recording, busy, inconsistent, True)


def disk(*bitmaps, size=1 << 30, fmt="qcow2", node="vda-node"):
    return DiskInfo(node, "/x.qcow2", fmt, size, tuple(bitmaps))


def plan(info, head, **kw):
    args = dict(backup_id=B2, prefix="ekko-", granularity=G, segment_size=4 << 20)
    args.update(kw)
    return plan_generation(info, head, **args)


def test_an_incremental_keeps_the_chain_s_segment_size_and_the_base_bitmap_s_granularity():
    """The configuration changed since the full: the chain goes on as it began (a head of an
    older release recorded no granularity, so the base bitmap's own one is taken)."""
    head = ChainHead(B1, G1, None, 1 << 30, 8 << 20)
    p = plan(disk(bm(G1, gran=2 * G)), head, granularity=G, segment_size=4 << 20)
    assert (p.kind, p.granularity, p.segment_size) == ("incremental", 2 * G, 8 << 20)
    assert p.reason == f"changes since {B1} (bitmap {G1})"


def test_a_full_takes_the_configured_granularity_and_segment_size():
    head = ChainHead(B1, G1, G, 1 << 30, 8 << 20)
    p = plan(disk(), head, granularity=4 * G, segment_size=16 << 20)      # head bitmap gone: full
    assert (p.kind, p.granularity, p.segment_size) == ("full", 4 * G, 16 << 20)
    first = plan(disk(), None, granularity=2 * G, segment_size=1 << 20)
    assert (first.kind, first.granularity, first.segment_size) == ("full", 2 * G, 1 << 20)


@pytest.mark.parametrize("info, head, reason", [
    (disk(fmt="raw"), None,
     "disk format raw cannot hold a persistent dirty bitmap (qcow2 v3 needed): every backup of it is a full"),
    (disk(bm(G1)), ChainHead(B1, G1, G, 1 << 30, 4 << 20), "full backup requested (--full)"),
    (disk(), ChainHead(B1, G1, G, 1 << 30, 4 << 20),
     f"bitmap {G1} of backup {B1} is missing on the disk (image replaced, or the bitmap was removed)"),
])
def test_the_reason_of_a_full_as_the_user_reads_it(info, head, reason):
    assert plan(info, head, force_full="--full" in reason).reason == reason


def test_a_busy_head_bitmap_says_what_to_suspect_and_that_nothing_changed():
    with pytest.raises(EngineError, match=r"^disk vda-node: bitmap ekko-.* is in use by another operation "
                                          r"\(another backup running\?\); nothing was changed$"):
        plan(disk(bm(G1, busy=True)), ChainHead(B1, G1, G, 1 << 30, 4 << 20))


def test_a_generation_name_has_our_prefix_not_just_an_id_after_as_many_characters():
    """A header (or journal) naming another tool's bitmap `user-<id>` does not make it ours."""
    assert known_generations("ekko-", [B1], header_bitmaps=["user-" + B2, G3]) == {G1, G3}
    assert known_generations("ekko-", [], interrupted=Interrupted("xxxx-" + B1, "abcd-" + B2)) == frozenset()


def test_recovery_transaction_in_full_and_its_notes():
    """An interrupted run disabled the head and added its own generation; an older generation's
    retire never happened. The transaction acts on the disk's node with every argument QEMU needs;
    each note says what was done to which bitmap; a bitmap without our prefix is not mentioned."""
    info = disk(bm(G1, recording=False), bm(G2), bm(G3), bm("other-tool"))
    known = known_generations("ekko-", [B1, B3]) | {G2}
    r = plan_recovery(info, G1, "ekko-", interrupted=Interrupted(G1, G2), known=known)
    assert r.broken_reason is None
    assert list(r.actions) == [
        {"type": "block-dirty-bitmap-merge", "data": {"node": "vda-node", "target": G1, "bitmaps": [G2]}},
        {"type": "block-dirty-bitmap-enable", "data": {"node": "vda-node", "name": G1}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "vda-node", "name": G2}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "vda-node", "name": G3}},
    ]
    assert list(r.notes) == [
        f"merged {G2} back into {G1}",
        f"re-enabled {G1}, which an interrupted backup had disabled",
        f"removed interrupted backup's generation {G2}",
        f"removed retired generation {G3}",
    ]


def test_recovery_of_an_inconsistent_head_removes_it_and_says_why_the_chain_broke():
    info = disk(bm(G1, inconsistent=True), bm("ekko-foo"))
    r = plan_recovery(info, G1, "ekko-", known=known_generations("ekko-", [B1]))
    assert r.broken_reason == (f"bitmap {G1} is inconsistent: QEMU exited uncleanly "
                               "(kill, crash or power loss) since the last backup")
    assert list(r.actions) == [{"type": "block-dirty-bitmap-remove", "data": {"node": "vda-node", "name": G1}}]
    assert list(r.notes) == [f"removed inconsistent generation {G1}",
                             "left bitmap ekko-foo alone: ekko did not create it for this disk"]

"""The loss paths a new user found in an hour: each test fails on the code before its fix.

Every test compares what a committed backup restores with the disk as it was at the backup's
instant (the QemuDisk's model), not with what the backup says about itself.
"""

import json
import random

import pytest

from tests.integration.test_backup_qmp import ours, restore_equals

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("in_flight,request_size", [(1, "64KiB"), (1, "256KiB"), (2, "96KiB")])
def test_reads_split_into_several_requests_with_few_in_flight_restore_exact(in_flight, request_size, qdisk,
                                                                           ekko_for, workdir):
    """Loss path 1: the reader handed a segment to a worker while its later reads were still to
    be issued, so a stale buffer was hashed and stored (or matched as 'reused'). Random data and
    a request size below the segment size make every segment take several reads."""
    rnd = random.Random(13)
    disk = qdisk(24 * MiB + 3 * 512)        # a short last segment too
    ekko = ekko_for(disk, segment_size="256KiB")
    ekko.cfg["read"] = {"in_flight": in_flight, "request_size": request_size}
    ekko.cfg["workers"] = 3
    ekko.write_config()
    disk.write(0, rnd.randbytes(24 * MiB + 3 * 512))
    first = ekko.backup()
    assert first["kind"] == "full"
    assert restore_equals(ekko, first["backup_id"], disk.snapshot(), workdir)
    for _ in range(40):
        disk.write(rnd.randrange(0, 24 * MiB), rnd.randbytes(rnd.randrange(1, 200 * KiB)))
    second = ekko.backup()
    assert second["kind"] == "incremental"
    assert restore_equals(ekko, second["backup_id"], disk.snapshot(), workdir)
    assert ours(disk) == [second["generation"]["bitmap"]]


def test_a_bitmap_disabled_outside_ekko_gives_a_full_that_says_why(qdisk, ekko_for, workdir):
    """Loss path 2: re-enabled without a word, it gave an incremental that read nothing and lacked
    the write made while it was disabled, in that backup and every later one."""
    disk = qdisk(16 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, random.Random(2).randbytes(2 * MiB))
    first = ekko.backup()
    gen = first["generation"]["bitmap"]
    disk.admin.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": gen})
    disk.write(5 * MiB, b"\x5a" * MiB)
    second = ekko.backup()
    assert second["kind"] == "full"
    assert f"bitmap {gen} is not recording (disabled outside ekko)" in second["reason"]
    assert restore_equals(ekko, second["backup_id"], disk.snapshot(), workdir)
    assert ours(disk) == [second["generation"]["bitmap"]]      # the disabled one retired with the commit
    disk.write(9 * MiB, b"\x33" * 4096)
    third = ekko.backup()
    assert third["kind"] == "incremental" and 0 < third["read_bytes"] <= 256 * KiB
    assert restore_equals(ekko, third["backup_id"], disk.snapshot(), workdir)


def test_a_failed_backup_after_an_outside_disable_does_not_make_it_trusted(qdisk, ekko_for, workdir):
    """The full that follows an outside disable fails (killed before its commit): the disabled
    bitmap is still not ekko's doing, so the retry is a full again, with the same reason."""
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, b"\x11" * MiB)
    gen = ekko.backup()["generation"]["bitmap"]
    disk.admin.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": gen})
    disk.write(3 * MiB, b"\x22" * MiB)
    killed = ekko.run("backup", "t1", env={"EKKO_TEST_CRASH": "before-commit"}, check=False)
    assert killed.returncode == -9
    again = ekko.backup()
    assert again["kind"] == "full" and "disabled outside ekko" in again["reason"]
    assert restore_equals(ekko, again["backup_id"], disk.snapshot(), workdir)


def test_bitmaps_ekko_did_not_create_for_this_disk_are_left_alone(qdisk, ekko_for, workdir):
    """Loss path 3: `ekko-foo` (a user's) was removed as a 'stray generation'; so was a bitmap of
    another config that shares the node and the prefix."""
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    foreign = ["ekko-foo", "ekko-20250101T000000000Z-abcdef", "backup-tool"]
    for name in foreign:
        disk.admin.execute("block-dirty-bitmap-add", {"node": "disk0", "name": name, "persistent": True})
    disk.write(0, b"\x01" * MiB)
    first = ekko.backup()
    disk.write(MiB, b"\x02" * MiB)
    second = ekko.backup()
    third = ekko.backup("t1", "--full")
    names = {b["name"] for b in disk.bitmaps()}
    assert set(foreign) <= names, names
    assert ours(disk) == sorted(["ekko-foo", "ekko-20250101T000000000Z-abcdef", third["generation"]["bitmap"]])
    assert second["kind"] == "incremental"
    assert restore_equals(ekko, first["backup_id"], b"\x01" * MiB + bytes(7 * MiB), workdir)


def test_two_targets_sharing_a_node_and_a_prefix_keep_each_others_generations(qdisk, workdir):
    """Two configs (here: two targets of one config) back up the same disk with the same prefix:
    each chain stays incremental; neither removes the other's generation."""
    from conftest import Ekko, make_config
    disk = qdisk(8 * MiB)
    spec = {"engine": "qmp", "qmp_socket": disk.qmp_socket, "node": "disk0"}
    ekko = Ekko(workdir, make_config(workdir, {"a": dict(spec), "b": dict(spec)}))
    disk.write(0, b"\x01" * MiB)
    a1, b1 = ekko.backup("a"), ekko.backup("b")
    disk.write(2 * MiB, b"\x02" * 4096)
    a2, b2 = ekko.backup("a"), ekko.backup("b")
    assert [a2["kind"], b2["kind"]] == ["incremental", "incremental"]
    assert ours(disk) == sorted([a2["generation"]["bitmap"], b2["generation"]["bitmap"]])
    assert restore_equals(ekko, b2["backup_id"], disk.snapshot(), workdir)


def test_a_damaged_newest_manifest_gives_a_full_that_says_so(qdisk, ekko_for, workdir):
    """Loss path 5: the reason blamed a missing bitmap of an older backup, and the damaged
    backup's bitmap was removed as a 'stray generation'."""
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, b"\x01" * MiB)
    ekko.backup()
    disk.write(MiB, b"\x02" * MiB)
    second = ekko.backup()
    key = f"manifests/t1/{second['backup_id']}"
    ekko.corrupt(key, offset=40)
    disk.write(2 * MiB, b"\x03" * MiB)
    third = ekko.backup()
    assert third["kind"] == "full"
    assert f"newest manifest {key} is unreadable" in third["reason"] and "checksum mismatch" in third["reason"]
    assert restore_equals(ekko, third["backup_id"], disk.snapshot(), workdir)
    assert ours(disk) == [third["generation"]["bitmap"]]


def test_a_store_that_lost_its_backups_fails_verify_and_the_next_full_says_why(store_kind, qdisk, ekko_for,
                                                                              workdir):
    """Loss path 6: an emptied store said 'verified 0 backup(s) OK' and the next backup called
    itself the first backup of the disk."""
    disk = qdisk(8 * MiB)
    ekko = ekko_for(disk)
    disk.write(0, b"\x01" * MiB)
    first = ekko.backup()
    assert ekko.run("verify", json_out=True).data["vanished"] == []
    store = ekko.store()
    for k in list(store.list("")):
        store.delete(k)
    v = ekko.run("verify", check=False)
    assert v.returncode == 3, v.stdout + v.stderr
    assert f"VANISHED backup {first['backup_id']} of t1" in v.stdout and "BACKUPS LOST" in v.stdout
    assert ekko.run("verify", "--target", "t1", check=False).returncode == 3
    st = ekko.run("status", check=False)
    assert st.returncode == 3 and f"store: VANISHED backup {first['backup_id']} of t1" in st.stdout, st.stdout
    again = ekko.backup()
    assert again["kind"] == "full"
    assert f"backup {first['backup_id']} of t1, committed by this host" in again["reason"]
    assert "first backup" not in again["reason"]
    assert restore_equals(ekko, again["backup_id"], disk.snapshot(), workdir)
    assert ekko.run("verify", json_out=True).data["ok"]


@pytest.mark.parametrize("read_back,where", [(None, "first"), (None, "last"), ("all", "middle")])
def test_the_read_back_check_fails_a_backup_whose_bitmap_missed_writes(read_back, where, qdisk, ekko_for, workdir):
    """A bitmap cleared behind ekko's back stays recording and consistent: nothing but reading
    the view again can tell the chain is wrong. The default check always reads the first and
    the last segment; `read_back: all` reads every one. Nothing is committed, and the next
    backup is a full that says why."""
    disk = qdisk(8 * MiB + 1536)              # the last segment is short
    ekko = ekko_for(disk)
    if read_back:
        ekko.cfg["read"] = {"read_back": read_back}
        ekko.write_config()
    disk.write(0, random.Random(3).randbytes(8 * MiB + 1536))
    first = ekko.backup()
    gen = first["generation"]["bitmap"]
    offset = {"first": 4096, "last": 8 * MiB + 512, "middle": 4 * MiB + 100}[where]
    disk.write(offset, b"\xee" * 512)
    disk.admin.execute("block-dirty-bitmap-clear", {"node": "disk0", "name": gen})
    before = ekko.run("list", json_out=True).data
    failed = ekko.run("backup", "t1", check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "read-back check failed" in failed.stderr and "Nothing was committed" in failed.stderr
    assert ekko.run("list", json_out=True).data == before
    again = ekko.backup()
    assert again["kind"] == "full" and "read-back check" in again["reason"]
    assert restore_equals(ekko, again["backup_id"], disk.snapshot(), workdir)
    disk.write(2 * MiB, b"\x01" * 4096)
    after = ekko.backup()           # the full cleared the demand: the chain goes on
    assert after["kind"] == "incremental"
    assert restore_equals(ekko, after["backup_id"], disk.snapshot(), workdir)


@pytest.mark.parametrize("kind", ["incremental", "full"])
def test_a_range_zeroed_during_the_backup_is_not_taken_for_zeros(kind, qdisk, ekko_for, workdir):
    """Found by the chain fuzzer: the guest zeroes a range after the backup's instant; QEMU 7.2's
    fleecing view answers a large block-status request for it with ZERO (its reads are right),
    and the backup committed zeros where the disk held data at its instant. Restore exit 0."""
    from tests.integration.test_backup_qmp import paused_at
    disk = qdisk(4 * MiB)
    ekko = ekko_for(disk, segment_size="64KiB")
    disk.write(0, random.Random(21).randbytes(4 * MiB))
    ekko.backup()
    disk.write(MiB + 4096, b"\x42" * 4096)
    at_instant = disk.snapshot()
    args = ("backup", "t1") + (("--full",) if kind == "full" else ())
    with paused_at(ekko, workdir, "after-transaction", *args, "--json") as proc:
        disk.write_zeroes(512 * KiB, 2 * MiB)
    assert proc.returncode == 0, proc.err
    backup = json.loads(proc.out)["backup"]
    assert backup["kind"] == kind
    assert restore_equals(ekko, backup["backup_id"], at_instant, workdir)
    after = ekko.backup()                       # the zeroing is in the next one
    assert restore_equals(ekko, after["backup_id"], disk.snapshot(), workdir)

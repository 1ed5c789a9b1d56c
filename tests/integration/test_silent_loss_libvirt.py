"""Loss path 4 and foreign checkpoints, against a real libvirtd.

A checkpoint ekko makes gets as libvirt parent whatever checkpoint was current, a user's too.
Once the user deleted theirs, ekko's redefinition named a parent that no longer existed: a
needless full, a warning, and ekko's bitmap left recording in the image for ever."""

import json
import os
import random

from libvirt_fixtures import images, libvirt_conn, libvirtd, test_domains  # noqa: F401
from tests.integration.test_libvirt_backup import backups_by_disk, lvwork, make_ekko, start_guest  # noqa: F401

from conftest import read_raw

KiB, MiB = 1024, 1024 * 1024


def bitmaps_of(dom):
    """The dirty bitmaps on the guest's qcow2 disk (vda: its only qcow2 node between backups), as
    QEMU sees them: libvirt does not know a bitmap whose checkpoint metadata is gone."""
    import libvirt_qemu
    nodes = json.loads(libvirt_qemu.qemuMonitorCommand(
        dom, json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}}), 0))["return"]
    return sorted(x["name"] for n in nodes if n.get("drv") == "qcow2" for x in n.get("dirty-bitmaps", []))


def user_checkpoint(dom, name):
    dom.checkpointCreateXML(f"<domaincheckpoint><name>{name}</name><disks><disk name='vda' checkpoint='bitmap'/>"
                            "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>", 0)


def restored(ekko, lvwork, backup_id, dev):
    out = os.path.join(lvwork, f"r-{backup_id}-{dev}.raw")
    ekko.run("restore", backup_id, "--disk", dev, "--to", out, "--force")
    data = read_raw(out)
    os.unlink(out)
    return data


def test_a_deleted_user_checkpoint_as_parent_does_not_break_the_chain(libvirt_conn, test_domains, images, lvwork):
    rnd = random.Random(4)
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-sl4")
    ekko = make_ekko(lvwork)
    g.write("vda", 0, rnd.randbytes(512 * KiB))
    user_checkpoint(g.dom, "foo2")
    first = backups_by_disk(ekko, "ekko-test-sl4")
    g.dom.checkpointLookupByName("foo2").delete(0)
    g.write("vda", 3 * MiB, rnd.randbytes(64 * KiB))
    exp = g.snapshot()
    second = backups_by_disk(ekko, "ekko-test-sl4")
    assert second["vda"]["kind"] == "incremental", second["vda"]["reason"]
    assert second["vda"]["parent"] == first["vda"]["backup_id"]
    assert restored(ekko, lvwork, second["vda"]["backup_id"], "vda") == exp["vda"]
    # exactly one ekko bitmap: the generation the newest backup names; none left recording for ever
    assert [b for b in bitmaps_of(g.dom) if b.startswith("ekko-")] == [second["vda"]["generation"]["bitmap"]]


def test_a_users_checkpoint_with_ekkos_prefix_is_never_deleted(libvirt_conn, test_domains, images, lvwork):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-sl5")
    ekko = make_ekko(lvwork)
    g.write("vda", 0, b"\x07" * (256 * KiB))
    user_checkpoint(g.dom, "ekko-foo")
    backups_by_disk(ekko, "ekko-test-sl5")
    g.write("vda", MiB, b"\x08" * (64 * KiB))
    second = backups_by_disk(ekko, "ekko-test-sl5")
    assert second["vda"]["kind"] == "incremental"
    assert [c.getName() for c in g.dom.listAllCheckpoints()] == ["ekko-foo"]
    assert "ekko-foo" in bitmaps_of(g.dom)
    assert restored(ekko, lvwork, second["vda"]["backup_id"], "vda") == g.snapshot()["vda"]


def test_a_range_zeroed_during_a_domain_backup_is_not_taken_for_zeros(libvirt_conn, test_domains, images, lvwork):
    """The chain fuzzer found QEMU's QMP fleecing view reporting ranges zeroed after the instant
    as ZERO (tests/integration/test_silent_loss.py); libvirt's pull backup must not either."""
    from harness.libvirtd import disk_alias, monitor
    from tests.integration.test_backup_qmp import paused_at
    rnd = random.Random(8)
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-sl6")
    ekko = make_ekko(lvwork)
    ekko.cfg["segment_size"] = "64KiB"
    ekko.write_config()
    g.write("vda", 0, rnd.randbytes(4 * MiB))
    backups_by_disk(ekko, "ekko-test-sl6")
    g.write("vda", MiB + 4096, b"\x42" * 4096)
    g.flush("vda")
    at_instant = g.snapshot()
    with paused_at(ekko, lvwork, "after-transaction", "backup", "ekko-test-sl6", "--json") as proc:
        dev = f"/machine/peripheral/{disk_alias(g.dom, 'vda')}/virtio-backend"
        monitor(g.dom, f'qemu-io -d {dev} "write -z {512 * KiB} {2 * MiB}"')
        g.flush("vda")
    assert proc.returncode == 0, proc.err
    vda = next(b for b in json.loads(proc.out)["backups"] if b["target"].endswith(".vda"))
    assert vda["kind"] == "incremental"
    assert restored(ekko, lvwork, vda["backup_id"], "vda") == at_instant["vda"]
    g.model["vda"][512 * KiB:512 * KiB + 2 * MiB] = bytes(2 * MiB)      # the zeroing did happen:
    after = backups_by_disk(ekko, "ekko-test-sl6")["vda"]                 # it is in the next backup
    assert restored(ekko, lvwork, after["backup_id"], "vda") == g.snapshot()["vda"] != at_instant["vda"]

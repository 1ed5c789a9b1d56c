"""A libvirt domain's name works wherever a target or a backup is asked for: its backups are
those of its disks' targets '<domain>.<disk>' (engine/domain_xml.target_name). The store alone
tells which targets those are: no libvirtd here (none is started, none is asked).

The store is a local directory with manifests committed by catalog.commit, as a backup does.
"""

import datetime
import json

import pytest
import yaml

from ekko_libvirt.store import catalog, markers
from ekko_libvirt import cli
from ekko_libvirt.format import manifest as mf, segment
from ekko_libvirt.engine.domain_xml import target_name
from ekko_libvirt.errors import UsageError
from ekko_libvirt.store.local import LocalStore

UTC = datetime.timezone.utc
SEG = 4096
UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"


def put(store, target, day, labels=None, minute=0):
    """A one-segment backup of `target` on 2024-06-<day>; -> backup id."""
    when = datetime.datetime(2024, 6, day, 12, minute, tzinfo=UTC)
    enc = segment.encode(f"{target}/{day}/{minute}".encode().ljust(SEG, b"."))
    store.put(enc.key, enc.blob)
    table = mf.SegmentTable(1)
    table.set_data(0, enc.digest)
    bid = catalog.new_backup_id(when)
    catalog.commit(store, mf.Manifest(bid, target, SEG, SEG, table, created=when.isoformat(),
                                      labels=dict(labels or {})))
    return bid


def domain_backup(store, domain, day, disks=("vda", "vdb"), labels=None):
    """One backup of a domain: one manifest per disk, all under one backup id, each disk's target
    named by target_name (as domain_job does)."""
    when = datetime.datetime(2024, 6, day, 12, tzinfo=UTC)
    bid = catalog.new_backup_id(when)
    for dev in disks:
        enc = segment.encode(f"{domain}/{dev}/{day}".encode().ljust(SEG, b"."))
        store.put(enc.key, enc.blob)
        table = mf.SegmentTable(1)
        table.set_data(0, enc.digest)
        catalog.commit(store, mf.Manifest(bid, target_name(domain, dev), SEG, SEG, table, created=when.isoformat(),
                                          labels=dict(labels or {}, domain_name=domain)))
    return bid


@pytest.fixture
def ekko(tmp_path, capsys):
    """cli.main on a local store; -> (exit code, stdout, stderr)."""
    path = tmp_path / "ekko.yaml"
    path.write_text(yaml.safe_dump({"store": {"type": "local", "path": str(tmp_path / "store")},
                                    "state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run"),
                                    # libvirt would be asked here, if anything asked it: nothing answers
                                    "libvirt": {"uri": f"qemu+unix:///system?socket={tmp_path}/none"}}))

    def run(*args):
        capsys.readouterr()
        code = cli.main(["-c", str(path), *args])
        out, err = capsys.readouterr()
        return code, out, err
    run.store = LocalStore(str(tmp_path / "store"))
    return run


@pytest.fixture
def web(ekko):
    """Domain web1 (disks vda, vdb: two domain backups, then one of vda alone), domain web10
    (whose name starts like web1's) and a QMP target web1-vda."""
    st = ekko.store
    ids = {"d1": domain_backup(st, "web1", 1, labels={"domain_uuid": UUID}),
           "d2": domain_backup(st, "web1", 2, labels={"domain_uuid": UUID}),
           "d3": domain_backup(st, "web1", 3, disks=("vda",), labels={"domain_uuid": UUID}),
           "w10": domain_backup(st, "web10", 2),
           "q": put(st, "web1-vda", 2)}
    return ids


def test_list_takes_a_domain_name(ekko, web):
    code, out, err = ekko("list", "web1", "--json")
    assert code == 0, err
    rows = json.loads(out)["backups"]
    assert sorted((r["backup_id"], r["target"]) for r in rows) == sorted(
        [(web["d1"], "web1.vda"), (web["d1"], "web1.vdb"), (web["d2"], "web1.vda"), (web["d2"], "web1.vdb"),
         (web["d3"], "web1.vda")])
    code, out, _ = ekko("list", "web1")
    assert code == 0 and "no backups" not in out and out.count("web1.v") == 5 and "web10" not in out
    # a target's own name still means that target only
    code, out, _ = ekko("list", "web1.vdb", "--json")
    assert [r["backup_id"] for r in json.loads(out)["backups"]] == [web["d1"], web["d2"]]
    code, out, _ = ekko("list", "web1-vda", "--json")
    assert [r["backup_id"] for r in json.loads(out)["backups"]] == [web["q"]]
    # the domain's UUID: its manifests carry it
    code, out, _ = ekko("list", UUID, "--json")
    assert len(json.loads(out)["backups"]) == 5
    code, out, _ = ekko("list", "web")
    assert code == 0 and "no backups of 'web'" in out


def test_show_takes_a_domain_name_its_newest_backup(ekko, web):
    code, out, err = ekko("show", "web1", "--json")
    assert code == 0, err
    shown = json.loads(out)["backups"]
    assert [(b["backup_id"], b["target"]) for b in shown] == [(web["d3"], "web1.vda")]
    code, out, err = ekko("show", "web1", "--disk", "vdb", "--json")
    assert code == 0, err
    assert json.loads(out)["backup"]["backup_id"] == web["d2"] and json.loads(out)["backup"]["target"] == "web1.vdb"
    code, out, _ = ekko("show", "web10")                       # every disk of the newest backup
    assert code == 0 and out.count(f"backup      {web['w10']}") == 2
    assert "web10.vda" in out and "web10.vdb" in out
    code, out, _ = ekko("show", UUID, "--json")
    assert json.loads(out)["backup"]["backup_id"] == web["d3"]
    code, _, err = ekko("show", "web")
    assert code == 2 and "no backup 'web'" in err


def test_protect_verify_restore_by_domain_name(ekko, web, tmp_path):
    code, out, err = ekko("protect", "web10", "--json")
    assert code == 0, err
    assert sorted(b["target"] for b in json.loads(out)["backups"]) == ["web10.vda", "web10.vdb"]
    assert markers.is_protected(ekko.store, "web10.vda", web["w10"])
    assert markers.is_protected(ekko.store, "web10.vdb", web["w10"])
    code, out, err = ekko("unprotect", "web10", "--disk", "vdb", "--json")
    assert code == 0 and [b["target"] for b in json.loads(out)["backups"]] == ["web10.vdb"]
    assert not markers.is_protected(ekko.store, "web10.vdb", web["w10"])
    code, out, err = ekko("verify", "web1", "--json")          # web1's newest backup is one disk
    assert code == 0, err
    assert json.loads(out)["backups"] == [web["d3"]]
    code, _, err = ekko("verify", "web10")                     # two disks: which one
    assert code == 2 and "--disk" in err
    code, out, err = ekko("verify", "web10", "--disk", "vdb", "--json")
    assert code == 0 and json.loads(out)["backups"] == [web["w10"]]
    out_file = tmp_path / "r.raw"
    code, _, err = ekko("restore", "web1", "--disk", "vdb", "--to", str(out_file))
    assert code == 0, err
    assert out_file.read_bytes() == b"web1/vdb/2".ljust(SEG, b".")


def test_catalog_named_is_the_store_alone(web, ekko):
    st = ekko.store
    assert catalog.named(st, "web1") == ["web1.vda", "web1.vdb"]
    assert catalog.named(st, "web1.vda") == ["web1.vda"]
    assert catalog.named(st, "web10") == ["web10.vda", "web10.vdb"]
    assert catalog.named(st, UUID.upper()) == ["web1.vda", "web1.vdb"]
    assert catalog.named(st, "web") == [] and catalog.named(st, "nothing") == []
    # an id prefix wins over a name; a name gives the newest backup of its targets
    assert catalog.matching(st, web["d1"]) == [catalog.manifest_key("web1.vda", web["d1"]),
                                               catalog.manifest_key("web1.vdb", web["d1"])]
    assert catalog.matching(st, "web1", "vdb") == [catalog.manifest_key("web1.vdb", web["d2"])]
    # a domain name with characters a target cannot have: named as target_name names it
    bid = domain_backup(st, "my vm", 4, disks=("sda",))
    assert catalog.named(st, "my vm") == ["my_vm.sda"]
    assert catalog.find(st, "my vm") == catalog.manifest_key("my_vm.sda", bid)


def test_an_ambiguous_prefix_says_how_many_more(ekko):
    st = ekko.store
    for minute in range(9):
        put(st, f"t{minute}", 5, minute=minute)
    with pytest.raises(UsageError) as e:
        catalog.find(st, "20240605T12")
    assert "is ambiguous (" in str(e.value) and str(e.value).count("t") >= 6
    assert "and 3 more" in str(e.value)
    code, _, err = ekko("show", "20240605T12")
    assert code == 2 and "and 3 more" in err
    for minute in range(3):                    # six or fewer: all of them, no "more"
        put(st, f"u{minute}", 6, minute=minute)
    with pytest.raises(UsageError) as e:
        catalog.find(st, "20240606T12")
    assert "more" not in str(e.value) and all(f"u{m}/" in str(e.value) for m in range(3))


def test_prune_and_verify_take_a_domain_name(ekko, web):
    """`ekko prune web1` prunes the disks of web1 (not web10's, not the QMP target web1-vda);
    `ekko verify --target web1` verifies them."""
    code, out, _ = ekko("prune", "web1", "--keep-last", "1", "--dry-run", "--json")
    assert code == 0
    rows = json.loads(out)["backups"]
    assert sorted({r["target"] for r in rows}) == ["web1.vda", "web1.vdb"]
    assert sorted(r["backup_id"] for r in rows if not r["keep"]) == sorted([web["d1"], web["d2"], web["d1"]])
    code, out, _ = ekko("verify", "--target", "web1", "--json")
    assert code == 0
    assert sorted(json.loads(out)["backups"]) == sorted([web["d1"], web["d2"], web["d3"], web["d1"], web["d2"]])

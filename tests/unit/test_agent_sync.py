"""The agent's scheduled sync (agent.sync): its settings, maintenance.run_sync's record (the lag
kept per destination across failed runs), what `ekko status` and the metrics make of it."""

import datetime
import os

import pytest

from ekko_libvirt import config
from ekko_libvirt.agent import maintenance, metrics
from ekko_libvirt.agent.daemon import check_stores
from ekko_libvirt.agent.metrics import AgentFacts
from ekko_libvirt.agent.settings import AgentSettings
from ekko_libvirt.agent.status import describe_lifecycle, lifecycle_info
from ekko_libvirt.errors import ConfigError
from ekko_libvirt.format import manifest as mf, segment
from ekko_libvirt.store import catalog
from ekko_libvirt.store.factory import open_store
from tests.unit.test_agent_metrics import scrape


def cfg_with_sites(tmp_path, **agent):
    return config.build({"store": {"type": "local", "path": str(tmp_path / "src")},
                         "stores": {"site2": {"type": "local", "path": str(tmp_path / "site2")},
                                    "site3": {"type": "local", "path": str(tmp_path / "site3")}},
                         "state_dir": str(tmp_path / "state"), "agent": agent})


def put_backup(store, target, blocks, project=None):
    t = mf.SegmentTable(len(blocks))
    for i, raw in enumerate(blocks):
        enc = segment.encode(raw)
        store.put(enc.key, enc.blob)
        t.set_data(i, enc.digest)
    return catalog.commit(store, mf.Manifest(catalog.new_backup_id(), target, len(blocks) * 4096, 4096, t))


@pytest.mark.parametrize("raw, want", [
    ({"to": "site2"}, (("site2",), "default", 6 * 3600)),
    ({"to": ["site2", "site3"], "source": "default", "interval": "1h"}, (("site2", "site3"), "default", 3600))])
def test_sync_settings(raw, want):
    s = AgentSettings.from_mapping({"agent": {"sync": raw}}).sync
    assert (s.dests, s.source, s.interval_s) == want


@pytest.mark.parametrize("raw, match", [
    ({}, r"agent\.sync\.to"), ({"to": []}, r"agent\.sync\.to"), ({"to": ["a", "a"]}, r"agent\.sync\.to"),
    ({"to": "a", "source": "a"}, r"agent\.sync\.source"), ({"to": "a", "every": 1}, r"agent\.sync\.every"),
    ({"to": "a", "interval": "x"}, r"agent\.sync\.interval"), ("site2", r"agent\.sync: must be a mapping")])
def test_bad_sync_settings(raw, match):
    with pytest.raises(ConfigError, match=match):
        AgentSettings.from_mapping({"agent": {"sync": raw}})


def test_unknown_store_fails_the_agent_start(tmp_path):
    cfg = cfg_with_sites(tmp_path, sync={"to": ["site2", "nowhere"]})
    with pytest.raises(ConfigError, match=r"agent\.sync: no store named 'nowhere' \(known: default, site2, site3"):
        check_stores(cfg, AgentSettings.from_config(cfg))


def test_run_sync_records_the_lag_per_destination(tmp_path):
    cfg = cfg_with_sites(tmp_path, sync={"to": ["site2", "site3"]})
    settings = AgentSettings.from_config(cfg).sync
    src = open_store(cfg)
    k1 = put_backup(src, "vm.vda", [os.urandom(4096), os.urandom(4096)])
    k2 = put_backup(open_store(cfg, "p1"), "web.vda", [os.urandom(4096)], "p1")
    rec = maintenance.run_sync(cfg, settings)
    assert rec["ok"] and [d["dest"] for d in rec["stores"]] == ["site2", "site3"]
    assert all(d["copied"] == 2 and d["namespaces"] == 2 and d["last_complete_ns"] == rec["started_ns"]
               for d in rec["stores"])
    for site in ("site2", "site3"):
        assert catalog.keys(open_store(cfg.with_store(site))) == [k1]
        assert catalog.keys(open_store(cfg.with_store(site), "p1")) == [k2]
    # a damaged segment holds a new backup back: not complete, the last complete run is kept
    k3 = put_backup(src, "vm.vda", [os.urandom(4096)])
    bad = segment.segment_key(next(iter(catalog.load(src, k3).table.unique_digests())))
    blob = src.get(bad)
    src.put(bad, blob[:-1] + bytes([blob[-1] ^ 1]))
    rec2 = maintenance.run_sync(cfg, settings, previous=rec)
    assert not rec2["ok"] and all(d["failed"] == [k3] for d in rec2["stores"])
    assert all(d["last_complete_ns"] == rec["started_ns"] for d in rec2["stores"])
    assert "not copied" in rec2["error"]
    # a destination that cannot be reached is one error; the other still syncs
    site3 = os.path.join(str(tmp_path), "site3")
    os.rename(site3, site3 + ".gone")
    open(site3, "w").close()                      # a file where the directory was
    src.put(bad, blob)
    rec3 = maintenance.run_sync(cfg, settings, previous=rec2)
    by = {d["dest"]: d for d in rec3["stores"]}
    assert by["site2"]["ok"] and by["site2"]["last_complete_ns"] == rec3["started_ns"]
    assert not by["site3"]["ok"] and by["site3"]["last_complete_ns"] == rec["started_ns"] and by["site3"]["error"]

    # what `ekko status` and the metrics make of it
    now = datetime.datetime.fromtimestamp(rec3["started_ns"] / 1e9 + 10, datetime.timezone.utc)
    info = lifecycle_info({"sync": rec3}, None, None, now, settings)["sync"]
    assert info["enabled"] and info["dests"] == ["site2", "site3"] and info["lag"]["site2"] == 10.0
    assert info["lag"]["site3"] == round(now.timestamp() - rec["started_ns"] / 1e9, 1)
    assert "site3 behind by" in describe_lifecycle({"sync": info})
    got, _ = scrape(metrics.families([], {"sync": rec3}, AgentFacts(1, True, 1, 0, sync_interval_s=21600)))
    assert got[("ekko_sync_last_complete_timestamp_seconds", (("dest", "site2"),))] == rec3["started_ns"] / 1e9
    assert got[("ekko_sync_last_complete_timestamp_seconds", (("dest", "site3"),))] == rec["started_ns"] / 1e9
    assert got[("ekko_sync_ok", (("dest", "site3"),))] == 0 and got[("ekko_sync_ok", (("dest", "site2"),))] == 1
    assert got[("ekko_sync_backups_copied", (("dest", "site2"),))] == 1
    assert got[("ekko_sync_interval_seconds", ())] == 21600
    assert got[("ekko_sync_last_run_ok", ())] == 0


def test_each_destination_keeps_its_own_retention(tmp_path):
    cfg = cfg_with_sites(tmp_path, sync={"to": ["site2", "site3"], "retention": {"site2": {"keep_last": 1}}})
    settings = AgentSettings.from_config(cfg).sync
    src = open_store(cfg)
    keys = [put_backup(src, "vm.vda", [os.urandom(4096)]) for _ in range(3)]
    rec = maintenance.run_sync(cfg, settings, gc_grace_hours=0)
    by = {d["dest"]: d for d in rec["stores"]}
    assert rec["ok"] and by["site2"]["pruned"] == 0 and "pruned" not in by["site3"]
    site2, site3 = open_store(cfg.with_store("site2")), open_store(cfg.with_store("site3"))
    assert catalog.keys(site2) == keys[-1:] and catalog.keys(site3) == keys and catalog.keys(src) == keys
    assert len(list(site2.list("segments/"))) == 1 and len(list(site3.list("segments/"))) == 3
    # a backup the destination already had and its policy no longer keeps is pruned there, and gc'd
    site2_extra = put_backup(site2, "vm.vdb", [os.urandom(4096)])
    put_backup(site2, "vm.vdb", [os.urandom(4096)])
    assert maintenance.run_sync(cfg, settings, gc_grace_hours=0)["stores"][0]["pruned"] == 1
    assert site2_extra not in catalog.keys(site2) and len(list(site2.list("segments/"))) == 2
    for k in catalog.keys(site2, "vm.vdb"):
        site2.delete(k)
    assert by["site2"]["copied"] == 1 and by["site3"]["copied"] == 3      # what site2 would prune is not sent
    # the next sync does not bring the pruned ones back; a new backup replaces the kept one
    rec2 = maintenance.run_sync(cfg, settings, previous=rec, gc_grace_hours=0)
    assert {d["dest"]: d["copied"] for d in rec2["stores"]} == {"site2": 0, "site3": 0}
    k4 = put_backup(src, "vm.vda", [os.urandom(4096)])
    rec3 = maintenance.run_sync(cfg, settings, previous=rec2, gc_grace_hours=0)
    assert {d["dest"]: d["copied"] for d in rec3["stores"]} == {"site2": 1, "site3": 1}
    assert catalog.keys(site2) == [k4] and catalog.keys(site3) == keys + [k4]


@pytest.mark.parametrize("raw, match", [
    ({"to": "a", "retention": {"b": {"keep_last": 1}}}, r"agent\.sync\.retention\.b: not a destination"),
    ({"to": "a", "retention": {"a": {}}}, r"agent\.sync\.retention\.a: must be a mapping of keep_\* rules"),
    ({"to": "a", "retention": {"a": {"keep_often": 1}}}, r"agent\.sync\.retention\.a"),
    ({"to": "a", "retention": ["a"]}, r"agent\.sync\.retention: must be a mapping")])
def test_bad_sync_retention(raw, match):
    with pytest.raises(ConfigError, match=match):
        AgentSettings.from_mapping({"agent": {"sync": raw}})


def test_a_backup_protected_at_the_source_is_copied_and_kept_whatever_the_destination_policy(tmp_path):
    from ekko_libvirt.store import markers
    cfg = cfg_with_sites(tmp_path, sync={"to": ["site2"], "retention": {"site2": {"keep_last": 1}}})
    settings = AgentSettings.from_config(cfg).sync
    src = open_store(cfg)
    keys = [put_backup(src, "vm.vda", [os.urandom(4096)]) for _ in range(3)]
    target, bid = keys[0].split("/")[1:]
    markers.protect(src, target, bid)
    rec = maintenance.run_sync(cfg, settings, gc_grace_hours=0)
    site2 = open_store(cfg.with_store("site2"))
    assert rec["ok"] and catalog.keys(site2) == [keys[0], keys[2]]
    assert markers.is_protected(site2, target, bid) and markers.protected(site2) == {f"{target}/{bid}"}
    assert open_store(cfg.with_store("site2")).get(markers.protected_key(target, bid)) == \
        src.get(markers.protected_key(target, bid))

"""The agent's lifecycle work as a real `ekko agent` process against a real libvirtd: retention
applied after scheduled backups (keep-last 2 per disk, plus a protected backup), gc and deep
verification run on their interval and shown by `ekko status`; everything left restores exactly.
Fixtures and helpers are those of test_agent_libvirt."""

import os
import re
import time

from conftest import read_raw
from ekko_libvirt.lifecycle.prune import backup_time
from libvirt_fixtures import ekko_hook, images, libvirt_conn, libvirtd, test_domains  # noqa: F401
from tests.integration.test_agent_libvirt import (agent_ekko, agents, backups_of, lvwork, status_of,  # noqa: F401
                                                  wait_for)
from tests.integration.test_libvirt_backup import start_guest

KiB, MiB = 1024, 1024 * 1024


def committed(agent, name):
    """Backup ids the agent logged as committed for the domain, oldest first."""
    return re.findall(rf"{re.escape(name)}: backup (\S+) committed", agent.text())


def test_agent_retention_keep_last_2_gc_and_verify(libvirtd, ekko_hook, test_domains, images, lvwork, agents):
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-agret")
    name = g.dom.name()
    g.write("vda", 0, os.urandom(300 * KiB))
    g.write("vdb", 1 * MiB, os.urandom(100 * KiB))
    first = g.snapshot()
    ekko = agent_ekko(lvwork, ekko_hook, domains={name: {
        "schedule": {"enabled": True, "interval": 1, "window": "00:00-24:00"},
        "retention": {"keep_last": 2}}},                   # replaces the default below for this domain
        gc_interval=2, verify={"interval": 2, "deep": True, "sample": "100%", "since_days": 1})
    # gc's grace (7 s) stays above the length of a backup here, so gc never races one
    ekko.cfg["retention"] = {"keep_last": 10, "gc_grace_hours": 0.002}
    ekko.write_config()
    b0 = ekko.run("backup", name, json_out=True).data["backups"][0]["backup_id"]     # by hand, then protected
    ekko.run("protect", b0)

    agent = agents(ekko)
    wait_for(lambda: len(committed(agent, name)) >= 2, 60, "two scheduled backups")
    g.write("vda", 5 * MiB, os.urandom(200 * KiB))
    g.write("vdb", 3 * MiB, os.urandom(64 * KiB))
    final = g.snapshot()
    written = time.time()

    def settled():
        """b0 + the newest 2, both taken after the last write, and gc and verify recorded."""
        ids = list(backups_of(ekko, name))
        newest = [b for b in ids if b != b0]
        after = [b for b in newest if backup_time(b).timestamp() > written]
        lc = ekko.run("status", name, json_out=True).data["lifecycle"]
        done = all(lc[t]["last"] and lc[t]["last"]["ok"] for t in ("gc", "verify"))
        return ids[0] == b0 and len(newest) == 2 and after == newest and done
    wait_for(settled, 60, "retention after two backups newer than the last write")
    row = status_of(ekko, name)
    lifecycle = ekko.run("status", name, json_out=True).data["lifecycle"]
    assert agent.terminate() == 0
    assert "Traceback" not in agent.text(), agent.text()

    made = committed(agent, name)
    by_id = backups_of(ekko, name)
    assert list(by_id) == [b0] + made[-2:]               # exactly the newest 2 scheduled + the protected one
    assert len(made) >= 4                                # so at least 2 scheduled backups were pruned
    for bid, disks in by_id.items():
        assert set(disks) == {"vda", "vdb"}, bid         # per disk
    assert by_id[made[-1]]["vda"]["kind"] == "incremental"
    assert by_id[made[-1]]["vda"]["protected"] is False and by_id[b0]["vda"]["protected"] is True
    assert by_id[b0]["vdb"]["protected"] is True

    # ekko status: the last prune of the domain, the last gc and verify with their outcome
    pr = row["last_prune"]
    assert pr["ok"] and pr["policies"] == {f"{name}.vda": "--keep-last 2", f"{name}.vdb": "--keep-last 2"}
    for task in ("gc", "verify"):
        last = lifecycle[task]["last"]
        assert lifecycle[task]["enabled"] and last["ok"] and last["error"] is None and last["started"], task
    assert lifecycle["verify"]["deep"] and "checked" in lifecycle["verify"]["last"]["summary"]
    text = ekko.run("status", name).stdout
    assert "gc:     last " in text and "verify: last " in text and "pruned  " in text

    # what is left restores exactly, also after a gc that frees everything the pruned ones used
    ekko.run("gc", "--grace-hours", "0")
    assert ekko.run("verify", "--deep", json_out=True).data["ok"]
    listed = {r["backup_id"]: r for r in ekko.run("list", json_out=True).data["backups"]}
    assert all(listed[b]["verified"]["ok"] and listed[b]["verified"]["deep"] for b in by_id)
    for bid, exp in ((b0, first), (made[-2], final), (made[-1], final)):
        for dev in ("vda", "vdb"):
            out = os.path.join(lvwork, f"r-{bid}-{dev}.raw")
            ekko.run("restore", bid, "--disk", dev, "--to", out)
            assert read_raw(out) == exp[dev], (bid, dev)

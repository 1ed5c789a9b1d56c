"""The agent's Prometheus metrics from a real run (real libvirtd, QEMU, hook, local store), scraped
over HTTP and read from the textfile, and the example alert rules (packaging/ekko-alerts.yml)
tested with `promtool test rules` against exactly what was scraped.

One domain goes through: a scheduled backup that fails (scratch_reserve larger than any disk:
ScratchSpaceLow), a scheduled backup that succeeds (its first full), an incremental and a forced
full by the CLI, a flipped segment the agent's verify finds, and QEMU killed (chain broken).
"""

import os
import shutil
import signal
import subprocess
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from harness import in_ci
from harness.libvirtd import qemu_pid
from libvirt_fixtures import ekko_hook, images, libvirt_conn, libvirtd, test_domains  # noqa: F401
from tests.integration.test_agent_libvirt import agent_ekko, agents, lvwork, status_of, wait_for  # noqa: F401
from tests.integration.test_libvirt_backup import start_guest

KiB = 1024
RULES = os.path.join(ROOT, "packaging", "ekko-alerts.yml")


def scrape(url):
    """{(name, sorted labels): value} of one scrape, and the text."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return parse(text), text


def parse(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metrics_url(agent):
    import re
    agent.wait_log("metrics: serving http://")
    return re.search(r"metrics: serving (http://\S+/metrics)", agent.text()).group(1)


def value(got, name, **labels):
    matches = [v for (n, lab), v in got.items() if n == name and all(dict(lab).get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} series"
    return matches[0]


def status_of_lifecycle(ekko):
    return ekko.run("status", json_out=True).data["lifecycle"]


def head_id(got, dev):
    """The backup id of the disk's newest backup in the metrics, or None."""
    ids = [dict(lab)["backup_id"] for n, lab in got if n == "ekko_disk_last_backup_info" and dict(lab)["disk"] == dev]
    return ids[0] if len(ids) == 1 else None


def test_metrics_of_a_real_run_and_the_alert_rules(libvirtd, ekko_hook, test_domains, images, lvwork, agents):
    if shutil.which("promtool") is None:
        if in_ci():
            pytest.fail("promtool (Debian prometheus) not installed (CI=true: failing instead of skipping)")
        pytest.skip("promtool (Debian prometheus) not installed")
    g, _ = start_guest(test_domains, images, lvwork, "ekko-test-mtr")
    name, uuid = g.dom.name(), g.dom.UUIDString().lower()
    g.write("vda", 0, os.urandom(300 * KiB))
    textfile = os.path.join(lvwork, "ekko.prom")
    sched = {name: {"schedule": {"enabled": True, "interval": "1h", "window": "00:00-24:00"}}}
    metrics = {"listen": "127.0.0.1:0", "textfile": textfile, "interval": 1}
    ekko = agent_ekko(lvwork, ekko_hook, domains=sched, metrics=metrics)

    # 1. a scheduled backup that fails: no scratch file system has 1000 TiB free
    ekko.cfg["scratch_reserve"] = "1000TiB"
    ekko.write_config()
    agent = agents(ekko)
    url = metrics_url(agent)
    wait_for(lambda: (j := status_of(ekko, name)["last_job"]) and j["status"] == "failed", 60, "the failed backup")
    got = wait_for(lambda: (m := scrape(url)[0]) and value(m, "ekko_domain_backup_failures_since_success",
                                                            domain=name) == 1 and m, 30, "the failure in the metrics")
    assert value(got, "ekko_domain_backup_failures", domain=name, cause="scratch-space-low") == 1
    assert value(got, "ekko_domain_chain_state", domain=name, state="none") == 1
    assert not [k for k in got if k[0] == "ekko_domain_last_success_timestamp_seconds"]
    assert value(got, "ekko_agent_up") == 1 and value(got, "ekko_agent_libvirt_connected") == 1
    assert value(got, "ekko_agent_hook_ok") == 1
    assert agent.terminate() == 0
    assert value(parse(open(textfile).read()), "ekko_agent_up") == 0      # a stopped agent says so

    # 2. the scheduled backup succeeds (the first: a full), then an incremental and a forced full by hand;
    # the agent's first sync (at start: it never ran) to a second store leaves it complete
    del ekko.cfg["scratch_reserve"]
    ekko.cfg["stores"] = {"site2": {"type": "local", "path": os.path.join(lvwork, "site2")}}
    ekko.cfg["agent"]["sync"] = {"to": "site2", "interval": "1h"}
    ekko.write_config()
    agent = agents(ekko)
    url = metrics_url(agent)
    first = wait_for(lambda: status_of(ekko, name)["chain"]["last_backup_id"], 60, "the scheduled backup")
    g.write("vda", 1024 * KiB, os.urandom(200 * KiB))
    ekko.run("backup", name)
    g.write("vda", 2048 * KiB, os.urandom(100 * KiB))
    forced = ekko.run("backup", name, "--full", json_out=True).data["backups"]
    forced_id = forced[0]["backup_id"]
    got = wait_for(lambda: (m := scrape(url)[0]) and head_id(m, "vda") == forced_id
                   and any(k[0] == "ekko_sync_ok" for k in m) and m, 60, "the forced full and the sync in the metrics")
    st = status_of(ekko, name)
    assert st["chain"]["last_backup_id"] == forced_id != first
    for dev in ("vda", "vdb"):
        show = ekko.run("show", forced_id, "--disk", dev, json_out=True).data["backup"]
        assert value(got, "ekko_disk_last_backup_info", disk=dev, backup_id=forced_id, kind="full",
                     reason=show["reason"]) == 1
        assert dev == "vdb" or show["reason"] == "full backup requested (--full)"      # vdb is raw: always full
        assert value(got, "ekko_disk_last_backup_full", disk=dev) == 1
        assert value(got, "ekko_disk_last_backup_read_bytes", disk=dev) == show["counts"]["read_bytes"]
        assert value(got, "ekko_disk_last_backup_stored_bytes", disk=dev) == show["counts"]["stored_bytes"]
        assert value(got, "ekko_disk_last_backup_reused_segments", disk=dev) == show["counts"]["reused_segments"]
        assert value(got, "ekko_disk_last_backup_duration_seconds", disk=dev) == show["timings"]["seconds"]
    assert value(got, "ekko_domain_backup_failures", domain=name, cause="scratch-space-low") == 1   # kept
    assert value(got, "ekko_domain_backup_failures_since_success", domain=name) == 0
    assert value(got, "ekko_domain_chain_state", domain=name, state="ok") == 1
    assert value(got, "ekko_domain_backup_interval_seconds", domain=name) == 3600
    from ekko_libvirt.agent.state import StateDir
    chain = StateDir(ekko_hook.state_dir).load_domain(uuid).chain
    assert value(got, "ekko_domain_last_success_timestamp_seconds", domain=name) == chain.last_backup_ns / 1e9
    assert value(got, "ekko_domain_last_full_timestamp_seconds", domain=name) == chain.last_full_ns / 1e9
    assert value(got, "ekko_sync_ok", dest="site2") == 1 and value(got, "ekko_sync_interval_seconds") == 3600
    synced = StateDir(ekko_hook.state_dir).load_lifecycle()["sync"]
    assert value(got, "ekko_sync_last_complete_timestamp_seconds", dest="site2") == synced["started_ns"] / 1e9
    lag = status_of_lifecycle(ekko)["sync"]
    assert lag["dests"] == ["site2"] and lag["last"]["ok"] and 0 <= lag["lag"]["site2"] < 3600
    assert agent.terminate() == 0

    # 3. a flipped segment that the agent's verify (deep, at start: never run) finds; QEMU killed
    seg = next(k for k in ekko.store().list("segments/"))
    ekko.corrupt(seg)
    ekko.cfg["agent"]["verify"] = {"interval": "1d", "deep": True}
    ekko.write_config()
    agent = agents(ekko)
    url = metrics_url(agent)
    got = wait_for(lambda: (m := scrape(url)[0]) and any(k[0] == "ekko_verify_last_run_ok" for k in m) and m,
                   120, "the verify in the metrics")
    assert value(got, "ekko_verify_last_run_ok") == 0
    assert value(got, "ekko_store_damaged_segments", project="default") == 1
    assert value(got, "ekko_store_damaged_backups", project="default") >= 1
    os.kill(qemu_pid(g.dom), signal.SIGKILL)
    got, text = wait_for(lambda: (m := scrape(url)) and value(m[0], "ekko_domain_chain_state", domain=name,
                                                              state="full-required") == 1 and m,
                         30, "the broken chain in the metrics")
    assert "QEMU" in dict(next(k for k in got if k[0] == "ekko_domain_chain_info")[1])["reason"]
    assert parse(open(textfile).read()).keys() == got.keys()         # the textfile holds the same series
    scraped_at = value(got, "ekko_agent_metrics_collected_timestamp_seconds")
    assert agent.terminate() == 0

    # 4. the example alerts against exactly these figures, as Prometheus would see them from now on
    promtool_test(lvwork, text, scraped_at, name, uuid)


DAY = 86400


def promtool_test(work, text, scraped_at, name, uuid):
    """Every scraped series as promtool input, constant from now on (the domain's backups stopped),
    its timestamps moved so that promtool's time 1d is the moment of the scrape; plus a twin domain
    whose last backup keeps up with the clock (still backed up every minute): it must not alert."""
    fams = list(text_string_to_metric_families(text))
    steps = (DAY + 3 * 3600) // 60
    series = []
    for fam in fams:
        for s in fam.samples:
            v = s.value - scraped_at + DAY if s.name.endswith("_timestamp_seconds") else s.value
            labels = dict(s.labels, job="ekko", instance="host1")
            series.append({"series": _series(s.name, labels), "values": f"{v!r}+0x{steps}"})
            if s.name in ("ekko_domain_last_success_timestamp_seconds", "ekko_domain_backup_interval_seconds"):
                twin = dict(labels, domain="twin", uuid="00000000-0000-0000-0000-000000000000")
                start, step = (v - DAY, 60) if s.name.endswith("_timestamp_seconds") else (v, 0)
                series.append({"series": _series(s.name, twin), "values": f"{start!r}+{step}x{steps}"})
    base = {"job": "ekko", "instance": "host1"}
    dom = dict(base, domain=name, uuid=uuid)
    missing = dict(dom, severity="warning")
    tests = {"rule_files": [RULES], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": "25h", "alertname": "EkkoBackupMissing", "exp_alerts": []},     # 1 h after: fine
            {"eval_time": "26h30m", "alertname": "EkkoBackupMissing", "exp_alerts": [{"exp_labels": missing,
             "exp_annotations": {"summary": f"no successful backup of {name} within twice its interval"}}]},
            {"eval_time": "24h1m", "alertname": "EkkoVerifyDamage", "exp_alerts": [{
                "exp_labels": dict(base, project="default", severity="critical"),
                "exp_annotations": {"summary": "verify found damage in store namespace default"}}]},
            {"eval_time": "24h20m", "alertname": "EkkoChainBroken", "exp_alerts": [{
                "exp_labels": dict(dom, state="full-required", severity="info"),
                "exp_annotations": {"summary": f"backup chain of {name} broken: its next backup is a full"}}]},
            {"eval_time": "24h20m", "alertname": "EkkoBackupsFailing", "exp_alerts": []},
            {"eval_time": "25h", "alertname": "EkkoReplicaBehind", "exp_alerts": []},
            {"eval_time": "26h30m", "alertname": "EkkoReplicaBehind", "exp_alerts": [{
                "exp_labels": dict(base, dest="site2", severity="warning"),
                "exp_annotations": {"summary": "replica site2 lags behind its source"}}]},
            {"eval_time": "24h20m", "alertname": "EkkoHookBroken", "exp_alerts": []},
            {"eval_time": "24h20m", "alertname": "EkkoAgentDown", "exp_alerts": []},
            # the figures stop moving (as a killed agent's textfile would): stale after 15 min
            {"eval_time": "24h10m", "alertname": "EkkoMetricsStale", "exp_alerts": []},
            {"eval_time": "24h20m", "alertname": "EkkoMetricsStale", "exp_alerts": [{
                "exp_labels": dict(base, severity="warning"),
                "exp_annotations": {"summary": "ekko's agent has not gathered its figures for 15 minutes"}}]},
        ]}]}
    path = os.path.join(work, "alerts-test.yml")
    with open(path, "w") as f:
        yaml.safe_dump(tests, f)
    p = subprocess.run(["promtool", "test", "rules", path], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def _series(name, labels):
    inner = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _esc(v):
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

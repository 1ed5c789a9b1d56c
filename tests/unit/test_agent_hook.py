"""The pure parts of hooks/qemu, loaded as a module (the script itself runs in the integration test)."""

import importlib.machinery
import importlib.util
import json
import os

import pytest

from ekko_libvirt.agent import hookformat
from ekko_libvirt.agent.events import parse_event

HOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "hooks", "qemu")
UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"


@pytest.fixture(scope="module")
def hook():
    loader = importlib.machinery.SourceFileLoader("ekko_hook_script", HOOK)
    spec = importlib.util.spec_from_loader("ekko_hook_script", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_the_hook_loads_the_package_rule(hook):
    rule = hook.load_rule(hook.rule_path())
    assert os.path.samefile(hook.rule_path(), hookformat.__file__)
    assert rule.call_from_argv(["vm", "started", "begin", ""])["extra"] is None


def test_call_from_argv():
    call = hookformat.call_from_argv(["instance-0000000a", "started", "begin", "-"])
    assert call == {"domain": "instance-0000000a", "op": "started", "subop": "begin", "extra": "-", "known": True}
    call = hookformat.call_from_argv(["vm", "frobnicate", "begin", "x y"])
    assert call["known"] is False and call["extra"] is None          # bad extra: dropped, call kept
    assert hookformat.call_from_argv(["vm", "stopped", "end", ""])["extra"] is None
    for bad in (["vm"], ["../x", "start", "begin", "-"], ["vm", "Start", "begin", "-"], ["vm", "s", "b" * 17, "-"]):
        with pytest.raises(hookformat.Refused):
            hookformat.call_from_argv(bad)


def test_load_rule_refuses_a_file_others_may_write(hook, tmp_path):
    f = tmp_path / "rule.py"
    f.write_text(open(hookformat.__file__).read())
    os.chmod(f, 0o666)
    with pytest.raises(ValueError):
        hook.load_rule(str(f))
    os.chmod(f, 0o644)
    assert hook.load_rule(str(f)).FORMAT_VERSION == hookformat.FORMAT_VERSION


def test_parse_domain_xml_takes_only_top_level_name_and_uuid(hook):
    xml = (f"<domain><name>vm1</name><uuid>{UUID.upper()}</uuid>"
           "<devices><disk><name>inner</name><uuid>00000000-0000-0000-0000-000000000000</uuid></disk></devices>"
           "<metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>"
           "<nova:name>  web  </nova:name><nova:owner><nova:project uuid='bad'/></nova:owner>"
           "</nova:instance><other:name xmlns:other='urn:x'>not nova</other:name></metadata></domain>").encode()
    r = hook.parse_domain_xml(xml, hookformat)
    assert r == {"status": "ok", "uuid": UUID, "name": "vm1", "nova": {"name": "web"}}


@pytest.mark.parametrize("xml", [b"", b"garbage", b"<domain><uuid>x</uuid></domain>",
                                 b"<x:domain xmlns:x='urn:y'><uuid>" + UUID.encode() + b"</uuid></x:domain>",
                                 b"<!DOCTYPE domain [<!ENTITY e 'x'>]><domain/>"])
def test_parse_domain_xml_refuses(hook, xml):
    r = hook.parse_domain_xml(xml, hookformat)
    assert r["uuid"] is None and r["status"] in ("empty", "malformed")


def test_encode_is_json_and_parses_as_an_event(hook):
    rec = {"v": 1, "wall_ns": 10, "mono_ns": 2, "boot_id": None, "pid": 3, "domain": "vm", "op": "started",
           "subop": "begin", "extra": "-", "known": True, "uuid": UUID, "xml_name": "vm\u00e9\"\\\n",
           "xml": "ok", "nova": {"name": "w\u00e9b"}, "vetoed": False}
    text = hook.encode(rec)
    assert text.isascii() and json.loads(text) == rec
    assert parse_event(json.loads(text)).nova.name == "w\u00e9b"


def test_valid_uuid():
    assert hookformat.valid_uuid(UUID.upper()) == UUID
    for bad in (None, 5, "", UUID[:-1], UUID.replace("-", "x"), "g" * 36):
        assert hookformat.valid_uuid(bad) is None


def test_status_tells_whether_the_installed_hook_can_load_its_rule(tmp_path):
    from ekko_libvirt.agent.spool import install_hook
    from ekko_libvirt.agent.status import describe_hook, hook_info
    dest, spool = str(tmp_path / "qemu.d" / "ekko"), str(tmp_path / "spool")
    info = hook_info(dest, spool)
    assert not info["installed"] and "not installed" in describe_hook(info)
    install_hook(dest, spool, str(tmp_path / "state"), source=HOOK, spool_max=77)
    os.makedirs(os.path.join(spool, "bad"))
    open(os.path.join(spool, "bad", "x.json"), "w").close()
    open(os.path.join(spool, "bad", "x.json.reason"), "w").close()
    info = hook_info(dest, spool)
    assert (info["rule_ok"], info["spool_max"], info["waiting"], info["quarantined"]) == (True, 77, 0, 1)
    assert describe_hook(info).endswith("(rule ok, coalesces above 77 events); spool: 0 event(s) waiting, "
                                        "1 quarantined")
    text = open(dest).read().replace(hookformat.__file__, str(tmp_path / "gone.py"))
    open(dest, "w").write(text)
    info = hook_info(dest, spool)
    assert not info["rule_ok"] and "every event is lost" in describe_hook(info)


def test_the_hook_refuses_a_start_exactly_while_the_agents_offline_marker_holds(hook, tmp_path):
    """One marker path rule (hookformat.offline_marker_path) for the writer (agent/state.py,
    taken by an offline backup) and the reader (the hook's veto at `prepare begin`)."""
    from ekko_libvirt.agent.state import StateDir
    sd = StateDir(str(tmp_path)).ensure()
    rule = hook.load_rule(hook.rule_path())
    assert sd.offline_marker_path(UUID) == rule.offline_marker_path(str(tmp_path), UUID)
    assert hook.offline_backup_veto(rule, str(tmp_path), UUID) is None
    with sd.offline_backup(UUID, "vm1"):
        assert hook.offline_backup_veto(rule, str(tmp_path), UUID) is not None
    assert hook.offline_backup_veto(rule, str(tmp_path), UUID) is None

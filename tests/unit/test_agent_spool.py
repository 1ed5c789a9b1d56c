import json
import os
import re

import pytest

from ekko_libvirt.agent.events import EventKind
from ekko_libvirt.agent.spool import Spool, install_hook, render_hook, rule_file

UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"
HOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "hooks", "qemu")


def put(spool_dir, wall, op="started", subop="begin", body=None, name=None):
    os.makedirs(spool_dir, exist_ok=True)
    name = name or f"{wall:020d}-{wall:020d}-{42:010d}-{wall:016x}.json"
    if body is None:
        body = json.dumps({"v": 1, "wall_ns": wall, "mono_ns": wall, "pid": 42, "domain": "vm1", "op": op,
                           "subop": subop, "uuid": UUID, "xml": "ok"})
    with open(os.path.join(spool_dir, name), "w") as f:
        f.write(body)
    return name


@pytest.fixture
def spool(tmp_path):
    return Spool(str(tmp_path / "events")).ensure()


def test_pending_in_order_ignoring_tmp_and_dirs(spool):
    b = put(spool.root, 2000, "stopped", "end")
    a = put(spool.root, 1000)
    put(spool.root, 0, name=".tmp-x.json")
    os.makedirs(os.path.join(spool.root, "bad"))
    assert [e.name for e in spool.pending()] == [a, b]
    assert spool.pending()[0].wall_ns == 1000


def test_drain_hands_over_in_order_and_acks(spool):
    put(spool.root, 3, "release", "end")
    put(spool.root, 1, "stopped", "end")
    put(spool.root, 2, "stopped", "end")
    seen = []
    r = spool.drain(lambda ev: seen.append((ev.wall_ns, ev.kind)))
    assert seen == [(1, EventKind.STOPPED), (2, EventKind.STOPPED), (3, EventKind.RELEASED)]
    assert len(r.processed) == 3 and r.error is None and spool.pending() == []


def test_events_stay_until_acked(spool):
    put(spool.root, 1)
    (entry,) = spool.pending()
    assert spool.read(entry).uuid == UUID
    assert spool.pending() == [entry]                    # reading is not consuming
    spool.ack(entry)
    spool.ack(entry)                                     # idempotent
    assert spool.pending() == []


def test_handler_failure_stops_and_keeps_the_event(spool):
    put(spool.root, 1)
    second = put(spool.root, 2)
    put(spool.root, 3)
    calls = []

    def handler(ev):
        calls.append(ev.wall_ns)
        if ev.wall_ns == 2:
            raise RuntimeError("libvirt unreachable")
    r = spool.drain(handler)
    assert calls == [1, 2] and r.stopped_at == second and isinstance(r.error, RuntimeError)
    assert [e.wall_ns for e in spool.pending()] == [2, 3]
    assert len(spool.drain(lambda ev: None).processed) == 2


@pytest.mark.parametrize("body,name", [
    ("{not json", None), ("\xff\xfe", None), ("[]", None), (json.dumps({"v": 99}), None),
    ("x" * (70 * 1024), None), ("{}", "foreign.txt"),
])
def test_malformed_files_are_quarantined_with_reason(spool, body, name):
    bad = put(spool.root, 5, body=body, name=name)
    good = put(spool.root, 9)
    r = spool.drain(lambda ev: None)
    assert r.quarantined == (bad,) and [e.wall_ns for e in r.processed] == [9] and good not in os.listdir(spool.root)
    assert sorted(os.listdir(spool.bad_dir)) == sorted([bad, bad + ".reason"])
    assert open(os.path.join(spool.bad_dir, bad + ".reason")).read().strip()


def test_symlink_is_quarantined_not_followed(spool, tmp_path):
    target = tmp_path / "secret"
    target.write_text("{}")
    name = f"{1:020d}-{1:020d}-{1:010d}-{1:016x}.json"
    os.symlink(target, os.path.join(spool.root, name))
    r = spool.drain(lambda ev: None)
    assert r.quarantined == (name,) and target.read_text() == "{}"


def test_cleanup_tmp(spool):
    p = os.path.join(spool.root, ".tmp-old")
    open(p, "w").close()
    os.utime(p, (1000, 1000))
    open(os.path.join(spool.root, ".tmp-new"), "w").close()
    assert spool.cleanup_tmp(600) == 1 and os.listdir(spool.root) == [".tmp-new"]


def test_pending_on_missing_dir(tmp_path):
    assert Spool(str(tmp_path / "nope")).pending() == []


# --- baking the hook -----------------------------------------------------------------------------

def test_render_hook_bakes_dirs_rule_and_bound():
    src = open(HOOK).read()
    out = render_hook(src, "/srv/spool", "/srv/state", "/srv/rule.py", 77)
    assert 'SPOOL_DIR = "/srv/spool"' in out and 'STATE_DIR = "/srv/state"' in out
    assert out.replace('"/srv/spool"', '"/var/spool/ekko/events"').replace('"/srv/state"', '"/var/lib/ekko"').replace(
        '"/srv/rule.py"', '""').replace("SPOOL_MAX = 77", "SPOOL_MAX = 1000") == src
    assert f'RULE_FILE = "{rule_file()}"' in render_hook(src, "/a", "/b")         # default: this package's rule
    with pytest.raises(ValueError, match="SPOOL_MAX must be a positive integer: 0"):
        render_hook(src, "/a", "/b", spool_max=0)


@pytest.mark.parametrize("spool_dir", ["relative", '/a"b', "/a\\b", "/a\nb"])
def test_render_hook_refuses_bad_paths(spool_dir):
    with pytest.raises(ValueError, match="SPOOL_DIR must be an absolute path without quotes or backslashes: "
                                         + re.escape(repr(spool_dir))):
        render_hook(open(HOOK).read(), spool_dir, "/srv/state")


def test_render_hook_needs_the_lines():
    with pytest.raises(ValueError, match=r"hook source has 0 lines `SPOOL_DIR = .*` \(expected exactly one\)"):
        render_hook("print('no config')\n", "/a", "/b")


def test_install_hook(tmp_path):
    dest = tmp_path / "hooks" / "qemu.d" / "ekko"
    install_hook(str(dest), str(tmp_path / "spool"), str(tmp_path / "state"), source=HOOK)
    assert os.stat(dest).st_mode & 0o777 == 0o755
    assert f'SPOOL_DIR = "{tmp_path / "spool"}"' in dest.read_text()
    assert os.path.isdir(tmp_path / "spool")
    assert os.listdir(tmp_path / "hooks" / "qemu.d") == ["ekko"]      # no temp file left where libvirt looks


def test_a_failing_domain_does_not_hold_back_the_others(spool):
    """One domain's state cannot be written: its events wait (in order), the others' go on."""
    other = "00000000-1111-4222-8333-444444444444"
    put(spool.root, 1)
    put(spool.root, 2, body=json.dumps({"v": 1, "wall_ns": 2, "mono_ns": 2, "pid": 42, "domain": "vm2",
                                        "op": "migrate", "subop": "begin", "uuid": other, "xml": "ok"}))
    put(spool.root, 3, "stopped", "end")
    seen = []

    def handler(ev):
        if ev.uuid == UUID:
            raise OSError("state of vm1 not writable")
        seen.append(ev.wall_ns)
    r = spool.drain(handler)
    assert seen == [2] and r.stopped_at.startswith(f"{1:020d}") and isinstance(r.error, OSError)
    assert [e.wall_ns for e in spool.pending()] == [1, 3]
    assert [e.wall_ns for e in spool.drain(lambda ev: None).processed] == [1, 3]

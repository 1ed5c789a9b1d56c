"""The hook and the agent against each other: one rule (ekko_libvirt/agent/hookformat.py) for what
a valid event is. The same generated inputs (argv, stdin XML, an offline-backup marker) go to the
hook (hooks/qemu, loaded as a module, its `handle`) and, as the record the hook would write for
them, to the agent (Spool.read, the agent's reader): the hook writes an event iff the agent
accepts it, and what the hook writes is what the agent reads.

Hypothesis prints the falsifying example (and a @reproduce_failure blob) on failure."""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko_libvirt.agent import hookformat
from ekko_libvirt.agent.events import MalformedEvent, classify
from ekko_libvirt.agent.spool import Spool, SpoolEntry
from ekko_libvirt.agent.state import StateDir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOOK = os.path.join(ROOT, "hooks", "qemu")
UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"
NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"


@pytest.fixture(scope="module")
def hook():
    loader = importlib.machinery.SourceFileLoader("ekko_hook_script_rule", HOOK)
    spec = importlib.util.spec_from_loader("ekko_hook_script_rule", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    mod.RULE = mod.load_rule(mod.rule_path())      # the hook's own copy, loaded as the hook loads it
    return mod


# --- inputs --------------------------------------------------------------------------------------

ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())   # surrogates too
odd_text = st.text(ANY_CHAR, max_size=40)
long_text = st.builds(lambda c, n: c * n, st.sampled_from(["x", "-", "\u00e9", "a/", "\x00"]),
                      st.integers(0, 3000))
NAMES = ["instance-0000000a", "vm1", "web.01", "a", "..", ".", "vm\u00e9", "my vm", "a/b", "x" * 128, "x" * 129,
         "vm~1+2@3=4,5:6"]
OPS = sorted(hookformat.KNOWN_OPS) + ["frobnicate", "Started", "start;x", "a" * 16, "a" * 17, "-"]
SUBOPS = ["begin", "end", "-", "", "Begin", "b" * 17]
EXTRAS = ["-", "", "x y", "/var/lib/x", "a" * 64, "a" * 65, "\u00e9", "\n"]

arg = st.one_of(odd_text, long_text, st.sampled_from(NAMES + OPS + SUBOPS + EXTRAS))
four_args = st.tuples(st.one_of(st.sampled_from(NAMES), arg), st.one_of(st.sampled_from(OPS), arg),
                      st.one_of(st.sampled_from(SUBOPS), arg), st.one_of(st.sampled_from(EXTRAS), arg)).map(list)
libvirt_like = st.tuples(st.sampled_from(["instance-0000000a", "vm1", "a.b-c"]), st.sampled_from(OPS),
                         st.sampled_from(["begin", "end", "-"]), st.one_of(st.sampled_from(EXTRAS), arg)).map(list)
argvs = st.one_of(libvirt_like, four_args, four_args, st.lists(arg, max_size=6))

xml_text = st.one_of(odd_text.filter(lambda t: all(c not in t for c in "<&") and hookformat.plain(t)),
                     st.sampled_from(["instance-0000000a", "  web  ", "", " " * 300, "a" * 300, "x\u2028y"]))


def _esc(t):
    return t.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


@st.composite
def domain_xml(draw):
    name = draw(st.one_of(st.just("instance-0000000a"), xml_text))
    uuid = draw(st.sampled_from([UUID, UUID.upper(), "not-a-uuid", "", UUID[:-1] + "z"]))
    nova = ""
    if draw(st.booleans()):
        nova = (f"<metadata><nova:instance xmlns:nova='{NOVA_NS}'><nova:name>{_esc(draw(xml_text))}</nova:name>"
                f"<nova:flavor name='{_esc(draw(xml_text))}'/><nova:owner>"
                f"<nova:user uuid='{draw(st.sampled_from([UUID, 'bad', '']))}'/></nova:owner>"
                "</nova:instance></metadata>")
    return f"<domain type='kvm'><name>{_esc(name)}</name><uuid>{uuid}</uuid>{nova}</domain>".encode("utf-8")


stdins = st.one_of(st.just(b""), domain_xml(), domain_xml(), st.binary(max_size=200),
                   st.sampled_from([b"<domain", b"<!DOCTYPE d [<!ENTITY e 'x'>]><domain/>",
                                    b"<x:domain xmlns:x='urn:y'/>", b"\xff\xfe<domain/>"]))


# --- the two sides -------------------------------------------------------------------------------

def _stdin_status(data):
    return "ok" if data else "empty"


def hook_side(hook, args, data, root, veto):
    """Run the hook's `handle` on the inputs. -> (exit code, event file path or None)."""
    state = os.path.join(root, "state")
    if veto:
        StateDir(state).ensure().mark_offline_backup(UUID, "vm", job_id="j")
    return hook.handle(hook.RULE, args, data, _stdin_status(data), os.path.join(root, "spool"), state, 1000,
                       1_700_000_000_000_000_000, 123, 4242, None)


def naive_record(hook, args, data, vetoed):
    """The record the hook builds for these inputs, with NO validation: argv positionally (a missing
    argument is a missing field), the XML through the hook's parser."""
    xml = hook.parse_domain_xml(data, hook.RULE) if data else {"status": "empty", "uuid": None, "name": None,
                                                               "nova": None}
    rec = {"v": 1, "wall_ns": 1_700_000_000_000_000_000, "mono_ns": 123, "boot_id": None, "pid": 4242,
           "known": True, "uuid": xml["uuid"], "xml_name": xml["name"], "xml": xml["status"], "nova": xml["nova"],
           "vetoed": vetoed and xml["uuid"] == UUID and list(args[1:3]) == ["prepare", "begin"]}
    for key, value in zip(("domain", "op", "subop", "extra"), args):
        rec[key] = value
    if xml["status"] == "ok" and xml["name"] is not None and xml["name"] != rec.get("domain"):
        rec["xml"] = "name-mismatch"
    return rec


def agent_side(hook, root, record):
    """Write `record` as an event file the way the hook writes one, read it as the agent does.
    -> HookEvent or None (refused)."""
    d = os.path.join(root, "agent-spool")
    os.makedirs(d, exist_ok=True)
    name = "%020d-%020d-%010d-%016x.json" % (1, 2, 3, 4)
    try:
        text = hook.encode(record)
    except TypeError:
        return None
    with open(os.path.join(d, name), "w") as f:
        f.write(text + "\n")
    try:
        return Spool(d).read(SpoolEntry(os.path.join(d, name), name))
    except MalformedEvent:
        return None


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=argvs, data=stdins, veto=st.booleans())
def test_hook_writes_exactly_what_the_agent_accepts(hook, args, data, veto):
    root = tempfile.mkdtemp(prefix="ekko-rule-")
    try:
        code, path = hook_side(hook, args, data, root, veto)
        spooled = os.listdir(os.path.join(root, "spool")) if os.path.isdir(os.path.join(root, "spool")) else []
        assert len(spooled) == (path is not None)
        if len(args) != 4:      # libvirt always passes 4: another count is no libvirt call, no record
            assert path is None
            return
        theirs = agent_side(hook, root, naive_record(hook, args, data, veto))
        assert (path is not None) == (theirs is not None), (args, data)
        if path is None:
            return
        # round trip: the file the hook wrote is the event the agent reads, with the hook's inputs
        sp = Spool(os.path.join(root, "spool"))
        (entry,) = sp.pending()
        ours = sp.read(entry)
        assert ours == theirs
        assert (ours.domain, ours.op, ours.subop) == tuple(args[:3])
        assert ours.kind is classify(args[1], args[2])
        assert ours.extra == (args[3] if hookformat.normalize_extra(args[3]) else None)
        assert ours.notes == ()                  # the hook writes nothing the agent must keep as unknown
        assert code == (1 if ours.vetoed else 0) and ours.vetoed == (veto and ours.uuid == UUID and
                                                                      args[1:3] == ["prepare", "begin"])
        parsed = hookformat.parse_name(entry.name)
        assert parsed is not None and parsed[2] == ours.uuid
        assert parsed[1] == hookformat.kind_letter(hookformat.check_event(json.load(open(entry.path)))[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("extra", ["", "-", "x y"])
def test_an_empty_or_odd_extra_is_recorded_and_read(hook, tmp_path, extra):
    """The field's 34 lost events: `qemu DOMAIN stopped end ''` was spooled, then quarantined."""
    code, path = hook_side(hook, ["instance-0000000a", "stopped", "end", extra], b"", str(tmp_path), False)
    assert code == 0 and path is not None
    res = Spool(str(tmp_path / "spool")).drain(lambda ev: None)
    assert res.quarantined == () and [e.extra for e in res.processed] == [None if extra != "-" else "-"]


def _run(args, stdin, spool):
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "EKKO_SPOOL_DIR": spool,
           "EKKO_STATE_DIR": spool + "-state"}
    return subprocess.run([HOOK, *args], input=stdin, capture_output=True, env=env, timeout=30)


def test_the_script_itself_agrees_with_the_agent(tmp_path):
    """Real argv (bytes, a C locale), real stdin: what the script writes the agent reads."""
    spool = str(tmp_path / "spool")
    xml = f"<domain><name>vm1</name><uuid>{UUID}</uuid></domain>".encode()
    for args, written in ((["vm1", "stopped", "end", ""], True), ([b"vm\xff", "started", "begin", "-"], False),
                          (["vm\u00e9", "started", "begin", "-"], False), (["vm1", "started", "begin"], False),
                          (["vm1", "release", "end", "\u00e9" * 100], True)):
        before = set(os.listdir(spool)) if os.path.isdir(spool) else set()
        p = _run(args, xml, spool)
        assert p.returncode == 0 and p.stdout == b"", p.stderr
        new = set(os.listdir(spool)) - before if os.path.isdir(spool) else set()
        assert len(new) == int(written), (args, p.stderr)
        assert (b"dropped a malformed call" in p.stderr) == (not written)
    res = Spool(spool).drain(lambda ev: None)
    assert res.quarantined == ()
    assert [(e.op, e.extra, e.uuid) for e in res.processed] == [("stopped", None, UUID), ("release", None, UUID)]


def test_the_script_without_its_rule_exits_0_and_says_so(tmp_path):
    text = open(HOOK).read().replace('RULE_FILE = ""', f'RULE_FILE = "{tmp_path}/missing.py"')
    script = tmp_path / "hook"
    script.write_text(text)
    os.chmod(script, 0o755)
    p = subprocess.run([str(script), "vm1", "prepare", "begin", "-"], input=b"", capture_output=True,
                       env={"LC_ALL": "C", "EKKO_SPOOL_DIR": str(tmp_path / "spool")}, timeout=30)
    assert p.returncode == 0 and b"cannot load the event rule" in p.stderr and b"event lost" in p.stderr

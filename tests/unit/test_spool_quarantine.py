"""Whatever lands in the spool directory, the agent's drain ends, processes the events, and moves
everything else to bad/ with a reason: a directory named *.json (or named like an event), a FIFO
(opening one for reading blocks until a writer comes), a socket, a name already in bad/."""

import json
import os
import socket

import pytest

from ekko_libvirt.agent.spool import Spool

UUID = "6f1c2e4a-1b2c-4d5e-8f90-123456789abc"


def event_name(wall):
    return f"{wall:020d}-{wall:020d}-{42:010d}-{wall:016x}.json"


def put(root, wall, op="started"):
    name = event_name(wall)
    with open(os.path.join(root, name), "w") as f:
        json.dump({"v": 1, "wall_ns": wall, "mono_ns": wall, "pid": 42, "domain": "vm1", "op": op,
                   "subop": "begin", "uuid": UUID, "xml": "ok"}, f)
    return name


@pytest.fixture
def spool(tmp_path):
    return Spool(str(tmp_path / "events")).ensure()


def drain_all(spool):
    seen = []
    res = spool.drain(lambda ev: seen.append(ev.wall_ns))
    assert res.error is None
    return res, seen


def test_a_directory_named_json_is_quarantined(spool):
    os.makedirs(os.path.join(spool.root, "x.json", "inner"))
    os.makedirs(os.path.join(spool.root, event_name(5)))                 # a directory with an event's name
    put(spool.root, 3)
    put(spool.root, 9)
    res, seen = drain_all(spool)
    assert seen == [3, 9]
    assert sorted(res.quarantined) == sorted(["x.json", event_name(5)])
    assert sorted(os.listdir(spool.root)) == [".lock", "bad"]
    assert os.path.isdir(os.path.join(spool.bad_dir, "x.json", "inner"))
    reason = open(os.path.join(spool.bad_dir, event_name(5) + ".reason")).read()
    assert "directory" in reason
    assert drain_all(spool)[0].quarantined == ()                          # nothing left to trip over


def test_a_fifo_and_a_socket_are_quarantined_without_blocking(spool, monkeypatch):
    os.mkfifo(os.path.join(spool.root, event_name(4)))                   # open(O_RDONLY) would block forever
    monkeypatch.chdir(spool.root)                                          # a socket path is limited to 108 bytes
    s = socket.socket(socket.AF_UNIX)
    s.bind(event_name(6))
    s.close()
    put(spool.root, 7)
    res, seen = drain_all(spool)
    assert seen == [7] and sorted(res.quarantined) == [event_name(4), event_name(6)]
    assert "FIFO" in open(os.path.join(spool.bad_dir, event_name(4) + ".reason")).read()


def test_a_name_already_in_bad_is_not_overwritten(spool):
    os.makedirs(spool.bad_dir)
    os.makedirs(os.path.join(spool.bad_dir, "x.json"))                   # a directory from an earlier round
    with open(os.path.join(spool.bad_dir, "y.json"), "w") as f:
        f.write("first")
    os.makedirs(os.path.join(spool.root, "x.json"))
    with open(os.path.join(spool.root, "y.json"), "w") as f:
        f.write("second")
    res, _ = drain_all(spool)
    assert sorted(res.quarantined) == ["x.json", "y.json"]
    assert open(os.path.join(spool.bad_dir, "y.json")).read() == "first"
    assert open(os.path.join(spool.bad_dir, "y.json.1")).read() == "second"
    assert os.path.isdir(os.path.join(spool.bad_dir, "x.json.1"))


def test_cleanup_tmp_leaves_a_directory_alone(spool):
    d = os.path.join(spool.root, ".tmp-dir")
    os.makedirs(d)
    os.utime(d, (1000, 1000))
    assert spool.cleanup_tmp(600) == 0 and os.path.isdir(d)


def test_requeue_moves_back_only_what_the_rule_now_accepts(spool):
    """Events an older agent quarantined for an empty `extra` come back; garbage stays in bad/."""
    os.makedirs(spool.bad_dir)
    good = event_name(11)
    with open(os.path.join(spool.bad_dir, good), "w") as f:
        json.dump({"v": 1, "wall_ns": 11, "mono_ns": 1, "pid": 1, "domain": "vm1", "op": "stopped", "subop": "end",
                   "uuid": UUID, "xml": "ok", "extra": ""}, f)
    open(os.path.join(spool.bad_dir, good + ".reason"), "w").write("extra: expected a printable string\n")
    junk = event_name(12)
    open(os.path.join(spool.bad_dir, junk), "w").write("{not json")
    open(os.path.join(spool.bad_dir, junk + ".reason"), "w").write("not JSON\n")
    assert spool.requeue_bad() == [good]
    assert sorted(os.listdir(spool.bad_dir)) == [junk, junk + ".reason"]
    res, seen = drain_all(spool)
    assert seen == [11] and res.processed[0].extra is None

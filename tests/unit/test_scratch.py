"""The scratch guard's decisions (scratch.py); the real thing is in the integration tests
(test_backup_qmp, test_libvirt_backup: guest writes during a backup on a small tmpfs)."""

import os
from types import SimpleNamespace

import pytest

from ekko_libvirt import config, units
from ekko_libvirt.backup import scratch
from ekko_libvirt.errors import ConfigError, ScratchSpaceLow

MiB = units.MiB


@pytest.mark.parametrize("free,reserve,running,refused", [
    (100 * MiB, 64 * MiB, False, False),
    (63 * MiB, 64 * MiB, False, True),       # to start: the whole reserve
    (63 * MiB, 64 * MiB, True, False),       # running: down to half of it
    (32 * MiB, 64 * MiB, True, False),
    (32 * MiB - 1, 64 * MiB, True, True),
    (0, 0, False, False),                    # reserve 0: the guard is off
    (0, 0, True, False),
])
def test_verdict(free, reserve, running, refused):
    assert (scratch.verdict(free, reserve, running) is not None) == refused


def _guard(tmp_path, monkeypatch, free):
    monkeypatch.setattr(scratch.os, "statvfs", lambda p: SimpleNamespace(f_bavail=free[0] // 4096, f_frsize=4096))
    return scratch.ScratchGuard(str(tmp_path / "scratch"), 64 * MiB)


def test_guard_refuses_to_start_and_gives_way_first(tmp_path, monkeypatch):
    free = [10 * MiB]
    g = _guard(tmp_path, monkeypatch, free)
    with pytest.raises(ScratchSpaceLow, match="needs scratch_reserve = 64.0 MiB to start") as e:
        g.check_start()
    assert e.value.exit_code == 1 and str(tmp_path / "scratch") in str(e.value)
    assert os.path.isdir(tmp_path / "scratch")
    free[0] = 100 * MiB
    g.check_start()
    calls = []
    watch = g.watcher(lambda: calls.append("give way"))
    watch()
    assert calls == []
    free[0] = 20 * MiB
    with pytest.raises(ScratchSpaceLow, match="gave way"):
        watch()
    assert calls == ["give way"]            # the filter goes before the error is raised


def test_guard_for():
    assert scratch.guard_for(None, MiB) is None
    assert scratch.guard_for("/x", 0) is None
    assert scratch.guard_for("/x", MiB) == scratch.ScratchGuard("/x", MiB)


def test_config_scratch_reserve():
    base = {"store": {"type": "local", "path": "/tmp/s"}}
    assert config.build(base).scratch_reserve == units.DEFAULT_SCRATCH_RESERVE == units.GiB
    assert config.build(dict(base, scratch_reserve="256MiB")).scratch_reserve == 256 * MiB
    assert config.build(dict(base, scratch_reserve=0)).scratch_reserve == 0
    with pytest.raises(ConfigError, match="scratch_reserve"):
        config.build(dict(base, scratch_reserve="lots"))

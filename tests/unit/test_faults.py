"""faults.pause_point: <point>@N waits from the N-th pass on, not before (the sync's kill test relies
on it to stop a copy half-way whatever its speed)."""

import os
import threading

from ekko_libvirt import faults
from tests.harness.pause import open_fifo_when_waited_on


def test_a_counted_pause_point_waits_from_its_nth_pass(tmp_path, monkeypatch):
    fifo = str(tmp_path / "p.fifo")
    os.mkfifo(fifo)
    monkeypatch.setattr(faults, "_passes", {})
    monkeypatch.setenv("EKKO_TEST_PAUSE", f"sync-segment@3:{fifo}")
    early = threading.Event()

    def first_two():
        faults.pause_point("other-point")       # another point: never counted, never waits
        faults.pause_point("sync-segment")      # 1st and 2nd pass: on at once
        faults.pause_point("sync-segment")
        early.set()

    threading.Thread(target=first_two, daemon=True).start()
    if not early.wait(5):                        # a pass that waited too early: release it, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        raise AssertionError("a pass before the 3rd waited at the pause point")
    reached = threading.Event()

    def third():
        faults.pause_point("sync-segment")      # 3rd: waits for the test
        reached.set()

    t = threading.Thread(target=third, daemon=True)
    t.start()
    fd = open_fifo_when_waited_on(fifo, timeout=10)     # opens once the 3rd pass waits
    assert not reached.wait(0.2)                # held while the test keeps its end open
    os.close(fd)
    assert reached.wait(10)
    t.join(10)


def test_an_uncounted_pause_point_waits_at_once(tmp_path, monkeypatch):
    fifo = str(tmp_path / "p.fifo")
    os.mkfifo(fifo)
    monkeypatch.setenv("EKKO_TEST_PAUSE", f"after-segments:{fifo}")
    done = threading.Event()
    t = threading.Thread(target=lambda: (faults.pause_point("after-segments"), done.set()), daemon=True)
    t.start()
    fd = open_fifo_when_waited_on(fifo, timeout=10)     # the first pass waits
    os.close(fd)
    assert done.wait(10)

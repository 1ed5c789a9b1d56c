"""Crash points for the crash-consistency tests: EKKO_TEST_CRASH=<point> makes this process
SIGKILL itself there, which is exactly what an operator's `kill -9` does. Inert otherwise."""

import os
import signal
import threading

POINTS = ("after-transaction", "during-read", "during-store", "before-commit", "after-commit", "while-frozen")


def crash_point(name: str) -> None:
    if os.environ.get("EKKO_TEST_CRASH") == name:
        os.kill(os.getpid(), signal.SIGKILL)


PAUSE_POINTS = ("after-transaction", "during-read", "after-segments",   # during-read: in a worker thread
                "restore-write", "instant-started", "while-frozen",   # while-frozen: engine/freeze.py
                "sync-segment")                                       # lifecycle/sync.py, a copying thread

_passes: dict = {}
_passes_lock = threading.Lock()


def pause_point(name: str) -> None:
    """EKKO_TEST_PAUSE=<point>:<fifo> makes this process stop at <point> until a test lets it go,
    so the test can act (e.g. run gc) at exactly that instant. The handshake is the FIFO itself:
    opening it for reading blocks until the test opens it for writing (the test thereby knows the
    point is reached), and reading blocks until the test closes its end (the go signal).
    <point>@N: from the N-th time this process reaches the point on (e.g. the N-th segment a
    sync copies: a test that kills it there knows it is half-way, however fast the copy is)."""
    spec = os.environ.get("EKKO_TEST_PAUSE", "")
    point, _, fifo = spec.partition(":")
    point, _, nth = point.partition("@")
    if point != name or not fifo:
        return
    if nth:
        with _passes_lock:
            _passes[name] = _passes.get(name, 0) + 1
            if _passes[name] < int(nth):
                return
    with open(fifo, "rb") as f:
        f.read()


"""Crash points for the crash-consistency tests: EKKO_TEST_CRASH=<point> makes this process
SIGKILL itself there, which is exactly what an operator's `kill -9` does. Inert otherwise."""

import os
import signal

POINTS = ("after-transaction", "during-read", "during-store", "before-commit", "after-commit", "while-frozen")


def crash_point(name: str) -> None:
    if os.environ.get("EKKO_TEST_CRASH") == name:
        os.kill(os.getpid(), signal.SIGKILL)


PAUSE_POINTS = ("after-transaction", "during-read", "after-segments",   # during-read: in a worker thread
                "restore-write", "instant-started", "while-frozen")   # while-frozen: engine/freeze.py


def pause_point(name: str) -> None:
    """EKKO_TEST_PAUSE=<point>:<fifo> makes this process stop at <point> until a test lets it go,
    so the test can act (e.g. run gc) at exactly that instant. The handshake is the FIFO itself:
    opening it for reading blocks until the test opens it for writing (the test thereby knows the
    point is reached), and reading blocks until the test closes its end (the go signal)."""
    spec = os.environ.get("EKKO_TEST_PAUSE", "")
    point, _, fifo = spec.partition(":")
    if point == name and fifo:
        with open(fifo, "rb") as f:
            f.read()


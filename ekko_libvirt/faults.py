"""Crash points for the crash-consistency tests: EKKO_TEST_CRASH=<point> makes this process
SIGKILL itself there, which is exactly what an operator's `kill -9` does. Inert otherwise."""

import os
import signal

POINTS = ("after-transaction", "during-read", "during-store", "before-commit", "after-commit")


def crash_point(name: str) -> None:
    if os.environ.get("EKKO_TEST_CRASH") == name:
        os.kill(os.getpid(), signal.SIGKILL)

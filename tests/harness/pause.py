"""The test's side of ekko's pause points (faults.pause_point, EKKO_TEST_PAUSE=<point>[@N]:<fifo>)."""

import os
import time


def open_fifo_when_waited_on(fifo, timeout=60, proc=None):
    """The write end of the pause FIFO, as soon as the paused process has opened its read end
    (it then waits at the point until this end is closed). `proc`: the process expected there;
    its exit before it gets there fails at once instead of after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if proc is not None and proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                raise AssertionError(f"the process exited ({proc.returncode}) before the pause point "
                                     f"({fifo}): {err}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing reached the pause point ({fifo}) within {timeout} s") from None
            time.sleep(0.02)

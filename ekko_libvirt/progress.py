"""A progress line on a terminal (bytes done, rate, ETA); silent when stderr is not a tty."""

import sys
import time

from .units import human


class Progress:
    def __init__(self, label: str, enabled: "bool | None" = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and done < total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0
        pct = 100.0 * done / total if total else 100.0
        self.stream.write(f"\r{self.label}: {pct:5.1f}% {human(done)}/{human(total)} "
                          f"{human(rate)}/s ETA {eta:4.0f}s ")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

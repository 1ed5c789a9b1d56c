"""A progress line on a terminal (done/total, rate, ETA); silent when stderr is not a tty.

Bytes by default ("1.2 GiB/4.0 GiB 310 MiB/s"); with a `unit` (e.g. "segments") counts of that
unit ("1,200,000/4,000,000 segments 240,000/s"). A total of None (a listing whose length is
not known) shows the count and the rate only."""

import sys
import time
from typing import Optional

from .units import human


class Progress:
    def __init__(self, label: str, enabled: "bool | None" = None, stream=None, unit: str = "B"):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.unit = unit
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: Optional[int]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and (total is None or done < total):
            return
        self.last = now
        self.stream.write("\r" + self.line(done, total, max(now - self.start, 1e-6)) + " ")
        self.stream.flush()

    def line(self, done: int, total: Optional[int], elapsed: float) -> str:
        """The text of the line (pure: tests)."""
        rate = done / elapsed
        if total is None:
            return f"{self.label}: {self._amount(done)} {self._rate(rate)}"
        eta = (total - done) / rate if rate > 0 else 0
        pct = 100.0 * done / total if total else 100.0
        return (f"{self.label}: {pct:5.1f}% {self._amount(done, total)} {self._rate(rate)} ETA {eta:4.0f}s")

    def _amount(self, done: int, total: Optional[int] = None) -> str:
        if self.unit == "B":
            return human(done) + ("" if total is None else f"/{human(total)}")
        return f"{done:,}" + ("" if total is None else f"/{total:,}") + f" {self.unit}"

    def _rate(self, rate: float) -> str:
        return f"{human(rate)}/s" if self.unit == "B" else f"{rate:,.0f}/s"

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

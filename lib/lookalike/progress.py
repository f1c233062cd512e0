"""Progress lines on the driver while a long Spark action runs.

Executors report through accumulators, which reach the driver as tasks finish; a daemon thread turns them
into one log line every `interval` seconds (done, rate, failures, time left), so a nightly log shows a
stage is alive long before it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import TracebackType

from pyspark import Accumulator

log = logging.getLogger(__name__)


def progress_line(label: str, done: int, total: int, failed: int, seconds: float) -> str:
    """One human line: `embed r1: 1200/5000 (24%), 85.3 img/s, 3 failed, ~45s left`."""
    rate = done / seconds if seconds > 0 else 0.0
    left = f", ~{(total - done) / rate:.0f}s left" if rate > 0 and done < total else ""
    share = f" ({done / total:.0%})" if total else ""
    return f"{label}: {done}/{total}{share}, {rate:.1f} img/s, {failed} failed{left}"


class Progress:
    """Logs progress from accumulators named embedded/unchanged/failed until the block ends."""

    def __init__(self, label: str, total: int, counters: Mapping[str, Accumulator], interval: float = 15.0):
        self.label, self.total, self.counters, self.interval = label, total, counters, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"progress-{label}")
        self._started = 0.0

    def _line(self) -> str:
        done = sum(self.counters[name].value for name in ("embedded", "unchanged", "failed"))
        return progress_line(self.label, done, self.total, self.counters["failed"].value, time.time() - self._started)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            log.info(self._line())

    def __enter__(self) -> Progress:
        self._started = time.time()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        if exc is None:
            log.info(self._line())

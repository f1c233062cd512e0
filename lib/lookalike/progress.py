"""Progress lines on the driver while a long Spark action runs.

Executors report through accumulators, which reach the driver as tasks finish; a daemon thread turns them
into one log line every `interval` seconds (done, rate, what was fetched, failures by kind, time left), so a
nightly log shows a stage is alive, and what is going wrong, long before it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import TracebackType

from pyspark import Accumulator, AccumulatorParam

log = logging.getLogger(__name__)

DONE = ("embedded", "unchanged", "failed", "kept", "still_failed")


class CountsParam(AccumulatorParam):
    """An accumulator of counts by name (failures by kind): tasks add {kind: n}, the driver sees the sums."""

    def zero(self, value: dict[str, int]) -> dict[str, int]:
        return {}

    def addInPlace(self, value1: dict[str, int], value2: dict[str, int]) -> dict[str, int]:
        for name, n in value2.items():
            value1[name] = value1.get(name, 0) + n
        return value1


def progress_line(
    label: str,
    done: int,
    total: int,
    seconds: float,
    failures: Mapping[str, int] | None = None,
    fetched_bytes: int = 0,
    requests: int = 0,
) -> str:
    """One human line: `embed r1: 1200/5000 (24%), 85.3 img/s, 2.1 MB/s, 40.2 req/s, 3 failed (timeout 2,
    http_error 1), ~45s left`; the fetch rates only once something was fetched over http(s)."""
    per_s = (lambda n: n / seconds) if seconds > 0 else (lambda n: 0.0)
    rate = per_s(done)
    left = f", ~{(total - done) / rate:.0f}s left" if rate > 0 and done < total else ""
    share = f" ({done / total:.0%})" if total else ""
    fetched = f", {per_s(fetched_bytes) / 1e6:.1f} MB/s, {per_s(requests):.1f} req/s" if requests else ""
    failures = {kind: n for kind, n in (failures or {}).items() if n}
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))
    failed = f"{sum(failures.values())} failed" + (f" ({kinds})" if kinds else "")
    return f"{label}: {done}/{total}{share}, {rate:.1f} img/s{fetched}, {failed}{left}"


class Progress:
    """Logs progress until the block ends, from accumulators named as in DONE (rows done by status),
    `failed_kinds` (a CountsParam accumulator), and `bytes` and `requests` (fetched over http(s))."""

    def __init__(self, label: str, total: int, counters: Mapping[str, Accumulator], interval: float = 15.0):
        self.label, self.total, self.counters, self.interval = label, total, counters, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"progress-{label}")
        self._started = 0.0

    def _line(self) -> str:
        c = self.counters
        return progress_line(
            self.label,
            sum(c[name].value for name in DONE),
            self.total,
            time.time() - self._started,
            c["failed_kinds"].value,
            c["bytes"].value,
            c["requests"].value,
        )

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

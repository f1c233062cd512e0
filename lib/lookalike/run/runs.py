"""The `runs` table: one row per stage of every run, the log analysts and the report read.

Rows are appended from the driver with delta-rs in one small commit each (`tables.append_rows`). A stage
that raised gets a `failed` row with the error in the log; a run that was killed gets an `interrupted` row
from the next run that finds its lock (`lock.py`), so a crash is visible in the table, not only in a log.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import pyarrow as pa

from lookalike.storage import tables

RUNS = "runs"
SUCCEEDED, FAILED, INTERRUPTED = "succeeded", "failed", "interrupted"
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("stage", pa.string()),
        ("status", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("rows_in", pa.int64()),
        ("rows_out", pa.int64()),
        ("metrics", pa.map_(pa.string(), pa.float64())),
    ]
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def record(
    output_root: str,
    run_id: str,
    stage: str,
    status: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    rows_in: int = 0,
    rows_out: int = 0,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Append one row to `runs`."""
    row = {
        "run_id": run_id,
        "stage": stage,
        "status": status,
        "started_at": started_at,
        "finished_at": finished_at,
        "rows_in": int(rows_in),
        "rows_out": int(rows_out),
        "metrics": [(name, float(value)) for name, value in sorted((metrics or {}).items())],
    }
    tables.append_rows(tables.table_path(output_root, RUNS), pa.Table.from_pylist([row], schema=SCHEMA))


def interrupted_run_ids(output_root: str) -> set[str]:
    """The runs already logged as interrupted (a small read of two columns)."""
    path = tables.table_path(output_root, RUNS)
    if not tables.exists(path):
        return set()
    frame = tables.read_arrow(path, columns=["run_id", "status"])
    return {
        run for run, status in zip(frame["run_id"].to_pylist(), frame["status"].to_pylist()) if status == INTERRUPTED
    }

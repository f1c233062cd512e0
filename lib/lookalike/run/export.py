"""Plain Parquet snapshots for the downstream recommender, which reads no Delta.

After a nightly run succeeded, each exported table's current rows are written by Spark to
`<output.root>/export/<table>/run_id=<run_id>/` (Hadoop's committer writes `_SUCCESS` when all files are in),
and only then `<output.root>/export/<table>/LATEST` is replaced with the run id. A reader that follows
`LATEST` therefore only sees complete snapshots; a run killed mid-export leaves a folder without `_SUCCESS`
that the next export removes. The newest `export.keep` complete snapshots are kept.
"""

from __future__ import annotations

import logging

from pyspark.sql import SparkSession

from lookalike.storage import files, published, tables

log = logging.getLogger(__name__)

EXPORTED = ("similar_items", "recommendations")
SUCCESS, PREFIX = "_SUCCESS", "run_id="


def export_root(output_root: str, table: str) -> str:
    return f"{output_root.rstrip('/')}/export/{table}"


def latest(output_root: str, table: str) -> str | None:
    """The run id of the newest complete snapshot of `table`, or None."""
    return published.latest(export_root(output_root, table))


def publish(spark: SparkSession, output_root: str, run_id: str, keep: int) -> dict[str, int]:
    """Snapshot every exported table that exists; returns the rows written per table."""
    written = {}
    for table in EXPORTED:
        path = tables.table_path(output_root, table)
        if not tables.exists(path):
            log.info("export %s: no %s table yet, nothing to export", run_id, table)
            continue
        folder = export_root(output_root, table)
        target = f"{folder}/{PREFIX}{run_id}"
        files.remove_dir(target)  # a previous attempt of this same run that died mid-write
        tables.parquet_writer(tables.read(spark, path)).parquet(target)
        published.publish(folder, run_id)
        written[table] = spark.read.parquet(target).count()
        removed = published.prune(folder, keep, run_id, SUCCESS, PREFIX)
        log.info(
            "export %s: %s -> %s (%d rows)%s",
            run_id,
            table,
            target,
            written[table],
            f"; removed snapshots {removed}" if removed else "",
        )
    return written

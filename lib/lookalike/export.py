"""Plain Parquet snapshots for the downstream recommender, which reads no Delta.

After a nightly run succeeded, each exported table's current rows are written by Spark to
`<output.root>/export/<table>/run_id=<run_id>/` (Hadoop's committer writes `_SUCCESS` when all files are in),
and only then `<output.root>/export/<table>/LATEST` is replaced with the run id. A reader that follows
`LATEST` therefore only sees complete snapshots; a run killed mid-export leaves a folder without `_SUCCESS`
that the next export removes. The newest `export.keep` complete snapshots are kept.
"""
from __future__ import annotations

import logging

import pyarrow.fs as pafs
from pyspark.sql import SparkSession

from lookalike import storage, tables

log = logging.getLogger(__name__)

EXPORTED = ("similar_items", "recommendations")
LATEST, SUCCESS, PREFIX = "LATEST", "_SUCCESS", "run_id="


def export_root(output_root: str, table: str) -> str:
    return f"{output_root.rstrip('/')}/export/{table}"


def latest(output_root: str, table: str) -> str | None:
    """The run id of the newest complete snapshot of `table`, or None."""
    text = storage.read_text(f"{export_root(output_root, table)}/{LATEST}")
    return None if text is None else text.strip()


def _snapshots(folder: str) -> list[tuple[str, bool]]:
    """(run id, complete) of every snapshot folder, oldest first (run ids sort by time)."""
    fs, local = storage.filesystem(folder)
    if fs.get_file_info(local).type == pafs.FileType.NotFound:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(local)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(PREFIX):
            done = fs.get_file_info(f"{info.path}/{SUCCESS}").type == pafs.FileType.File
            found.append((info.base_name[len(PREFIX):], done))
    return sorted(found)


def prune(folder: str, keep: int, current: str | None) -> list[str]:
    """Remove incomplete snapshots and complete ones beyond the newest `keep`; never `current`."""
    snapshots = _snapshots(folder)
    complete = [run for run, done in snapshots if done]
    keep_set = set(complete[-keep:]) | ({current} if current else set())
    removed = [run for run, _ in snapshots if run not in keep_set]
    for run in removed:
        storage.remove_dir(f"{folder}/{PREFIX}{run}")
    return removed


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
        storage.remove_dir(target)  # a previous attempt of this same run that died mid-write
        tables.parquet_writer(tables.read(spark, path)).parquet(target)
        storage.write_text(f"{folder}/{LATEST}", run_id)
        written[table] = spark.read.parquet(target).count()
        removed = prune(folder, keep, run_id)
        log.info("export %s: %s -> %s (%d rows)%s", run_id, table, target, written[table],
                 f"; removed snapshots {removed}" if removed else "")
    return written

"""Plain Parquet snapshots for the downstream recommender, which reads no Delta, published together.

After a nightly run's stages succeeded, each exported table whose stage ran is written by Spark to
`<output.root>/export/<table>/run_id=<run_id>/` (Hadoop's committer writes `_SUCCESS` when all files are in).
Only when every snapshot of the run is complete is each table's `export/<table>/LATEST` replaced, and last
`export/LATEST`, the manifest: the run id and, per table, the snapshot to read and its row count. A reader
that follows the manifest sees one run's exports, never a mix; a run killed mid-export leaves the manifest
and every table's LATEST on the previous run, and the next export removes its incomplete folders.

A table whose stage did not run in this nightly (recommend without `events.path`) is not exported again under
the new run id: the manifest keeps pointing at its previous snapshot (or leaves it out if there is none). A
table whose stage ran but left it at the Delta version its previous snapshot copied (nothing changed) keeps
that snapshot too: the same rows, no copy. The newest `export.keep` complete snapshots per table are kept,
and always the one the manifest names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import asdict, dataclass

import pyarrow.dataset as pads
from pyspark.sql import SparkSession

from lookalike.run import runs
from lookalike.storage import files, published, tables
from lookalike.storage.uri import filesystem, native_path

log = logging.getLogger(__name__)

EXPORTED = {"similar_items": "similar", "recommendations": "recommend"}  # table -> the stage that writes it
SUCCESS, PREFIX = "_SUCCESS", "run_id="
MANIFEST = "LATEST"


@dataclass(frozen=True)
class Snapshot:
    """One table's snapshot as the manifest names it."""

    run_id: str  # the run whose export wrote it: folder `run_id=<run_id>`
    rows: int
    table_version: int | None  # the Delta version it copies; None for snapshots older than the manifest


@dataclass(frozen=True)
class Published:
    """What an export published: the manifest's snapshots, and the tables this run wrote."""

    run_id: str
    snapshots: dict[str, Snapshot]
    written: tuple[str, ...]


def export_root(output_root: str, table: str) -> str:
    return f"{output_root.rstrip('/')}/export/{table}"


def manifest_path(output_root: str) -> str:
    return f"{output_root.rstrip('/')}/export/{MANIFEST}"


def latest(output_root: str, table: str) -> str | None:
    """The run id of the newest complete snapshot of `table`, or None."""
    return published.latest(export_root(output_root, table))


def manifest(output_root: str) -> dict[str, Snapshot] | None:
    """The snapshots the manifest names per table, or None before the first export with one."""
    found = files.read_json(manifest_path(output_root))
    if found is None:
        return None
    return {
        table: Snapshot(entry["run_id"], entry["rows"], entry["table_version"])
        for table, entry in found["tables"].items()
        if table in EXPORTED
    }


def publish(spark: SparkSession, output_root: str, run_id: str, keep: int, stages_ran: Collection[str]) -> Published:
    """Snapshot each exported table whose stage is in `stages_ran` and that changed since its snapshot, then
    publish the run's exports at once: each table's LATEST, then the manifest (module docstring)."""
    previous = _previous(output_root)
    current: dict[str, Snapshot] = {}
    written = []
    for table, stage in EXPORTED.items():
        path = tables.table_path(output_root, table)
        before = previous.get(table)
        if stage not in stages_ran:
            reason = f"{stage} did not run"
        elif not tables.exists(path):
            reason = "no table yet"
        elif before is not None and before.table_version == tables.version(path):
            reason = f"unchanged since its snapshot of run {before.run_id}"
        else:
            current[table] = _snapshot(spark, output_root, table, run_id)
            written.append(table)
            continue
        if before is not None:
            current[table] = before
        kept = "not exported" if before is None else f"the manifest keeps the snapshot of run {before.run_id}"
        log.info("export %s: %s: %s; %s", run_id, table, reason, kept)
    for table in written:
        published.publish(export_root(output_root, table), run_id)
    body = {
        "run_id": run_id,
        "published_at": runs.now().isoformat(),
        "tables": {name: {**asdict(snap), "path": f"{name}/{PREFIX}{snap.run_id}"} for name, snap in current.items()},
    }
    files.write_text(manifest_path(output_root), json.dumps(body, indent=2, sort_keys=True) + "\n")
    for table in EXPORTED:
        named = current[table].run_id if table in current else run_id  # a table never exported: nothing to spare
        removed = published.prune(export_root(output_root, table), keep, named, SUCCESS, PREFIX)
        if removed:
            log.info("export %s: %s: removed snapshots %s", run_id, table, removed)
    return Published(run_id, current, tuple(written))


def _snapshot(spark: SparkSession, output_root: str, table: str, run_id: str) -> Snapshot:
    """Write `table`'s current rows to `export/<table>/run_id=<run_id>/`, complete with `_SUCCESS`."""
    path = tables.table_path(output_root, table)
    version = tables.version(path)
    target = f"{export_root(output_root, table)}/{PREFIX}{run_id}"
    files.remove_dir(target)  # a previous attempt of this same run that died mid-write
    tables.parquet_writer(tables.read(spark, path)).parquet(native_path(target))
    rows = _rows(target)
    log.info("export %s: %s (v%s) -> %s (%d rows)", run_id, table, version, target, rows)
    return Snapshot(run_id, rows, version)


def _rows(folder: str) -> int:
    """Rows in a snapshot folder, from the Parquet footers (`_SUCCESS` and dot files are not data)."""
    fs, local = filesystem(folder)
    return int(pads.dataset(local, filesystem=fs, format="parquet").count_rows())


def _previous(output_root: str) -> dict[str, Snapshot]:
    """What readers see now: the manifest's snapshots; without a manifest (exports written before it
    existed), each table's LATEST, whose Delta version is unknown."""
    found = manifest(output_root)
    if found is not None:
        return found
    snapshots = {}
    for table in EXPORTED:
        run = latest(output_root, table)
        if run is not None:
            snapshots[table] = Snapshot(run, _rows(f"{export_root(output_root, table)}/{PREFIX}{run}"), None)
    return snapshots

"""The table layer: Delta Lake tables written by Spark executors and committed by the driver.

Spark's Delta JARs are not reachable here (DESIGN.md, "Delta"), so the protocol is split in two: executors
write ordinary Parquet files with Spark's writer into a fresh folder inside the table, then the driver commits
exactly those files to `_delta_log` in one transaction through delta-rs. Until that commit, the new files are
invisible: a write that dies half-way leaves the previous version as it was, and a reader never sees part of
a version. Reads always go through the table's current file list, never a directory listing, because files of
old versions and of failed writes live in the same folders.

Three write modes cover the pipeline: append, overwrite, and replace-rows-by-key (copy-on-write of only the
files that hold a replaced or deleted key, committed as remove + add actions in one transaction). A stage whose
tasks already hold their rows as Arrow writes them itself: each task writes one Parquet file into a folder of
the table (`files_folder`, `write_file`) and reports its name, and the driver commits exactly the reported
files (`commit_files`), so the rows are written once, without a second pass through Spark's writer. Tasks
also read a table without Spark: the driver lists a version's files (`current_files`) and a task reads the
rows it needs from them (`read_files`).

Every commit ends with `vacuum`: files that no kept version references (old versions' files beyond
`tables.keep_versions`, what crashed writes left) are deleted once they are older than a safety margin, so a
table's folder stays proportional to the versions kept.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema, write_deltalake
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions
from pyspark.sql import DataFrame, DataFrameWriter, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import ArrayType, DataType, DoubleType, FloatType, MapType, StructField, StructType

from lookalike.errors import LookalikeError
from lookalike.storage.uri import delta_problem, filesystem, native_path, spark_read_path

log = logging.getLogger(__name__)

DATA_DIR = "data"  # new files land in <table>/data/<write id>/, one folder per write


class TableError(LookalikeError):
    """A table problem a user can act on: missing table, schema drift, bad key."""


@dataclass(frozen=True)
class CommitResult:
    """What one write committed: the new table version and the rows and files it added."""

    version: int
    files_added: int
    files_removed: int
    rows_added: int


def table_path(output_root: str, name: str) -> str:
    """Where table `name` lives under `output.root` (DESIGN.md: <output.root>/tables/<name>)."""
    return f"{output_root.rstrip('/')}/tables/{name}"


@dataclass(frozen=True)
class Retention:
    """How much of a table's history its folder keeps (config `tables.keep_versions`,
    `tables.vacuum_min_age_hours`; these defaults are the config's)."""

    keep_versions: int = 10
    min_age_hours: int = 1


_retention = Retention()


def set_retention(retention: Retention) -> None:
    """The retention every later commit of this process applies: a command sets its config's once, before
    its first write (storage reads no config)."""
    global _retention
    _retention = retention


def _location(path: str) -> str:
    """The table's path as delta-rs opens it and Spark writes to it; a path delta-rs cannot hold is refused
    with one line instead of a Rust panic."""
    problem = delta_problem(path)
    if problem is not None:
        raise TableError(f"table {path}: {problem}")
    return native_path(path)


def exists(path: str) -> bool:
    return DeltaTable.is_deltatable(_location(path))


def _open(path: str) -> DeltaTable:
    if not exists(path):
        raise TableError(f"no Delta table at {path} (has the stage that writes it run?)")
    return DeltaTable(_location(path))


def _nullable(dtype: DataType) -> DataType:
    """Every field nullable: Spark's nullability flags vary by plan, a table's schema must not."""
    if isinstance(dtype, StructType):
        return StructType([StructField(f.name, _nullable(f.dataType), True) for f in dtype.fields])
    if isinstance(dtype, ArrayType):
        return ArrayType(_nullable(dtype.elementType), True)
    if isinstance(dtype, MapType):
        return MapType(dtype.keyType, _nullable(dtype.valueType), True)
    return dtype


def arrow_schema(schema: StructType) -> pa.Schema:
    """The Arrow schema delta-rs records for a Spark schema (timestamps as UTC microseconds)."""
    return to_arrow_schema(cast(StructType, _nullable(schema)), timestamp_utc=True)


def spark_schema(path: str) -> StructType:
    """The Spark schema of a committed table, from its Delta metadata (no Parquet footer is read)."""
    return from_arrow_schema(pa.schema(_open(path).schema().to_arrow()))


def _check_schema(path: str, table: DeltaTable, new: pa.Schema) -> None:
    """Refuse schema drift with a message naming the first differing column."""
    old = pa.schema(table.schema().to_arrow())
    if old.names != new.names:
        missing = [n for n in old.names if n not in new.names]
        extra = [n for n in new.names if n not in old.names]
        detail = (f"missing column(s) {missing}" if missing else "") + (
            f"{'; ' if missing else ''}unexpected column(s) {extra}" if extra else ""
        ) or f"column order {new.names} != {old.names}"
        raise TableError(f"schema drift writing {path}: {detail}")
    for field in old:
        other = new.field(field.name)
        if not other.type.equals(field.type):
            raise TableError(
                f"schema drift writing {path}: column {field.name!r} is {other.type}, table has {field.type}"
            )


def parquet_writer(df: DataFrame) -> DataFrameWriter:
    """Spark's Parquet writer with the project's file settings, for table files and exports.

    Snappy compression; no dictionary encoding for float-array (vector) columns. parquet-mr tries a dictionary
    for every column chunk and gives up only after a megabyte of distinct floats: turning it off for vectors
    measured 0.68 -> 0.49 s per 6000 1280-d embeddings written, while ids and names keep their dictionaries.
    """
    writer = df.write.option("compression", "snappy")
    for field in df.schema.fields:
        if isinstance(field.dataType, ArrayType) and isinstance(field.dataType.elementType, (FloatType, DoubleType)):
            writer = writer.option(f"parquet.enable.dictionary#{field.name}.list.element", "false")
    return writer


def files_folder(path: str) -> str:
    """A fresh folder inside table `path` for one write's files: Spark's writer fills it (`write`), or tasks do
    (`write_file`) before the driver commits what they reported (`commit_files`)."""
    write_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    return f"{_location(path).rstrip('/')}/{DATA_DIR}/{write_id}"


def write_file(folder: str, rows: pa.Table) -> str:
    """Executor side: `rows` as one Parquet file of its own name in `folder` (from `files_folder`); returns the
    name for the driver to commit. A task attempt that dies, or loses to a retry, leaves a file no commit
    names: invisible to readers, and removed by a later `vacuum`."""
    fs, root = filesystem(folder)
    fs.create_dir(root, recursive=True)
    name = f"part-{uuid.uuid4().hex}.snappy.parquet"
    pq.write_table(rows, f"{root}/{name}", filesystem=fs, compression="snappy")
    return name


def _add_actions(path: str, folder: str, names: Sequence[str] | None = None) -> tuple[list[AddAction], int]:
    """Add actions for the Parquet files `names` of `folder` (a write folder of the table; None: every Parquet
    file in it), with their row counts from the footers, and the rows in all."""
    root = _location(path).rstrip("/")
    if not folder.startswith(f"{root}/{DATA_DIR}/"):
        raise ValueError(f"{folder} is not a write folder of table {path}")
    rel_dir = folder[len(root) + 1 :]
    fs, fs_folder = filesystem(folder)
    if names is None:
        found = fs.get_file_info(pafs.FileSelector(fs_folder, recursive=False))
        infos = [i for i in found if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")]
    else:
        infos = fs.get_file_info([f"{fs_folder}/{name}" for name in names])
    actions: list[AddAction] = []
    rows = 0
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{path}: {rel_dir}/{info.base_name} was reported written but is not there")
        with fs.open_input_file(info.path) as handle:
            num_records = pq.ParquetFile(handle).metadata.num_rows
        rows += num_records
        actions.append(
            AddAction(
                path=f"{rel_dir}/{info.base_name}",
                size=info.size,
                partition_values={},
                modification_time=int(info.mtime.timestamp() * 1000),
                data_change=True,
                stats=json.dumps({"numRecords": num_records}),
            )
        )
    return actions, rows


def _write_files(df: DataFrame, path: str, cluster_by: str | None) -> tuple[list[AddAction], int]:
    """Executors write `df` into a fresh folder of the table; returns its add actions and rows (the folder's
    _SUCCESS and .crc checksums are not table files).

    `cluster_by` names a column whose equal values should share files: rows are hash-partitioned by it (one
    value's rows in one file; adaptive execution packs small values together) and sorted by it inside each
    file, so a reader filtering on one value (`read_files`) skips the other files' row groups by their
    statistics. `embeddings` is written by `shard`: every index, similar and recommend task reads one shard,
    and with shards mixed in every file each such read decoded the whole table (at 300,000 x 256-d in 10
    shards, reading every shard once took 5.3x as long; `benchmarks/shard_reads.py`)."""
    if cluster_by is not None:
        df = df.repartition(cluster_by).sortWithinPartitions(cluster_by)
    folder = files_folder(path)
    parquet_writer(df).mode("errorifexists").parquet(folder)
    return _add_actions(path, folder)


def write(
    df: DataFrame, path: str, mode: str = "append", replace_schema: bool = False, cluster_by: str | None = None
) -> CommitResult:
    """Append to or overwrite a table (creating it on first write) in one atomic commit.

    `replace_schema` (overwrite only) lets the new rows bring new columns: the stage that owns the table uses
    it once when its contract grew, instead of refusing the table as drifted. `cluster_by`: see `_write_files`.
    """
    schema = arrow_schema(df.schema)
    table = _writable(path, mode, schema, replace_schema)
    actions, rows = _write_files(df, path, cluster_by)
    return _commit_adds(path, table, schema, actions, rows, mode)


def commit_files(path: str, folder: str, names: Sequence[str], schema: pa.Schema, mode: str) -> CommitResult:
    """Append or overwrite (as `write`) with the files `names` that tasks wrote into `folder` (`files_folder`
    of this table, `write_file`), all holding `schema`, in one atomic commit. Only the named files are
    committed: what failed task attempts left in the folder stays invisible."""
    table = _writable(path, mode, schema, replace_schema=False)
    actions, rows = _add_actions(path, folder, names)
    return _commit_adds(path, table, schema, actions, rows, mode)


def _writable(path: str, mode: str, schema: pa.Schema, replace_schema: bool) -> DeltaTable | None:
    """The table a write of `schema` goes to (None: the write creates it), schema drift refused before any
    file is written."""
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode must be append or overwrite, got {mode!r}")
    if replace_schema and mode != "overwrite":
        raise ValueError("replace_schema needs mode='overwrite'")
    table = _open(path) if exists(path) else None
    if table is not None and not replace_schema:
        _check_schema(path, table, schema)
    return table


def _commit_adds(
    path: str, table: DeltaTable | None, schema: pa.Schema, actions: list[AddAction], rows: int, mode: str
) -> CommitResult:
    """Commit written files: the table's first version, or an append or overwrite of it."""
    if table is None:
        create_table_with_add_actions(_location(path), Schema.from_arrow(schema), actions, mode="error")
        vacuum(path)  # what a crashed first write left behind
        return CommitResult(0, len(actions), 0, rows)
    removed = len(_current_files(table)) if mode == "overwrite" else 0
    table.create_write_transaction(list[AddAction | RemoveAction](actions), mode=mode, schema=schema)
    table.update_incremental()
    log.info("committed %s to %s: %d rows in %d files (v%d)", mode, path, rows, len(actions), table.version())
    vacuum(path)
    return CommitResult(table.version(), len(actions), removed, rows)


def replace_by_key(
    df: DataFrame, path: str, key: str, delete_keys: DataFrame | None = None, cluster_by: str | None = None
) -> CommitResult:
    """Upsert `df` by `key` and drop `delete_keys`, rewriting only the files that hold a touched key.

    Rows of `df` replace the current rows with the same key; keys in `delete_keys` (a one-column frame named
    `key`) leave the table. Untouched files stay as they are, so an incremental night costs in proportion to
    what changed, not to the table. The rewritten files are clustered by `cluster_by` (`_write_files`).
    """
    if not exists(path):
        return write(df, path, mode="overwrite", cluster_by=cluster_by)
    table = _open(path)
    schema = arrow_schema(df.schema)
    _check_schema(path, table, schema)
    spark = df.sparkSession
    touched = df.select(key)
    if delete_keys is not None:
        touched = touched.unionByName(delete_keys.select(key))
    touched = touched.distinct()
    if touched.isEmpty():  # nothing to replace or delete: no commit, and no scan of the table's keys
        return CommitResult(table.version(), 0, 0, 0)
    current_files = set(_current_files(table))
    touched_files: list[str] = []
    if current_files:
        current = spark.read.schema(spark_schema(path)).parquet(*_spark_paths(path, sorted(current_files)))
        hits = (
            current.select(key, F.input_file_name().alias("_file"))
            .join(touched, key, "left_semi")
            .select("_file")
            .distinct()
            .collect()
        )
        touched_files = sorted({_relative(path, r["_file"]) for r in hits})
        unknown = set(touched_files) - current_files
        if unknown:  # a spelling this module does not understand: refuse rather than remove the wrong files
            raise RuntimeError(f"{path}: Spark read files the table does not list: {sorted(unknown)[:3]}")
    if not touched_files and df.isEmpty():  # only deletes, of keys the table does not hold
        return CommitResult(table.version(), 0, 0, 0)
    survivors = None
    if touched_files:
        survivors = (
            spark.read.schema(df.schema).parquet(*_spark_paths(path, touched_files)).join(touched, key, "left_anti")
        )
    new_rows = df if survivors is None else survivors.unionByName(df)
    adds, rows = _write_files(new_rows, path, cluster_by)
    now_ms = int(time.time() * 1000)
    removes = [RemoveAction(rel, True, now_ms) for rel in touched_files]
    table.create_write_transaction([*removes, *adds], mode="append", schema=schema)
    table.update_incremental()
    log.info(
        "replaced by %s in %s: rewrote %d file(s) into %d (%d rows), v%d",
        key,
        path,
        len(touched_files),
        len(adds),
        rows,
        table.version(),
    )
    vacuum(path)
    return CommitResult(table.version(), len(adds), len(touched_files), rows)


def _current_files(table: DeltaTable) -> list[str]:
    """The current version's files, relative to the table folder and unescaped, as the log names them.

    Not `file_uris()`: delta-rs percent-encodes those (`out%20dir/...`, `%C3%BC` for ü) and Spark would look
    for the encoded names literally."""
    return [str(p) for p in table.get_add_actions(flatten=True).column("path").to_pylist()]


def _spark_paths(path: str, files: list[str]) -> list[str]:
    """The table's `files` (relative) as Spark reads exactly them, whatever characters the folder holds."""
    root = _location(path).rstrip("/")
    return [spark_read_path(f"{root}/{rel}") for rel in files]


def _relative(path: str, file_name: str) -> str:
    """A file of table `path` relative to its folder, from Spark's `input_file_name()`: a URI whose path
    is percent-encoded (file:///a%20b/t/data/w/part-0.parquet; non-ASCII letters stay as they are)."""
    root = _location(path)
    root_path = unquote(urlsplit(root).path) if "://" in root else root
    return posixpath.relpath(unquote(urlsplit(file_name).path), root_path)


def read(spark: SparkSession, path: str, version: int | None = None) -> DataFrame:
    """The table's current version (or `version`) as a DataFrame, from its committed file list."""
    table = _open(path)
    if version is not None:
        table.load_as_version(version)
    schema = from_arrow_schema(pa.schema(table.schema().to_arrow()))
    files = _current_files(table)
    if not files:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*_spark_paths(path, files))


def current_files(path: str, version: int | None = None) -> list[str]:
    """The files of the table's current version (or `version`), as paths `read_files` reads: the driver
    lists them once, and tasks read their own rows from them without Spark."""
    table = _open(path)
    if version is not None:
        table.load_as_version(version)
    root = _location(path).rstrip("/")
    return [f"{root}/{rel}" for rel in _current_files(table)]


def read_files(files: Sequence[str], columns: list[str], where: pc.Expression | None = None) -> pa.Table:
    """Executor side: `columns` of the rows of `files` (from `current_files`, at least one) that `where` keeps.
    Row groups whose statistics rule `where` out are skipped; the others are decoded whole."""
    fs, _ = filesystem(files[0])
    dataset = ds.dataset([filesystem(f)[1] for f in files], filesystem=fs, format="parquet")
    return dataset.to_table(columns=columns, filter=where)


def read_arrow(path: str, columns: list[str] | None = None) -> pa.Table:
    """A small table (or some of its columns) on the driver, without Spark: runs, manifests, tests."""
    return pa.table(_open(path).to_pyarrow_table(columns=columns))


def append_rows(path: str, rows: pa.Table) -> None:
    """Append a few driver-side rows (the `runs` log) in one commit; creates the table on first use."""
    write_deltalake(_location(path), rows, mode="append")
    vacuum(path)


def version(path: str) -> int | None:
    return _open(path).version() if exists(path) else None


def vacuum(path: str, retention: Retention | None = None) -> list[str]:
    """Delete the table's files that no kept version needs; returns them, relative to the table folder.

    Kept: every file one of the newest `keep_versions` versions references (time travel to those works),
    every file removed from the table less than `min_age_hours` ago (a reader of an older version may still
    be reading it), and every file no commit mentions that is younger than that (a write in progress).
    Deleted: the rest, including what crashed writes left in `data/<write id>/`, and the folders that leaves
    empty. The log itself is delta-rs's: a checkpoint every 100 commits drops entries older than
    `delta.logRetentionDuration` (30 days).

    delta-rs plans the deletion (full vacuum, dry run) and the files are deleted here: delta-rs's own vacuum
    commits two versions (VACUUM START, END), which would make the table version every stage records in its
    state stale after each write, and the next run would recompute from scratch.
    """
    retention = retention or _retention
    table = _open(path)
    kept = [int(commit["version"]) for commit in table.history(retention.keep_versions)]
    planned = table.vacuum(
        retention_hours=retention.min_age_hours,
        dry_run=True,
        enforce_retention_duration=False,
        full=True,
        keep_versions=kept,
    )
    fs, root = filesystem(_location(path))
    emptied: set[str] = set()
    for rel in sorted(planned):
        name = unquote(rel)
        try:
            fs.delete_file(f"{root}/{name}")
        except FileNotFoundError:
            continue  # another vacuum of the same table got there first
        emptied.add(posixpath.dirname(name))
    for folder in sorted(emptied, key=lambda f: -f.count("/")):
        while folder and folder != DATA_DIR:  # the folders a write made, deepest first; never data/ itself
            here = f"{root}/{folder}"
            if fs.get_file_info(here).type != pafs.FileType.Directory or fs.get_file_info(pafs.FileSelector(here)):
                break
            fs.delete_dir(here)
            folder = posixpath.dirname(folder)
    if planned:
        log.info("vacuumed %s: %d file(s) no kept version needs", path, len(planned))
    return sorted(planned)

"""Units of work as Spark tasks: the one way the index, similar and recommend stages spread shard-sized work
over executors, and the staged Parquet those tasks read.

The driver plans a list of units (a shard to build, a (shard, query chunk) pair to search, ...) and
`run_tasks` turns unit number i into Spark task i, which yields Arrow record batches. A task reads what its
unit needs: a shard's vectors straight from the `embeddings` files (index, similar), or rows the driver
wrote once as Parquet partitioned by unit (`stage`, `read_staged`: recommend's profiles and requests,
similar's keys). Compared with a `groupBy().applyInPandas`, this keeps the plan on the driver (how many
tasks, which unit where) and lets a task read only the columns and rows it needs.

Per-key work (every user's rows, say) runs over partitions sorted by that key (`key_groups`): one Python
call per batch of many keys, NumPy slices per key, instead of one pandas call and DataFrame per key as
`groupBy().applyInPandas` makes.

A reused Python worker keeps this module between tasks, so `worker_cached` holds the one expensive thing a
worker has loaded (a FAISS shard and its vectors) for the next task that asks for the same key. Units are
sorted by that key, so a worker loads each about once and never holds two.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.types import StructType

from lookalike.storage.uri import filesystem

T = TypeVar("T")
U = TypeVar("U")

_worker_cache: dict[Hashable, Any] = {}


def run_tasks(
    spark: SparkSession, units: Sequence[U], work: Callable[[U], Iterable[pa.RecordBatch]], schema: pa.Schema
) -> DataFrame:
    """The rows `work(unit)` yields for every unit, with one Spark task per unit, in the units' order.

    `work` and `units` are pickled into the tasks: they must hold plain values, never config or Spark
    objects. Each task runs FAISS with as many threads as the task has cores (`spark.task.cpus`).
    """
    if not units:
        return spark.createDataFrame([], from_arrow_schema(schema))
    one_per_partition = spark.range(0, len(units), 1, numPartitions=len(units))
    return one_per_partition.mapInArrow(_units_task(units, work), from_arrow_schema(schema))


def _units_task(
    units: Sequence[U], work: Callable[[U], Iterable[pa.RecordBatch]]
) -> Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run_units(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import faiss

        faiss.omp_set_num_threads(max(1, int(task_context().cpus())))
        for batch in batches:
            for number in batch.column(0).to_pylist():
                yield from work(units[number])

    return run_units


def task_context() -> TaskContext:
    """The running Spark task's context; only task bodies call this."""
    context = TaskContext.get()
    if context is None:
        raise RuntimeError("no Spark task is running in this process")
    return context


def worker_cached(key: Hashable, load: Callable[[], T]) -> tuple[T, bool]:
    """What `load()` returns for `key`, kept by this worker for later tasks, and whether it loaded just now.

    One entry only: the previous one is dropped before the next loads, so a worker never holds two.
    """
    if key in _worker_cache:
        return _worker_cache[key], False
    _worker_cache.clear()
    _worker_cache[key] = load()
    return _worker_cache[key], True


def by_key(df: DataFrame, partitions: int, key: str, *then: str) -> DataFrame:
    """`df` in `partitions` partitions, each `key`'s rows in one, sorted by `key` then `then`: the input
    `key_groups` expects from a `mapInArrow` body. The count is the caller's: one Python task has a fixed
    cost, so small work wants about as many tasks as cores, not `spark.sql.shuffle.partitions`."""
    return df.repartition(partitions, key).sortWithinPartitions(key, *then)


def key_groups(batches: Iterable[pa.RecordBatch], key: str) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Rows sorted by `key` (a partition after `sortWithinPartitions(key)`) as tables of whole groups, each
    with its group bounds (group g is rows `bounds[g]:bounds[g + 1]`).

    Spark cuts a partition into batches wherever the row count says, so the last group of a batch may go
    on in the next: it is held back and joined to what follows, and every group reaches the caller whole.
    """
    pending: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if pending is not None:
            table = pa.concat_tables([pending, table])
        if table.num_rows == 0:
            continue
        bounds = group_bounds(table.column(key))
        last = int(bounds[-2])
        if last > 0:
            yield table.slice(0, last), bounds[:-1]
        pending = table.slice(last)
    if pending is not None and pending.num_rows:
        yield pending, group_bounds(pending.column(key))


def whole_partition(batches: Iterable[pa.RecordBatch]) -> pa.Table | None:
    """A `mapInArrow` body's whole partition as one table, or None when it holds no row: for work that
    needs every row of a partition at once (summing parts of the same key that arrive in any order)."""
    held = list(batches)
    table = pa.Table.from_batches(held) if held else None
    return table if table is not None and table.num_rows else None


def group_bounds(keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Where each run of equal keys starts, then the end: `[0, ..., len(keys)]`."""
    values = keys.to_numpy(zero_copy_only=False)
    changes = np.flatnonzero(values[1:] != values[:-1]) + 1
    return np.concatenate(([0], changes, [len(values)])).astype(np.int64)


def stage(df: DataFrame, path: str, partition_by: list[str]) -> DataFrame:
    """Write `df` partitioned by `partition_by` and read it back, so that later steps read these files
    instead of computing `df` again. The schema is given: a partitioned write of no rows leaves no file to
    infer one from."""
    df.repartition(*partition_by).write.partitionBy(*partition_by).parquet(path)
    fields = [f for f in df.schema.fields if f.name not in partition_by] + [df.schema[p] for p in partition_by]
    return df.sparkSession.read.schema(StructType(fields)).parquet(path)


def read_staged(path: str, columns: list[str]) -> pa.Table:
    """Some columns of a staged folder (one partition of `stage`)."""
    fs, local = filesystem(path)
    return pq.read_table(local, filesystem=fs, columns=columns)


def read_staged_if_any(path: str, columns: list[str]) -> pa.Table | None:
    """`read_staged`, or None where nothing was staged (a partition of no rows writes no folder)."""
    fs, local = filesystem(path)
    if fs.get_file_info(local).type == pafs.FileType.NotFound:
        return None
    return read_staged(path, columns)

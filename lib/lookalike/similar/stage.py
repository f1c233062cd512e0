"""The similar stage: every item in `embeddings` -> its `similar.k` most similar items in `similar_items`.

Work layout. The driver stages each item's exclusion key, eligibility and query chunk (small columns, no vectors) as
Parquet partitioned by shard and chunk (`<output.root>/staging/<run_id>/similar/items/
shard_dir=<folder>/chunk=<c>/`), and plans work units (target shard, query shard, chunk). One Spark task runs a few
consecutive units: for each it takes the target shard from the one-entry per-worker cache
`distributor.worker_cached`: the index from the latest build, the shard's vectors read with Arrow straight from the
files of the `embeddings` version the driver read (`tables.read_files`, no Spark copy of them), put in FAISS id
order and checked by `LoadedShard.align`, and its staged columns in the same order. (A load decodes the row groups
whose statistics do not rule its shard out; the embed stage writes `embeddings` clustered by shard, so that is about
the shard's own rows.) A unit's queries are a chunk of the target's own rows. Units are sorted by target, so a
reused Python worker loads each shard about once and never holds two. With `similar.scope: shard` an item's only
target is its own shard; with `all` every (target, chunk) pair is a unit, the staged chunks also carry vectors (a
unit's queries may come from another shard), and Spark merges the per-target top-k lists by score. That merge is
exact: a target's own top k holds everything it can contribute to the global top k.

Writing. With scope shard each task writes its rows, as Arrow, into one Parquet file and reports its name.
When every shard was computed those files go into a fresh folder of `similar_items` and the driver commits
exactly the reported ones as the table's new version (`tables.commit_files`): the rows are written once. An
incremental run stages them instead and replaces its items' rows by key. Scope all writes the merged rows
through Spark.

Search. The index proposes candidates and they are re-scored exactly (`shard_index.search`), so `score` is a
true cosine. Candidates that may not be neighbours are filtered after the search: the item itself, items
with the same image bytes (`similar.exclude_duplicates`), items out of stock (`similar.in_stock_only`) and
scores under `similar.min_score`. Self and duplicates are one rule: every item carries an exclusion key, the
hash of its `image_sha256` (its own `item_id` when duplicates may be neighbours), and a candidate sharing the
query's key is dropped. So that k survive, a query asks for k plus the members of its own group in the
target, divided by the target's in-stock share; rows still short are asked again 4x wider, twice, and what
is left is scored exhaustively against the shard's vectors. Members of a duplicate group have identical
vectors and the same exclusions, so each group is searched once and its list shared: a placeholder image
used by thousands of items costs one query, not thousands of ever wider ones.

Duplicates. Items with the same `image_sha256` form a group; its smallest `item_id` is the canonical item
and every other member gets one row in `duplicates` (`item_id`, `duplicate_of` = the canonical item, `kind`
`exact`, `run_id` of the run that first saw the pair). The table spans the whole catalog, whatever the
shards. Near duplicates (the same photo cropped, rescaled or recompressed) come from the committed
`similar_items`: an item with a neighbour scoring at least `search.duplicate_score` whose `item_id` is
smaller gets a row `kind` `near`, `duplicate_of` its smallest such neighbour, unless it is an exact
duplicate. So they are found among the neighbours the table may hold (its scope, stock and score rules),
and a chain a~b~c yields b->a and c->b rather than a merged group. `duplicates` is derived whole after
`similar_items` is committed, on every run whose inputs differ from those the state recorded (the versions of
`embeddings`, `similar_items` and `duplicates` itself, and the score), so a crash between the two commits, or
an edit of the table, is mended by the next run, and an unchanged night skips the Spark job.

Incremental. A shard's fingerprint joins the `vectors_sha256` of its index in the latest build with a digest
of its rows in `embeddings` (item ids, the embed run that wrote each vector, exclusion keys, stock flags).
`<output.root>/state/similar_items.json`, written after each commit, keeps the fingerprints, the settings
and the table version the last run left. The next run recomputes only the shards whose fingerprint changed
and replaces their items' rows by key; items that left `embeddings` are deleted. Everything is recomputed
(and the table overwritten) when the settings changed, the table is not the version the state recorded
(edited, restored or the state lost), or, with `scope: all`, any shard changed, since any item may then
have a new neighbour. Nightly index builds rebuild every shard, but unchanged vectors keep their
`vectors_sha256`, so a new build alone does not make a shard dirty.

Freshness. The index must have been built from the current embeddings: a shard whose item count differs
from its index's is refused on the driver, one whose vectors differ is refused by `align` in the task. Both
raise `StaleIndexError`, which asks for `lookalike index` to be re-run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from lookalike import distributor
from lookalike.config import Config
from lookalike.embed import catalog, shards
from lookalike.index import builds, shard_index
from lookalike.index.builds import StaleIndexError
from lookalike.results import StageResult
from lookalike.similar.plan import (
    STATE_VERSION,
    Settings,
    Unit,
    changed_shards,
    fingerprint,
    pack,
    plan_units,
    task_size,
)
from lookalike.similar.search import RESULT_SCHEMA, neighbours, rerank_budget, result_rows
from lookalike.storage import files, tables

log = logging.getLogger(__name__)

SIMILAR_ITEMS, DUPLICATES, EMBEDDINGS = "similar_items", "duplicates", "embeddings"
TABLE_SCHEMA = RESULT_SCHEMA.append(pa.field("run_id", pa.string()))
"""`similar_items` as DESIGN.md fixes it: what the tasks write, and what Spark's writer records for it."""
FILES_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64())])
"""What a writing task reports: the Parquet file it wrote and its rows."""
TASK_ERROR = "lookalike-stale-index:"
"""Prefix of the message a task fails with when its shard's vectors do not match the index, so that the
driver can find it in Spark's wrapped exception and raise `StaleIndexError` with it."""


@dataclass(frozen=True)
class Job(builds.SearchJob):
    """What every task needs, as plain values pickled into the task's closure: `embeddings` lists the files
    of the `embeddings` version the driver read, `run_id` goes into every row a task writes."""

    k: int
    min_score: float | None
    embeddings: tuple[str, ...]
    run_id: str


@dataclass(frozen=True)
class TargetShard:
    """One shard as a worker searches it: the index, the vectors in FAISS id order (queries, re-rank and
    exhaustive scoring), and per FAISS id the exclusion key, whether the item may be a neighbour and its
    query chunk."""

    loaded: shard_index.LoadedShard
    vectors: np.ndarray
    keys: np.ndarray
    eligible: np.ndarray
    chunks: np.ndarray

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """`fetch` re-ranked candidates per query, with the candidate budget the index was tuned for."""
        manifest = self.loaded.manifest
        return shard_index.search(
            self.loaded.index,
            self.vectors,
            queries,
            fetch,
            manifest["nprobe"],
            rerank_budget(manifest["rerank_k"], fetch),
        )


# ----------------------------------------------------------------------------------------- executors


def _load_target(job: Job, shard: str) -> TargetShard:
    """The shard's index, its vectors from the `embeddings` files in FAISS id order and its staged columns
    in the same order; vectors that differ from the build's fail the task with `TASK_ERROR`. At its peak this
    holds the vectors three times (Arrow, as read, aligned)."""
    rows = tables.read_files(job.embeddings, ["item_id", "embedding"], pc.field("shard") == shard)
    staged = distributor.read_staged(
        f"{job.staging}/shard_dir={shards.folder_name(shard)}", ["item_id", "dup_key", "eligible", "chunk"]
    )
    try:
        loaded = builds.load_shard(job.output_root, job.build, shard, model=job.model, dim=job.dim)
        aligned = loaded.align(rows["item_id"], shard_index.matrix(rows["embedding"], job.dim))
    except (ValueError, builds.IndexBuildError) as err:
        raise RuntimeError(f"{TASK_ERROR} shard {shard!r} of index build {job.build}: {err}") from err
    positions = pc.index_in(loaded.item_ids, value_set=staged["item_id"].combine_chunks()).to_numpy()
    return TargetShard(
        loaded=loaded,
        vectors=aligned,
        keys=staged["dup_key"].to_numpy()[positions],
        eligible=staged["eligible"].to_numpy()[positions],
        chunks=staged["chunk"].to_numpy()[positions],
    )


def _queries(job: Job, unit: Unit, target: TargetShard) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """A unit's query ids, vectors and exclusion keys: a chunk of the target's own rows, or (scope all) a
    staged chunk of another shard."""
    if unit.source == unit.target:
        rows = np.flatnonzero(target.chunks == unit.chunk)
        return target.loaded.item_ids.take(rows), target.vectors[rows], target.keys[rows]
    table = distributor.read_staged(
        f"{job.staging}/shard_dir={shards.folder_name(unit.source)}/chunk={unit.chunk}",
        ["item_id", "embedding", "dup_key"],
    )
    return (
        table["item_id"].combine_chunks(),
        shard_index.matrix(table["embedding"], job.dim),
        table["dup_key"].to_numpy(),
    )


def _search_unit(job: Job, unit: Unit, counters: Mapping[str, Any]) -> pa.RecordBatch:
    """One unit's rows. A function of its own so that no reference to the target outlives it: the next
    unit's target then replaces it in memory instead of joining it."""
    target, loaded = distributor.worker_cached(job.cache_key(unit.target), lambda: _load_target(job, unit.target))
    query_ids, queries, query_keys = _queries(job, unit, target)
    ids, scores, scored = neighbours(target, queries, query_keys, job.k, job.min_score)
    counters["shard_loads"].add(int(loaded))
    counters["exhaustive"].add(scored)
    return result_rows(query_ids, target.loaded.item_ids, ids, scores)


def search_task(job: Job, counters: Mapping[str, Any]):
    """The task body for `distributor.run_tasks`: a task is a list of units, searched in order."""

    def search_units(units: list[Unit]) -> Iterator[pa.RecordBatch]:
        for unit in units:
            yield _search_unit(job, unit, counters)

    return search_units


def write_task(job: Job, counters: Mapping[str, Any], folder: str):
    """The task body for `distributor.run_tasks` that writes: its units' rows, with the run id, as one
    Parquet file in `folder`; yields the file's name and rows (nothing when no unit found a neighbour)."""
    search_units = search_task(job, counters)

    def write_units(units: list[Unit]) -> Iterator[pa.RecordBatch]:
        found = pa.Table.from_batches(list(search_units(units)), schema=RESULT_SCHEMA)
        if found.num_rows:
            name = tables.write_file(folder, found.append_column("run_id", pa.repeat(job.run_id, found.num_rows)))
            yield pa.record_batch([pa.array([name]), pa.array([found.num_rows], pa.int64())], schema=FILES_SCHEMA)

    return write_units


# ---------------------------------------------------------------------------------------------- driver


def _items(spark: SparkSession, cfg: Config, settings: Settings, version: int | None) -> DataFrame:
    """`embeddings` (at `version`) with each item's exclusion key and whether it may be a neighbour."""
    items = tables.read(spark, tables.table_path(cfg["output.root"], EMBEDDINGS), version).select(
        "item_id", "shard", "embedding", "model", "image_sha256", "run_id"
    )
    by_item = F.xxhash64(F.lit("item"), F.col("item_id"))
    key = (
        F.when(F.col("image_sha256").isNotNull(), F.xxhash64(F.lit("image"), F.col("image_sha256"))).otherwise(by_item)
        if settings.exclude_duplicates
        else by_item
    )
    eligible = F.lit(True)
    if settings.in_stock_only:  # an item no longer in the catalog is not offered either
        stock = catalog.read_catalog(spark, cfg).select("item_id", "in_stock")
        items, eligible = items.join(stock, "item_id", "left"), F.coalesce(F.col("in_stock"), F.lit(False))
    return items.withColumn("dup_key", key).withColumn("eligible", eligible)


def _shard_stats(items: DataFrame) -> dict[str, tuple[int, str, list[str]]]:
    """Per shard: item count, an order-free digest of what decides its rows, and its models. Reads no
    vectors: a re-embedded item has a new embed `run_id`."""
    digest = F.sum(F.xxhash64("item_id", "run_id", "dup_key", "eligible").cast("decimal(38,0)"))
    rows = (
        items.groupBy("shard")
        .agg(F.count("*").alias("n"), digest.alias("digest"), F.collect_set("model").alias("models"))
        .collect()
    )
    return {r["shard"]: (r["n"], str(r["digest"]), list(r["models"])) for r in rows}


def _check_fresh(stats: Mapping[str, tuple[int, str, list[str]]], summary: Mapping[str, Any], build: str) -> None:
    """Refuse a build that was made for other embeddings (its vectors are checked later, in the tasks)."""
    builds.check_fresh(
        {shard: n for shard, (n, _, _) in stats.items()},
        [m for _, _, models in stats.values() for m in models],
        summary,
        build,
        "lookalike similar",
    )


def _duplicates_inputs(root: str, near_score: float) -> dict[str, Any]:
    """What `duplicates` is derived from, and its own version: equal to what the last run recorded, the
    table is already what deriving it again would give (a no-change night skips that Spark job)."""
    versions = {name: tables.version(tables.table_path(root, name)) for name in (EMBEDDINGS, SIMILAR_ITEMS, DUPLICATES)}
    return {**versions, "duplicate_score": near_score}


def _commit_duplicates(
    spark: SparkSession, items: DataFrame, root: str, run_id: str, near_score: float
) -> dict[str, float]:
    """Update `duplicates`: new or changed pairs get this run id, members that left a group leave. Returns
    the count of each kind."""
    canonical = F.min("item_id").over(Window.partitionBy("image_sha256"))
    exact = (
        items.filter(F.col("image_sha256").isNotNull())
        .select("item_id", canonical.alias("duplicate_of"))
        .filter(F.col("item_id") != F.col("duplicate_of"))
        .withColumn("kind", F.lit("exact"))
    )
    neighbours = tables.read(spark, tables.table_path(root, SIMILAR_ITEMS))
    near = (
        neighbours.filter((F.col("score") >= near_score) & (F.col("similar_item_id") < F.col("item_id")))
        .groupBy("item_id")
        .agg(F.min("similar_item_id").alias("duplicate_of"))
        .join(exact.select("item_id"), "item_id", "left_anti")
        .withColumn("kind", F.lit("near"))
    )
    found = exact.unionByName(near).cache()
    path = tables.table_path(root, DUPLICATES)
    fresh = found.withColumn("run_id", F.lit(run_id))
    if tables.exists(path) and "kind" in tables.spark_schema(path).fieldNames():
        current = tables.read(spark, path)
        gone = current.select("item_id").join(found.select("item_id"), "item_id", "left_anti")
        tables.replace_by_key(
            fresh.join(current, ["item_id", "duplicate_of", "kind"], "left_anti").select(*fresh.columns),
            path,
            "item_id",
            delete_keys=gone,
        )
    else:  # first run, or a table from before `kind`: rewritten whole with it
        tables.write(fresh, path, mode="overwrite", replace_schema=True)
    counts = {row["kind"]: float(row["count"]) for row in found.groupBy("kind").count().collect()}
    found.unpersist()
    return {"duplicates": counts.get("exact", 0.0), "near_duplicates": counts.get("near", 0.0)}


def _stage(
    spark: SparkSession,
    items: DataFrame,
    counts: Mapping[str, int],
    chunk_size: int,
    staging: str,
    with_vectors: bool,
) -> dict[str, dict[int, int]]:
    """Write the exclusion keys and eligibility (`with_vectors`: and vectors) of `counts`' shards partitioned
    by shard folder and query chunk; returns the queries per (shard, chunk) that were written.

    Chunks follow the exclusion key, so that a duplicate group lands in one chunk and is searched once.
    """
    plan = spark.createDataFrame(
        [(shard, shards.folder_name(shard), max(1, math.ceil(n / chunk_size))) for shard, n in counts.items()],
        "shard string, shard_dir string, chunks int",
    )
    staged = items.join(F.broadcast(plan), "shard").select(
        "item_id",
        *(["embedding"] if with_vectors else []),
        "dup_key",
        "eligible",
        "shard_dir",
        F.pmod("dup_key", F.col("chunks")).cast("int").alias("chunk"),
    )
    staged.repartition("shard_dir", "chunk").write.partitionBy("shard_dir", "chunk").parquet(staging)
    by_folder = {shards.folder_name(shard): shard for shard in counts}
    sizes: dict[str, dict[int, int]] = {}
    for row in spark.read.parquet(staging).groupBy("shard_dir", "chunk").count().collect():
        sizes.setdefault(by_folder[str(row["shard_dir"])], {})[int(row["chunk"])] = row["count"]
    return sizes


def _stale_error(err: Exception) -> StaleIndexError | None:
    """The task's stale-index message out of Spark's wrapped exception, if that is what failed."""
    match = re.search(re.escape(TASK_ERROR) + r" ([^\n]*)", str(err))
    if match is None:
        return None
    return StaleIndexError(
        f"{match.group(1)}; re-run `lookalike index` (after `lookalike embed`), then `lookalike similar`"
    )


def _fingerprints(root: str, build: str, stats: Mapping[str, tuple[int, str, list[str]]]) -> dict[str, str]:
    """Each shard's fingerprint, with the `vectors_sha256` from its manifest in the build."""
    folder = f"{builds.indexes_root(root)}/{build}"
    return {
        shard: fingerprint(
            files.read_json(f"{folder}/{shards.folder_name(shard)}/{shard_index.MANIFEST_FILE}")["vectors_sha256"],
            n,
            digest,
        )
        for shard, (n, digest, _) in stats.items()
    }


@contextmanager
def _stale_tasks() -> Iterator[None]:
    """A task that found its shard stale fails the run with `StaleIndexError`, not Spark's wrapped error."""
    try:
        yield
    except Exception as err:
        stale = _stale_error(err)
        if stale is None:
            raise
        raise stale from err


def _search_and_commit(
    spark: SparkSession,
    job: Job,
    tasks: list[list[Unit]],
    scope: str,
    items: DataFrame,
    changed: set[str],
    every_shard: bool,
    staging: str,
) -> tuple[dict[str, int], int]:
    """Run the tasks and commit their rows to `similar_items` ("Writing"); returns the executors' counters
    and the rows written.

    Every shard computed: the table is overwritten. Else the changed shards' items' rows are replaced by key
    and every other item that is not in an unchanged shard (it left `embeddings`) is deleted. Scope all always
    computes every shard (`changed_shards`).
    """
    counters = {name: spark.sparkContext.accumulator(0) for name in ("shard_loads", "exhaustive")}
    path = tables.table_path(job.output_root, SIMILAR_ITEMS)
    with _stale_tasks():
        if scope == "shard":
            folder = tables.files_folder(path) if every_shard else f"{staging}/results"
            written = distributor.run_tasks(spark, tasks, write_task(job, counters, folder), FILES_SCHEMA).collect()
            names, rows = [str(row["file"]) for row in written], sum(int(row["rows"]) for row in written)
            if every_shard:
                tables.commit_files(path, folder, names, TABLE_SCHEMA, mode="overwrite")
            else:
                _replace(spark, items, path, folder, names, changed)
        else:
            found = distributor.run_tasks(spark, tasks, search_task(job, counters), RESULT_SCHEMA)
            best_first = Window.partitionBy("item_id").orderBy(F.desc("score"), "similar_item_id")
            merged = (
                found.withColumn("rank", F.row_number().over(best_first))
                .filter(F.col("rank") <= job.k)
                .select(*RESULT_SCHEMA.names)
            )
            rows = tables.write(merged.withColumn("run_id", F.lit(job.run_id)), path, mode="overwrite").rows_added
    return {name: counter.value for name, counter in counters.items()}, rows


def _replace(
    spark: SparkSession, items: DataFrame, path: str, folder: str, names: Iterable[str], changed: set[str]
) -> None:
    """Replace the changed shards' items by the staged rows in `folder`'s files `names`, and delete every item
    that is neither among them nor in an unchanged shard (it left `embeddings`)."""
    schema = from_arrow_schema(TABLE_SCHEMA)
    files = [f"{folder}/{name}" for name in names]
    results = spark.read.schema(schema).parquet(*files) if files else spark.createDataFrame([], schema)
    keep = items.filter(~F.col("shard").isin(sorted(changed))).select("item_id")
    leaving = tables.read(spark, path).select("item_id").distinct().join(keep, "item_id", "left_anti")
    tables.replace_by_key(results, path, "item_id", delete_keys=leaving)


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    settings = Settings.from_config(cfg)
    root = cfg["output.root"]
    build = builds.latest_build(root)
    summary = builds.build_summary(root, build)
    embeddings = tables.table_path(root, EMBEDDINGS)
    version = tables.version(embeddings)  # tasks read the files of the version Spark reads
    items = _items(spark, cfg, settings, version)
    stats = _shard_stats(items)
    _check_fresh(stats, summary, build)
    n_items = sum(n for n, _, _ in stats.values())
    fingerprints = _fingerprints(root, build, stats)
    state_path, path = files.state_path(root, SIMILAR_ITEMS), tables.table_path(root, SIMILAR_ITEMS)
    previous = files.read_json(state_path)
    changed = changed_shards(previous, fingerprints, settings, tables.version(path))
    metrics = {"shards": float(len(stats)), "shards_recomputed": float(len(changed))}
    near_score = cfg["search.duplicate_score"]

    def finish() -> None:
        """`duplicates` from what is committed now (unless its inputs are as the last run left them), then
        the state, published whole: a reader sees the old state or the new one."""
        recorded, inputs = (previous or {}).get("duplicates"), _duplicates_inputs(root, near_score)
        if recorded is not None and recorded["inputs"] == inputs:
            counts = recorded["counts"]
        else:
            counts = _commit_duplicates(spark, items, root, run_id, near_score)
            inputs = _duplicates_inputs(root, near_score)  # `duplicates` has a new version now
        metrics.update(counts)
        state = {
            "version": STATE_VERSION,
            "run_id": run_id,
            "build": build,
            "settings": asdict(settings),
            "table_version": tables.version(path),
            "shards": fingerprints,
            "duplicates": {"inputs": inputs, "counts": counts},
        }
        files.write_text(state_path, json.dumps(state, indent=2, sort_keys=True))

    if not changed:
        log.info("similar %s: all %d shards unchanged since the last run, nothing to do", run_id, len(stats))
        finish()
        metrics["seconds"] = round(time.time() - started, 3)
        return StageResult("similar", rows_in=n_items, rows_out=0, metrics=metrics)

    staging = files.staging_dir(root, run_id, "similar")
    targets = sorted(changed) if settings.scope == "shard" else sorted(stats)
    job = Job(
        output_root=root,
        build=build,
        model=summary["model"],
        dim=summary["dim"],
        staging=f"{staging}/items",
        k=settings.k,
        min_score=settings.min_score,
        embeddings=tuple(tables.current_files(embeddings, version)),
        run_id=run_id,
    )
    n_queries = sum(stats[shard][0] for shard in changed)
    size = task_size(
        cfg["similar.chunk_size"],
        n_queries,
        len(targets) if settings.scope == "all" else 1,
        spark.sparkContext.defaultParallelism,
    )
    try:
        counts = {shard: stats[shard][0] for shard in targets}
        sizes = _stage(spark, items, counts, size, job.staging, with_vectors=settings.scope == "all")
        tasks = pack(plan_units({shard: sizes[shard] for shard in changed}, targets, settings.scope), size)
        log.info(
            "similar %s: %d of %d shards to compute (scope %s, build %s): %d queries in %d tasks",
            run_id,
            len(changed),
            len(stats),
            settings.scope,
            build,
            n_queries,
            len(tasks),
        )
        every_shard = changed == set(stats)
        counters, rows_out = _search_and_commit(spark, job, tasks, settings.scope, items, changed, every_shard, staging)
    finally:
        files.remove_dir(staging)
    finish()
    metrics.update(
        {
            "queries": float(n_queries),
            "tasks": float(len(tasks)),
            "shard_loads": float(counters["shard_loads"]),
            "exhaustive_queries": float(counters["exhaustive"]),
            "seconds": round(time.time() - started, 3),
        }
    )
    log.info("similar %s: %d rows for %d items; %s", run_id, rows_out, n_items, metrics)
    return StageResult("similar", rows_in=n_items, rows_out=rows_out, metrics=metrics)

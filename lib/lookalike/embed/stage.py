"""The embed stage: catalog -> `embeddings` and `quarantine`, incrementally.

Driver side only: which items need work, how the work is partitioned, and what is committed. The executors
run `inference.embed_rows` inside an iterator pandas UDF, with the model cached per Python worker
(`models.cache.get_embedder`). The UDF's rows are persisted (memory, spilling to disk) by the first action, which
counts them by status: inference runs exactly once although three things are derived from it (embeddings,
quarantine, counts), nothing is committed until the bad-image guard has looked at the whole run, and the
vectors are encoded to Parquet once, straight into the table, instead of through a staging copy.

An item is embedded again only when the sha256 of its image bytes or the model version changed; items that
left the catalog, or whose image can no longer be used, leave `embeddings`. With `embed.input: title` the
same holds for the title: its text is what is hashed and embedded (`inference.embed_titles`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from lookalike import distributor
from lookalike.config import Config
from lookalike.embed import catalog, shards
from lookalike.embed.models import registry
from lookalike.embed.task import (
    EMBEDDED,
    FAILED,
    OUTPUT_SCHEMA,
    SKIPPED_WHILE_UNCHANGED,
    STILL_FAILED,
    UNCHANGED,
    EmbedSettings,
    TaskModel,
    embed_rows,
    embed_titles,
)
from lookalike.errors import LookalikeError
from lookalike.progress import Progress
from lookalike.results import StageResult
from lookalike.storage import tables

log = logging.getLogger(__name__)

EMBEDDINGS, QUARANTINE = "embeddings", "quarantine"
# Rows per pandas call of the UDF: enough to amortise the call whatever the inference batch (decode-ahead is
# bounded separately, by `inference.DECODE_AHEAD`); 64- to 1024-row batches measured the same on the CPU.
ARROW_ROWS = 1024


class TooManyBadImages(LookalikeError):
    """More of the run's images failed than `embed.max_bad_fraction` allows: likely a broken mount or URI."""


class TooManyRemoved(LookalikeError):
    """The run would remove more of `embeddings` than `embed.max_removed_fraction` allows: likely a truncated
    feed export rather than a real catalog clean-up."""


def settings_from(cfg: Config) -> EmbedSettings:
    spec = registry.get_spec(cfg["model.name"])
    # A text model reads titles whatever embed.image_size says (config checked that model and input agree).
    image_size = (cfg["embed.image_size"] or spec.image_size) if spec.modality == "image" else None
    return EmbedSettings(
        model_name=spec.name,
        weights=cfg["model.weights"],
        image_size=image_size,
        decode_size=math.ceil(image_size / spec.crop_fraction) if image_size and spec.crop_fraction else None,
        crop_fraction=spec.crop_fraction if image_size else None,
        batch_size=cfg["embed.batch_size"],
        device=cfg["embed.device"],
        max_pixels=cfg["embed.max_pixels"],
        max_bytes=cfg["embed.max_bytes"],
        decode_threads=cfg["embed.decode_threads"],
        input=cfg["embed.input"],
        policy=catalog.image_policy(cfg),
    )


def embed_task(settings: EmbedSettings, counters: dict):
    """The iterator pandas UDF; everything it closes over is plain data or a Spark accumulator."""

    # pyspark's stubs know this UDF type (iterator of series tuples) only with an explicit functionType.
    @pandas_udf(OUTPUT_SCHEMA)  # type: ignore[call-overload]
    def embed_items(batches: Iterator[tuple[pd.Series, pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        context = distributor.task_context()
        gpus = context.resources().get("gpu")
        model = TaskModel(settings, list(gpus.addresses) if gpus else [], int(context.cpus()))
        try:
            # Threads start on first use: with titles (no reading or decoding) the pool stays empty.
            with ThreadPoolExecutor(max_workers=settings.decode_threads) as pool:
                for contents, known, known_bad in batches:
                    frame = (
                        embed_titles(list(contents), list(known), model)
                        if settings.input == "title"
                        else embed_rows(list(contents), list(known), list(known_bad), model, pool)
                    )
                    status = frame["status"]
                    for name in (EMBEDDED, UNCHANGED, FAILED, STILL_FAILED):
                        counters[name].add(int((status == name).sum()))
                    yield frame
        finally:
            counters["model_loads"].add(model.loads)

    return embed_items


def _partitions(spark: SparkSession, n_items: int, partition_size: int) -> int:
    """Enough tasks to keep every core busy and report progress, few enough that each amortises its start."""
    return max(1, min(max(math.ceil(n_items / partition_size), 2 * spark.sparkContext.defaultParallelism), n_items))


def _check_bad_fraction(
    counts: dict[str, int], staged: DataFrame, max_fraction: float, embed_input: str = "image"
) -> None:
    considered = sum(counts.values())  # tried now, and unchanged (good or still failing): the whole catalog
    if considered == 0 or counts[FAILED] / considered <= max_fraction:
        return
    # A failed title has no URI to show: its item_id is the example.
    what, example = ("images", "image_uri") if embed_input == "image" else ("titles", "item_id")
    reasons = (
        staged.filter(F.col("status") == FAILED)
        .groupBy("error_kind")
        .agg(F.count("*").alias("n"), F.first(example).alias("example"))
        .orderBy(F.desc("n"))
        .limit(3)
        .collect()
    )
    detail = "; ".join(f"{r['error_kind']}: {r['n']} (e.g. {r['example']})" for r in reasons)
    raise TooManyBadImages(
        f"{counts[FAILED]} of {considered} {what} failed ({counts[FAILED] / considered:.0%} > "
        f"embed.max_bad_fraction {max_fraction:.0%}); nothing was committed. {detail}"
    )


def _check_removed(removed: int, existing: int, max_fraction: float, why: str) -> None:
    """Refuse a run that would remove more than `max_fraction` of `embeddings` (`why` says which rows)."""
    if existing and removed / existing > max_fraction:
        raise TooManyRemoved(
            f"this run would remove {removed} of the {existing} items in embeddings ({removed / existing:.0%} > "
            f"embed.max_removed_fraction {max_fraction:.0%}): {why}; nothing was committed. If the catalog really "
            "shrank, run once with --set embed.max_removed_fraction=1"
        )


def _commit(
    staged: DataFrame, existing: DataFrame | None, emb_path: str, q_path: str, version: str, run_id: str
) -> None:
    """The run's rows into `embeddings` and `quarantine`, each in one Delta commit."""
    embedded_at = F.current_timestamp()
    new_rows = staged.filter(F.col("status") == EMBEDDED).select(
        "item_id",
        "shard",
        "embedding",
        F.lit(version).alias("model"),
        "image_sha256",
        "width",
        "height",
        F.lit(run_id).alias("run_id"),
        embedded_at.alias("embedded_at"),
    )
    if existing is None:
        tables.write(new_rows, emb_path, mode="overwrite")
    else:
        # Unchanged images whose shard moved (a category grew past index.max_shard_size) keep their vector.
        moved = (
            existing.join(
                staged.filter(F.col("status") == UNCHANGED).select("item_id", F.col("shard").alias("new_shard")),
                "item_id",
            )
            .filter(F.col("shard") != F.col("new_shard"))
            .withColumn("shard", F.col("new_shard"))
            .select(*new_rows.columns)
        )
        tables.replace_by_key(new_rows.unionByName(moved), emb_path, "item_id", delete_keys=_gone(existing, staged))

    failed = staged.filter(F.col("status") == FAILED).select(
        "item_id",
        "image_uri",
        "error_kind",
        "error_message",
        F.lit(run_id).alias("run_id"),
        embedded_at.alias("seen_at"),
        "image_sha256",
    )
    if _keeps_failed_sha(q_path):
        still = staged.filter(F.col("status").isin(FAILED, STILL_FAILED)).select("item_id")
        healed = tables.read(staged.sparkSession, q_path).select("item_id").join(still, "item_id", "left_anti")
        tables.replace_by_key(failed, q_path, "item_id", delete_keys=healed)
    else:
        # First run, or a quarantine written before it kept the failing bytes' sha256: nothing was skipped as
        # still failing, so this run's failures are the whole quarantine, written with the current columns.
        tables.write(failed, q_path, mode="overwrite", replace_schema=True)


def _keeps_failed_sha(q_path: str) -> bool:
    """Whether `quarantine` exists with the `image_sha256` column (tables written before it had none)."""
    return tables.exists(q_path) and "image_sha256" in tables.spark_schema(q_path).names


def _gone(existing: DataFrame, staged: DataFrame) -> DataFrame:
    """Items of `embeddings` that leave it: gone from the catalog, or whose image no longer embeds."""
    kept = staged.filter(F.col("status").isin(EMBEDDED, UNCHANGED)).select("item_id")
    return existing.select("item_id").join(kept, "item_id", "left_anti")


def _known_bad(spark: SparkSession, q_path: str) -> DataFrame | None:
    """(item_id, sha256) of quarantined bytes that fail by their content alone (SKIPPED_WHILE_UNCHANGED)."""
    if not _keeps_failed_sha(q_path):
        return None
    return (
        tables.read(spark, q_path)
        .filter(F.col("error_kind").isin(*SKIPPED_WHILE_UNCHANGED) & F.col("image_sha256").isNotNull())
        .select("item_id", F.col("image_sha256").alias("known_bad"))
    )


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    settings = settings_from(cfg)
    version = registry.model_version(settings.model_name, settings.weights, settings.image_size)
    root, max_removed = cfg["output.root"], cfg["embed.max_removed_fraction"]
    emb_path, q_path = tables.table_path(root, EMBEDDINGS), tables.table_path(root, QUARANTINE)
    items, n_items = shards.assign(catalog.read_catalog(spark, cfg), cfg["index.shard_by"], cfg["index.max_shard_size"])
    if n_items == 0:
        raise catalog.CatalogError(
            f"catalog {cfg['catalog.path']} has no rows: refusing to run on an empty feed (nothing was committed)"
        )
    content = catalog.CONTENT_COLUMNS[settings.input]  # image_uri, or title
    items = items.select("item_id", "image_uri", *([content] if content != "image_uri" else []), "shard")
    existing = tables.read(spark, emb_path) if tables.exists(emb_path) else None
    n_existing = 0
    if existing is None:
        items = items.withColumn("known", F.lit(None).cast("string"))
    else:
        # Before any inference: a feed cut short is refused at once, not after hours of work.
        n_existing = existing.count()
        leaving = existing.select("item_id").join(items.select("item_id"), "item_id", "left_anti").count()
        _check_removed(leaving, n_existing, max_removed, f"{leaving} of them are no longer in the catalog")
        items = items.join(
            existing.filter(F.col("model") == version).select("item_id", F.col("image_sha256").alias("known")),
            "item_id",
            "left",
        )
    known_bad = _known_bad(spark, q_path) if settings.input == "image" else None
    items = (
        items.withColumn("known_bad", F.lit(None).cast("string"))
        if known_bad is None
        else items.join(known_bad, "item_id", "left")
    )
    n_partitions = _partitions(spark, n_items, cfg["embed.partition_size"])
    work = items.repartition(n_partitions)
    log.info("embed %s: %d catalog items, model %s, %d partitions", run_id, n_items, version, n_partitions)

    statuses = (EMBEDDED, UNCHANGED, FAILED, STILL_FAILED)
    counters = {name: spark.sparkContext.accumulator(0) for name in (*statuses, "model_loads")}
    results = work.select(
        "item_id", "image_uri", "shard", embed_task(settings, counters)(content, "known", "known_bad").alias("r")
    ).select("item_id", "image_uri", "shard", "r.*")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(ARROW_ROWS))
    staged = results.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        with Progress(f"embed {run_id}", n_items, counters):
            # Runs inference once and keeps its rows; counted from them, not from the accumulators, which a
            # retried task can count twice.
            by_status = {r["status"]: r["count"] for r in staged.groupBy("status").count().collect()}
        counts = {name: by_status.get(name, 0) for name in statuses}
        _check_bad_fraction(counts, staged, cfg["embed.max_bad_fraction"], settings.input)
        if existing is not None:
            gone = _gone(existing, staged).count()
            _check_removed(gone, n_existing, max_removed, "they left the catalog or their images no longer embed")
        _commit(staged, existing, emb_path, q_path, version, run_id)
    finally:
        staged.unpersist()

    seconds = time.time() - started
    processed = counts[EMBEDDED] + counts[FAILED]
    if processed == 0:
        log.info(
            "embed %s: nothing to embed, all %d images unchanged", run_id, counts[UNCHANGED] + counts[STILL_FAILED]
        )
    metrics = {
        "embedded": counts[EMBEDDED],
        "unchanged": counts[UNCHANGED],
        "quarantined": counts[FAILED],
        "still_quarantined": counts[STILL_FAILED],
        "model_loads": counters["model_loads"].value,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 2) if seconds else 0.0,
    }
    log.info("embed %s: %s", run_id, metrics)
    return StageResult("embed", rows_in=n_items, rows_out=counts[EMBEDDED], metrics=metrics)

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

http(s) images (docs/fetching.md): `fetch_state` keeps each URL's `ETag` / `Last-Modified` with the sha256
of the bytes they name, and the next run sends them along, for those bytes only when they are still the
embedded (or known-bad) ones; a failed URL is tried again after a delay that grows with each failed run
(`quarantine.attempts`, `next_retry_at`), and until then it is `deferred`: its quarantine row, and the
embedding of an item that failed only transiently (`kept`), stay as they are. `embed.retry_failed` (the
`--retry-failed` flag) embeds the quarantined items only, now. Local files get a validator of their own, made
from their stat (`reader.stat_tag`), kept in `fetch_state` the same way: an unchanged local image is not read.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator

import pandas as pd
from pyspark import Accumulator, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from lookalike import distributor
from lookalike.config import Config
from lookalike.embed import catalog, shards, vectors
from lookalike.embed.fetcher import Fetcher, FetchStats
from lookalike.embed.models import head as models_head
from lookalike.embed.models import registry
from lookalike.embed.task import (
    EMBEDDED,
    FAILED,
    KEPT,
    OUTPUT_SCHEMA,
    SKIPPED_WHILE_UNCHANGED,
    STILL_FAILED,
    UNCHANGED,
    EmbedSettings,
    Readers,
    TaskModel,
    WorkRow,
    embed_rows,
    embed_titles,
)
from lookalike.errors import LookalikeError
from lookalike.progress import CountsParam, Progress
from lookalike.results import StageResult
from lookalike.storage import tables

log = logging.getLogger(__name__)

EMBEDDINGS, QUARANTINE, FETCH_STATE, FEATURES = "embeddings", "quarantine", "fetch_state", "features"
DEFERRED = "deferred"  # a failed http(s) image before its next retry time: not tried, its rows stay as they are
STATUSES = (EMBEDDED, UNCHANGED, FAILED, KEPT, STILL_FAILED, DEFERRED)
# quarantine's columns beyond the contract's; a table written before one of them existed is rewritten whole
QUARANTINE_STATE = ("image_sha256", "attempts", "next_retry_at")
# Rows per pandas call of the UDF: enough to amortise the call whatever the inference batch (decode-ahead is
# bounded separately, by `inference.DECODE_AHEAD`); 64- to 1024-row batches measured the same on the CPU.
ARROW_ROWS = 1024


class TooManyBadImages(LookalikeError):
    """More of the run's images failed than `embed.max_bad_fraction` allows: likely a broken mount or URI."""


class TooManyRemoved(LookalikeError):
    """The run would remove more of `embeddings` than `embed.max_removed_fraction` allows: likely a truncated
    feed export rather than a real catalog clean-up."""


def settings_from(cfg: Config, tasks_at_once: int = 1, partitions: int = 1) -> EmbedSettings:
    """The executors' settings; `tasks_at_once` (of the stage's `partitions`, the tasks that may run at the
    same time) splits the per-host fetch budget so that it holds for the whole job."""
    spec = registry.get_spec(cfg["model.name"])
    # A text model reads titles whatever embed.image_size says (config checked that model and input agree).
    image_size = (cfg["embed.image_size"] or spec.image_size) if spec.modality == "image" else None
    root = cfg["output.root"]
    backbone = registry.model_version(spec.name, cfg["model.weights"], image_size)
    head = models_head.for_backbone(root, cfg["model.head"], backbone)
    fused = cfg["embed.input"] == "image+title"
    text = registry.get_spec(models_head.TEXT_MODEL)
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
        fetch=catalog.fetch_settings(cfg, tasks_at_once, partitions) if cfg["embed.input"] != "title" else None,
        retry_delay_hours=cfg["fetch.retry_delay_hours"],
        runtime=cfg["embed.runtime"],
        head_root=root if head is not None else None,
        head_version=head.version if head is not None else None,
        title_weight=cfg["embed.title_weight"] if fused else None,
        text_version=registry.model_version(text.name) if fused else None,
        image_dim=head.dim if head is not None else spec.dim,
        text_dim=text.dim if fused else None,
    )


# The work list's columns that pass by the UDF into its rows (`vectors` reads the last four).
PASSED = ("item_id", "image_uri", "shard", "current", "had_image", "title", "title_sha256")
# The UDF's columns after the content, with their types (`WorkRow`'s fields after `uri`).
INPUTS = {
    "known": "string",
    "known_bad": "string",
    "etag": "string",
    "last_modified": "string",
    "validated_sha": "string",
    "attempts": "int",
}


def embed_task(settings: EmbedSettings, counters: dict):
    """The iterator pandas UDF; everything it closes over is plain data or a Spark accumulator."""

    # pyspark's stubs know this UDF type (iterator of series tuples) only with an explicit functionType.
    @pandas_udf(OUTPUT_SCHEMA)  # type: ignore[call-overload]
    def embed_items(batches: Iterator[tuple[pd.Series, ...]]) -> Iterator[pd.DataFrame]:
        context = distributor.task_context()
        gpus = context.resources().get("gpu")
        model = TaskModel(settings, list(gpus.addresses) if gpus else [], int(context.cpus()))
        reported = FetchStats()  # what the fetcher had moved when the last batch was counted
        try:
            # Threads start on first use: with titles (no reading or decoding) the pools stay empty.
            with Readers(settings, context.partitionId()) as readers:
                for contents, *state in batches:
                    if settings.input == "title":
                        frame = embed_titles(list(contents), list(state[0]), model)
                    else:
                        columns = [s.astype(object).where(s.notna(), None) for s in state]
                        frame = embed_rows([WorkRow(*row) for row in zip(contents, *columns)], model, readers)
                    _count(frame, readers.fetcher, reported, counters)
                    yield frame
        finally:
            counters["model_loads"].add(model.loads)

    return embed_items


def make_counters(spark: SparkSession) -> dict[str, Accumulator]:
    """The accumulators `embed_task` reports through: rows by status, model loads, fetched requests and
    bytes, failures by kind (`progress.Progress` reads them)."""
    counters: dict[str, Accumulator] = {
        name: spark.sparkContext.accumulator(0) for name in (*STATUSES, "model_loads", "requests", "bytes")
    }
    counters["failed_kinds"] = spark.sparkContext.accumulator({}, CountsParam())
    return counters


def _count(frame: pd.DataFrame, fetcher: Fetcher | None, reported: FetchStats, counters: dict) -> None:
    """This batch's rows by status and failures by kind, and what `fetcher` moved since `reported`."""
    status = frame["status"]
    for name in STATUSES:
        if name != DEFERRED:  # deferred rows never reach a task
            counters[name].add(int((status == name).sum()))
    counters["failed_kinds"].add(dict(Counter(frame["error_kind"][status.isin([FAILED, KEPT])])))
    if fetcher is not None:
        counters["requests"].add(fetcher.stats.requests - reported.requests)
        counters["bytes"].add(fetcher.stats.bytes - reported.bytes)
        reported.requests, reported.bytes = fetcher.stats.requests, fetcher.stats.bytes


def _partitions(spark: SparkSession, n_items: int, partition_size: int) -> int:
    """Enough tasks to keep every core busy and report progress, few enough that each amortises its start."""
    return max(1, min(max(math.ceil(n_items / partition_size), 2 * spark.sparkContext.defaultParallelism), n_items))


def _check_bad_fraction(
    counts: dict[str, int], staged: DataFrame, max_fraction: float, n_items: int, embed_input: str = "image"
) -> None:
    """Refuse the run when more than `max_fraction` of the catalog's `n_items` failed in it (transiently or
    not); unchanged and still-failing items count as items, not as failures."""
    failed = counts[FAILED] + counts[KEPT]
    if n_items == 0 or failed / n_items <= max_fraction:
        return
    # A failed title has no URI to show: its item_id is the example.
    what, example = ("images", "image_uri") if embed_input != "title" else ("titles", "item_id")
    reasons = (
        staged.filter(F.col("status").isin(FAILED, KEPT))
        .groupBy("error_kind")
        .agg(F.count("*").alias("n"), F.first(example).alias("example"))
        .orderBy(F.desc("n"))
        .limit(3)
        .collect()
    )
    detail = "; ".join(f"{r['error_kind']}: {r['n']} (e.g. {r['example']})" for r in reasons)
    raise TooManyBadImages(
        f"{failed} of {n_items} {what} failed ({failed / n_items:.0%} > "
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
    staged: DataFrame,
    existing: DataFrame | None,
    catalog_ids: DataFrame,
    paths: dict[str, str],
    settings: EmbedSettings,
    run_id: str,
    fetched: int,
    quarantine_current: bool,
    stored: DataFrame | None,
    titles: DataFrame | None,
) -> None:
    """The run's rows into `features` (`settings.keep_features`), `embeddings`, `quarantine` and (when
    anything was fetched, or it exists) `fetch_state`, each in one Delta commit. `existing` is the part of
    `embeddings` this run worked on; `quarantine_current`: whether `quarantine` has the columns the run relied
    on (`_quarantine_current`); `stored`, `titles`: the backbone and title vectors kept before the run
    (`vectors.stored_features`, `vectors.stored_titles`)."""
    now = F.current_timestamp()
    fresh = vectors.new_vectors(staged, stored, titles, settings)
    if settings.keep_features:
        # Before `embeddings`: a run killed between the two re-derives the same vectors next time.
        gone = None if existing is None else _gone(existing, staged, settings)
        tables.replace_by_key(vectors.feature_rows(fresh, settings, run_id), paths[FEATURES], "item_id", gone)
    new_rows = fresh.select(
        "item_id",
        "shard",
        "embedding",
        F.lit(settings.model_version).alias("model"),
        "image_sha256",
        "width",
        "height",
        F.lit(run_id).alias("run_id"),
        now.alias("embedded_at"),
    )
    if existing is None:
        tables.write(new_rows, paths[EMBEDDINGS], mode="overwrite", cluster_by="shard")
    else:
        # Items whose vector stays but whose shard moved (a category grew past index.max_shard_size) keep it.
        unchanged = staged.filter(vectors.keeps_vector(settings))
        moved = (
            existing.join(unchanged.select("item_id", F.col("shard").alias("new_shard")), "item_id")
            .filter(F.col("shard") != F.col("new_shard"))
            .withColumn("shard", F.col("new_shard"))
            .select(*new_rows.columns)
        )
        tables.replace_by_key(
            new_rows.unionByName(moved),
            paths[EMBEDDINGS],
            "item_id",
            delete_keys=_gone(existing, staged, settings),
            cluster_by="shard",
        )

    q_path = paths[QUARANTINE]
    failed = staged.filter(F.col("status").isin(FAILED, KEPT)).select(
        "item_id",
        "image_uri",
        "error_kind",
        "error_message",
        F.lit(run_id).alias("run_id"),
        now.alias("seen_at"),
        *QUARANTINE_STATE,
    )
    if quarantine_current:
        quarantine = tables.read(staged.sparkSession, q_path)
        still = staged.filter(F.col("status").isin(FAILED, KEPT, STILL_FAILED, DEFERRED)).select("item_id")
        healed = quarantine.select("item_id").join(still, "item_id", "left_anti")
        # http(s) images that failed by their bytes, tried again and unchanged: the row stays, its retry moves on.
        tried_again = staged.filter((F.col("status") == STILL_FAILED) & F.col("next_retry_at").isNotNull())
        refreshed = quarantine.drop("attempts", "next_retry_at", "run_id", "seen_at").join(
            tried_again.select("item_id", "attempts", "next_retry_at"), "item_id"
        )
        rows = failed.unionByName(
            refreshed.select("*", F.lit(run_id).alias("run_id"), now.alias("seen_at")), allowMissingColumns=False
        )
        tables.replace_by_key(rows, q_path, "item_id", delete_keys=healed)
    else:
        # First run, or a quarantine written before it kept the state columns: nothing was skipped or deferred
        # on its word, so this run's failures are the whole quarantine, written with the current columns.
        tables.write(failed, q_path, mode="overwrite", replace_schema=True)

    state_path = paths[FETCH_STATE]
    has_state = tables.exists(state_path)
    if fetched or has_state:
        answered = staged.filter(F.col("fetched")).select(
            "item_id",
            "image_uri",
            "etag",
            "last_modified",
            "image_sha256",
            F.lit(run_id).alias("run_id"),
            now.alias("fetched_at"),
        )
        if has_state:
            state = tables.read(staged.sparkSession, state_path)
            left = state.select("item_id").join(catalog_ids, "item_id", "left_anti")
            tables.replace_by_key(answered, state_path, "item_id", delete_keys=left)
        else:
            tables.write(answered, state_path, mode="overwrite")


def _quarantine_current(q_path: str) -> bool:
    """Whether `quarantine` exists with the columns the run relies on (QUARANTINE_STATE); tables written by
    an older lookalike lack some and are rewritten by the next commit."""
    return tables.exists(q_path) and set(QUARANTINE_STATE) <= set(tables.spark_schema(q_path).names)


def _with_vector_history(
    items: DataFrame, existing: DataFrame | None, stored: DataFrame | None, titles: DataFrame | None, version: str
) -> DataFrame:
    """`items` with `known` (the sha256 of the bytes whose backbone vector is kept: unchanged bytes are not
    embedded again), `current` (the item's embedding is this run's model version, and with fused input of
    its current title: else it is re-derived) and `had_image` (its embedding came from an image)."""
    parts = []
    if stored is not None:
        parts.append(stored.select("item_id", F.col("image_sha256").alias("known")))
    if existing is not None:
        parts.append(
            existing.select(
                "item_id",
                (F.col("model") == version).alias("same_model"),
                F.col("image_sha256").isNotNull().alias("had_image"),
            )
        )
    if titles is not None:
        parts.append(titles.select("item_id", "stored_title_sha"))
    for part in parts:
        items = items.join(part, "item_id", "left")
    for name, dtype in (("known", "string"), ("same_model", "boolean"), ("had_image", "boolean")):
        if name not in items.columns:
            items = items.withColumn(name, F.lit(None).cast(dtype))
    if titles is not None:
        same_title = F.col("title_sha256").eqNullSafe(F.col("stored_title_sha"))
    else:  # no title vector kept (or titles not fused, where title_sha256 is null): only a titleless row matches
        same_title = F.col("title_sha256").isNull()
    current = F.coalesce(F.col("same_model"), F.lit(False)) & same_title
    return (
        items.withColumn("current", current)
        .withColumn("had_image", F.coalesce(F.col("had_image"), F.lit(False)))
        .drop("same_model", *(["stored_title_sha"] if titles is not None else []))
    )


def _gone(existing: DataFrame, staged: DataFrame, settings: EmbedSettings) -> DataFrame:
    """Items of `embeddings` that leave it: gone from the catalog, or whose image no longer embeds (a
    transient failure, a deferred retry, or with fused input a usable title keeps it)."""
    embeds = F.col("status").isin(EMBEDDED, UNCHANGED, KEPT, DEFERRED) | vectors.title_only(settings)
    kept = staged.filter(embeds).select("item_id")
    return existing.select("item_id").join(kept, "item_id", "left_anti")


def _with_history(
    spark: SparkSession, items: DataFrame, paths: dict[str, str], embed_input: str, quarantine_current: bool
) -> DataFrame:
    """`items` with what earlier runs left about each: `known_bad` (the sha256 of bytes that failed by their
    content alone), `attempts` and `retry_at` (of a quarantined image, while its URI is the same),
    `quarantined`, and the validators to send (`etag`, `last_modified`, naming `validated_sha`, only when
    those bytes are the embedded or the known-bad ones). Titles have none; `quarantine_current` says whether
    `quarantine` has the columns read here (`_quarantine_current`)."""
    null = F.lit(None)
    q_path, state_path = paths[QUARANTINE], paths[FETCH_STATE]
    if embed_input != "title" and quarantine_current:
        quarantine = tables.read(spark, q_path).select(
            "item_id",
            F.col("image_uri").alias("q_uri"),
            F.when(F.col("error_kind").isin(*SKIPPED_WHILE_UNCHANGED), F.col("image_sha256")).alias("known_bad"),
            F.col("attempts").alias("q_attempts"),
            F.col("next_retry_at").alias("q_retry_at"),
        )
        same = F.col("q_uri") == F.col("image_uri")
        items = (
            items.join(quarantine, "item_id", "left")
            .withColumn("quarantined", F.col("q_uri").isNotNull())
            .withColumn("attempts", F.when(same, F.col("q_attempts")))
            .withColumn("retry_at", F.when(same, F.col("q_retry_at")))
            .drop("q_uri", "q_attempts", "q_retry_at")
        )
    else:
        items = items.select(
            "*",
            null.cast("string").alias("known_bad"),
            F.lit(False).alias("quarantined"),
            null.cast("int").alias("attempts"),
            null.cast("timestamp").alias("retry_at"),
        )
    if embed_input != "title" and tables.exists(state_path):
        state = tables.read(spark, state_path).select(
            "item_id",
            F.col("image_uri").alias("s_uri"),
            F.col("etag").alias("s_etag"),
            F.col("last_modified").alias("s_last_modified"),
            F.col("image_sha256").alias("s_sha"),
        )
        usable = (F.col("s_uri") == F.col("image_uri")) & (
            (F.col("s_sha") == F.col("known")) | (F.col("s_sha") == F.col("known_bad"))
        )
        return (
            items.join(state, "item_id", "left")
            .withColumn("etag", F.when(usable, F.col("s_etag")))
            .withColumn("last_modified", F.when(usable, F.col("s_last_modified")))
            .withColumn("validated_sha", F.when(usable, F.col("s_sha")))
            .drop("s_uri", "s_etag", "s_last_modified", "s_sha")
        )
    return items.select("*", *(null.cast("string").alias(name) for name in ("etag", "last_modified", "validated_sha")))


def _any_waiting(spark: SparkSession, q_path: str) -> bool:
    """Whether `quarantine` holds an image whose retry time has not come (a look at that small table)."""
    return bool(tables.read(spark, q_path).filter(F.col("next_retry_at") > F.current_timestamp()).limit(1).count())


def _tasks_at_once(spark: SparkSession, n_partitions: int) -> int:
    """How many of this stage's tasks may run at the same time: its partitions, or the cluster's task slots
    (the cores Spark knows of now, over `spark.task.cpus`), whichever is fewer."""
    cpus = int(spark.conf.get("spark.task.cpus", "1") or 1)
    return max(1, min(n_partitions, spark.sparkContext.defaultParallelism // max(1, cpus)))


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    embed_input, retry_failed = cfg["embed.input"], cfg["embed.retry_failed"]
    root, max_removed = cfg["output.root"], cfg["embed.max_removed_fraction"]
    paths = {name: tables.table_path(root, name) for name in (EMBEDDINGS, QUARANTINE, FETCH_STATE, FEATURES)}
    items, n_items = shards.assign(catalog.read_catalog(spark, cfg), cfg["index.shard_by"], cfg["index.max_shard_size"])
    if n_items == 0:
        raise catalog.CatalogError(
            f"catalog {cfg['catalog.path']} has no rows: refusing to run on an empty feed (nothing was committed)"
        )
    planned = settings_from(cfg)
    version = planned.model_version
    content = catalog.CONTENT_COLUMNS[embed_input]  # image_uri, or title
    fused = planned.title_weight is not None
    null = F.lit(None).cast("string")
    # `title` rides along for fusion (with title input it is the content itself); otherwise it is null
    title = ["title"] if fused or content == "title" else [null.alias("title")]
    items = items.select("item_id", "image_uri", "shard", *title).withColumn(
        "title_sha256", vectors.title_sha(F.col("title"), planned.text_version or "") if fused else null
    )
    catalog_ids = items.select("item_id")
    existing = tables.read(spark, paths[EMBEDDINGS]) if tables.exists(paths[EMBEDDINGS]) else None
    n_existing = 0
    if existing is not None:
        # Before any inference: a feed cut short is refused at once, not after hours of work.
        n_existing = existing.count()
        leaving = existing.select("item_id").join(catalog_ids, "item_id", "left_anti").count()
        _check_removed(leaving, n_existing, max_removed, f"{leaving} of them are no longer in the catalog")
    stored = vectors.stored_features(spark, existing, paths[FEATURES], planned.backbone_version)
    titles = vectors.stored_titles(spark, paths[FEATURES]) if fused else None
    items = _with_vector_history(items, existing, stored, titles, version)
    quarantine_current = _quarantine_current(paths[QUARANTINE])
    items = _with_history(spark, items, paths, embed_input, quarantine_current)
    if retry_failed:  # the quarantined items only; the rest of the tables stays as it is
        items = items.filter(F.col("quarantined"))
        if existing is not None:
            existing = existing.join(items.select("item_id"), "item_id", "left_semi")
    # Counting the work costs a pass over the catalog and its joins; it is needed only when something may
    # wait for its retry time (then the rows are kept for the two branches below) or with --retry-failed.
    has_retry_times = embed_input != "title" and quarantine_current  # only then can anything wait
    waits = has_retry_times and not retry_failed and _any_waiting(spark, paths[QUARANTINE])
    waiting = F.coalesce(F.col("retry_at") > F.current_timestamp(), F.lit(False)) if waits else F.lit(False)
    items = items.withColumn("waiting", waiting)
    if waits:
        items = items.persist(StorageLevel.MEMORY_AND_DISK)
    n_work = items.filter(~F.col("waiting")).count() if waits or retry_failed else n_items
    n_partitions = _partitions(spark, n_work, cfg["embed.partition_size"])
    tasks_at_once = _tasks_at_once(spark, n_partitions)
    settings = settings_from(cfg, tasks_at_once, n_partitions)
    if embed_input != "title" and cfg["fetch.max_connections_per_host"] < tasks_at_once:
        log.warning(
            "fetch.max_connections_per_host=%d is below the %d tasks that run at once: each task keeps one "
            "connection per host, so a host may see %d (docs/fetching.md)",
            cfg["fetch.max_connections_per_host"],
            tasks_at_once,
            tasks_at_once,
        )
    log.info(
        "embed %s: %d catalog items, %d to read%s, model %s, %d partitions",
        run_id,
        n_items,
        n_work,
        " (--retry-failed: quarantined items only)" if retry_failed else "",
        version,
        n_partitions,
    )

    counters = make_counters(spark)
    results = (
        items.filter(~F.col("waiting"))
        .repartition(n_partitions)
        .select(*PASSED, embed_task(settings, counters)(content, *INPUTS).alias("r"))
        .select(*PASSED, "r.*")
    )
    deferred = items.filter(F.col("waiting")).select(
        *PASSED,
        *(
            (F.lit(DEFERRED) if field.name == "status" else F.lit(None)).cast(field.dataType).alias(field.name)
            for field in results.schema.fields[len(PASSED) :]
        ),
    )
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(ARROW_ROWS))
    staged = (results.unionByName(deferred) if waits else results).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        with Progress(f"embed {run_id}", n_work, counters):
            # Runs inference once and keeps its rows; counted from them, not from the accumulators, which a
            # retried task can count twice.
            tally = staged.groupBy(
                "status", vectors.stale().alias("stale"), vectors.title_only(settings).alias("title_only")
            ).agg(F.count("*").alias("n"), F.sum(F.col("fetched").cast("int")).alias("fetched"))
            tallied = tally.collect()
        counts = {name: sum(r["n"] for r in tallied if r["status"] == name) for name in STATUSES}
        rederived = sum(r["n"] for r in tallied if r["stale"])
        title_only = sum(r["n"] for r in tallied if r["title_only"])
        _check_bad_fraction(counts, staged, cfg["embed.max_bad_fraction"], n_items, embed_input)
        if existing is not None:
            gone = _gone(existing, staged, settings).count()
            _check_removed(gone, n_existing, max_removed, "they left the catalog or their images no longer embed")
        fetched = sum(r["fetched"] or 0 for r in tallied)
        _commit(staged, existing, catalog_ids, paths, settings, run_id, fetched, quarantine_current, stored, titles)
    finally:
        staged.unpersist()
        items.unpersist()  # a no-op when it was not persisted

    seconds = time.time() - started
    processed = counts[EMBEDDED] + counts[FAILED] + counts[KEPT]
    if counts[KEPT]:
        log.warning(
            "embed %s: %d items failed transiently and keep their previous embedding (quarantine says why)",
            run_id,
            counts[KEPT],
        )
    if counts[DEFERRED]:
        log.info(
            "embed %s: %d failed http(s) images wait for their retry time (quarantine.next_retry_at); "
            "`lookalike embed --retry-failed` tries them now",
            run_id,
            counts[DEFERRED],
        )
    if processed == 0 and rederived == 0:
        log.info("embed %s: nothing to embed, all %d images unchanged or waiting", run_id, n_items)
    elif rederived:
        log.info("embed %s: %d unchanged images re-derived from their stored backbone vectors", run_id, rederived)
    metrics = {
        "embedded": counts[EMBEDDED],
        "unchanged": counts[UNCHANGED] - rederived,
        "rederived": rederived,  # unchanged bytes given this model's vector from their stored backbone vector
        "title_only": title_only,  # image+title: items whose image failed, embedded by their title alone
        "quarantined": counts[FAILED] + counts[KEPT],
        "kept_after_failure": counts[KEPT],
        "still_quarantined": counts[STILL_FAILED],
        "deferred": counts[DEFERRED],
        "fetched": fetched,
        "http_requests": counters["requests"].value,  # from accumulators: a retried task counts twice
        "http_bytes": counters["bytes"].value,
        "model_loads": counters["model_loads"].value,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 2) if seconds else 0.0,
    }
    log.info("embed %s: %s", run_id, metrics)
    return StageResult("embed", rows_in=n_items, rows_out=counts[EMBEDDED] + rederived, metrics=metrics)

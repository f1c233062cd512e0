"""The `search` command: a table of query images -> `search_results` and `search_errors`.

Queries are embedded on the executors by the embed stage's own UDF (same reading, fetching, decoding, model
and failure kinds, so an unusable query image becomes an error row, never a failed job), with the model of the
latest index build: a config whose model differs is refused before any work. The vectors then come to the
driver, which searches the build with `Searcher.search_vectors` (every shard, or the query's `category`'s
shards), exactly re-ranked. A re-run replaces the rows of its own `query_id`s only, in both tables.

`search.where` (`--where`) is checked before Spark reads anything (syntax) and against the catalog's schema
before any query is embedded (columns); the catalog's columns it names then come to the driver as Arrow for
the searcher's filter (`search.filters`), the same engine a service uses.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema

from lookalike.config import Config
from lookalike.embed import catalog
from lookalike.embed import stage as embed
from lookalike.embed.task import EMBEDDED
from lookalike.errors import LookalikeError
from lookalike.results import StageResult
from lookalike.search import filters
from lookalike.search.searcher import Searcher
from lookalike.storage import tables

log = logging.getLogger(__name__)

RESULTS, ERRORS = "search_results", "search_errors"
NO_SHARD = "no_shard"  # the error kind of a query whose category has no shard in the build


class QueryError(LookalikeError):
    """The query table cannot be used as it is; the message names the problem and example rows."""


def read_queries(spark: SparkSession, path: str, fmt: str) -> DataFrame:
    """`query_id`, `image_uri`, `category`, `k` of the query table, checked: required columns, no null or
    duplicate `query_id`, at least one row."""
    df = catalog.load_table(spark, path, fmt)
    missing = [c for c in ("query_id", "image_uri") if c not in df.columns]
    if missing:
        raise QueryError(f"queries {path} lack required column(s) {missing}; they have {df.columns}")
    df = df.select(
        F.col("query_id").cast("string").alias("query_id"),
        F.col("image_uri").cast("string").alias("image_uri"),
        (F.col("category") if "category" in df.columns else F.lit(None)).cast("string").alias("category"),
        (F.col("k") if "k" in df.columns else F.lit(None)).cast("int").alias("k"),
    )
    checks = df.agg(
        F.count("*").alias("rows"),
        F.sum(F.col("query_id").isNull().cast("int")).alias("null_ids"),
        F.countDistinct("query_id").alias("ids"),
        F.sum((F.col("k") < 1).cast("int")).alias("bad_k"),
    ).first()
    assert checks is not None
    if checks["rows"] == 0:
        raise QueryError(f"queries {path} have no rows: nothing to search (nothing was committed)")
    if checks["null_ids"]:
        raise QueryError(f"queries {path} have {checks['null_ids']} row(s) without query_id")
    if checks["ids"] != checks["rows"]:
        dupes = df.groupBy("query_id").count().filter("count > 1").limit(3).collect()
        raise QueryError(f"queries {path} repeat query_id(s), e.g. {', '.join(repr(r['query_id']) for r in dupes)}")
    if checks["bad_k"]:
        raise QueryError(f"queries {path} have {checks['bad_k']} row(s) with k < 1")
    return df


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    path, root, texts = cfg["search.queries"], cfg["output.root"], cfg["search.text"]
    if (path is None) == (texts is None):
        raise QueryError(
            "give `lookalike search` either --queries PATH (a table of query images) or --text WORDS, not "
            + ("both" if path is not None else "neither")
        )
    where = cfg["search.where"]
    if where is not None:
        filters.check_syntax(where)
    searcher = Searcher.open(root, cfg["model.weights"], with_model=False, catalog=_filter_columns(cfg, spark, where))
    if texts is not None:
        return _run_text(cfg, spark, run_id, searcher, texts, started)
    settings = embed.settings_from(cfg)
    version = settings.model_version
    if settings.input == "title" or version != searcher.model:
        raise QueryError(
            f"index build {searcher.build} was embedded with {searcher.model!r}, this config embeds queries with "
            f"{version!r}: set model.* and embed.image_size as for that build"
        )
    queries = read_queries(spark, path, cfg["search.queries_format"])
    n_queries = queries.count()
    partitions = max(1, min(n_queries, 2 * spark.sparkContext.defaultParallelism))
    counters = embed.make_counters(spark)
    udf = embed.embed_task(embed.settings_from(cfg, partitions, partitions), counters)
    nulls = [F.lit(None).cast(dtype) for dtype in embed.INPUTS.values()]  # queries have no history
    rows = (
        queries.repartition(partitions)
        .select("query_id", "image_uri", "category", "k", udf("image_uri", *nulls).alias("r"))
        .select("query_id", "image_uri", "category", "k", "r.status", "r.embedding", "r.error_kind", "r.error_message")
        .toPandas()
    )
    found, errors = _search(searcher, rows, cfg["search.k"], cfg["index.shard_by"], where)
    found["duplicate"] = found["score"] >= cfg["search.duplicate_score"]
    results = spark.createDataFrame(found.assign(run_id=run_id), schema=RESULTS_SCHEMA)
    failed = spark.createDataFrame(errors.assign(run_id=run_id), schema=ERRORS_SCHEMA)
    ok_ids = spark.createDataFrame(found[["query_id"]].drop_duplicates(), "query_id string")
    _commit(spark, root, results, failed, ok_ids, cfg["search.duplicate_score"])
    metrics = {
        "queries": n_queries,
        "answered": int(found["query_id"].nunique()),
        "failed": len(errors),
        "duplicates": int(found["duplicate"].sum()),
        "seconds": round(time.time() - started, 3),
    }
    log.info("search %s against build %s: %s", run_id, searcher.build, metrics)
    return StageResult("search", rows_in=n_queries, rows_out=len(found), metrics=metrics)


TEXT_PREFIX = "text:"  # the query_id of a text search is this and the text


def _run_text(
    cfg: Config, spark: SparkSession, run_id: str, searcher: Searcher, texts: list[str], started: float
) -> StageResult:
    """`--text`: each text as `Searcher.search_text` searches it, on the driver, committed like image queries."""
    query_ids = [f"{TEXT_PREFIX}{text}" for text in texts]
    found = []
    for text, query_id in zip(texts, query_ids):  # a blank text is a SearchError before anything is committed
        hits = searcher.search_text(text, cfg["search.k"], cfg["search.where"])
        found += [dict(query_id=query_id, rank=r, item_id=h.item_id, score=h.score) for r, h in enumerate(hits, 1)]
        shown = ", ".join(f"{h.item_id} ({h.score:.3f})" for h in hits[:5])
        log.info("search %r: %s%s", text, shown, ", ..." if len(hits) > 5 else "")
    rows = pd.DataFrame(found, columns=["query_id", "rank", "item_id", "score"])
    rows["duplicate"] = False  # a text is no image: nothing can be a copy of it
    results = spark.createDataFrame(rows.assign(run_id=run_id), schema=RESULTS_SCHEMA)
    ids = spark.createDataFrame(pd.DataFrame({"query_id": query_ids}), "query_id string")
    no_errors = spark.createDataFrame([], ERRORS_SCHEMA)
    _commit(spark, cfg["output.root"], results, no_errors, ids, cfg["search.duplicate_score"])
    metrics = {"queries": len(texts), "answered": len(texts), "seconds": round(time.time() - started, 3)}
    log.info("search %s (text) against build %s: %s", run_id, searcher.build, metrics)
    return StageResult("search", rows_in=len(texts), rows_out=len(rows), metrics=metrics)


def _commit(
    spark: SparkSession,
    root: str,
    results: DataFrame,
    failed: DataFrame,
    answered: DataFrame,
    duplicate_score: float,
) -> None:
    """This run's rows replace its query ids' rows in both tables: answered ids leave `search_errors`,
    failed ones leave `search_results`."""
    _add_duplicate_flags(spark, tables.table_path(root, RESULTS), duplicate_score)
    tables.replace_by_key(results, tables.table_path(root, RESULTS), "query_id", delete_keys=failed.select("query_id"))
    tables.replace_by_key(failed, tables.table_path(root, ERRORS), "query_id", delete_keys=answered)


RESULTS_SCHEMA = "query_id string, rank int, item_id string, score float, duplicate boolean, run_id string"


def _add_duplicate_flags(spark: SparkSession, path: str, duplicate_score: float) -> None:
    """A `search_results` written before the `duplicate` flag gets it, computed from its scores, in one commit."""
    if tables.exists(path) and "duplicate" not in tables.spark_schema(path).fieldNames():
        old = tables.read(spark, path).withColumn("duplicate", F.col("score") >= duplicate_score)
        columns = [field.split()[0] for field in RESULTS_SCHEMA.split(", ")]
        tables.write(old.select(*columns), path, mode="overwrite", replace_schema=True)


ERRORS_SCHEMA = "query_id string, image_uri string, error_kind string, error_message string, run_id string"


def _filter_columns(cfg: Config, spark: SparkSession, where: str | None) -> pa.Table | None:
    """The catalog columns `where` names, as Arrow, once the predicate binds to the catalog's schema."""
    if where is None:
        return None
    items = catalog.load_table(spark, cfg["catalog.path"], cfg["catalog.format"])
    columns = filters.referenced_columns(where, items.columns)
    if filters.ID_COLUMN not in items.columns:
        raise QueryError(f"catalog {cfg['catalog.path']} has no item_id column to filter on")
    subset = items.select(*columns)
    filters.CatalogFilter(to_arrow_schema(subset.schema).empty_table()).check(where)
    return subset.toArrow()


def _search(
    searcher: Searcher, rows: pd.DataFrame, default_k: int, shard_by: str, where: str | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Result rows (query_id, rank, item_id, score) and error rows (query_id, image_uri, kind, message)."""
    found: list[dict] = []
    errors = [rows.loc[rows["status"] != EMBEDDED, ["query_id", "image_uri", "error_kind", "error_message"]]]
    good = rows[rows["status"] == EMBEDDED]
    shards = searcher.shards
    # Queries that share a category and k are searched together: one FAISS call per group and shard.
    for (category, k), group in good.groupby([good["category"].fillna(""), good["k"].fillna(default_k)]):
        chosen = None if category == "" else [s for s in shards if s == category or s.startswith(f"{category}#")]
        if chosen == []:
            errors.append(
                group.assign(
                    error_kind=NO_SHARD,
                    error_message=f"no shard for {shard_by} {category!r} in index build {searcher.build}",
                )[["query_id", "image_uri", "error_kind", "error_message"]]
            )
            continue
        vectors = searcher.image_queries(np.stack(group["embedding"].to_numpy()).astype(np.float32))
        for query_id, hits in zip(group["query_id"], searcher.search_vectors(vectors, int(k), chosen, where)):
            found += [dict(query_id=query_id, rank=r, item_id=h.item_id, score=h.score) for r, h in enumerate(hits, 1)]
    return pd.DataFrame(found, columns=["query_id", "rank", "item_id", "score"]), pd.concat(errors, ignore_index=True)

"""Reading the catalog: any of parquet, csv, json or delta, checked and normalised to the contract columns.

The catalog is the one input the whole night depends on, so its problems stop the run before any work is
done, with examples: a missing required column, null or duplicate `item_id`s. Problems of single rows that
the rest of the catalog can live without (a null or unreadable `image_uri`, an empty title) are left to the
embed stage, which quarantines them and goes on.

Which columns are required follows `embed.input`: `image_uri` when images are embedded, `title` when titles
are (a catalog without images then reads with a null `image_uri`).
"""

from __future__ import annotations

import posixpath

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lookalike.config import Config
from lookalike.embed.fetcher import FetchSettings, task_share
from lookalike.embed.reader import ImagePolicy
from lookalike.errors import LookalikeError
from lookalike.storage import tables

# The column the embed stage reads, by `embed.input`: the catalog must have it, as well as `item_id`.
CONTENT_COLUMNS = {"image": "image_uri", "title": "title", "image+title": "image_uri"}
# Optional contract columns: their type, and the value a row without one gets (no stock flag = in stock).
OPTIONAL_COLUMNS = {"category": ("string", None), "title": ("string", None), "in_stock": ("boolean", True)}
COLUMNS = ("item_id", "image_uri", *OPTIONAL_COLUMNS)
_URI_SCHEME = r"^[A-Za-z][A-Za-z0-9+.\-]*:"
_EXAMPLES = 5


class CatalogError(LookalikeError, ValueError):
    """The catalog cannot be used as it is; the message names the problem and example rows."""


def catalog_folder(catalog_path: str) -> str:
    """The folder a catalog sits in: relative image URIs are relative to it, as they are in a dataset dump."""
    return posixpath.dirname(catalog_path.rstrip("/"))


def image_policy(cfg: Config) -> ImagePolicy:
    """Where this catalog's images may come from: under its own folder for relative URIs, and under
    `catalog.image_roots` when set (see `lookalike.embed.reader`)."""
    return ImagePolicy.of(catalog_folder(cfg["catalog.path"]), cfg["catalog.image_roots"])


def fetch_settings(cfg: Config, tasks_at_once: int = 1, partitions: int = 1) -> FetchSettings:
    """How this catalog's http(s) images are fetched by each of `tasks_at_once` concurrent tasks, out of
    `partitions`: the `fetch.*` keys, the per-host budget split among the tasks (`fetcher.task_share`)."""
    requests_per_s, connections = task_share(
        cfg["fetch.max_requests_per_host_per_s"], cfg["fetch.max_connections_per_host"], tasks_at_once
    )
    return FetchSettings(
        requests_per_s=requests_per_s,
        connections=connections,
        timeout_s=cfg["fetch.timeout_s"],
        retries=cfg["fetch.retries"],
        concurrency=cfg["fetch.concurrency"],
        max_redirects=cfg["fetch.max_redirects"],
        user_agent=cfg["fetch.user_agent"],
        ca_bundle=cfg["fetch.ca_bundle"],
        partitions=partitions,
    )


def resolve_uri(uri: Column, base: str) -> Column:
    """Absolute paths and URIs stay as they are; relative paths are joined to `base`."""
    absolute = uri.startswith("/") | uri.rlike(_URI_SCHEME)
    return F.when(uri.isNull() | (F.trim(uri) == "") | absolute, uri).otherwise(
        F.concat(F.lit(base.rstrip("/") + "/"), uri)
    )


def load_table(spark: SparkSession, path: str, fmt: str) -> DataFrame:
    """A parquet, csv (with a header), json or Delta table, as the catalog and query tables are read."""
    if fmt == "delta":
        return tables.read(spark, path)
    reader = spark.read.format(fmt)
    if fmt == "csv":
        reader = reader.option("header", "true")
    return reader.load(path)


def validate(
    df: DataFrame,
    source: str,
    keep: tuple[str, ...] = (),
    embed_input: str = "image",
    keep_from: str = "index.shard_by",
) -> DataFrame:
    """Check the contract of a raw catalog frame and return it with exactly COLUMNS, typed.

    `keep` names further columns a stage needs as they are (the shard column, when it is not a contract one),
    which the config key `keep_from` asked for.
    `embed_input` (`embed.input`) decides whether `image_uri` or `title` is required; the other may be absent.
    """
    required = ("item_id", CONTENT_COLUMNS[embed_input])
    missing = [c for c in required if c not in df.columns]
    if missing:
        why = f" (embed.input is {embed_input!r})" if embed_input != "image" else ""
        raise CatalogError(f"catalog {source} lacks required column(s) {missing}{why}; it has {df.columns}")
    extra = [c for c in keep if c not in COLUMNS]
    absent = [c for c in extra if c not in df.columns]
    if absent:
        raise CatalogError(f"catalog {source} lacks column(s) {absent} named by {keep_from}; it has {df.columns}")
    df = df.select(
        F.col("item_id").cast("string").alias("item_id"),
        (F.col("image_uri") if "image_uri" in df.columns else F.lit(None)).cast("string").alias("image_uri"),
        *[
            F.coalesce(
                (F.col(name) if name in df.columns else F.lit(None)).cast(dtype), F.lit(default).cast(dtype)
            ).alias(name)
            for name, (dtype, default) in OPTIONAL_COLUMNS.items()
        ],
        *extra,
    )
    # One aggregation finds both problems on the happy path: rows without an id group under a null key.
    blank = F.col("item_id").isNull() | (F.trim("item_id") == "")
    keys = df.withColumn("item_id", F.when(blank, F.lit(None)).otherwise(F.col("item_id")))
    bad = (
        keys.groupBy("item_id")
        .count()
        .filter(F.col("item_id").isNull() | (F.col("count") > 1))
        .orderBy(F.col("item_id").isNotNull(), F.desc("count"), "item_id")
        .limit(_EXAMPLES)
        .collect()
    )
    if bad and bad[0]["item_id"] is None:
        content = CONTENT_COLUMNS[embed_input]
        examples = ", ".join(repr(r[content]) for r in df.filter(blank).limit(_EXAMPLES).collect())
        raise CatalogError(f"catalog {source} has rows without item_id, e.g. {content} {examples}")
    if bad:
        total = df.groupBy("item_id").count().filter("count > 1").count()
        examples = ", ".join(f"{r['item_id']!r} (x{r['count']})" for r in bad)
        raise CatalogError(f"catalog {source} has {total} duplicate item_id(s), e.g. {examples}")
    return df


def read_catalog(spark: SparkSession, cfg: Config) -> DataFrame:
    """The validated catalog with relative image URIs resolved against the catalog's folder."""
    path, fmt = cfg["catalog.path"], cfg["catalog.format"]
    raw = load_table(spark, path, fmt)
    df = validate(raw, source=path, keep=(cfg["index.shard_by"],), embed_input=cfg["embed.input"])
    return df.withColumn("image_uri", resolve_uri(F.col("image_uri"), catalog_folder(path)))

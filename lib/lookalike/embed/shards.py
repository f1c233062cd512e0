"""Shard assignment: which index shard each catalog item belongs to, and the shard's folder name.

Shards follow a catalog column (`index.shard_by`, default `category`) because shoppers compare within a
category and because a category-sized index fits one task. A value with more than `index.max_shard_size`
items is split into hash sub-shards (`Bag#00`, `Bag#01`, ...) so that no single task must hold too many
vectors; the hash of `item_id` keeps an item in the same sub-shard night after night.
"""

from __future__ import annotations

import hashlib
import math
import re

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

NO_VALUE = "(none)"  # shard of items whose shard column is null or empty
_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def folder_name(shard: str) -> str:
    """A safe, unique file name for a shard: readable slug plus a short hash of the exact value.

    The hash keeps distinct values apart after slugging ("T-shirt/top" and "T-shirt top" both slug to
    "t-shirt_top").
    """
    slug = _UNSAFE.sub("_", shard.lower()).strip("._")[:60] or "shard"
    return f"{slug}-{hashlib.sha1(shard.encode()).hexdigest()[:8]}"


def _shard_value(column: str) -> Column:
    value = F.trim(F.col(column).cast("string"))
    return F.when(value.isNull() | (value == ""), F.lit(NO_VALUE)).otherwise(value)


def assign(catalog: DataFrame, shard_by: str, max_shard_size: int) -> tuple[DataFrame, int]:
    """The catalog with a `shard` column (the `shard_by` value, or value#NN when the value is too big), and
    the number of catalog items.

    The per-value sizes are collected on the driver (one row per value: categories, not items), so the split
    is a literal map in the plan rather than a join, and the item count comes with them instead of costing
    another pass over the catalog.
    """
    base = catalog.withColumn("_shard_base", _shard_value(shard_by))
    sizes = {row["_shard_base"]: row["count"] for row in base.groupBy("_shard_base").count().collect()}
    parts = {value: math.ceil(n / max_shard_size) for value, n in sizes.items() if n > max_shard_size}
    shard = F.col("_shard_base")
    if parts:
        n_parts = F.create_map(*[F.lit(x) for pair in sorted(parts.items()) for x in pair])[shard]
        shard = F.when(n_parts.isNull(), shard).otherwise(
            F.format_string("%s#%02d", shard, F.pmod(F.xxhash64("item_id"), n_parts))
        )
    return base.withColumn("shard", shard).drop("_shard_base"), sum(sizes.values())


def with_folder(spark: SparkSession, frame: DataFrame, names: list[str]) -> DataFrame:
    """`frame`'s rows of the shards `names`, with `shard_dir`, each shard's `folder_name`, so that staged
    folders match what the tasks look for (a broadcast join with the few shard names, not a Python UDF over
    every row)."""
    folders = spark.createDataFrame([(name, folder_name(name)) for name in names], "shard string, shard_dir string")
    return frame.join(F.broadcast(folders), "shard")

"""Per-user incremental recommend: which users a run must recompute, and the state that tells it.

A user's list depends on their own history (its items, their relative weights and vectors, what they
excluded), on the co-visitation lists of their history's items, on the candidates their interests can reach,
on the stock of all of these, and (for users filled with popular items) on the popular list. After each run
the stage records, per user, a digest of their history, the history items themselves, the items on their
list, their interests (vector and searched shards) and the score a newcomer must reach to enter the list
(`scoring.entry_score`); per item, a key that changes whenever its vector, shard or eligibility does; each
item's co-visitation list; the popular list. The next run recomputes exactly the users for whom one of
these changed:

- new users, and users whose history digest changed (weights compared relative to the user's heaviest
  item: decay scales every weight by the same factor when newer events arrive, which changes no list);
- users with a changed item in their history or on their list, or an item whose co-visitation list changed
  in their history;
- users whose history is co-visited with a changed item (it may now enter, or leave, as a co-visited one);
- users one of whose interests searches a changed item's shard where `scoring.could_enter` says the item
  could reach the list;
- users filled with popular items, when the popular list changed.

Users whose events are gone are deleted. Kept lists keep their `run_id`. One thing is not tracked: the
index's approximate candidate sets of unchanged users, which a rebuilt shard may shift slightly; a
run with `recommend.incremental: false` recomputes everyone. When more than `MAX_DIRTY_SHARE` of the users
must be recomputed, or more than `MAX_CHANGED_ITEMS` items changed, everyone is (it is cheaper than the
bookkeeping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from lookalike import distributor
from lookalike.index import shard_index
from lookalike.recommend.scoring import could_enter
from lookalike.storage import files

log = logging.getLogger(__name__)

MAX_DIRTY_SHARE = 0.5
"""Above this share of users to recompute, a run recomputes everyone."""
MAX_CHANGED_ITEMS = 100_000
"""Above this many changed items (their vectors go to every check's closure), a run recomputes everyone."""
PARTS = ("users", "profiles", "items", "covisits")
"""The state's datasets, each a Parquet folder under `<output.root>/state/recommendations/<run_id>/`."""
DIRTY_SCHEMA = pa.schema([("user_id", pa.string())])


@dataclass(frozen=True)
class State:
    """Where the previous run's per-user and per-item state lives (one folder per dataset) and its popular
    list (item ids and relative scores)."""

    folders: dict[str, str]
    popular: list[list]

    def read(self, spark: SparkSession, part: str) -> DataFrame:
        return spark.read.parquet(self.folders[part])


def folder(output_root: str, run_id: str, part: str) -> str:
    return f"{output_root.rstrip('/')}/state/recommendations/{run_id}/{part}"


def remove_unused(output_root: str, used: Iterable[str]) -> None:
    """Delete the state folders the current state does not point at: old or crashed runs', and the parts of
    a run whose other parts are still used (its co-visitation lists, carried over while events stay)."""
    root = f"{output_root.rstrip('/')}/state/recommendations"
    used = {path.rstrip("/") for path in used}
    for run in files.list_dirs(root):
        parts = [f"{root}/{run}/{part}" for part in files.list_dirs(f"{root}/{run}")]
        if not any(part in used for part in parts):
            files.remove_dir(f"{root}/{run}")
            continue
        for part in parts:
            if part not in used:
                files.remove_dir(part)


def item_keys(embeddings: DataFrame, eligible: DataFrame) -> DataFrame:
    """(item_id, key): what makes an item's vector, shard and eligibility; a change in any changes the key."""
    flagged = embeddings.join(eligible.select("item_id", F.lit("in").alias("_in")), "item_id", "left")
    key = F.concat_ws("|", "shard", "run_id", F.col("embedded_at").cast("string"), F.coalesce("_in", F.lit("out")))
    return flagged.select("item_id", key.alias("key"))


def user_digests(users: DataFrame, pairs: DataFrame) -> DataFrame:
    """(user_id, digest) for every user with events: a digest of every (item, weight relative to the user's
    heaviest, excluded) they have ("" for users none of whose events has a weight)."""
    top = pairs.groupBy("user_id").agg(F.max("weight").alias("_top"))
    rows = F.struct("item_id", F.round(F.col("weight") / F.col("_top"), 9).alias("w"), "excluded")
    digests = (
        pairs.join(top, "user_id")
        .groupBy("user_id")
        .agg(F.sha2(F.to_json(F.sort_array(F.collect_list(rows))), 256).alias("digest"))
    )
    return users.join(digests, "user_id", "left").fillna("", ["digest"])


def _covisit_digests(covisits: DataFrame) -> DataFrame:
    rows = F.struct("other_id", F.round("covisit", 6).alias("c"))
    return covisits.groupBy("item_id").agg(F.sha2(F.to_json(F.sort_array(F.collect_list(rows))), 256).alias("digest"))


def _differ(now: DataFrame, before: DataFrame, key: str, value: str) -> DataFrame:
    """Keys whose value differs between two (key, value) frames, or that only one holds."""
    joined = now.withColumnRenamed(value, "_now").join(before.withColumnRenamed(value, "_before"), key, "full")
    return joined.filter(~F.col("_now").eqNullSafe(F.col("_before"))).select(key)


def changed_items(items_now: DataFrame, state: State, spark: SparkSession) -> DataFrame:
    """Items added, removed or whose vector, shard or eligibility changed since the state's run."""
    return _differ(items_now, state.read(spark, "items"), "item_id", "key")


def reach_task(
    vectors: np.ndarray, shards: list[str], covisit_weight: float, dim: int
) -> Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The `mapInArrow` body of the visual check: recorded profile rows sorted by user, each with the user's
    entry score -> the users whom a changed item could reach (`scoring.could_enter`)."""

    def reach(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for table, bounds in distributor.key_groups(batches, "user_id"):
            users = table.column("user_id").to_pylist()
            interests = shard_index.matrix(table.column("vector"), dim)
            targets = table.column("targets").to_pylist()
            entry = table.column("entry").to_numpy()
            hit = [
                users[a]
                for a, b in zip(bounds[:-1], bounds[1:])
                if could_enter(interests[a:b], targets[a:b], float(entry[a]), vectors, shards, covisit_weight)
            ]
            yield pa.record_batch([pa.array(hit, pa.string())], schema=DIRTY_SCHEMA)

    return reach


def dirty_users(
    spark: SparkSession,
    state: State,
    digests: DataFrame,
    changed: DataFrame,
    fresh: tuple[np.ndarray, list[str]],
    covisits: DataFrame,
    covisit_changes: DataFrame | None,
    popular_changed: bool,
    covisit_weight: float,
    partitions: int,
) -> tuple[DataFrame, DataFrame]:
    """(users to recompute, users to delete), each a one-column `user_id` frame (module docstring)."""
    users = state.read(spark, "users")
    gone = users.select("user_id").join(digests, "user_id", "left_anti")
    reasons = [
        _differ(digests, users.select("user_id", "digest"), "user_id", "digest").join(gone, "user_id", "left_anti")
    ]
    touched = changed if covisit_changes is None else changed.unionByName(covisit_changes)
    history = users.select("user_id", F.explode("history").alias("item_id"))
    reasons.append(history.join(touched, "item_id", "left_semi").select("user_id"))
    listed = users.select("user_id", F.explode("listed").alias("item_id"))
    reasons.append(listed.join(changed, "item_id", "left_semi").select("user_id"))
    co_visited = covisits.join(changed.withColumnRenamed("item_id", "other_id"), "other_id", "left_semi")
    reasons.append(history.join(co_visited.select("item_id"), "item_id", "left_semi").select("user_id"))
    if popular_changed:
        reasons.append(users.filter("filled").select("user_id"))
    vectors, shards = fresh
    if len(shards):
        profiles = state.read(spark, "profiles").join(users.select("user_id", "entry"), "user_id")
        dim = vectors.shape[1]
        reasons.append(
            distributor.by_key(profiles, partitions, "user_id", "interest").mapInArrow(
                reach_task(vectors, shards, covisit_weight, dim), from_arrow_schema(DIRTY_SCHEMA)
            )
        )
    dirty = reasons[0]
    for more in reasons[1:]:
        dirty = dirty.unionByName(more)
    return dirty.distinct(), gone


def covisit_changes(covisits: DataFrame, state: State, spark: SparkSession) -> DataFrame:
    """Items whose co-visitation list (neighbours or their scores) changed since the state's run."""
    return _differ(_covisit_digests(covisits), _covisit_digests(state.read(spark, "covisits")), "item_id", "digest")

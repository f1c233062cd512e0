"""Interaction events -> weighted user histories, item popularity and co-visitation, all in Spark.

Every event gets a weight: its `event_type`'s weight (`recommend.event_weights`) halved every
`recommend.half_life_days` of age. Age is counted from the newest event in the data, not the wall clock, so
re-running on the same events gives the same table. A user's history is one row per (user, item) with the
summed weight. Two limits bound the work per user whatever a heavy user or a bot does: the
`recommend.history_limit` heaviest (most recent among equals) items shape the user's taste and candidates,
and the `recommend.covisit_history` heaviest feed co-visitation. The first is short because recent intent
predicts the next interaction best; the second long because co-visitation learns from everyone's pairs.
On MovieLens-100K (benchmarks/recommend_quality.py) 10 and 200 gave HR@10 0.155 where 50 for both gave 0.094.

Co-visitation counts how often two items share a history, each user's pairs damped by 1 / log2(2 + history
length) (a user who touched everything says little about any pair) and each count divided by
sqrt(users of i * users of j), the usual cosine damping that stops best-sellers being everyone's neighbour.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from lookalike.errors import LookalikeError

EVENT_COLUMNS = {"user_id": "string", "item_id": "string", "event_type": "string", "ts": "timestamp"}
SECONDS_PER_DAY = 86_400.0


class EventsError(LookalikeError):
    """The events table cannot be used: missing or mistyped columns."""


def read_events(spark: SparkSession, path: str) -> DataFrame:
    """The events Parquet at `path`, checked (`validate`)."""
    try:
        events = spark.read.parquet(path)
    except AnalysisException as err:
        if "TIMESTAMP(NANOS" in str(err):
            raise EventsError(
                f"events {path}: ts is stored in nanoseconds, which Spark cannot read; write it in "
                "microseconds (pandas: to_parquet(..., coerce_timestamps='us', "
                "allow_truncated_timestamps=True))"
            ) from err
        raise EventsError(f"events {path}: cannot be read as Parquet: {str(err).splitlines()[0]}") from err
    return validate(events, path)


def validate(events: DataFrame, source: str) -> DataFrame:
    """The contract's four columns, typed; nulls in any of them make the event unusable and it is dropped."""
    types = dict(events.dtypes)
    missing = [name for name in EVENT_COLUMNS if name not in types]
    if missing:
        raise EventsError(f"events {source}: missing column(s) {', '.join(missing)} (need {', '.join(EVENT_COLUMNS)})")
    if types["ts"] not in ("timestamp", "timestamp_ntz", "date"):
        raise EventsError(f"events {source}: column ts is {types['ts']}, expected a timestamp")
    return events.select(*(F.col(name).cast(kind).alias(name) for name, kind in EVENT_COLUMNS.items())).dropna()


def weighted(events: DataFrame, weights: Mapping[str, float], half_life_days: float | None) -> DataFrame:
    """Events with a `weight` column; event types without a weight are dropped (the caller logs them)."""
    mapping = F.create_map(*(F.lit(x) for pair in sorted(weights.items()) for x in pair))
    typed = events.withColumn("type_weight", mapping[F.col("event_type")]).filter(F.col("type_weight") > 0)
    if half_life_days is None:
        return typed.withColumn("weight", F.col("type_weight").cast("double"))
    newest = typed.agg(F.max("ts").alias("newest"))
    age_days = (F.col("newest").cast("double") - F.col("ts").cast("double")) / SECONDS_PER_DAY
    return (
        typed.crossJoin(F.broadcast(newest))
        .withColumn(
            "weight", F.col("type_weight") * F.pow(F.lit(0.5), F.greatest(age_days, F.lit(0.0)) / F.lit(half_life_days))
        )
        .drop("newest")
    )


def user_items(events: DataFrame, exclude_types: Iterable[str]) -> DataFrame:
    """One row per (user, item): summed `weight`, and `excluded` when any of its events has a type that
    must never be recommended back (a purchase, by default)."""
    excluded = F.max(F.col("event_type").isin(list(exclude_types)).cast("int")) == 1
    return events.groupBy("user_id", "item_id").agg(
        F.sum("weight").alias("weight"), excluded.alias("excluded"), F.max("ts").alias("last_ts")
    )


def limit_history(pairs: DataFrame, limit: int) -> DataFrame:
    """Each user's `limit` heaviest items, the most recent first among equal weights (without decay every
    view weighs the same, and what a user touched last says most about what they want next)."""
    heaviest = Window.partitionBy("user_id").orderBy(F.desc("weight"), F.desc("last_ts"), "item_id")
    return pairs.withColumn("_n", F.row_number().over(heaviest)).filter(F.col("_n") <= limit).drop("_n")


def popularity(events: DataFrame) -> DataFrame:
    """(item_id, popularity): the summed event weights of every user."""
    return events.groupBy("item_id").agg(F.sum("weight").alias("popularity"))


def covisitation(history: DataFrame, neighbours: int) -> DataFrame:
    """(item_id, other_id, covisit): each item's `neighbours` most co-visited items (module docstring)."""
    sized = history.withColumn("damp", 1.0 / F.log2(2.0 + F.count("*").over(Window.partitionBy("user_id"))))
    left = sized.select("user_id", "item_id", "damp")
    right = sized.select("user_id", F.col("item_id").alias("other_id"))
    pairs = (
        left.join(right, "user_id")
        .filter(F.col("item_id") != F.col("other_id"))
        .groupBy("item_id", "other_id")
        .agg(F.sum("damp").alias("count"))
    )
    users = history.groupBy("item_id").agg(F.count("*").alias("users"))
    scored = (
        pairs.join(users, "item_id")
        .join(users.select(F.col("item_id").alias("other_id"), F.col("users").alias("other_users")), "other_id")
        .withColumn("covisit", F.col("count") / F.sqrt(F.col("users") * F.col("other_users")))
    )
    best = Window.partitionBy("item_id").orderBy(F.desc("covisit"), "other_id")
    return (
        scored.withColumn("_n", F.row_number().over(best))
        .filter(F.col("_n") <= neighbours)
        .select("item_id", "other_id", "covisit")
    )


def covisit_candidates(history: DataFrame, covisits: DataFrame, per_user: int, because: int) -> DataFrame:
    """(user_id, item_id, covisit, covisit_because, covisit_contrib): items co-visited with a user's history,
    scored by sum over history items h of weight(h) * covisit(h, item); the `per_user` best per user, each
    with the `because` history items that contributed most and their contributions."""
    contributions = (
        history.select("user_id", F.col("item_id").alias("source"), "weight")
        .join(covisits.withColumnRenamed("item_id", "source"), "source")
        .select(
            "user_id", F.col("other_id").alias("item_id"), "source", (F.col("weight") * F.col("covisit")).alias("part")
        )
    )
    ranked = F.sort_array(F.collect_list(F.struct((-F.col("part")).alias("neg"), "source")))
    grouped = contributions.groupBy("user_id", "item_id").agg(
        F.sum("part").alias("covisit"), F.slice(ranked, 1, because).alias("top")
    )
    best = Window.partitionBy("user_id").orderBy(F.desc("covisit"), "item_id")
    return (
        grouped.withColumn("_n", F.row_number().over(best))
        .filter(F.col("_n") <= per_user)
        .select(
            "user_id",
            "item_id",
            F.col("covisit").cast("float"),
            F.col("top.source").alias("covisit_because"),
            F.transform("top.neg", lambda x: (-x).cast("float")).alias("covisit_contrib"),
        )
    )

"""Interaction events -> weighted user histories, item popularity and co-visitation, in Spark (co-visitation's
pair counting and ranking in NumPy inside its tasks, `covisit`).

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

import json
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from lookalike import distributor
from lookalike.errors import LookalikeError
from lookalike.recommend import covisit
from lookalike.storage.uri import filesystem

EVENT_COLUMNS = {"user_id": "string", "item_id": "string", "event_type": "string", "ts": "timestamp"}
SECONDS_PER_DAY = 86_400.0
TIMESTAMP_TYPES = ("timestamp", "timestamp_ntz", "date")
INTEGER_TYPES = ("tinyint", "smallint", "int", "bigint")
# An integer ts counts seconds, milliseconds, microseconds or nanoseconds since 1970; which one is told by its
# size. Dates from 1973-03-03 (10^8 s) to 2286-11-20 (10^10 s) give four ranges a factor of 10 apart, so a
# column whose smallest and largest values fall in one range has one reading; anything else is refused.
EPOCH_UNITS = {"seconds": 1, "milliseconds": 10**3, "microseconds": 10**6, "nanoseconds": 10**9}
EPOCH_SECONDS = (10**8, 10**10)
# Spark refuses INT64 TIMESTAMP(NANOS) Parquet (pandas' default) unless this reads it as its integer value.
NANOS_AS_LONG = "spark.sql.legacy.parquet.nanosAsLong"
NANOS = "timestamp(nanoseconds)"
PAIR_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("other_id", pa.string()), ("count", pa.float64()), ("users", pa.int64())]
)
COVISIT_SCHEMA = pa.schema([("item_id", pa.string()), ("other_id", pa.string()), ("covisit", pa.float64())])


class EventsError(LookalikeError):
    """The events table cannot be used: missing or mistyped columns, or a ts that is no point in time."""


def read_events(spark: SparkSession, path: str) -> DataFrame:
    """The events Parquet at `path`, checked (`validate`).

    Nanosecond timestamps are what pandas writes by default, and Spark cannot read them as timestamps. Their
    schema is then inferred with `spark.sql.legacy.parquet.nanosAsLong` in a separate session (so no other
    read of this session changes), the files are read with that schema, and `validate` turns the integer
    nanoseconds into timestamps.
    """
    nanos = _ts_in_nanoseconds(path)
    try:
        if nanos:
            inferring = spark.newSession()
            inferring.conf.set(NANOS_AS_LONG, "true")
            events = spark.read.schema(inferring.read.parquet(path).schema).parquet(path)
        else:
            events = spark.read.parquet(path)
    except AnalysisException as err:
        raise EventsError(f"events {path}: cannot be read as Parquet: {str(err).splitlines()[0]}") from err
    return validate(events, path, epoch_unit="nanoseconds" if nanos else None)


def _ts_in_nanoseconds(path: str) -> bool:
    """Whether ts is stored as INT64 nanosecond timestamps, from the Parquet footers (no data is read).

    When the first file's is, every file's must be: read as integers, microseconds in another file would
    silently become dates in 1970.
    """
    fs, local = filesystem(path)
    try:
        fragments = list(ds.dataset(local, filesystem=fs, format="parquet").get_fragments())
        if not fragments or _ts_storage(fragments[0]) != NANOS:
            return False
        for fragment in fragments[1:]:
            storage = _ts_storage(fragment)
            if storage != NANOS:
                raise EventsError(
                    f"events {path}: ts is a {NANOS} in {fragments[0].path} but {storage} in {fragment.path}; "
                    "write it the same way in every file"
                )
    except (OSError, pa.ArrowException) as err:
        raise EventsError(f"events {path}: cannot be read as Parquet: {str(err).splitlines()[0]}") from err
    return True


def _ts_storage(fragment: ds.ParquetFileFragment) -> str:
    """How one file stores ts: `timestamp(<unit>)` for a Parquet timestamp, else its physical type (INT96,
    Spark's legacy timestamps, which pyarrow also calls nanoseconds, is not one), or `no ts column`."""
    schema = fragment.metadata.schema
    for column in (schema.column(i) for i in range(len(schema))):
        if column.path == "ts":
            logical = json.loads(column.logical_type.to_json())
            if column.physical_type == "INT64" and logical.get("Type") == "Timestamp":
                return f"timestamp({logical['timeUnit']})"
            return str(column.physical_type)
    return "no ts column"


def validate(events: DataFrame, source: str, epoch_unit: str | None = None) -> DataFrame:
    """The contract's four columns, typed; nulls in any of them make the event unusable and it is dropped.

    An integer ts is an epoch in `epoch_unit` when the caller knows it (a Parquet nanosecond timestamp), else
    in the unit its size tells (`EPOCH_UNITS`)."""
    types = dict(events.dtypes)
    missing = [name for name in EVENT_COLUMNS if name not in types]
    if missing:
        raise EventsError(f"events {source}: missing column(s) {', '.join(missing)} (need {', '.join(EVENT_COLUMNS)})")
    if types["ts"] in INTEGER_TYPES:
        events = events.withColumn("ts", _epoch_timestamp(events, source, epoch_unit))
    elif types["ts"] not in TIMESTAMP_TYPES:
        raise EventsError(f"events {source}: column ts is {types['ts']}, expected a timestamp or an integer epoch")
    return events.select(*(F.col(name).cast(kind).alias(name) for name, kind in EVENT_COLUMNS.items())).dropna()


def _epoch_timestamp(events: DataFrame, source: str, unit: str | None) -> Column:
    """The integer ts column as a timestamp, its unit given or told by the size of its values (one pass over
    the column for its smallest and largest value)."""
    if unit is None:
        [(low, high)] = events.agg(F.min("ts"), F.max("ts")).collect()
        if low is None or high is None:
            return F.lit(None).cast("timestamp")  # every ts is null: every event is dropped
        earliest, latest = EPOCH_SECONDS
        fitting = [name for name, per_s in EPOCH_UNITS.items() if earliest * per_s <= low and high < latest * per_s]
        if not fitting:
            raise EventsError(
                f"events {source}: integer ts from {low} to {high} is not seconds, milliseconds, microseconds or "
                "nanoseconds since 1970 (10^8 to 10^10, 10^11 to 10^13, 10^14 to 10^16 or 10^17 to 10^19: dates "
                "from 1973 to 2286); write ts as a timestamp"
            )
        [unit] = fitting
    ts = F.col("ts").cast("bigint")
    if unit == "seconds":
        return F.timestamp_seconds(ts)
    if unit == "milliseconds":
        return F.timestamp_millis(ts)
    if unit == "microseconds":
        return F.timestamp_micros(ts)
    # Exact floor division: a double would lose the microseconds of today's nanosecond counts.
    return F.timestamp_micros(F.expr("(CAST(ts AS BIGINT) - pmod(CAST(ts AS BIGINT), 1000)) div 1000"))


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


def covisitation(history: DataFrame, neighbours: int, partitions: int) -> DataFrame:
    """(item_id, other_id, covisit): each item's `neighbours` most co-visited items (module docstring).

    Two tasks in NumPy (`covisit`): over partitions of users, their pairs summed, with the product of the
    two items' user counts; over partitions of items, the parts added up, divided, and each item's best
    kept. The users' rows go to `partitions` tasks."""
    users = history.groupBy("item_id").agg(F.count("*").alias("users"))
    rows = history.join(users, "item_id").select("user_id", "item_id", "users")
    by_user = distributor.by_key(rows, partitions, "user_id")
    counted = by_user.mapInArrow(pair_counts_task(), from_arrow_schema(PAIR_SCHEMA))
    return counted.repartition("item_id").mapInArrow(top_pairs_task(neighbours), from_arrow_schema(COVISIT_SCHEMA))


def pair_counts_task() -> Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The `mapInArrow` body that counts pairs: a partition of users' rows (at most
    `recommend.covisit_history` a user, held whole), sorted by user, to their summed pairs and the pairs'
    user count products."""

    def count_pairs(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        table = distributor.whole_partition(batches)
        if table is None:
            return
        items = pc.dictionary_encode(table.column("item_id").combine_chunks())
        codes = items.indices.to_numpy()
        users = np.zeros(len(items.dictionary), dtype=np.int64)
        users[codes] = table.column("users").to_numpy()
        bounds = distributor.group_bounds(table.column("user_id"))
        for item, other, count in covisit.pair_counts(codes, bounds):
            yield pa.record_batch(
                [
                    items.dictionary.take(pa.array(item)),
                    items.dictionary.take(pa.array(other)),
                    pa.array(count),
                    pa.array(users[item] * users[other]),
                ],
                schema=PAIR_SCHEMA,
            )

    return count_pairs


def top_pairs_task(neighbours: int) -> Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The `mapInArrow` body that ranks co-visitors: a partition holding every part of its items' pairs
    (summed in memory: `spark.shuffle_partitions` sizes the partitions) to each item's best."""

    def top(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        table = distributor.whole_partition(batches)
        if table is None:
            return
        names = pc.dictionary_encode(
            pa.concat_arrays([table.column(c).combine_chunks() for c in ("item_id", "other_id")])
        )
        codes, dictionary = names.indices.to_numpy(), names.dictionary
        rank = np.empty(len(dictionary), dtype=np.int64)
        rank[pc.sort_indices(dictionary).to_numpy()] = np.arange(len(dictionary))
        n = table.num_rows
        item, other, score = covisit.top_pairs(
            codes[:n], codes[n:], table.column("count").to_numpy(), table.column("users").to_numpy(), rank, neighbours
        )
        yield pa.record_batch(
            [dictionary.take(pa.array(item)), dictionary.take(pa.array(other)), pa.array(score)], schema=COVISIT_SCHEMA
        )

    return top


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

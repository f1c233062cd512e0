"""Reading `events`: every common way of writing `ts` gives the same instants; what has no single reading is
refused with one line. Real Parquet files written by pandas and pyarrow, read by Spark."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lookalike.recommend import history

UTC = dt.UTC
TIMES = [dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)]
MICROS = [int(t.timestamp()) * 10**6 for t in TIMES]
PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


def frame(ts: object) -> pd.DataFrame:
    return pd.DataFrame({"user_id": ["u", "v"], "item_id": ["a", "b"], "event_type": ["view", "cart"], "ts": ts})


def naive() -> list[dt.datetime]:
    return [t.replace(tzinfo=None) for t in TIMES]


def arrow_unit(unit: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        table = pa.Table.from_pandas(frame(naive()), preserve_index=False)
        pq.write_table(table.set_column(3, "ts", table["ts"].cast(pa.timestamp(unit))), path)

    return write


def epoch(unit: str, dtype: str = "int64") -> Callable[[Path], None]:
    def write(path: Path) -> None:
        frame(pd.Series([int(t.timestamp()) * PER_SECOND[unit] for t in TIMES], dtype=dtype)).to_parquet(path)

    return write


def folder_of_pandas_files(path: Path) -> None:
    path.mkdir()
    for i in range(2):
        frame(naive()).iloc[[i]].to_parquet(path / f"part-{i}.parquet")


WRITERS: dict[str, Callable[[Path], None]] = {
    "pandas default (nanoseconds)": lambda path: frame(naive()).to_parquet(path),
    "pandas, UTC-aware nanoseconds": lambda path: frame(TIMES).to_parquet(path),
    "pandas nanoseconds in a folder of files": folder_of_pandas_files,
    "pyarrow seconds": arrow_unit("s"),
    "pyarrow milliseconds": arrow_unit("ms"),
    "pyarrow microseconds": arrow_unit("us"),
    "pyarrow nanoseconds": arrow_unit("ns"),
    "INT96 (legacy Spark and Hive)": lambda path: pq.write_table(
        pa.Table.from_pandas(frame(naive())), path, use_deprecated_int96_timestamps=True
    ),
    "epoch seconds, int32": epoch("s", "int32"),
    "epoch seconds": epoch("s"),
    "epoch milliseconds": epoch("ms"),
    "epoch microseconds": epoch("us"),
    "epoch nanoseconds": epoch("ns"),
}


def read_micros(spark: SparkSession, path: Path) -> list[int]:
    events = history.read_events(spark, str(path))
    assert dict(events.dtypes)["ts"] == "timestamp"
    return [r[0] for r in events.orderBy("user_id").select(F.unix_micros("ts")).collect()]


@pytest.mark.parametrize("writer", WRITERS, ids=list(WRITERS))
def test_every_way_of_writing_ts_reads_the_same_instants(spark: SparkSession, tmp_path: Path, writer: str) -> None:
    path = tmp_path / "events.parquet"
    WRITERS[writer](path)
    assert read_micros(spark, path) == MICROS


def test_nanoseconds_keep_their_microseconds_and_leave_the_session_alone(spark: SparkSession, tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    frame([pd.Timestamp("2026-01-02 03:04:05.123456789"), pd.Timestamp("1969-12-31 23:59:59.999999500")]).to_parquet(
        path
    )
    before = spark.conf.get(history.NANOS_AS_LONG)
    # Floor, not truncation: half a microsecond before 1970 is the microsecond before it.
    assert read_micros(spark, path) == [(MICROS[0] + 123456), -1]
    assert spark.conf.get(history.NANOS_AS_LONG) == before


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ([5, 1_767_323_045], "a small number is no date"),
        ([1_767_323_045, 1_767_323_045_000], "seconds and milliseconds mixed"),
        ([-1_767_323_045, 1_767_323_045], "negative"),
        ([20_000_000_000, 30_000_000_000], "seconds after 2286, milliseconds before 1973"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_integer_ts_without_one_reading_is_refused(
    spark: SparkSession, tmp_path: Path, values: list[int], why: str
) -> None:
    path = tmp_path / "events.parquet"
    frame(values).to_parquet(path)
    with pytest.raises(history.EventsError) as err:
        history.read_events(spark, str(path))
    assert str(err.value).startswith(f"events {path}: integer ts from {min(values)} to {max(values)} is not seconds,")
    assert "\n" not in str(err.value)


def test_nanosecond_files_mixed_with_other_units_are_refused(spark: SparkSession, tmp_path: Path) -> None:
    # Read as integers, the microseconds of the second file would otherwise become dates in January 1970.
    folder = tmp_path / "events"
    folder.mkdir()
    frame(naive()).to_parquet(folder / "part-0.parquet")
    arrow_unit("us")(folder / "part-1.parquet")
    with pytest.raises(
        history.EventsError, match=r"nanoseconds\) in .*part-0.parquet but timestamp\(microseconds\) in"
    ):
        history.read_events(spark, str(folder))


def test_a_ts_that_is_no_time_is_refused(spark: SparkSession, tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    frame(["2026-01-02T03:04:05Z", "2026-01-03T03:04:05Z"]).to_parquet(path)
    with pytest.raises(history.EventsError, match="column ts is string, expected a timestamp or an integer epoch"):
        history.read_events(spark, str(path))
    path.write_bytes(b"not parquet")
    with pytest.raises(history.EventsError, match="cannot be read as Parquet"):
        history.read_events(spark, str(path))


def test_covisitation_tasks_give_the_documented_scores_and_ties(spark: SparkSession) -> None:
    """history.covisitation (pairs summed in one set of tasks, ranked in another) against the module
    docstring's rule computed in plain Python: damped pair counts over sqrt(users of i * users of j), each
    item's best `neighbours`, ties by the other item's name."""
    import math
    import random
    from collections import defaultdict

    rng = random.Random(4)
    items = [f"i{n:02d}" for n in range(12)]
    histories = {f"u{u}": rng.sample(items, rng.randint(1, 6)) for u in range(40)}
    rows = [(user, item) for user, held in histories.items() for item in held]
    frame = spark.createDataFrame(rows, "user_id string, item_id string")
    got = {
        (r["item_id"], r["other_id"]): r["covisit"]
        for r in history.covisitation(frame, neighbours=3, partitions=2).collect()
    }
    users: dict[str, int] = defaultdict(int)
    counts: dict[tuple[str, str], float] = defaultdict(float)
    for held in histories.values():
        for i in held:
            users[i] += 1
            for j in held:
                if i != j:
                    counts[i, j] += 1.0 / math.log2(2.0 + len(held))
    best: dict[tuple[str, str], float] = {}
    for i in items:
        scored = sorted((-c / math.sqrt(users[i] * users[j]), j) for (a, j), c in counts.items() if a == i)
        best.update({(i, j): -s for s, j in scored[:3]})
    assert got.keys() == best.keys()
    assert all(got[pair] == pytest.approx(best[pair]) for pair in best)

"""The Delta table layer: atomic commits, failed and killed writes, replace by key, concurrent readers,
and the retention that keeps a table's folder proportional to the versions kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lookalike.config import SCHEMA
from lookalike.storage import tables
from lookalike.storage.tables import Retention, TableError
from tests.conftest import REPO

TWO_HOURS_AGO = time.time() - 2 * 3600


def frame(spark: SparkSession, ids: range, value: str = "v1", partitions: int = 2) -> DataFrame:
    return spark.createDataFrame(
        [(f"i{i:04d}", value, [float(i), 1.0]) for i in ids], "item_id string, value string, vec array<float>"
    ).repartition(partitions)


def rows(spark: SparkSession, path: str) -> dict[str, str]:
    return {r["item_id"]: r["value"] for r in tables.read(spark, path).collect()}


@pytest.fixture
def retention() -> Iterator[None]:
    """Keep 3 versions with no safety margin for one test, then the defaults again."""
    tables.set_retention(Retention(keep_versions=3, min_age_hours=0))
    yield
    tables.set_retention(Retention())


def data_files(path: str) -> set[str]:
    """Every file under the table folder but the log, relative to it."""
    root = Path(path)
    return {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file() and "_delta_log" not in f.parts}


def committed_files(path: str, version: int | None = None) -> set[str]:
    return set(DeltaTable(path, version=version).get_add_actions().column("path").to_pylist())


def backdate(files: list[Path]) -> None:
    for file in files:
        os.utime(file, (TWO_HOURS_AGO, TWO_HOURS_AGO))


def test_create_append_overwrite(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    assert tables.write(frame(spark, range(10)), path).version == 0
    tables.write(frame(spark, range(10, 15)), path, mode="append")
    assert len(rows(spark, path)) == 15
    result = tables.write(frame(spark, range(3), "v2"), path, mode="overwrite")
    assert result.version == 2 and result.rows_added == 3
    assert rows(spark, path) == {f"i{i:04d}": "v2" for i in range(3)}
    # Any Delta reader sees the same version: delta-rs reads what Spark wrote.
    pdf = DeltaTable(path).to_pandas()
    assert sorted(pdf["item_id"]) == ["i0000", "i0001", "i0002"]
    assert list(pdf.loc[pdf["item_id"] == "i0001", "vec"].iloc[0]) == [1.0, 1.0]


def test_vector_columns_skip_dictionary_encoding(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(20), partitions=1), path)
    meta = pq.ParquetFile(DeltaTable(path).file_uris()[0]).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert not any("DICTIONARY" in e for e in encodings["vec.list.element"])
    assert any("DICTIONARY" in e for e in encodings["value"])  # ids and names keep their dictionaries


def test_replace_by_key_rewrites_only_touched_files(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(0, 50), partitions=1), path)
    tables.write(frame(spark, range(50, 100), partitions=1), path)  # a second file, untouched below
    before = set(DeltaTable(path).file_uris())
    upsert = frame(spark, [3, 7, 200], "v2", partitions=1)
    delete = spark.createDataFrame([("i0010",), ("i9999",)], "item_id string")
    result = tables.replace_by_key(upsert, path, "item_id", delete_keys=delete)
    assert result.files_removed == 1
    after = rows(spark, path)
    assert len(after) == 100 - 1 + 1  # minus i0010, plus i0200
    assert after["i0003"] == after["i0007"] == after["i0200"] == "v2"
    assert "i0010" not in after and after["i0060"] == "v1"
    untouched = [uri for uri in before if uri in set(DeltaTable(path).file_uris())]
    assert len(untouched) == 1
    # Nothing touched, nothing committed.
    empty = spark.createDataFrame([], "item_id string, value string, vec array<float>")
    assert tables.replace_by_key(empty, path, "item_id").version == result.version


def shards_per_file(path: str) -> list[list[str]]:
    """Each committed file's `value` column, in file order: which values share a file, and how sorted."""
    return [pq.read_table(f"{path}/{rel}", columns=["value"])["value"].to_pylist() for rel in committed_files(path)]


def test_clustered_writes_keep_each_value_in_one_file_sorted(spark: SparkSession, tmp_path: Path) -> None:
    """`cluster_by` (how `embeddings` is written by shard): a shard's rows share one file, sorted, and a read
    of one shard gets exactly its rows; an upsert rewrites clustered too."""
    path = str(tmp_path / "t")
    schema = "item_id string, value string, vec array<float>"
    mixed = spark.createDataFrame([(f"i{i:04d}", f"s{i % 5}", [float(i), 1.0]) for i in range(200)], schema)
    mixed = mixed.repartition(4)
    tables.write(mixed, path, cluster_by="value")
    files = shards_per_file(path)
    homes = [set(values) for values in files]
    assert sorted(value for home in homes for value in home) == [f"s{i}" for i in range(5)]  # no value in two files
    assert all(values == sorted(values) for values in files)
    one = tables.read_files(tables.current_files(path), ["item_id"], pc.field("value") == "s3")
    assert sorted(one["item_id"].to_pylist()) == [f"i{i:04d}" for i in range(3, 200, 5)]

    upsert = spark.createDataFrame([("i0003", "s1", [0.0, 0.0]), ("i0500", "s3", [0.0, 0.0])], mixed.schema)
    tables.replace_by_key(upsert, path, "item_id", cluster_by="value")
    after = tables.read_arrow(path, ["item_id", "value"]).to_pylist()
    assert len(after) == 201 and {"item_id": "i0003", "value": "s1"} in after
    assert all(values == sorted(values) for values in shards_per_file(path))


def test_files_tasks_wrote_are_committed_and_read_without_spark(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(5), partitions=1), path)
    schema = tables.arrow_schema(tables.spark_schema(path))
    written = {
        i: pa.table({"item_id": [f"j{i}"], "value": ["task"], "vec": [[float(i), 0.0]]}, schema=schema)
        for i in range(3)
    }
    folder = tables.files_folder(path)
    names = [tables.write_file(folder, rows) for rows in written.values()]
    result = tables.commit_files(path, folder, names[:2], schema, mode="overwrite")  # the third: a failed attempt
    assert result.version == 1 and result.rows_added == 2 and result.files_removed == 1
    assert rows(spark, path) == {"j0": "task", "j1": "task"}
    assert len(tables.current_files(path)) == 2 and len(tables.current_files(path, version=0)) == 1
    read = tables.read_files(tables.current_files(path), ["item_id", "vec"], pc.field("item_id") == "j1")
    assert read.to_pylist() == [{"item_id": "j1", "vec": [1.0, 0.0]}]
    assert tables.read(spark, path, version=0).count() == 5
    with pytest.raises(TableError, match=r"missing column\(s\) \['vec'\]"):
        tables.commit_files(path, folder, [], pa.schema([("item_id", pa.string()), ("value", pa.int64())]), "append")


def test_schema_drift_is_refused(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(3)), path)
    wrong_type = spark.createDataFrame([("a", 1, [1.0])], "item_id string, value int, vec array<float>")
    with pytest.raises(TableError, match="column 'value' is int32, table has string"):
        tables.write(wrong_type, path)
    missing = spark.createDataFrame([("a", "x")], "item_id string, value string")
    with pytest.raises(TableError, match=r"missing column\(s\) \['vec'\]"):
        tables.replace_by_key(missing, path, "item_id")
    assert len(rows(spark, path)) == 3


def test_missing_table_is_a_clear_error(spark: SparkSession, tmp_path: Path) -> None:
    with pytest.raises(TableError, match="no Delta table at"):
        tables.read(spark, str(tmp_path / "absent"))


def test_failed_write_leaves_previous_version(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(20)), path)

    @F.udf("string")
    def explode_on_last(item_id):  # type: ignore[no-untyped-def] - hints would make Spark guess a pandas UDF
        if item_id == "i0019":
            raise ValueError("executor died half-way")
        return "v2"

    broken = frame(spark, range(20), partitions=4).withColumn("value", explode_on_last("item_id"))
    with pytest.raises(Exception, match="executor died half-way"):
        tables.write(broken, path, mode="overwrite")
    assert tables.version(path) == 0
    assert set(rows(spark, path).values()) == {"v1"} and len(rows(spark, path)) == 20


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pyspark.sql import functions as F
    from lookalike.storage import tables
    from tests.conftest import make_config
    from lookalike.session import get_spark
    from pathlib import Path
    spark = get_spark(make_config(Path(sys.argv[2])))
    @F.udf("string")
    def slow(item_id):
        time.sleep(0.05)
        return "v2"
    df = spark.range(4000, numPartitions=8).select(
        F.format_string("i%04d", "id").alias("item_id")).withColumn("value", slow("item_id")).withColumn(
        "vec", F.array(F.lit(1.0).cast("float")))
    print("WRITING", flush=True)
    tables.write(df, sys.argv[1], mode="overwrite")
    print("COMMITTED", flush=True)
""")


def test_killed_write_leaves_previous_version(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(20)), path)
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), path, str(tmp_path / "w")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    committed = committed_files(path)

    def new_files() -> set[str]:
        return {rel for rel in data_files(path) - committed if rel.endswith(".parquet")}

    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "WRITING"
        # Kill the driver and its JVM once executors have started writing Parquet files into the table.
        deadline = time.time() + 120
        while not new_files() and time.time() < deadline:
            time.sleep(0.2)
        assert new_files(), "writer never started writing"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert tables.version(path) == 0
    assert rows(spark, path) == {f"i{i:04d}": "v1" for i in range(20)}
    crashed = new_files()
    backdate([tmp_path / "t" / rel for rel in crashed])  # an hour on, the files are certainly abandoned
    tables.write(frame(spark, range(5), "v3"), path, mode="overwrite")  # and the table still takes writes
    assert rows(spark, path) == {f"i{i:04d}": "v3" for i in range(5)}
    assert not crashed & data_files(path), "the next commit removed the killed write's files"


def test_concurrent_reader_never_sees_a_partial_version(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(100), "v0", partitions=4), path)
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                got = tables.read(spark, path).groupBy("value").count().collect()
                seen.append((len(got), sum(r["count"] for r in got)))
            except BaseException as err:  # noqa: BLE001 - any failure of the reader is the finding
                errors.append(err)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for generation in range(1, 5):
            tables.write(frame(spark, range(100), f"v{generation}", partitions=4), path, mode="overwrite")
            tables.replace_by_key(frame(spark, range(0, 100, 2), f"w{generation}", partitions=4), path, "item_id")
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert seen, "reader never completed a read"
    # Every read saw a whole version: 100 rows, of one value (after overwrite) or two (after replace-by-key).
    assert all(total == 100 and groups in (1, 2) for groups, total in seen), seen


def test_retention_defaults_are_the_configs() -> None:
    assert Retention() == Retention(
        SCHEMA["tables.keep_versions"].default, SCHEMA["tables.vacuum_min_age_hours"].default
    )


def test_only_the_kept_versions_files_remain(spark: SparkSession, tmp_path: Path, retention: None) -> None:
    path = str(tmp_path / "t")
    for generation in range(15):
        tables.write(frame(spark, range(4), f"v{generation}", partitions=1), path, mode="overwrite")
    assert tables.version(path) == 14  # the clean-up commits nothing of its own
    kept = set().union(*(committed_files(path, v) for v in (12, 13, 14)))
    assert data_files(path) == kept  # not even _SUCCESS or .crc files of the writes
    assert len(list((tmp_path / "t" / tables.DATA_DIR).iterdir())) == 3  # emptied write folders are gone
    for v in (12, 13, 14):  # time travel within the kept versions
        assert set(DeltaTable(path, version=v).to_pandas()["value"]) == {f"v{v}"}
    with pytest.raises(Exception, match="(?i)not found|no such file"):
        DeltaTable(path, version=11).to_pandas()
    assert set(rows(spark, path).values()) == {"v14"}


def test_orphans_of_crashed_writes_are_removed_once_old(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    tables.write(frame(spark, range(10)), path)
    data = tmp_path / "t" / tables.DATA_DIR
    old, fresh = data / "20260101T000000-000000000000", data / "20260101T000001-111111111111"
    for crashed in (old, fresh):  # what a writer killed mid-write leaves: task files, no commit
        (crashed / "_temporary" / "0").mkdir(parents=True)
        (crashed / "part-00000-a.snappy.parquet").write_bytes(b"half")
        (crashed / "_temporary" / "0" / "part-00001-b.snappy.parquet").write_bytes(b"half")
    backdate([f for f in old.rglob("*") if f.is_file()])
    tables.write(frame(spark, range(10, 12)), path)  # any commit cleans up (default margin: 1 hour)
    assert not old.exists()
    assert sorted(f.name for f in fresh.rglob("*") if f.is_file()) == [
        "part-00000-a.snappy.parquet",
        "part-00001-b.snappy.parquet",
    ]
    assert len(rows(spark, path)) == 12

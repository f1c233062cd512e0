"""Paths a user chooses (output.root, catalog.path, events.path) with spaces, %, #, non-ASCII letters and
other punctuation: real tables, exports, small files and index shards written and read back under such
folders, and the characters Spark or delta-rs cannot take refused by the config check in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession

from lookalike.config import ConfigError
from lookalike.index import shard_index
from lookalike.index.params import choose_params
from lookalike.run import export
from lookalike.storage import files, tables
from lookalike.storage.tables import TableError
from tests.conftest import make_config

# Folder names a user may choose. Storage also reads under Hadoop's pattern characters (the last one); the
# config check refuses those for the stages' own readers (test below).
ROOTS = ["out dir", "100%", "a#b", "ünïcödé", "x:y,z;w=v+u&t's @!~", "glob*?{x}"]


def frame(spark: SparkSession, ids: list[int], value: str) -> DataFrame:
    return spark.createDataFrame([(f"i{i}", value) for i in ids], "item_id string, value string")


@pytest.mark.parametrize("name", ROOTS)
def test_tables_round_trip(spark: SparkSession, tmp_path: Path, name: str) -> None:
    root = tmp_path / name / "out"
    path = tables.table_path(str(root), "t")
    tables.write(frame(spark, list(range(6)), "v1").repartition(2), path)
    tables.write(frame(spark, [6, 7], "v1"), path, mode="append")
    deleted = spark.createDataFrame([("i2",)], "item_id string")
    result = tables.replace_by_key(frame(spark, [1, 8], "v2"), path, "item_id", delete_keys=deleted)
    assert result.files_removed >= 1
    expected = {f"i{i}": "v1" for i in (0, 3, 4, 5, 6, 7)} | {"i1": "v2", "i8": "v2"}
    assert {r["item_id"]: r["value"] for r in tables.read(spark, path).collect()} == expected
    assert dict(DeltaTable(path).to_pandas()[["item_id", "value"]].values.tolist()) == expected  # any Delta reader
    assert tables.read_arrow(path).num_rows == len(expected)
    # Tasks' own reads and writes: a version's files read with Arrow, Arrow rows written and committed.
    read = tables.read_files(tables.current_files(path), ["item_id", "value"])
    assert dict(zip(read["item_id"].to_pylist(), read["value"].to_pylist())) == expected
    folder = tables.files_folder(path)
    written = pa.table({"item_id": ["i10"], "value": ["v4"]}, schema=tables.arrow_schema(tables.spark_schema(path)))
    tables.commit_files(path, folder, [tables.write_file(folder, written)], written.schema, mode="append")
    expected["i10"] = "v4"
    assert {r["item_id"]: r["value"] for r in tables.read(spark, path).collect()} == expected
    # The same table through its file: URI (percent-encoded, RFC 8089) is the same folder, not a new one.
    uri = Path(path).as_uri()
    tables.write(frame(spark, [9], "v3"), uri, mode="append")
    assert tables.version(path) == tables.version(uri) == 4
    assert len(tables.read(spark, uri).collect()) == len(expected) + 1


@pytest.mark.parametrize("name", ROOTS[:4])
def test_export_under_such_a_root(spark: SparkSession, tmp_path: Path, name: str) -> None:
    root = str(tmp_path / name / "out")
    similar = spark.createDataFrame(
        pd.DataFrame({"item_id": ["a", "b", "c"], "rank": 1, "similar_item_id": "x", "score": 0.5, "run_id": "r"})
    )
    tables.write(similar, tables.table_path(root, "similar_items"), mode="overwrite")
    done = export.publish(spark, root, "20260101T000000Z-aaaaaa", keep=2, stages_ran=["similar"])
    assert done.written == ("similar_items",)
    manifest = json.loads(Path(export.manifest_path(root)).read_text())
    snapshot = Path(root) / "export" / manifest["tables"]["similar_items"]["path"]
    assert (snapshot / export.SUCCESS).exists()
    assert len(pd.read_parquet(snapshot)) == manifest["tables"]["similar_items"]["rows"] == 3


@pytest.mark.parametrize("name", ROOTS)
def test_small_files_and_staging(tmp_path: Path, name: str) -> None:
    root = tmp_path / name / "out"
    for path in (files.state_path(str(root), "similar_items"), (root / "indexes" / "LATEST").as_uri()):
        files.write_text(path, "ünïcödé text\n")
        assert files.exists(path) and files.read_text(path) == "ünïcödé text\n"
    assert (root / "indexes" / "LATEST").read_text() == "ünïcödé text\n"  # the URI named the same file
    staging = files.staging_dir(str(root), "run-1", "similar")
    Path(staging).mkdir(parents=True)
    (Path(staging) / "part-0.parquet").write_bytes(b"x")
    before = files.listing_digest(staging)
    (Path(staging) / "part-1.parquet").write_bytes(b"y")
    assert files.listing_digest(staging) != before
    assert files.clear_stale_staging(str(root), "run-2") == ["run-1"]
    assert not Path(staging).exists()


@pytest.mark.parametrize("name", ROOTS)
def test_index_shard_save_and_load(tmp_path: Path, name: str) -> None:
    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = shard_index.build(vectors, choose_params(50, 8), seed=0, eval_queries=10)
    folder = tmp_path / name / "out" / "indexes" / "run-1" / "shoes"
    manifest = shard_index.save(built, folder, ids=[f"i{n}" for n in range(50)], model="m@test")
    shard = shard_index.load(str(folder), expected_dim=8, expected_model="m@test")
    assert shard.manifest == manifest and shard.index.ntotal == 50


@pytest.mark.parametrize("name", ROOTS[:5])
def test_config_accepts_such_paths(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "catalog.parquet").write_bytes(b"")
    (folder / "events.parquet").write_bytes(b"")
    cfg = make_config(
        tmp_path,
        **{
            "catalog.path": (folder / "catalog.parquet").as_uri(),  # a file: URI is decoded
            "events.path": str(folder / "events.parquet"),
            "output.root": str(folder / "out"),
        },
    )
    assert cfg["catalog.path"] == str(folder / "catalog.parquet")
    assert cfg["output.root"] == str(folder / "out")


@pytest.mark.parametrize(
    ("key", "name", "character"),
    [
        ("output.root", "a[b]", "["),
        ("output.root", "a]b", "]"),
        ("output.root", "a\\b", "\\"),
        ("output.root", "100%20", "%20"),
        ("output.root", "a*b", "*"),
        ("output.root", "a?b", "?"),
        ("output.root", "a{b}", "{"),
        ("catalog.path", "a[b]", "["),
        ("events.path", "a{b}", "{"),
    ],
)
def test_config_refuses_what_spark_or_delta_cannot_take(tmp_path: Path, key: str, name: str, character: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    target = folder / ("out" if key == "output.root" else "input.parquet")
    if key != "output.root":
        target.write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, **{key: str(target)})
    message = str(caught.value)
    assert message.startswith(f"{key}: {character!r} in a path is not supported") and "\n" not in message


def test_escapes_are_refused_only_where_delta_rs_reads_them(tmp_path: Path) -> None:
    folder = tmp_path / "100%20"
    folder.mkdir()
    (folder / "catalog.parquet").write_bytes(b"")
    parquet = make_config(tmp_path, **{"catalog.path": str(folder / "catalog.parquet")})
    assert parquet["catalog.path"] == str(folder / "catalog.parquet")  # Spark reads such a Parquet path as it is
    with pytest.raises(ConfigError, match=r"^catalog.path: '%20' in a path is not supported: delta-rs reads it"):
        make_config(tmp_path, **{"catalog.path": str(folder / "catalog.parquet"), "catalog.format": "delta"})


def test_a_table_path_delta_rs_cannot_hold_is_a_table_error(tmp_path: Path) -> None:
    with pytest.raises(TableError, match=r"^table .*a\[b\]/t: '\[' in a path is not supported"):
        tables.exists(str(tmp_path / "a[b]" / "t"))

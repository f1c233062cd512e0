"""Exports: plain Parquet snapshots with _SUCCESS, LATEST written last, old and broken snapshots pruned."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pyspark.sql import SparkSession

from lookalike.run import export
from lookalike.storage import tables


def write_similar(spark: SparkSession, root: str, rows: int) -> None:
    frame = spark.createDataFrame(
        pd.DataFrame(
            {"item_id": [f"i{n}" for n in range(rows)], "rank": 1, "similar_item_id": "x", "score": 0.5, "run_id": "r"}
        )
    )
    tables.write(frame, tables.table_path(root, "similar_items"), mode="overwrite")


def test_publish_snapshots_then_latest_and_prunes(spark: SparkSession, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_similar(spark, root, 7)
    assert export.publish(spark, root, "20260101T000000Z-aaaaaa", keep=2) == {"similar_items": 7}
    folder = Path(export.export_root(root, "similar_items"))
    assert export.latest(root, "similar_items") == "20260101T000000Z-aaaaaa"
    assert (folder / "run_id=20260101T000000Z-aaaaaa" / "_SUCCESS").exists()
    assert len(pd.read_parquet(folder / "run_id=20260101T000000Z-aaaaaa")) == 7
    assert export.latest(root, "recommendations") is None  # no table, no export, no error

    # A run killed mid-export left a folder without _SUCCESS: never LATEST, removed by the next export.
    broken = folder / "run_id=20260102T000000Z-bbbbbb"
    broken.mkdir()
    (broken / "part-0.parquet").write_bytes(b"half")
    write_similar(spark, root, 9)
    export.publish(spark, root, "20260103T000000Z-cccccc", keep=2)
    export.publish(spark, root, "20260104T000000Z-dddddd", keep=2)
    assert sorted(p.name for p in folder.glob("run_id=*")) == [
        "run_id=20260103T000000Z-cccccc",
        "run_id=20260104T000000Z-dddddd",
    ]
    assert export.latest(root, "similar_items") == "20260104T000000Z-dddddd"
    assert len(pd.read_parquet(folder / "run_id=20260104T000000Z-dddddd")) == 9

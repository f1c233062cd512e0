"""Exports: plain Parquet snapshots with _SUCCESS, each table's LATEST, and the manifest `export/LATEST`
written last, naming one run's snapshots; skipped or unchanged tables keep their snapshot; old and broken
snapshots pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from lookalike.run import export
from lookalike.storage import tables

RUN_A, RUN_B, RUN_C, RUN_D = (f"2026010{n}T000000Z-{n * 6}" for n in range(1, 5))
BOTH = ("similar", "recommend")


def write_similar(spark: SparkSession, root: str, rows: int) -> None:
    frame = spark.createDataFrame(
        pd.DataFrame(
            {"item_id": [f"i{n}" for n in range(rows)], "rank": 1, "similar_item_id": "x", "score": 0.5, "run_id": "r"}
        )
    )
    tables.write(frame, tables.table_path(root, "similar_items"), mode="overwrite")


def write_recommendations(spark: SparkSession, root: str, rows: int) -> None:
    frame = spark.createDataFrame(
        [(f"u{n}", 1, "i0", 0.5, ["i1"], "r") for n in range(rows)],
        "user_id string, rank int, item_id string, score float, because array<string>, run_id string",
    )
    tables.write(frame, tables.table_path(root, "recommendations"), mode="overwrite")


def manifest(root: str) -> dict:
    return json.loads(Path(export.manifest_path(root)).read_text())


def snapshot_runs(root: str, table: str) -> list[str]:
    return sorted(p.name.removeprefix("run_id=") for p in Path(export.export_root(root, table)).glob("run_id=*"))


def test_publish_snapshots_then_latest_and_prunes(spark: SparkSession, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_similar(spark, root, 7)
    done = export.publish(spark, root, RUN_A, keep=2, stages_ran=BOTH)
    assert done.written == ("similar_items",) and done.snapshots["similar_items"].rows == 7
    folder = Path(export.export_root(root, "similar_items"))
    assert export.latest(root, "similar_items") == RUN_A
    assert (folder / f"run_id={RUN_A}" / "_SUCCESS").exists()
    assert len(pd.read_parquet(folder / f"run_id={RUN_A}")) == 7
    assert export.latest(root, "recommendations") is None  # no table, no export, no error
    assert "recommendations" not in manifest(root)["tables"]

    # A run killed mid-export left a folder without _SUCCESS: never LATEST, removed by the next export.
    broken = folder / "run_id=20260102T000000Z-bbbbbb"
    broken.mkdir()
    (broken / "part-0.parquet").write_bytes(b"half")
    for run, rows in ((RUN_C, 9), (RUN_D, 11)):
        write_similar(spark, root, rows)
        export.publish(spark, root, run, keep=2, stages_ran=BOTH)
    assert snapshot_runs(root, "similar_items") == [RUN_C, RUN_D]
    assert export.latest(root, "similar_items") == RUN_D
    assert len(pd.read_parquet(folder / f"run_id={RUN_D}")) == 11


def test_manifest_names_one_runs_complete_snapshots(spark: SparkSession, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_similar(spark, root, 4)
    write_recommendations(spark, root, 3)
    export.publish(spark, root, RUN_A, keep=2, stages_ran=BOTH)
    body = manifest(root)
    assert body["run_id"] == RUN_A and body["published_at"]
    assert sorted(body["tables"]) == ["recommendations", "similar_items"]
    for table, rows in (("similar_items", 4), ("recommendations", 3)):
        entry = body["tables"][table]
        assert entry == {
            "run_id": RUN_A,
            "rows": rows,
            "table_version": tables.version(tables.table_path(root, table)),
            "path": f"{table}/run_id={RUN_A}",
        }
        snapshot = Path(root) / "export" / entry["path"]
        assert (snapshot / "_SUCCESS").exists() and len(pd.read_parquet(snapshot)) == rows
        assert export.latest(root, table) == RUN_A
    assert export.manifest(root) == {
        table: export.Snapshot(RUN_A, entry["rows"], entry["table_version"]) for table, entry in body["tables"].items()
    }


def test_skipped_or_unchanged_table_keeps_its_snapshot(spark: SparkSession, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_similar(spark, root, 4)
    write_recommendations(spark, root, 3)
    export.publish(spark, root, RUN_A, keep=3, stages_ran=BOTH)

    # recommend did not run (no events.path): its old rows are not exported again under the new run id.
    write_similar(spark, root, 5)
    done = export.publish(spark, root, RUN_B, keep=3, stages_ran=["embed", "index", "similar"])
    assert done.written == ("similar_items",)
    body = manifest(root)
    assert body["run_id"] == RUN_B
    assert body["tables"]["similar_items"]["run_id"] == RUN_B and body["tables"]["similar_items"]["rows"] == 5
    assert body["tables"]["recommendations"]["run_id"] == RUN_A and body["tables"]["recommendations"]["rows"] == 3
    assert snapshot_runs(root, "recommendations") == [RUN_A]
    assert export.latest(root, "recommendations") == RUN_A

    # Both stages ran but changed nothing (same table versions): both keep their snapshots, nothing is copied.
    done = export.publish(spark, root, RUN_C, keep=3, stages_ran=BOTH)
    assert done.written == ()
    body = manifest(root)
    assert body["run_id"] == RUN_C
    assert {t: e["run_id"] for t, e in body["tables"].items()} == {"similar_items": RUN_B, "recommendations": RUN_A}
    assert snapshot_runs(root, "similar_items") == [RUN_A, RUN_B]


def test_skipped_table_never_exported_is_left_out(spark: SparkSession, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_similar(spark, root, 4)
    write_recommendations(spark, root, 3)
    export.publish(spark, root, RUN_A, keep=2, stages_ran=["similar"])
    assert sorted(manifest(root)["tables"]) == ["similar_items"]
    assert snapshot_runs(root, "recommendations") == []


def test_exports_from_before_the_manifest_are_carried_over(spark: SparkSession, tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    write_recommendations(spark, root, 3)
    export.publish(spark, root, RUN_A, keep=2, stages_ran=BOTH)
    Path(export.manifest_path(root)).unlink()  # as an output root exported by an older version looks
    export.publish(spark, root, RUN_B, keep=2, stages_ran=["similar"])
    assert manifest(root)["tables"]["recommendations"] == {
        "run_id": RUN_A,
        "rows": 3,
        "table_version": None,
        "path": f"recommendations/run_id={RUN_A}",
    }


def test_export_failing_between_snapshots_leaves_the_previous_run_published(
    spark: SparkSession, tmp_path: Path
) -> None:
    root = str(tmp_path / "out")
    write_similar(spark, root, 4)
    write_recommendations(spark, root, 3)
    export.publish(spark, root, RUN_A, keep=2, stages_ran=BOTH)
    before = Path(export.manifest_path(root)).read_text()

    # Run B: similar_items is snapshotted, then reading recommendations fails (a data file of its current
    # version is gone), as a run killed between the two snapshots would stop.
    write_similar(spark, root, 6)
    write_recommendations(spark, root, 2)
    recs = tables.table_path(root, "recommendations")
    lost = Path(recs) / DeltaTable(recs).get_add_actions().column("path").to_pylist()[0]
    lost.unlink()
    with pytest.raises(Exception, match="(?i)not exist|not found"):
        export.publish(spark, root, RUN_B, keep=2, stages_ran=BOTH)
    assert (Path(export.export_root(root, "similar_items")) / f"run_id={RUN_B}" / "_SUCCESS").exists()
    assert Path(export.manifest_path(root)).read_text() == before  # readers still see run A, whole
    assert export.latest(root, "similar_items") == export.latest(root, "recommendations") == RUN_A

    write_recommendations(spark, root, 5)  # repaired; the next run publishes both of its own
    export.publish(spark, root, RUN_C, keep=2, stages_ran=BOTH)
    body = manifest(root)
    assert {t: (e["run_id"], e["rows"]) for t, e in body["tables"].items()} == {
        "similar_items": (RUN_C, 6),
        "recommendations": (RUN_C, 5),
    }

"""The index stage on Spark: one build per shard, LATEST published last, old builds pruned, model checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyspark.errors import PythonException
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lookalike.config import Config
from lookalike.embed import shards
from lookalike.index import builds
from lookalike.index import stage as index
from lookalike.storage import tables
from tests.conftest import make_config

DIM = 32
MODEL = "test-model@0000/32px"


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(4, n // 200), DIM))
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(spark: SparkSession, root: Path, sizes: dict[str, int | np.ndarray], model: str = MODEL) -> None:
    """Per shard, `n` clustered vectors (seeded by the shard's position), or the given vectors."""
    rows = []
    for s, (shard, n) in enumerate(sizes.items()):
        for i, vec in enumerate(clustered(n, seed=s) if isinstance(n, int) else n):
            rows.append((f"{shard}-{i:05d}", shard, vec.tolist(), model))
    df = spark.createDataFrame(rows, "item_id string, shard string, embedding array<float>, model string").select(
        "item_id",
        "shard",
        "embedding",
        "model",
        F.lit("sha").alias("image_sha256"),
        F.lit(1).alias("width"),
        F.lit(1).alias("height"),
        F.lit("r0").alias("run_id"),
        F.current_timestamp().alias("embedded_at"),
    )
    tables.write(df, tables.table_path(str(root), "embeddings"), mode="overwrite")


def config(tmp_path: Path, **overrides: object) -> Config:
    # exact_fallback off: these shards must stay IVF-PQ whatever this machine times (test_shard_index tests it).
    return make_config(tmp_path, **{"index.flat_below": 2000, "index.exact_fallback": False, **overrides})


def test_builds_every_shard_and_publishes_latest(spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    root = cfg["output.root"]
    write_embeddings(spark, Path(root), {"Bag": 300, "T-shirt/top": 12000})
    result = index.run(cfg, spark, "20260101T000000Z-aaaaaa")
    assert builds.latest_build(root) == "20260101T000000Z-aaaaaa"
    summary = builds.build_summary(root, "20260101T000000Z-aaaaaa")
    assert summary["model"] == MODEL and summary["dim"] == DIM
    kinds = {s["shard"]: s["kind"] for s in summary["shards"]}
    assert kinds == {"Bag": "flat", "T-shirt/top": "ivfpq"}
    recalls = {s["shard"]: s["recall_at_10"] for s in summary["shards"]}
    assert recalls["Bag"] == 1.0  # exact search
    assert result.rows_in == 12300 and result.metrics["min_recall_at_10"] == min(recalls.values())
    reached = {s["shard"]: s["target_reached"] for s in summary["shards"]}
    assert reached["T-shirt/top"] == (recalls["T-shirt/top"] >= 0.95)  # the manifest says when it fell short

    # The recall in the manifest is what a fresh exact comparison finds on the same search path.
    vectors = clustered(12000, seed=1)
    shard = builds.load_shard(root, "20260101T000000Z-aaaaaa", "T-shirt/top", model=MODEL, dim=DIM)
    manifest = shard.manifest
    assert set(manifest) >= {"factory", "dim", "ntotal", "nprobe", "recall_at_10", "model", "build_seconds", "bytes"}
    assert manifest["bytes"] <= manifest["flat_bytes"] / 4
    ids = np.array([int(i.split("-")[-1]) for i in shard.item_ids.to_pylist()])
    ordered = vectors[ids]  # FAISS id order
    rng = np.random.default_rng(42)
    rows = rng.choice(len(ordered), 300, replace=False)
    _, found = shard.search(ordered, ordered[rows], 11)
    exact = np.argsort(-(ordered[rows] @ ordered.T), axis=1)[:, :11]
    recall = np.mean([len((set(f) - {r}) & (set(e[:11]) - {r})) / 10 for f, e, r in zip(found, exact, rows)])
    assert abs(recall - manifest["recall_at_10"]) < 0.05, (recall, manifest["recall_at_10"])

    # The next night the big shard gains 100 items of the same catalog: its quantizers are reused, not retrained.
    near = vectors[:100] + 0.05 * np.random.default_rng(50).normal(size=(100, DIM)).astype(np.float32)
    grown = np.concatenate([vectors, near / np.linalg.norm(near, axis=1, keepdims=True)])
    write_embeddings(spark, Path(root), {"Bag": 300, "T-shirt/top": grown})
    update = index.run(cfg, spark, "20260102T000000Z-bbbbbb")
    updated = builds.load_shard(root, "20260102T000000Z-bbbbbb", "T-shirt/top", model=MODEL, dim=DIM).manifest
    assert (update.metrics["shards_built"], update.metrics["shards_updated"], update.metrics["shards_reused"]) == (
        1,
        1,
        1,
    ), updated["update"]
    assert updated["reused_training"] and updated["update"]["trained_in"] == "20260101T000000Z-aaaaaa"
    assert updated["ntotal"] == 12100 and updated["train_seconds"] < manifest["train_seconds"] / 10
    assert updated["target_reached"] and updated["tuning"]  # recall measured again
    write_embeddings(spark, Path(root), {"Bag": 300, "T-shirt/top": grown[:-1]})
    retrained = index.run(cfg.with_overrides({"index.update_max_drift": None}), spark, "20260103T000000Z-cccccc")
    assert (retrained.metrics["shards_built"], retrained.metrics["shards_updated"]) == (1, 0)


def test_failed_build_keeps_latest_and_old_builds_are_pruned(spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"index.keep_builds": 2})
    root = cfg["output.root"]
    write_embeddings(spark, Path(root), {"Bag": 50, "Shoe": 60})
    for run in ("20260101T000000Z-000001", "20260102T000000Z-000002"):
        index.run(cfg, spark, run)
    # A shard whose vectors are not unit length makes its task fail half-way through the build.
    bad = tables.read(spark, tables.table_path(root, "embeddings")).withColumn(
        "embedding",
        F.when(F.col("shard") == "Shoe", F.transform("embedding", lambda x: x * 3).cast("array<float>")).otherwise(
            F.col("embedding")
        ),
    )
    tables.write(bad, tables.table_path(root, "embeddings"), mode="overwrite")
    with pytest.raises(PythonException, match="vectors are not L2-normalised"):
        index.run(cfg, spark, "20260103T000000Z-000003")
    assert builds.latest_build(root) == "20260102T000000Z-000002"
    write_embeddings(spark, Path(root), {"Bag": 50, "Shoe": 60})
    index.run(cfg, spark, "20260104T000000Z-000004")
    kept = sorted(p.name for p in (Path(root) / "indexes").iterdir() if p.is_dir())
    assert kept == ["20260102T000000Z-000002", "20260104T000000Z-000004"]  # the failed one is gone too
    assert (Path(root) / "indexes" / "LATEST").read_text() == "20260104T000000Z-000004"


def test_unchanged_shards_are_reused_and_changed_ones_rebuilt(spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    root = cfg["output.root"]
    write_embeddings(spark, Path(root), {"Bag": 50, "Shoe": 60})
    first = index.run(cfg, spark, "20260101T000000Z-000001")
    assert first.metrics["shards_built"] == 2 and first.metrics["shards_reused"] == 0
    again = index.run(cfg, spark, "20260102T000000Z-000002")
    assert again.metrics["shards_built"] == 0 and again.metrics["shards_reused"] == 2
    # The copied shard is complete and identical; the build stands on its own after older ones are pruned.
    old, new = (
        Path(root) / "indexes" / run / shards.folder_name("Bag")
        for run in ("20260101T000000Z-000001", "20260102T000000Z-000002")
    )
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
    assert (new / "index.faiss").read_bytes() == (old / "index.faiss").read_bytes()
    # One shard's vectors change (same item ids, same embed run id): only that shard is rebuilt.
    moved = tables.read(spark, tables.table_path(root, "embeddings")).withColumn(
        "embedding", F.when(F.col("shard") == "Shoe", F.reverse("embedding")).otherwise(F.col("embedding"))
    )
    tables.write(moved, tables.table_path(root, "embeddings"), mode="overwrite")
    third = index.run(cfg, spark, "20260103T000000Z-000003")
    assert third.metrics["shards_built"] == 1 and third.metrics["shards_reused"] == 1
    # Other index settings rebuild everything.
    fourth = index.run(cfg.with_overrides({"index.target_recall": 0.9}), spark, "20260104T000000Z-000004")
    assert fourth.metrics["shards_built"] == 2


def test_mismatched_model_is_refused(spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    root = cfg["output.root"]
    write_embeddings(spark, Path(root), {"Bag": 40})
    index.run(cfg, spark, "r1")
    with pytest.raises(builds.IndexBuildError, match="index built with model 'test-model@0000/32px', expected"):
        builds.load_shard(root, "r1", "Bag", model="efficientnet-lite0@ffff/224px", dim=DIM)
    with pytest.raises(builds.IndexBuildError, match="no index build published"):
        builds.latest_build(str(tmp_path / "elsewhere"))


def test_mixed_models_in_embeddings_are_refused(spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    root = Path(cfg["output.root"])
    write_embeddings(spark, root, {"Bag": 20})
    other = (
        tables.read(spark, tables.table_path(str(root), "embeddings"))
        .withColumn("item_id", F.concat("item_id", F.lit("x")))
        .withColumn("model", F.lit("other@1/8px"))
    )
    tables.write(other, tables.table_path(str(root), "embeddings"), mode="append")
    with pytest.raises(builds.IndexBuildError, match="expected exactly one"):
        index.run(cfg, spark, "r1")
    assert not (root / "indexes" / "LATEST").exists()

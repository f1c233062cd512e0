"""The similar stage: exact-k clean neighbour lists per item, filters, scopes, incremental runs, stale indexes.

Synthetic clustered vectors go into an `embeddings` table, `index.run` builds the shards, then
`similar.run`; results are checked against brute-force cosine search with the same exclusions.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lookalike.config import Config
from lookalike.index import builds, shard_index
from lookalike.index import stage as index
from lookalike.index.params import choose_params
from lookalike.similar import plan, search
from lookalike.similar import stage as similar
from lookalike.storage import tables
from tests.conftest import make_config

DIM = 32
MODEL = "test-model@0000/32px"
K = 10
TWINS = ["Bag-00000", "Bag-00001", "Bag-00002", "Bag-00003"]  # one image, four listings
CROSS_TWIN = ("Bag-00010", "Shoe-00000")  # the same image in two categories
NEAR_TWIN = ("Bag-00020", "Bag-00021")  # other bytes, nearly the same vector: a re-uploaded photo


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered(n: int, seed: int, clusters: int = 12) -> np.ndarray:
    """Unit vectors around centres shared by every shard (seeded apart), so shards have cross neighbours."""
    centres = np.random.default_rng(99).normal(size=(clusters, DIM))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dataset(sizes: dict[str, int]) -> pd.DataFrame:
    """Items per shard with distinct images, plus the duplicate images of TWINS and CROSS_TWIN."""
    frames = []
    for seed, (shard, n) in enumerate(sizes.items()):
        ids = [f"{shard}-{i:05d}" for i in range(n)]
        frames.append(
            pd.DataFrame(
                {
                    "item_id": ids,
                    "shard": shard,
                    "embedding": list(clustered(n, seed)),
                    "image_sha256": [f"sha-{i}" for i in ids],
                    "run_id": "e1",
                }
            )
        )
    df = pd.concat(frames, ignore_index=True).set_index("item_id", drop=False)
    if "Bag" in sizes and "Shoe" in sizes:
        for group in (TWINS, list(CROSS_TWIN)):
            df.loc[group, "image_sha256"] = f"sha-{group[0]}"
            df.loc[group, "embedding"] = pd.Series([df.loc[group[0], "embedding"]] * len(group), index=group)
        nudged = df.loc[NEAR_TWIN[0], "embedding"] + np.float32(0.05) * clustered(1, seed=7)[0]
        df.at[NEAR_TWIN[1], "embedding"] = (nudged / np.linalg.norm(nudged)).astype(np.float32)
    return df.reset_index(drop=True)


def write_embeddings(spark: SparkSession, root: str, df: pd.DataFrame) -> None:
    frame = spark.createDataFrame(
        df.assign(embedding=df["embedding"].map(lambda v: v.tolist())),
        "item_id string, shard string, embedding array<float>, image_sha256 string, run_id string",
    )
    tables.write(
        frame.select(
            "item_id",
            "shard",
            "embedding",
            F.lit(MODEL).alias("model"),
            "image_sha256",
            F.lit(28).alias("width"),
            F.lit(28).alias("height"),
            "run_id",
            F.current_timestamp().alias("embedded_at"),
        ),
        tables.table_path(root, "embeddings"),
        mode="overwrite",
    )


def config(tmp_path: Path, **overrides: object) -> Config:
    # exact_fallback off: these shards must stay IVF-PQ whatever this machine times (test_shard_index tests it).
    return make_config(tmp_path, **{"index.flat_below": 2000, "index.exact_fallback": False, **overrides})


@pytest.fixture(scope="module")
def small(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """Two Flat shards (exact search) with twins, embedded and indexed once; tests work on copies."""
    folder = tmp_path_factory.mktemp("similar-small")
    cfg = config(folder)
    df = dataset({"Bag": 300, "Shoe": 200})
    write_embeddings(spark, cfg["output.root"], df)
    index.run(cfg, spark, "b1")
    return Path(cfg["output.root"]), df


def copy_of(small: tuple[Path, pd.DataFrame], tmp_path: Path) -> pd.DataFrame:
    shutil.copytree(small[0], tmp_path / "out")
    return small[1]


def similar_rows(root: str) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(root, "similar_items")).to_pandas()


def brute_force(
    df: pd.DataFrame,
    k: int,
    *,
    scope_all: bool = False,
    eligible: np.ndarray | None = None,
    min_score: float | None = None,
) -> dict[str, list[tuple[str, float]]]:
    """Exact top-k per item with the stage's exclusions: self, same image, ineligible, under min_score."""
    vectors = np.stack(df["embedding"].to_numpy())
    scores = vectors @ vectors.T
    blocked = df["image_sha256"].to_numpy()[:, None] == df["image_sha256"].to_numpy()[None, :]
    if not scope_all:
        blocked |= df["shard"].to_numpy()[:, None] != df["shard"].to_numpy()[None, :]
    if eligible is not None:
        blocked |= ~eligible[None, :]
    if min_score is not None:
        blocked |= scores < min_score
    scores = np.where(blocked, -np.inf, scores)
    ids = df["item_id"].to_numpy()
    out = {}
    for row, item in enumerate(ids):
        best = np.argsort(-scores[row], kind="stable")[:k]
        out[item] = [(ids[j], float(scores[row, j])) for j in best if np.isfinite(scores[row, j])]
    return out


def check_lists(rows: pd.DataFrame, truth: dict[str, list[tuple[str, float]]], df: pd.DataFrame) -> None:
    """The brute-force lists: the same scores rank by rank, each the true cosine of its pair (so the ids
    are a right top-k, whichever way ties fell), ranks dense from 1, never the item itself."""
    assert set(rows["item_id"]) == {item for item, found in truth.items() if found}
    vector = dict(zip(df["item_id"], df["embedding"]))
    cosines = [float(vector[a] @ vector[b]) for a, b in zip(rows["item_id"], rows["similar_item_id"])]
    np.testing.assert_allclose(rows["score"].to_numpy(), cosines, atol=1e-5)
    assert not (rows["item_id"] == rows["similar_item_id"]).any()
    for item, group in rows.sort_values(["item_id", "rank"]).groupby("item_id"):
        expected = truth[item]
        assert group["rank"].tolist() == list(range(1, len(expected) + 1))
        np.testing.assert_allclose(group["score"].to_numpy(), [s for _, s in expected], atol=1e-5)


def test_contract_exact_k_and_duplicates(spark: SparkSession, small: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    df = copy_of(small, tmp_path)
    cfg = config(tmp_path, **{"similar.chunk_size": 120})
    result = similar.run(cfg, spark, "r1")
    root = cfg["output.root"]
    schema = tables.spark_schema(tables.table_path(root, "similar_items"))
    assert [(f.name, f.dataType.simpleString()) for f in schema.fields] == [
        ("item_id", "string"),
        ("rank", "int"),
        ("similar_item_id", "string"),
        ("score", "float"),
        ("run_id", "string"),
    ]
    rows = similar_rows(root)
    assert (rows.groupby("item_id").size() == K).all() and len(rows) == K * len(df) == result.rows_out
    check_lists(rows, brute_force(df, K), df)
    twins = rows[rows["item_id"].isin(TWINS)]
    assert not twins["similar_item_id"].isin(TWINS).any()
    # the twins share one vector and one list: searched once
    assert twins.groupby("item_id")["similar_item_id"].apply(tuple).nunique() == 1

    duplicates = tables.read_arrow(tables.table_path(root, "duplicates")).to_pandas()
    assert list(duplicates.columns) == ["item_id", "duplicate_of", "kind", "run_id"]
    exact = duplicates[duplicates["kind"] == "exact"]
    assert sorted(zip(exact["item_id"], exact["duplicate_of"])) == [
        ("Bag-00001", "Bag-00000"),
        ("Bag-00002", "Bag-00000"),
        ("Bag-00003", "Bag-00000"),
        ("Shoe-00000", "Bag-00010"),
    ]
    # Near: each item's smallest neighbour at or above search.duplicate_score that sorts before it.
    near = duplicates[duplicates["kind"] == "near"].set_index("item_id")["duplicate_of"].to_dict()
    close = rows[(rows["score"] >= cfg["search.duplicate_score"]) & (rows["similar_item_id"] < rows["item_id"])]
    assert near == close.groupby("item_id")["similar_item_id"].min().drop(exact["item_id"], errors="ignore").to_dict()
    assert near[NEAR_TWIN[1]] == NEAR_TWIN[0] and result.metrics["near_duplicates"] == len(near)
    assert set(duplicates["run_id"]) == {"r1"}
    # 500 items in chunks of ~120: several tasks, each worker loading a shard once, not per task
    assert result.metrics["tasks"] >= 4 and result.metrics["shard_loads"] < result.metrics["tasks"]


def test_ivfpq_shard_recall_against_brute_force(spark: SparkSession, tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"similar.chunk_size": 3000})
    df = dataset({"Tee": 12_000})
    write_embeddings(spark, cfg["output.root"], df)
    index.run(cfg, spark, "b1")
    assert builds.build_summary(cfg["output.root"], "b1")["shards"][0]["kind"] == "ivfpq"
    result = similar.run(cfg, spark, "r1")
    rows = similar_rows(cfg["output.root"])
    assert (rows.groupby("item_id").size() == K).all() and rows["item_id"].nunique() == len(df)
    assert not (rows["item_id"] == rows["similar_item_id"]).any()
    ordered = rows.sort_values(["item_id", "rank"])
    assert (ordered.groupby("item_id")["score"].diff().dropna() <= 0).all()
    assert result.metrics["tasks"] == 4

    sample = df.sample(1000, random_state=0)
    vectors = np.stack(df["embedding"].to_numpy())
    exact = faiss.knn(np.stack(sample["embedding"].to_numpy()), vectors, K + 1, metric=faiss.METRIC_INNER_PRODUCT)[1]
    ids = df["item_id"].to_numpy()
    found = ordered.groupby("item_id")["similar_item_id"].apply(set)
    hits = sum(len(found[item] & (set(ids[row]) - {item})) for item, row in zip(sample["item_id"], exact))
    recall = hits / (K * len(sample))
    assert recall >= 0.95, recall
    # every score is the true cosine, not a PQ estimate
    pairs = rows.merge(df[["item_id", "embedding"]], on="item_id").merge(
        df[["item_id", "embedding"]].rename(columns={"item_id": "similar_item_id", "embedding": "other"}),
        on="similar_item_id",
    )
    cosines = np.einsum("ij,ij->i", np.stack(pairs["embedding"].to_numpy()), np.stack(pairs["other"].to_numpy()))
    np.testing.assert_allclose(pairs["score"].to_numpy(), cosines, atol=1e-5)


def test_min_score_and_in_stock_only(spark: SparkSession, small: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    df = copy_of(small, tmp_path)
    in_stock = np.random.default_rng(3).random(len(df)) > 0.4
    pd.DataFrame({"item_id": df["item_id"], "image_uri": "x.png", "in_stock": in_stock}).to_parquet(
        tmp_path / "catalog.parquet"
    )
    cfg = config(tmp_path, **{"similar.in_stock_only": True, "similar.min_score": 0.75})
    similar.run(cfg, spark, "r1")
    rows = similar_rows(cfg["output.root"])
    assert rows["score"].min() >= 0.75
    assert set(rows["similar_item_id"]) <= set(df["item_id"][in_stock])
    assert not set(rows["item_id"]) <= set(df["item_id"][in_stock])  # out-of-stock items still get lists
    truth = brute_force(df, K, eligible=in_stock, min_score=0.75)
    assert 0 < sum(len(v) < K for v in truth.values()) < len(df)  # the threshold bites for some items only
    check_lists(rows, truth, df)


def test_scope_all_merges_shards(spark: SparkSession, small: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    df = copy_of(small, tmp_path)
    cfg = config(tmp_path, **{"similar.scope": "all", "similar.chunk_size": 150})
    similar.run(cfg, spark, "r1")
    rows = similar_rows(cfg["output.root"])
    check_lists(rows, brute_force(df, K, scope_all=True), df)
    shard_of = dict(zip(df["item_id"], df["shard"]))
    crossing = rows["item_id"].map(shard_of) != rows["similar_item_id"].map(shard_of)
    assert 0.1 < crossing.mean() < 0.9
    assert not rows[rows["item_id"] == CROSS_TWIN[0]]["similar_item_id"].isin([CROSS_TWIN[1]]).any()


def test_incremental_recomputes_changed_shards_only(
    spark: SparkSession, small: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    df = copy_of(small, tmp_path)
    cfg = config(tmp_path)
    root = cfg["output.root"]
    similar.run(cfg, spark, "r1")

    # Night 2: five shoes re-embedded, one shoe gone; the index is rebuilt (every shard, a new build).
    changed = df[df["item_id"] != "Shoe-00199"].reset_index(drop=True)
    redo = changed["item_id"].isin([f"Shoe-{i:05d}" for i in range(100, 105)])
    changed.loc[redo, "embedding"] = pd.Series(list(clustered(int(redo.sum()), seed=77)), index=changed.index[redo])
    changed.loc[redo, "run_id"] = "e2"
    write_embeddings(spark, root, changed)
    index.run(cfg, spark, "b2")
    result = similar.run(cfg, spark, "r2")
    assert result.metrics["shards_recomputed"] == 1
    rows = similar_rows(root)
    bags = rows["item_id"].str.startswith("Bag")
    assert set(rows[bags]["run_id"]) == {"r1"} and set(rows[~bags]["run_id"]) == {"r2"}
    assert "Shoe-00199" not in set(rows["item_id"]) | set(rows["similar_item_id"])
    check_lists(rows, brute_force(changed, K), changed)

    version = tables.version(tables.table_path(root, "similar_items"))
    dup_path = tables.table_path(root, "duplicates")
    dup_version, dup_rows = tables.version(dup_path), tables.read_arrow(dup_path).num_rows
    night = similar.run(cfg, spark, "r3")
    assert night.metrics["shards_recomputed"] == 0
    assert tables.version(tables.table_path(root, "similar_items")) == version
    # Nothing `duplicates` derives from changed: it is not derived again, and its counts are reported as before.
    assert tables.version(dup_path) == dup_version
    assert night.metrics["duplicates"] + night.metrics["near_duplicates"] == dup_rows > 0
    # A table edited behind the stage's back (here: emptied) is derived again on the next night.
    tables.write(tables.read(spark, dup_path).limit(0), dup_path, mode="overwrite")
    similar.run(cfg, spark, "r3b")
    assert tables.read_arrow(dup_path).num_rows == dup_rows

    # A setting that changes every list recomputes every shard.
    result = similar.run(cfg.with_overrides({"similar.k": 3}), spark, "r4")
    assert result.metrics["shards_recomputed"] == 2
    rows = similar_rows(root)
    assert set(rows["run_id"]) == {"r4"} and (rows.groupby("item_id").size() == 3).all()


def test_stale_index_is_refused(spark: SparkSession, small: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    df = copy_of(small, tmp_path)
    cfg = config(tmp_path)
    root = cfg["output.root"]
    moved = df.copy()
    shoes = moved["shard"] == "Shoe"
    moved.loc[shoes, "embedding"] = pd.Series(list(clustered(int(shoes.sum()), seed=5)), index=moved.index[shoes])
    write_embeddings(spark, root, moved)
    with pytest.raises(
        builds.StaleIndexError,
        match=r"shard 'Shoe' of index build b1: .* differ from those the "
        r"index was built from.*re-run `lookalike index`",
    ):
        similar.run(cfg, spark, "r1")

    grown = pd.concat([df, df.iloc[:1].assign(item_id="Bag-new")], ignore_index=True)
    write_embeddings(spark, root, grown)
    with pytest.raises(
        builds.StaleIndexError, match="shard 'Bag' has 301 items in embeddings but 300 in index build b1"
    ):
        similar.run(cfg, spark, "r2")
    assert not tables.exists(tables.table_path(root, "similar_items"))


# ------------------------------------------------------------------------------ search math, no Spark


def flat_target(vectors: np.ndarray, keys: np.ndarray, eligible: np.ndarray, tmp_path: Path) -> similar.TargetShard:
    params = choose_params(len(vectors), DIM)
    folder = tmp_path / "shard"
    shard_index.save(shard_index.build(vectors, params), folder, ids=[str(i) for i in range(len(vectors))], model=MODEL)
    loaded = shard_index.load(folder, expected_dim=DIM, expected_model=MODEL)
    return similar.TargetShard(loaded, vectors, keys, eligible, chunks=np.zeros(len(vectors), dtype=np.int32))


def test_widening_fills_k_when_few_items_are_eligible(tmp_path: Path) -> None:
    vectors = clustered(3000, seed=1)
    vectors[:60] = vectors[0]
    keys = np.arange(3000, dtype=np.int64)
    keys[:60] = 7  # a big duplicate group: one image, 60 listings
    eligible = np.random.default_rng(0).random(3000) < 0.05  # most of the shard sold out
    target = flat_target(vectors, keys, eligible, tmp_path)
    ids, scores, scored = search.neighbours(target, vectors, keys, K, None)
    assert (ids >= 0).all()
    exact = np.where(eligible[None, :] & (keys[None, :] != keys[:, None]), vectors @ vectors.T, -np.inf)
    np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :K], atol=1e-5)
    assert eligible[ids].all() and (keys[ids] != keys[:, None]).all()
    assert 0 < scored < len(np.unique(keys))  # only the rows the index could not fill were scored exhaustively


def test_select_filters_and_min_score_settles() -> None:
    ids = np.array([[3, 0, 5, 2], [1, 2, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.4, 0.3], [0.7, 0.6, -np.inf, -np.inf]], dtype=np.float32)
    keys, eligible = np.array([0, 1, 2, 3, 4, 5]), np.array([True, True, True, True, True, False])
    found, kept_scores, kept = search.select(ids, scores, np.array([0, 9]), keys, eligible, 3, 0.5)
    assert found.tolist() == [[3, -1, -1], [1, 2, -1]] and kept.tolist() == [1, 2]
    assert search.settled(kept, ids, scores, 3, 0.5).tolist() == [True, False]
    assert search.settled(kept, ids, scores, 3, None).tolist() == [False, False]


def test_planning() -> None:
    assert search.planned_fetch(10, np.array([1, 5]), 0.5).tolist() == [22, 30]
    assert search.rerank_budget(100, 11) == 100 and search.rerank_budget(100, 12) == 200
    assert search.rerank_budget(0, 500) == 0
    assert plan.task_size(10_000, 200_000, 1, 2) == 10_000  # big shards: chunk_size queries per task
    assert plan.task_size(10_000, 2_000, 1, 2) == 500  # a small catalog still gives each core two tasks
    assert plan.task_size(10_000, 2_000, 10, 2) == 5_000  # scope all: each query searches 10 shards
    assert search.group_sizes(np.array([4, 9, 1]), np.array([1, 4, 4, 4, 7])).tolist() == [3, 0, 1]
    units = plan.plan_units({"a": {0: 5, 1: 5}, "b": {0: 3}}, ["a", "b"], "all")
    assert [(u.target, u.source, u.chunk) for u in units] == [
        ("a", "a", 0),
        ("a", "a", 1),
        ("a", "b", 0),
        ("b", "a", 0),
        ("b", "a", 1),
        ("b", "b", 0),
    ]
    tasks = plan.pack(units, 8)
    assert [[u.size for u in task] for task in tasks] == [[5], [5, 3], [5], [5, 3]]
    assert len(plan.plan_units({"a": {0: 5}, "b": {0: 3}}, ["a", "b"], "shard")) == 2


def test_changed_shards() -> None:
    settings = plan.Settings(k=10, scope="shard", min_score=None, in_stock_only=False, exclude_duplicates=True)
    state = {
        "version": plan.STATE_VERSION,
        "settings": asdict(settings),
        "table_version": 4,
        "shards": {"a": "x", "b": "y"},
    }
    assert plan.changed_shards(state, {"a": "x", "b": "z", "c": "w"}, settings, 4) == {"b", "c"}
    assert plan.changed_shards(state, {"a": "x"}, settings, 4) == set()  # b's items are deleted by key
    assert plan.changed_shards(state, {"a": "x", "b": "y"}, settings, 5) == {"a", "b"}  # table edited
    assert plan.changed_shards(None, {"a": "x"}, settings, None) == {"a"}
    wider = plan.Settings(**{**asdict(settings), "scope": "all"})
    assert plan.changed_shards({**state, "settings": asdict(wider)}, {"a": "x"}, wider, 4) == {"a"}

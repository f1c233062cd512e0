"""The recommend stage on a small world whose right answers are known by construction.

Three shards (Shoe, Pan, Bag), each a tight cluster of its own direction, so the visual path's neighbours are
known; hand-written events make shoppers with one taste, two tastes, no usable history, and a co-visitation
pattern that crosses categories. Indexes are real FAISS shards built by `index.run`.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lookalike.config import Config
from lookalike.index import stage as index
from lookalike.recommend import history
from lookalike.recommend import stage as recommend
from lookalike.storage import tables
from tests.conftest import make_config

DIM = 16
MODEL = "test-model@0000/16px"
SHARDS = {"Shoe": 0, "Pan": 1, "Bag": 2}
PER_SHARD = 40
NOW = dt.datetime(2026, 11, 1, 12, 0, 0)
OUT_OF_STOCK = "Shoe-005"
NOT_EMBEDDED = "Gone-001"

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def item_vectors() -> pd.DataFrame:
    """Per shard, unit vectors around that shard's own axis: every same-shard item is nearer than any other."""
    rng = np.random.default_rng(3)
    rows = []
    for shard, axis in SHARDS.items():
        for i in range(PER_SHARD):
            v = np.zeros(DIM)
            v[axis] = 1.0
            v[3:] = 0.15 * rng.normal(size=DIM - 3)
            rows.append(
                {
                    "item_id": f"{shard}-{i:03d}",
                    "shard": shard,
                    "category": shard,
                    "embedding": (v / np.linalg.norm(v)).astype(np.float32),
                }
            )
    return pd.DataFrame(rows)


def event(user: str, item: str, kind: str = "view", days_ago: float = 1.0) -> dict:
    return {"user_id": user, "item_id": item, "event_type": kind, "ts": NOW - dt.timedelta(days=days_ago)}


def write_events(events: pd.DataFrame, path: Path) -> None:
    events.to_parquet(path, coerce_timestamps="us", allow_truncated_timestamps=True)


def world_events() -> pd.DataFrame:
    rows = [
        # One taste: shoes. Buys Shoe-001, which must never come back.
        event("u_shoes", "Shoe-001"),
        event("u_shoes", "Shoe-001", "purchase"),
        event("u_shoes", "Shoe-002"),
        event("u_shoes", "Shoe-003", "cart"),
        # Two tastes: mostly pans, some bags.
        *(event("u_two", f"Pan-{i:03d}", "cart") for i in range(10, 16)),
        *(event("u_two", f"Bag-{i:03d}") for i in range(10, 13)),
        # Nothing usable: an item that is not in embeddings, and an event type without a weight.
        event("u_cold", NOT_EMBEDDED, "purchase"),
        event("u_wish", "Shoe-002", "wishlist"),
    ]
    # Co-visitation across categories: twenty shoppers who look at Shoe-030 also look at Pan-030.
    for u in range(20):
        rows += [event(f"pair{u:02d}", "Shoe-030"), event(f"pair{u:02d}", "Pan-030")]
    rows.append(event("u_covisit", "Shoe-030"))
    # Popularity: Bag-000 is what everyone views.
    rows += [event(f"fan{u:02d}", "Bag-000") for u in range(30)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def world(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """Embeddings, index and events written once; each test runs the stage into its own copy of `out`."""
    folder = tmp_path_factory.mktemp("recommend-world")
    items = item_vectors()
    root = str(folder / "out")
    frame = spark.createDataFrame(
        items.assign(embedding=items["embedding"].map(lambda v: v.tolist())).drop(columns="category"),
        "item_id string, shard string, embedding array<float>",
    )
    tables.write(
        frame.select(
            "item_id",
            "shard",
            "embedding",
            F.lit(MODEL).alias("model"),
            F.col("item_id").alias("image_sha256"),
            F.lit(28).alias("width"),
            F.lit(28).alias("height"),
            F.lit("e1").alias("run_id"),
            F.current_timestamp().alias("embedded_at"),
        ),
        tables.table_path(root, "embeddings"),
        mode="overwrite",
    )
    catalog = items[["item_id", "category"]].assign(
        image_uri=items["item_id"] + ".png", in_stock=items["item_id"] != OUT_OF_STOCK
    )
    catalog.to_parquet(folder / "catalog.parquet")
    write_events(world_events(), folder / "events.parquet")
    index.run(config(folder), spark, "b1")
    return folder, items


def config(folder: Path, **overrides: object) -> Config:
    return make_config(
        folder,
        **{
            "catalog.path": str(folder / "catalog.parquet"),
            "events.path": str(folder / "events.parquet"),
            "index.flat_below": 2000,
            "index.exact_fallback": False,  # IVF-PQ shards whatever this machine times
            "recommend.n": 6,
            **overrides,
        },
    )


def read_table(folder: Path) -> pd.DataFrame:
    rows = tables.read_arrow(tables.table_path(str(folder / "out"), "recommendations")).to_pandas()
    return rows.sort_values(["user_id", "rank"]).reset_index(drop=True)


def run_stage(spark: SparkSession, world: tuple[Path, pd.DataFrame], **overrides: object) -> pd.DataFrame:
    cfg = config(world[0], **overrides)
    result = recommend.run(cfg, spark, "r1")
    rows = read_table(world[0])
    assert result.rows_out == len(rows)
    return rows


@pytest.fixture(scope="module")
def default_rows(spark: SparkSession, world: tuple[Path, pd.DataFrame]) -> pd.DataFrame:
    return run_stage(spark, world)


def lists(rows: pd.DataFrame) -> dict[str, list[str]]:
    return {user: group["item_id"].tolist() for user, group in rows.groupby("user_id")}


def test_contract_every_user_gets_n_clean_ranked_rows(default_rows: pd.DataFrame) -> None:
    rows = default_rows
    assert list(rows.columns) == ["user_id", "rank", "item_id", "score", "because", "run_id"]
    users = set(world_events()["user_id"])
    assert set(rows["user_id"]) == users
    for user, group in rows.groupby("user_id"):
        assert group["rank"].tolist() == list(range(1, 7)), user
        assert group["item_id"].is_unique, user
    seen = world_events().groupby("user_id")["item_id"].apply(set)
    for row in rows.itertuples():
        assert row.item_id not in seen[row.user_id], "an item the user interacted with came back"
        assert set(row.because) <= seen[row.user_id], "because names items outside the user's history"
    assert OUT_OF_STOCK not in set(rows["item_id"]) and NOT_EMBEDDED not in set(rows["item_id"])
    assert (rows["run_id"] == "r1").all()


def test_one_taste_stays_in_its_category_and_because_names_its_history(default_rows: pd.DataFrame) -> None:
    shoes = default_rows[default_rows["user_id"] == "u_shoes"]
    assert all(item.startswith("Shoe-") for item in shoes["item_id"])
    assert all(len(b) > 0 and set(b) <= {"Shoe-001", "Shoe-002", "Shoe-003"} for b in shoes["because"])
    # A view and a purchase (1 + 5) outweigh a cart (3) and a view (1): the bought shoe leads the explanations.
    assert sum(b[0] == "Shoe-001" for b in shoes["because"]) >= len(shoes) / 2


def test_two_tastes_share_the_list_by_weight(default_rows: pd.DataFrame) -> None:
    items = lists(default_rows)["u_two"]
    pans, bags = sum(i.startswith("Pan-") for i in items), sum(i.startswith("Bag-") for i in items)
    assert pans + bags == 6
    assert pans > bags >= 1  # pans weigh 18 of 21: most of the list, yet the bag taste keeps a slot


def test_covisitation_crosses_categories_and_is_explained(default_rows: pd.DataFrame) -> None:
    rows = default_rows[default_rows["user_id"] == "u_covisit"]
    top = rows.iloc[0]
    assert top["item_id"] == "Pan-030", "the co-visited item leads over look-alike shoes"
    assert list(top["because"]) == ["Shoe-030"]
    assert all(i.startswith("Shoe-") for i in rows["item_id"].iloc[1:])  # the rest: looks


def test_visual_only_when_covisitation_weight_is_zero(spark: SparkSession, world: tuple[Path, pd.DataFrame]) -> None:
    rows = run_stage(spark, world, **{"recommend.covisit_weight": 0.0})
    assert "Pan-030" not in lists(rows)["u_covisit"]


def test_users_without_usable_history_get_popular_items_with_empty_because(default_rows: pd.DataFrame) -> None:
    for user in ("u_cold", "u_wish"):
        rows = default_rows[default_rows["user_id"] == user]
        assert rows["item_id"].iloc[0] == "Bag-000"
        assert all(len(b) == 0 for b in rows["because"])
        assert rows["score"].is_monotonic_decreasing


def test_exclusion_rules_are_configurable(spark: SparkSession, world: tuple[Path, pd.DataFrame]) -> None:
    # Only purchases excluded: viewed and carted shoes may come back, the bought one never.
    rows = run_stage(spark, world, **{"recommend.exclude_events": ["purchase"]})
    shoes = lists(rows)["u_shoes"]
    assert "Shoe-001" not in shoes
    assert {"Shoe-002", "Shoe-003"} <= set(shoes)


def test_missing_events_path_and_bad_events_are_clear_errors(
    spark: SparkSession, world: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    with pytest.raises(recommend.RecommendError, match="events.path is not set"):
        recommend.run(config(world[0], **{"events.path": None}), spark, "r2")
    bad = tmp_path / "events.parquet"
    write_events(world_events().drop(columns="event_type"), bad)
    with pytest.raises(history.EventsError, match="missing column.*event_type"):
        recommend.run(config(world[0], **{"events.path": str(bad)}), spark, "r3")


def test_events_written_by_pandas_defaults_give_the_same_recommendations(
    spark: SparkSession, world: tuple[Path, pd.DataFrame], default_rows: pd.DataFrame, tmp_path: Path
) -> None:
    events = tmp_path / "events.parquet"
    world_events().to_parquet(events)  # nanosecond timestamps, which Spark cannot read as timestamps
    rows = run_stage(spark, world, **{"events.path": str(events)})
    assert rows.drop(columns="because").equals(default_rows.drop(columns="because"))
    assert [list(b) for b in rows["because"]] == [list(b) for b in default_rows["because"]]


def test_events_on_no_embedded_item_give_an_empty_table_not_a_crash(
    spark: SparkSession, world: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    # No user has a usable history and nothing recommendable is popular: every staged folder is empty.
    events = tmp_path / "events.parquet"
    write_events(pd.DataFrame([event("u1", NOT_EMBEDDED), event("u2", "Gone-002", "purchase")]), events)
    rows = run_stage(spark, world, **{"events.path": str(events)})
    assert rows.empty


def test_event_weights_and_half_life_decay(spark: SparkSession) -> None:
    events = spark.createDataFrame(
        pd.DataFrame(
            [
                event("u", "a", "view", days_ago=0),
                event("u", "a", "purchase", days_ago=10),
                event("u", "b", "cart", days_ago=20),
                event("u", "c", "wishlist", days_ago=0),
            ]
        )
    )
    weighted = history.weighted(history.validate(events, "test"), {"view": 1.0, "cart": 3.0, "purchase": 5.0}, 10.0)
    pairs = history.user_items(weighted, ["purchase"]).toPandas().set_index("item_id")
    assert pairs.loc["a", "weight"] == pytest.approx(1.0 + 5.0 * 0.5)
    assert pairs.loc["b", "weight"] == pytest.approx(3.0 * 0.25)
    assert "c" not in pairs.index  # no weight for wishlist
    assert bool(pairs.loc["a", "excluded"]) and not bool(pairs.loc["b", "excluded"])
    undecayed = history.weighted(history.validate(events, "test"), {"view": 1.0, "cart": 3.0}, None)
    assert sorted(undecayed.toPandas()["weight"]) == [1.0, 3.0]  # the purchase has no weight here


# ------------------------------------------------------------------------------------ incremental runs


def fresh_copy(world: tuple[Path, pd.DataFrame], folder: Path) -> Path:
    """The world's inputs, embeddings and index in `folder`, with no recommendations or state yet."""
    shutil.copytree(world[0], folder)
    shutil.rmtree(folder / "out" / "tables" / "recommendations", ignore_errors=True)
    shutil.rmtree(folder / "out" / "state", ignore_errors=True)
    return folder


def incremental_against_scratch(
    spark: SparkSession, folder: Path, change: Callable[[Path], None]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Recommend, change the inputs, recommend again incrementally; and that second run from scratch
    (`recommend.incremental: false`) over a copy of the changed inputs."""
    recommend.run(config(folder), spark, "r1")
    change(folder)
    scratch = folder.parent / f"{folder.name}-scratch"
    shutil.copytree(folder, scratch)
    result = recommend.run(config(folder), spark, "r2")
    recommend.run(config(scratch, **{"recommend.incremental": False}), spark, "r2")
    return read_table(folder), read_table(scratch), result.metrics


def assert_same_lists(incremental_rows: pd.DataFrame, scratch_rows: pd.DataFrame) -> None:
    assert incremental_rows[["user_id", "rank", "item_id"]].equals(scratch_rows[["user_id", "rank", "item_id"]])
    np.testing.assert_allclose(incremental_rows["score"], scratch_rows["score"], atol=1e-5)
    assert [list(b) for b in incremental_rows["because"]] == [list(b) for b in scratch_rows["because"]]


def test_incremental_run_after_a_moved_vector_equals_a_run_from_scratch(
    spark: SparkSession, world: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    def move(folder: Path) -> None:
        # Shoe-039 now looks like what u_shoes shops for (re-embedded by run e2): it should lead their list.
        path = tables.table_path(str(folder / "out"), "embeddings")
        embeddings = tables.read_arrow(path).to_pandas()
        moved = embeddings["item_id"] == "Shoe-039"
        taste = np.mean(list(embeddings[embeddings["item_id"].isin(["Shoe-001", "Shoe-002"])]["embedding"]), axis=0)
        vector = (taste / np.linalg.norm(taste)).astype(np.float32)
        embeddings.loc[moved, "embedding"] = pd.Series([vector], index=embeddings.index[moved])
        embeddings.loc[moved, "run_id"] = "e2"
        tables.write(spark.createDataFrame(embeddings, tables.spark_schema(path)), path, mode="overwrite")
        index.run(config(folder), spark, "b2")

    rows, scratch, metrics = incremental_against_scratch(spark, fresh_copy(world, tmp_path / "moved"), move)
    assert_same_lists(rows, scratch)
    assert "Shoe-039" in set(rows[rows["user_id"] == "u_shoes"]["item_id"])  # the change did reach a list
    assert 0 < metrics["users_recomputed"] < metrics["users"]
    assert set(rows[rows["run_id"] == "r2"]["user_id"]) < set(rows["user_id"])  # the others' lists kept


def test_incremental_run_after_new_and_gone_events_and_stock_equals_a_run_from_scratch(
    spark: SparkSession, world: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    def shop(folder: Path) -> None:
        # A new shopper, one more view for u_shoes, a co-visitor who left, and u_two's top pick sold out.
        events = pd.read_parquet(folder / "events.parquet")
        events = pd.concat(
            [
                events[events["user_id"] != "pair07"],
                pd.DataFrame([event("u_new", "Pan-001"), event("u_shoes", "Shoe-010")]),
            ]
        )
        write_events(events, folder / "events.parquet")
        sold = read_table(folder).query("user_id == 'u_two' and rank == 1")["item_id"].iloc[0]
        catalog = pd.read_parquet(folder / "catalog.parquet")
        catalog.loc[catalog["item_id"] == sold, "in_stock"] = False
        catalog.to_parquet(folder / "catalog.parquet")

    rows, scratch, metrics = incremental_against_scratch(spark, fresh_copy(world, tmp_path / "shop"), shop)
    assert_same_lists(rows, scratch)
    assert "pair07" not in set(rows["user_id"]) and "u_new" in set(rows["user_id"])
    assert {"u_new", "u_shoes", "u_two"} <= set(rows[rows["run_id"] == "r2"]["user_id"])
    assert 0 < metrics["users_recomputed"] < metrics["users"]


def test_incremental_state_is_ignored_when_the_table_was_changed_behind_its_back(
    spark: SparkSession, world: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    folder = fresh_copy(world, tmp_path / "edited")
    recommend.run(config(folder), spark, "r1")
    path = tables.table_path(str(folder / "out"), "recommendations")
    tables.write(spark.createDataFrame(read_table(folder).head(3)), path, mode="overwrite")
    write_events(pd.concat([world_events(), pd.DataFrame([event("u_new", "Pan-001")])]), folder / "events.parquet")
    result = recommend.run(config(folder), spark, "r2")
    assert result.metrics["users_recomputed"] == result.metrics["users"]
    assert set(read_table(folder)["user_id"]) == set(world_events()["user_id"]) | {"u_new"}

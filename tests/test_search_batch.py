"""`lookalike search`: a query table embedded by the embed stage's UDF and searched against the latest build,
into `search_results` and `search_errors`; bad queries are error rows, bad tables one-line refusals."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.embed import stage as embed
from lookalike.index import stage as index
from lookalike.search import batch, filters
from lookalike.storage import tables
from tests.conftest import make_config
from tests.image_corpus import photo

N = 24


@pytest.fixture(scope="module")
def built(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("search-batch")
    (folder / "img").mkdir()
    for i in range(N):
        photo(40 + i % 9, 36 + i % 5, seed=i).save(folder / "img" / f"p{i}.png")
    pd.DataFrame(
        {
            "item_id": [f"p{i}" for i in range(N)],
            "image_uri": [f"img/p{i}.png" for i in range(N)],
            "category": [("a", "b")[i % 2] for i in range(N)],
            "in_stock": [None if i % 4 == 0 else i % 4 != 1 for i in range(N)],  # null = in stock
            "price": [float(i) for i in range(N)],
        }
    ).to_parquet(folder / "catalog.parquet")
    cfg = config(folder)
    embed.run(cfg, spark, "b1")
    index.run(cfg, spark, "b1")
    return folder


def config(folder: Path, **overrides: object) -> Config:
    values = {"catalog.path": str(folder / "catalog.parquet"), "embed.image_size": 32, "embed.batch_size": 8}
    return make_config(folder, **{**values, **overrides})


def copy(folder: Path, item: str, name: str) -> str:
    """A query image with the item's picture, re-encoded (other bytes, same pixels): it must find the item
    first. How far altered photos still find theirs is a benchmark's question, not this test's."""
    buffer = io.BytesIO()
    Image.open(folder / "img" / f"{item}.png").save(buffer, "PNG", compress_level=1)
    path = folder / "queries" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return str(path)


def write_queries(folder: Path, rows: list[dict]) -> str:
    path = folder / "queries" / "q.parquet"
    path.parent.mkdir(exist_ok=True)
    pd.DataFrame(rows, columns=["query_id", "image_uri", "category", "k"]).astype({"k": "Int32"}).to_parquet(path)
    return str(path)


def table(folder: Path, name: str) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(folder / "out"), name)).to_pandas()


def test_queries_find_their_items_and_bad_ones_become_error_rows(spark: SparkSession, built: Path) -> None:
    folder = built
    (folder / "queries").mkdir(exist_ok=True)
    (folder / "queries" / "page.jpg").write_bytes(b"<html>soft 404</html>")
    queries = write_queries(
        folder,
        [
            {"query_id": "q1", "image_uri": copy(folder, "p3", "q1.png"), "category": None, "k": None},
            {"query_id": "q2", "image_uri": copy(folder, "p7", "q2.png"), "category": "b", "k": 3},
            {"query_id": "q3", "image_uri": str(folder / "queries" / "later.jpg"), "category": None, "k": None},
            {"query_id": "q4", "image_uri": str(folder / "queries" / "page.jpg"), "category": None, "k": None},
            {"query_id": "q5", "image_uri": copy(folder, "p1", "q5.png"), "category": "shoes", "k": None},
        ],
    )
    result = batch.run(config(folder, **{"search.queries": queries}), spark, "s1")
    assert result.metrics["queries"] == 5 and result.metrics["answered"] == 2 and result.metrics["failed"] == 3
    found = table(folder, "search_results").sort_values(["query_id", "rank"])
    q1, q2 = found[found["query_id"] == "q1"], found[found["query_id"] == "q2"]
    assert list(q1["rank"]) == list(range(1, 11)) and q1["item_id"].iloc[0] == "p3"  # search.k = 10, all shards
    assert q1["score"].is_monotonic_decreasing and q1["score"].iloc[0] > 0.999
    # The re-encoded copy is flagged a duplicate of its item; the flag is the score against search.duplicate_score.
    assert (
        q1["duplicate"].iloc[0]
        and (found["duplicate"] == (found["score"] >= config(folder)["search.duplicate_score"])).all()
    )
    assert list(q2["rank"]) == [1, 2, 3] and q2["item_id"].iloc[0] == "p7"
    assert all(int(item[1:]) % 2 == 1 for item in q2["item_id"])  # category b: the odd items' shard only
    errors = table(folder, "search_errors").set_index("query_id")
    assert errors["error_kind"].to_dict() == {"q3": "missing", "q4": "not_an_image", "q5": "no_shard"}
    assert (errors["run_id"] == "s1").all()

    # A re-run replaces its own queries' rows only: q3's image now exists, q1 asks for another item.
    copy(folder, "p10", "later.jpg")
    again = write_queries(
        folder,
        [
            {"query_id": "q1", "image_uri": copy(folder, "p5", "q1b.png"), "category": None, "k": 2},
            {"query_id": "q3", "image_uri": str(folder / "queries" / "later.jpg"), "category": None, "k": 1},
        ],
    )
    batch.run(config(folder, **{"search.queries": again}), spark, "s2")
    found = table(folder, "search_results").sort_values(["query_id", "rank"])
    assert found.groupby("query_id")["run_id"].first().to_dict() == {"q1": "s2", "q2": "s1", "q3": "s2"}
    assert list(found.loc[found["query_id"] == "q1", "item_id"])[0] == "p5"
    assert list(found.loc[found["query_id"] == "q3", "item_id"]) == ["p10"]
    assert set(table(folder, "search_errors")["query_id"]) == {"q4", "q5"}


def test_bad_query_tables_and_a_mismatched_model_are_refused(spark: SparkSession, built: Path) -> None:
    folder = built
    empty = write_queries(folder, [])
    with pytest.raises(batch.QueryError, match="no rows"):
        batch.run(config(folder, **{"search.queries": empty}), spark, "x1")
    dupes = write_queries(folder, [{"query_id": "d", "image_uri": "a.jpg"}, {"query_id": "d", "image_uri": "b.jpg"}])
    with pytest.raises(batch.QueryError, match="repeat query_id"):
        batch.run(config(folder, **{"search.queries": dupes}), spark, "x2")
    ok = write_queries(folder, [{"query_id": "m", "image_uri": copy(folder, "p2", "m.png")}])
    with pytest.raises(batch.QueryError, match="was embedded with"):
        batch.run(config(folder, **{"search.queries": ok, "embed.image_size": 48}), spark, "x3")
    path = folder / "queries" / "noid.parquet"
    pd.DataFrame({"image_uri": ["a.jpg"]}).to_parquet(path)
    with pytest.raises(batch.QueryError, match=r"lack required column\(s\) \['query_id'\]"):
        batch.run(config(folder, **{"search.queries": str(path)}), spark, "x4")


def test_where_keeps_k_matching_results_and_bad_predicates_are_refused_first(spark: SparkSession, built: Path) -> None:
    folder = built
    queries = write_queries(
        folder,
        [
            {"query_id": "w1", "image_uri": copy(folder, "p2", "w1.png"), "category": None, "k": 6},
            {"query_id": "w2", "image_uri": copy(folder, "p9", "w2.png"), "category": "b", "k": 10},
        ],
    )
    where = "in_stock AND price >= 4"
    batch.run(config(folder, **{"search.queries": queries, "search.where": where}), spark, "w")
    found = table(folder, "search_results")
    matching = {f"p{i}" for i in range(4, N) if i % 4 != 1}
    w1, w2 = (found[found["query_id"] == q].sort_values("rank") for q in ("w1", "w2"))
    assert len(w1) == 6 and set(w1["item_id"]) <= matching
    assert list(w2["rank"]) == [1, 2, 3, 4, 5] and set(w2["item_id"]) == {f"p{i}" for i in (7, 11, 15, 19, 23)}

    # Refused before the queries are read: a bad predicate fails though the query table is not even parquet.
    missing = folder / "queries" / "junk.parquet"
    missing.write_bytes(b"not parquet")
    for bad, said in [("price >", "not a SQL predicate"), ("prise > 3", "prise"), ("1; DROP TABLE x", "not a SQL")]:
        with pytest.raises(filters.FilterError, match=said) as caught:
            batch.run(config(folder, **{"search.queries": str(missing), "search.where": bad}), spark, "w-bad")
        assert "\n" not in str(caught.value)
    assert set(table(folder, "search_results")["run_id"]) >= {"w"}


def test_results_from_before_the_duplicate_flag_get_it(spark: SparkSession, tmp_path: Path) -> None:
    path = str(tmp_path / "search_results")
    legacy = spark.createDataFrame(
        [("q", 1, "a", 0.99, "old"), ("q", 2, "b", 0.5, "old")],
        "query_id string, rank int, item_id string, score float, run_id string",
    )
    tables.write(legacy, path)
    batch._add_duplicate_flags(spark, path, 0.9)
    rows = tables.read_arrow(path).to_pandas().sort_values("rank")
    assert list(rows.columns) == ["query_id", "rank", "item_id", "score", "duplicate", "run_id"]
    assert rows["duplicate"].tolist() == [True, False] and set(rows["run_id"]) == {"old"}

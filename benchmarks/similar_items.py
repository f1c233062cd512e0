"""Benchmark: the similar stage against Spark MLlib's LSH and against exact search, same vectors, same run.

Every item's 10 most similar items, three ways, on clustered unit vectors shaped like image embeddings
(`index_build.cluster_model`), on this machine's Spark (`local[2]` here):

- lookalike: `index.run` then `similar.run` over an `embeddings` table holding one shard of all items
  (IVF-PQ candidates re-ranked exactly, queries split across Spark tasks). Timed as index + similar.
- exact: FAISS brute force (inner product) in one process with all cores, the best exact baseline there
  is; also the ground truth of every recall figure.
- LSH: `BucketedRandomProjectionLSH` + `approxSimilarityJoin` of the items with themselves, self pairs
  dropped, top 10 per item with a window: what the Spark documentation suggests for similarity joins.

Why LSH is measured on a subset and extrapolated. BRP hashes with one random projection per table, so a
bucket is a slab of space, and in 256-d a random projection barely separates neighbours from strangers.
The bucket length the Spark docs suggest for unit vectors (1-10 x n^(-1/dim), ~1.0 here) puts every
item in one bucket: a cross join of 4e10 pairs at 200,000. A bucket short enough to keep the join small
misses most neighbours, and its candidate pairs still grow as n^2, so no setting reaches a useful recall
at 200,000 within this benchmark's 10 minutes. LSH therefore runs on a random `--lsh-n` subset (default
20,000) with a bucket length of 0.01 (a true 10-NN pair shares a bucket in ~10% of tables) and a distance
threshold of 1.0 (cosine >= 0.5, beyond the 10th neighbour of ~99% of items), after a warm-up, with 2 and
with 8 tables; the difference is the measured cost of a table. lookalike and exact run again on that
subset for a like-for-like row. The estimates: recall 0.95 needs T tables with 1 - (1 - p)^T >= 0.95,
where p, the per-table collision rate of true neighbours, is measured with BRP's own kind of projections
(it predicts the measured recall of the 2 and 8 table runs); those T tables cost T x the measured cost of
a table at the subset, and x the growth of candidate pairs per table (counted from the projections, ~n^2)
at full scale. Fixed costs are left out, which flatters LSH.

Exact search at full scale (n^2 dot products, minutes) is timed on `--exact-queries` items and scaled
to all n (its cost is linear in the queries); `--exact-all` times it on every item.

    .venv/bin/python benchmarks/similar_items.py            # 200,000 x 256, LSH on 20,000; 4-8 min here
    .venv/bin/python benchmarks/similar_items.py --n 50000 --lsh-n 10000
    .venv/bin/python benchmarks/similar_items.py --n 50000 --shape none --skip-lsh   # never slower than exact
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_build import cluster_model, sample  # noqa: E402  (the same vectors as the index benchmark)

K = 10
MODEL = "synthetic@0/256"
LSH_BUCKET_LENGTH = 0.01
LSH_TABLES = (2, 8)  # two runs: their difference is the cost of 6 tables
LSH_THRESHOLD = 1.0  # Euclidean, on unit vectors: cosine >= 1 - 1.0**2 / 2 = 0.5
RECALL_TARGET = 0.95


def exact_top(vectors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """The exact top-10 other items of `rows` (FAISS ids = rows of `vectors`) and the seconds it took."""
    import faiss

    started = time.perf_counter()
    _, ids = faiss.knn(vectors[rows], vectors, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    seconds = time.perf_counter() - started
    not_self = ids != rows[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :K]  # drop self, keep order (ties may hide it)
    return np.take_along_axis(ids, order, axis=1), seconds


def recall(found: dict[int, set[int]], rows: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(found.get(int(row), set()) & set(true.tolist())) for row, true in zip(rows, truth))
    return hits / (K * len(rows))


def write_embeddings(
    spark, vectors: np.ndarray, root: str, workdir: Path, model: str = MODEL, shards: int = 1, clustered: bool = True
) -> None:
    """The vectors as lookalike's `embeddings` table: item i is "i", in shard "all" (or `s<i % shards>`),
    distinct images, embedded by `model`; files clustered by shard as the embed stage writes them (or, with
    `clustered` False, every file mixing all shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    from lookalike.storage import tables

    n, dim = vectors.shape
    ids = pa.array([str(i) for i in range(n)])
    source = workdir / f"vectors-{n}.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": ids,
                "embedding": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vectors.ravel())
                ),
            }
        ),
        source,
    )
    frame = spark.read.parquet(str(source)).select(
        "item_id",
        (F.lit("all") if shards == 1 else F.concat(F.lit("s"), F.col("item_id").cast("int") % shards)).alias("shard"),
        "embedding",
        F.lit(model).alias("model"),
        F.col("item_id").alias("image_sha256"),
        F.lit(0).alias("width"),
        F.lit(0).alias("height"),
        F.lit("e1").alias("run_id"),
        F.current_timestamp().alias("embedded_at"),
    )
    path = tables.table_path(root, "embeddings")
    tables.write(frame, path, mode="overwrite", cluster_by="shard" if clustered else None)


def run_lookalike(spark, cfg, vectors: np.ndarray, workdir: Path) -> dict:
    """index + similar on the vectors; returns timings, the table's lists and the stage's metrics."""
    from lookalike.index import builds
    from lookalike.index import stage as index
    from lookalike.similar import stage as similar
    from lookalike.storage import tables

    write_embeddings(spark, vectors, cfg["output.root"], workdir)
    started = time.perf_counter()
    index.run(cfg, spark, "bench-index")
    indexed = time.perf_counter()
    result = similar.run(cfg, spark, "bench-similar")
    done = time.perf_counter()
    rows = tables.read_arrow(
        tables.table_path(cfg["output.root"], "similar_items"), columns=["item_id", "similar_item_id"]
    ).to_pandas()
    found = rows.astype(int).groupby("item_id")["similar_item_id"].apply(set).to_dict()
    shard = builds.build_summary(cfg["output.root"], "bench-index")["shards"][0]
    manifest = json.loads(Path(shard["folder"], "manifest.json").read_text())
    return {
        "index_s": indexed - started,
        "similar_s": done - indexed,
        "found": found,
        "metrics": result.metrics,
        "factory": f"{shard['factory']} (nprobe {shard['nprobe']}; {manifest['choice']})",
        "rows": len(rows),
    }


def run_lsh(spark, vectors: np.ndarray, workdir: Path, tables: int) -> dict:
    """Spark BRP LSH self-join + window top-10, as a Spark user would write it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    n, dim = vectors.shape
    source = workdir / f"lsh-{n}-{tables}.parquet"
    pq.write_table(
        pa.table(
            {
                "id": np.arange(n),
                "v": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vectors.ravel())
                ),
            }
        ),
        source,
    )
    items = spark.read.parquet(str(source)).select("id", array_to_vector("v").alias("features")).cache()
    items.count()  # loading is not the join's cost
    started = time.perf_counter()
    model = BucketedRandomProjectionLSH(
        inputCol="features", outputCol="hashes", bucketLength=LSH_BUCKET_LENGTH, numHashTables=tables, seed=0
    ).fit(items)
    pairs = (
        model.approxSimilarityJoin(items, items, LSH_THRESHOLD, distCol="distance")
        .select(F.col("datasetA.id").alias("a"), F.col("datasetB.id").alias("b"), "distance")
        .filter("a != b")
    )
    nearest = Window.partitionBy("a").orderBy("distance", "b")
    top = pairs.withColumn("rank", F.row_number().over(nearest)).filter(F.col("rank") <= K).select("a", "b").toPandas()
    seconds = time.perf_counter() - started
    items.unpersist()
    return {"seconds": seconds, "found": top.groupby("a")["b"].apply(set).to_dict(), "rows": len(top)}


def bucket_stats(vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray, seed: int) -> tuple[float, float]:
    """Per BRP table, averaged over 16 random projections drawn as BRP draws them (Gaussian, normalised):
    the share of (item, true 10-NN) pairs that share a bucket, and the candidate pairs the join compares."""
    rng = np.random.default_rng(seed)
    rates, pairs = [], []
    for _ in range(16):
        direction = rng.standard_normal(vectors.shape[1]).astype(np.float32)
        buckets = np.floor(vectors @ (direction / np.linalg.norm(direction)) / LSH_BUCKET_LENGTH)
        rates.append(float((buckets[truth] == buckets[rows][:, None]).mean()))
        counts = np.unique(buckets, return_counts=True)[1].astype(np.float64)
        pairs.append(float((counts * (counts - 1)).sum()))
    return float(np.mean(rates)), float(np.mean(pairs))


def tables_for(rate: float) -> int:
    """BRP tables needed for recall RECALL_TARGET when a true neighbour collides in `rate` of tables."""
    return math.ceil(math.log(1 - RECALL_TARGET) / math.log(1 - rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="items (default 200,000)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=None, help="default: n / 500")
    parser.add_argument("--lsh-n", type=int, default=20_000, help="items in the LSH comparison (a random subset)")
    parser.add_argument("--exact-queries", type=int, default=10_000, help="items exact search is timed on at n")
    parser.add_argument("--exact-all", action="store_true", help="time exact search on all n items")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="similar.chunk_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape",
        choices=("clustered", "none"),
        default="clustered",
        help="clustered (index_build.cluster_model) or none: isotropic unit vectors with no cluster structure, "
        "the case where an index must not cost more than exact search",
    )
    parser.add_argument("--skip-lsh", action="store_true", help="only lookalike against exact search at --n")
    parser.add_argument("--workdir", help="where tables and indexes go (default: a temporary folder)")
    args = parser.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        benchmark(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="similar_items_") as workdir:
            benchmark(args, Path(workdir))


def benchmark(args: argparse.Namespace, workdir: Path) -> None:
    import faiss

    from lookalike import config
    from lookalike.session import get_spark

    clusters = args.clusters or max(1, args.n // 500)
    print(
        f"scale: n={args.n:,} x dim={args.dim}, {clusters:,} clusters, k={K}; LSH subset {args.lsh_n:,}; "
        f"seed {args.seed}"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads"
    )
    if args.shape == "clustered":
        vectors = sample(cluster_model(args.dim, clusters, args.seed), args.n, args.seed + 1)
    else:
        vectors = np.random.default_rng(args.seed + 1).standard_normal((args.n, args.dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rng = np.random.default_rng(args.seed + 3)
    subset = np.sort(rng.choice(args.n, args.lsh_n, replace=False))
    small = vectors[subset]

    def make_cfg(name: str) -> config.Config:
        (workdir / name).mkdir()
        return config.validate(
            {
                "catalog.path": str(workdir),
                "output.root": str(workdir / name / "out"),
                "spark.master": "local[2]",
                "spark.driver_memory": "4g",
                "spark.conf": {"spark.ui.enabled": "false"},
                "similar.chunk_size": args.chunk_size,
            },
            base_dir=workdir,
        )

    cfg = make_cfg("full")
    spark = get_spark(cfg)

    print(f"\n[1/4] lookalike at n={args.n:,} ...", flush=True)
    full = run_lookalike(spark, cfg, vectors, workdir)
    print(f"[2/4] exact at n={args.n:,} ...", flush=True)
    timed = np.arange(args.n) if args.exact_all else np.sort(rng.choice(args.n, args.exact_queries, replace=False))
    truth, exact_s = exact_top(vectors, timed)
    exact_full_s = exact_s * args.n / len(timed)
    full_recall = recall(full["found"], timed, truth)
    total = full["index_s"] + full["similar_s"]
    if args.skip_lsh:
        print(f"\nshape {args.shape}: lookalike {full['factory']}")
        print(
            f"  index {full['index_s']:.1f} s + similar {full['similar_s']:.1f} s = {total:.1f} s, "
            f"recall@10 {full_recall:.3f}"
        )
        print(f"  exact FAISS flat {exact_full_s:.1f} s (timed on {len(timed):,} items, scaled)")
        print(
            f"  index+similar vs exact: {exact_full_s / total:.2f}x faster; "
            f"similar alone {exact_full_s / full['similar_s']:.2f}x"
        )
        return

    print(f"[3/4] LSH at n={args.lsh_n:,} ...", flush=True)
    run_lsh(spark, small[:500], workdir, 1)  # warm-up: the first ML job pays for class loading
    lsh = [run_lsh(spark, small, workdir, tables) for tables in LSH_TABLES]
    print(f"[4/4] lookalike and exact at n={args.lsh_n:,} ...", flush=True)
    sub = run_lookalike(spark, make_cfg("subset"), small, workdir)
    sub_rows = np.arange(args.lsh_n)
    sub_truth, sub_exact_s = exact_top(small, sub_rows)
    sub_recall = recall(sub["found"], sub_rows, sub_truth)
    lsh_recall = [recall(run["found"], sub_rows, sub_truth) for run in lsh]

    sub_rate, sub_pairs = bucket_stats(small, sub_rows, sub_truth, args.seed)
    full_rate, full_pairs = bucket_stats(vectors, timed, truth, args.seed)
    per_table_s = (lsh[1]["seconds"] - lsh[0]["seconds"]) / (LSH_TABLES[1] - LSH_TABLES[0])
    sub_needed_s = lsh[1]["seconds"] + (tables_for(sub_rate) - LSH_TABLES[1]) * per_table_s
    full_needed_s = tables_for(full_rate) * per_table_s * full_pairs / sub_pairs
    sub_total = sub["index_s"] + sub["similar_s"]

    print()
    print(f"{'method':<28} {'items':>9} {'wall s':>9} {'recall@10':>10}  notes")
    rows = [
        (
            "lookalike index+similar",
            args.n,
            total,
            full_recall,
            f"index {full['index_s']:.1f} s ({full['factory']}) + similar {full['similar_s']:.1f} s "
            f"({full['metrics']['tasks']:.0f} tasks); recall on the {len(timed):,} timed items",
        ),
        (
            "exact (FAISS flat)",
            args.n,
            exact_full_s,
            1.0,
            "timed on all items"
            if args.exact_all
            else f"timed on {len(timed):,} items: {exact_s:.1f} s, scaled x {args.n / len(timed):.0f}",
        ),
        (
            f"Spark BRP LSH, {tables_for(full_rate)} tables",
            args.n,
            full_needed_s,
            RECALL_TARGET,
            f"ESTIMATED: {full_rate:.3f} collisions per table, {full_pairs:.2g} pairs per table "
            f"({full_pairs / sub_pairs:.0f}x the subset's)",
        ),
        (
            "lookalike index+similar",
            args.lsh_n,
            sub_total,
            sub_recall,
            f"index {sub['index_s']:.1f} s ({sub['factory']}) + similar {sub['similar_s']:.1f} s",
        ),
        ("exact (FAISS flat)", args.lsh_n, sub_exact_s, 1.0, "all items"),
        *[
            (
                f"Spark BRP LSH, {tables} tables",
                args.lsh_n,
                run["seconds"],
                rec,
                f"bucketLength {LSH_BUCKET_LENGTH}, threshold {LSH_THRESHOLD}; {run['rows']:,} rows; "
                f"{1 - (1 - sub_rate) ** tables:.3f} predicted",
            )
            for tables, run, rec in zip(LSH_TABLES, lsh, lsh_recall)
        ],
        (
            f"Spark BRP LSH, {tables_for(sub_rate)} tables",
            args.lsh_n,
            sub_needed_s,
            RECALL_TARGET,
            f"ESTIMATED: {sub_rate:.3f} collisions per table, {per_table_s:.1f} s per table measured, "
            f"{sub_pairs:.2g} pairs per table",
        ),
    ]
    for name, n, seconds, rec, note in rows:
        print(f"{name:<28} {n:>9,} {seconds:>9.1f} {rec:>10.4f}  {note}")
    print()
    print(f"ratio recall@10 lookalike at n={args.n:,}: {full_recall:.4f} (target >= {RECALL_TARGET})")
    print(
        f"ratio speed LSH / lookalike at n={args.n:,}, LSH at recall {RECALL_TARGET} (estimated): "
        f"{full_needed_s / total:.0f}x (target >= 10x)"
    )
    print(
        f"ratio speed exact / lookalike at n={args.n:,}: {exact_full_s / total:.2g}x "
        f"(similar stage alone: {exact_full_s / full['similar_s']:.2g}x)"
    )
    print(
        f"ratio speed LSH / lookalike at n={args.lsh_n:,}: {lsh[1]['seconds'] / sub_total:.1f}x as measured "
        f"(LSH at recall {lsh_recall[1]:.3f}, lookalike {sub_recall:.3f}); {sub_needed_s / sub_total:.1f}x with LSH "
        f"at recall {RECALL_TARGET} (estimated); the similar stage alone (the nightly builds the index anyway): "
        f"{lsh[1]['seconds'] / sub['similar_s']:.1f}x and {sub_needed_s / sub['similar_s']:.0f}x"
    )
    print(f"load average {os.getloadavg()[0]:.1f} at end (other work on this machine slows every row)")
    spark.stop()


if __name__ == "__main__":
    main()

"""What a per-user incremental recommend costs against recomputing every user, after small changes.

On a synthetic catalog (`scale.py`'s: clustered 256-d vectors as an `embeddings` table in `--shards` shards,
one user per 5 items with 10 events each) the recommend stage runs once in full, then after each change:

  one item     one item re-embedded with a new vector (as a changed photo would be), its shard's index updated
  new events   `--shoppers` users (half of them new) with 10 more events each

each time incrementally (the default) and then from scratch (`recommend.incremental: false`) over the same
inputs, in the same SparkSession. Printed per change: users recomputed, both times, their ratio, and whether
the two runs wrote the same table, by the chaos benchmark's comparison (`chaos.diff`: every row's item, score
and `because`, scores within 1e-5; items whose scores tie may come in either order, and the last tie at the
cut may be another item with the same score).

    .venv/bin/python benchmarks/recommend_incremental.py --n 50000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import diff, read_rows  # noqa: E402
from index_build import cluster_model, sample  # noqa: E402
from scale import EVENTS_PER_USER, write_catalog_and_events  # noqa: E402
from similar_items import write_embeddings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="catalog items (default 50,000; users: n / 5)")
    parser.add_argument("--shards", type=int, default=5, help="shards (default 5)")
    parser.add_argument("--shoppers", type=int, default=20, help="users with new events (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lookalike import config
    from lookalike.index import stage as index
    from lookalike.recommend import stage as recommend
    from lookalike.session import get_spark
    from lookalike.storage import tables

    work = Path(tempfile.mkdtemp(prefix="recommend-incremental-"))
    _, events_path, users = write_catalog_and_events(work, args.n, args.seed)

    def cfg(**extra: object) -> config.Config:
        return config.validate(
            {
                "catalog.path": str(work / "catalog.parquet"),
                "events.path": str(events_path),
                "output.root": str(work / "out"),
                "spark.master": "local[2]",
                "spark.driver_memory": "6g",
                "spark.conf": {"spark.ui.enabled": "false"},
                **extra,
            },
            base_dir=work,
        )

    spark = get_spark(cfg())
    vectors = sample(cluster_model(256, max(1, args.n // 500), args.seed), args.n, args.seed + 1)
    write_embeddings(spark, vectors, str(work / "out"), work, shards=args.shards)
    index.run(cfg(), spark, "i0")

    def recommend_run(run_id: str, **extra: object) -> tuple[float, float, pd.DataFrame]:
        started = time.perf_counter()
        result = recommend.run(cfg(**extra), spark, run_id)
        seconds = time.perf_counter() - started
        rows = read_rows(work / "out", "recommendations")
        assert rows is not None
        return seconds, result.metrics["users_recomputed"], rows

    print(f"{args.n:,} items in {args.shards} shards, {users:,} users x {EVENTS_PER_USER} events", flush=True)
    full, _, _ = recommend_run("r0")
    print(f"first run (every user): {full:.1f} s", flush=True)

    def one_item() -> None:
        embeddings_path = tables.table_path(str(work / "out"), "embeddings")
        row = tables.read_arrow(embeddings_path).to_pandas().query("item_id == '0'")
        moved = vectors[1] + 0.05 * np.random.default_rng(args.seed).normal(size=vectors.shape[1])
        row = row.assign(
            embedding=[(moved / np.linalg.norm(moved)).astype(np.float32)],
            run_id="changed",
            embedded_at=pd.Timestamp.now(),
        )
        tables.replace_by_key(
            spark.createDataFrame(row, tables.spark_schema(embeddings_path)), embeddings_path, "item_id"
        )
        index.run(cfg(), spark, "i1")

    def new_events() -> None:
        events = pd.read_parquet(events_path)
        rng = np.random.default_rng(args.seed + 2)
        who = [f"u{u}" for u in rng.integers(0, users, args.shoppers // 2)]
        who += [f"new{u}" for u in range(args.shoppers - len(who))]
        more = pd.DataFrame(
            {
                "user_id": np.repeat(who, EVENTS_PER_USER),
                "item_id": [str(i) for i in rng.integers(0, args.n, len(who) * EVENTS_PER_USER)],
                "event_type": "view",
                "ts": events["ts"].max() + pd.Timedelta(hours=1),
            }
        )
        pd.concat([events, more]).to_parquet(events_path)

    print(f"\n{'change':<12}{'recomputed':>14}{'incremental':>13}{'from scratch':>14}{'ratio':>8}  same table")
    for name, change in (("one item", one_item), ("new events", new_events)):
        change()
        inc_s, recomputed, inc_rows = recommend_run(f"{name}-inc")
        scratch_s, _, scratch_rows = recommend_run(f"{name}-scratch", **{"recommend.incremental": False})
        found = diff("recommendations", scratch_rows, inc_rows)
        verdict = "yes"
        if not found.equal:  # kept for a look: both tables
            inc_rows.to_parquet(work / f"{name}-incremental.parquet")
            scratch_rows.to_parquet(work / f"{name}-scratch.parquet")
            verdict = (
                f"NO: {found.lost} rows lost, {found.doubled} other ({', '.join(found.examples)}; tables in {work})"
            )
        print(
            f"{name:<12}{f'{recomputed:,.0f} / {len(scratch_rows.user_id.unique()):,}':>14}{inc_s:>11.1f} s"
            f"{scratch_s:>12.1f} s{inc_s / scratch_s:>7.2f}x  {verdict}",
            flush=True,
        )


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"(benchmark wall time {time.time() - started:.0f} s)")

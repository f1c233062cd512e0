"""How each stage's cost grows with the catalog: cost per item (and per user) at several sizes, same machine.

Index + similar + recommend run on synthetic catalogs of `--sizes` items (clustered unit vectors shaped like
image embeddings, `index_build.cluster_model`, 256-d, written as an `embeddings` table), split into shards of
`--shard-size` items as a growing catalog gains categories, with simulated shoppers: one user per 5 items,
10 events each (views, some carts and purchases, within a neighbourhood of items). Embed runs on `--embed-sizes`
Fashion-MNIST demo images. Each stage runs on this machine's Spark (`local[2]` here) with the SparkSession up.

Printed per size and stage: seconds, microseconds per item (per user for recommend) and the peak resident
memory of one Python worker (a task) and of the driver JVM while it ran (polled from /proc every 0.2 s);
then, per stage, the ratio of the cost per item at the largest size to that at the smallest (target <= 1.3).

    .venv/bin/python benchmarks/scale.py                                   # 100k, 300k, 1M; embed 10k, 70k
    .venv/bin/python benchmarks/scale.py --sizes 100000,300000 --embed-sizes 10000,40000
    .venv/bin/python benchmarks/scale.py --sizes 1000000 --stages index,similar --embed-sizes ''
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_build import cluster_model, sample  # noqa: E402
from similar_items import write_embeddings  # noqa: E402

EVENTS_PER_USER = 10
ITEMS_PER_USER = 5
NEIGHBOURHOOD = 200  # a user's events fall within this many consecutive item ids around one item


class PeakMemory(threading.Thread):
    """The largest RSS seen of any one Python worker and of the JVM, polled from /proc while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.worker = self.jvm = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, IndexError, ValueError):
                    continue
                if b"pyspark.worker" in cmdline or b"pyspark.daemon" in cmdline:
                    self.worker = max(self.worker, rss)
                elif b"java" in cmdline and b"pyspark-shell" in cmdline:
                    self.jvm = max(self.jvm, rss)

    def stop(self) -> tuple[int, int]:
        self._done.set()
        self.join()
        return self.worker, self.jvm


def timed(run: Callable[..., object], *args: object) -> tuple[float, int, int]:
    """Seconds of `run(*args)`, and the peak RSS of one Python worker and of the JVM meanwhile."""
    watcher = PeakMemory()
    watcher.start()
    started = time.perf_counter()
    run(*args)
    seconds = time.perf_counter() - started
    return (seconds, *watcher.stop())


def report(row: dict) -> None:
    """One stage at one size, printed as soon as it ran: a run stopped early keeps what it measured."""
    unit = {"recommend": "user", "embed": "image"}.get(row["stage"], "item")
    print(
        f"  {row['stage']:<10}{row['seconds']:>8.1f} s  {1e6 * row['seconds'] / row['per']:>9.1f} us/{unit}  "
        f"worker peak {row['worker'] / 2**30:.2f} G, JVM peak {row['jvm'] / 2**30:.2f} G",
        flush=True,
    )


def write_catalog_and_events(folder: Path, n: int, seed: int) -> tuple[Path, Path, int]:
    """A catalog of the n items (all in stock) and `EVENTS_PER_USER` events for each of n / 5 users."""
    rng = np.random.default_rng(seed)
    ids = np.array([str(i) for i in range(n)])
    pd.DataFrame({"item_id": ids, "image_uri": "unused.png", "in_stock": True}).to_parquet(folder / "catalog.parquet")
    users = n // ITEMS_PER_USER
    centre = rng.integers(0, n, users)
    offsets = rng.integers(-NEIGHBOURHOOD // 2, NEIGHBOURHOOD // 2, (users, EVENTS_PER_USER))
    items = np.clip(centre[:, None] + offsets, 0, n - 1).ravel()
    kinds = rng.choice(["view", "cart", "purchase"], size=items.size, p=[0.85, 0.1, 0.05])
    now = pd.Timestamp("2026-12-01", tz="UTC")
    seconds = rng.integers(0, 30 * 86400, items.size)
    events = pd.DataFrame(
        {
            "user_id": np.repeat([f"u{u}" for u in range(users)], EVENTS_PER_USER),
            "item_id": ids[items],
            "event_type": kinds,
            "ts": now - pd.to_timedelta(seconds, unit="s"),
        }
    )
    events.to_parquet(folder / "events.parquet")
    return folder / "catalog.parquet", folder / "events.parquet", users


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,300000,1000000", help="catalog sizes for index/similar/recommend")
    parser.add_argument("--embed-sizes", default="10000,70000", help="Fashion-MNIST images for embed ('' skips)")
    parser.add_argument("--shard-size", type=int, default=100_000, help="items per shard (default 100,000)")
    parser.add_argument("--stages", default="index,similar,recommend", help="of index, similar, recommend")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lookalike import config
    from lookalike.demo_data import build_demo_data
    from lookalike.embed import stage as embed
    from lookalike.index import stage as index
    from lookalike.recommend import stage as recommend
    from lookalike.session import get_spark
    from lookalike.similar import stage as similar

    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    rows: list[dict] = []

    def make_cfg(name: str, **extra: object) -> config.Config:
        (work / name).mkdir(exist_ok=True)
        return config.validate(
            {
                "catalog.path": str(work / name / "catalog.parquet"),
                "output.root": str(work / name / "out"),
                "spark.master": "local[2]",
                "spark.driver_memory": "6g",
                "spark.conf": {"spark.ui.enabled": "false"},
                **extra,
            },
            base_dir=work,
        )

    spark = None
    for n in [int(x) for x in args.sizes.split(",") if x]:
        name = f"n{n}"
        (work / name).mkdir()
        catalog_path, events_path, users = write_catalog_and_events(work / name, n, args.seed)
        cfg = make_cfg(name, **{"events.path": str(events_path)})
        spark = spark or get_spark(cfg)
        shards = max(1, round(n / args.shard_size))
        vectors = sample(cluster_model(args.dim, max(1, n // 500), args.seed), n, args.seed + 1)
        write_embeddings(spark, vectors, cfg["output.root"], work / name, shards=shards)
        del vectors
        print(f"{n:,} items in {shards} shard(s), {users:,} users x {EVENTS_PER_USER} events ...", flush=True)
        for stage, run, per in (
            ("index", index.run, n),
            ("similar", similar.run, n),
            ("recommend", recommend.run, users),
        ):
            if stage not in args.stages.split(","):
                continue
            seconds, worker, jvm = timed(run, cfg, spark, f"s-{stage}")
            rows.append({"stage": stage, "size": n, "seconds": seconds, "per": per, "worker": worker, "jvm": jvm})
            report(rows[-1])

    for n in [int(x) for x in args.embed_sizes.split(",") if x]:
        name = f"embed{n}"
        build_demo_data(work / name / "demo", limit=n, seed=7)
        cfg = make_cfg(name, **{"catalog.path": str(work / name / "demo" / "catalog.parquet"), "embed.image_size": 112})
        spark = spark or get_spark(cfg)
        print(f"embed {n:,} images ...", flush=True)
        seconds, worker, jvm = timed(embed.run, cfg, spark, "s-embed")
        rows.append({"stage": "embed", "size": n, "seconds": seconds, "per": n, "worker": worker, "jvm": jvm})
        report(rows[-1])

    table = pd.DataFrame(rows)
    table["us_per"] = 1e6 * table["seconds"] / table["per"]
    print(f"\n{os.cpu_count()} cores, shards of {args.shard_size:,} items, {args.dim}-d")
    print(f"{'stage':<11}{'items':>10}{'seconds':>9}{'us/unit':>10}  {'unit':<6}{'worker peak':>12}{'JVM peak':>10}")
    for r in table.itertuples():
        unit = "user" if r.stage == "recommend" else ("image" if r.stage == "embed" else "item")
        print(
            f"{r.stage:<11}{r.size:>10,}{r.seconds:>9.1f}{r.us_per:>10.1f}  {unit:<6}"
            f"{r.worker / 2**30:>10.2f} G{r.jvm / 2**30:>8.2f} G"
        )
    print("\ncost per unit, largest size / smallest (target <= 1.3):")
    for stage, group in table.groupby("stage", sort=False):
        small, large = group.loc[group["size"].idxmin()], group.loc[group["size"].idxmax()]
        print(f"  {stage:<10}{large['us_per'] / small['us_per']:>6.2f}  ({small['size']:,} -> {large['size']:,})")


if __name__ == "__main__":
    main()

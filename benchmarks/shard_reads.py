"""Benchmark: reading one shard's vectors from `embeddings`, the table clustered by shard against mixed.

Every index, similar and recommend task reads its shard's rows straight from the files of `embeddings`
(`tables.read_files` with a `shard ==` filter): row groups whose statistics rule the shard out are skipped,
the others are decoded whole. The embed stage writes `embeddings` clustered by shard (`tables.write(...,
cluster_by="shard")`), so a shard's rows share files; written in whatever order its partitions hold (every
file mixing every shard) each shard read decodes the whole table, and a catalog of S shards decodes it S
times per stage. This writes the same `--n` x `--dim` vectors, in `--shards` shards (item i in shard i mod
S, the worst case for mixing), both ways with Spark's writer (`local[2]`), then reads every shard once each
way, twice in alternation, and prints the seconds and the ratio (best of the rounds), and how many of the
table's rows each way decoded.

    .venv/bin/python benchmarks/shard_reads.py                      # 300,000 x 256 in 10 shards
    .venv/bin/python benchmarks/shard_reads.py --n 1000000 --shards 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from similar_items import write_embeddings  # noqa: E402

ROUNDS = 2


def read_every_shard(files: list[str], shards: int) -> float:
    from lookalike.storage import tables

    started = time.perf_counter()
    for s in range(shards):
        rows = tables.read_files(files, ["item_id", "embedding"], pc.field("shard") == f"s{s}")
        assert rows.num_rows > 0
    return time.perf_counter() - started


def rows_decoded(files: list[str], shards: int) -> int:
    """Rows in the row groups a shard read cannot skip by their `shard` statistics, summed over the shards."""
    total = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.to_arrow_schema().get_field_index("shard")
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            hit = sum(stats.min <= f"s{s}" <= stats.max for s in range(shards))
            total += hit * meta.row_group(g).num_rows
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300_000, help="items (default 300,000)")
    parser.add_argument("--dim", type=int, default=256, help="dimensions (default 256)")
    parser.add_argument("--shards", type=int, default=10, help="shards (default 10)")
    args = parser.parse_args()

    from lookalike import config
    from lookalike.session import get_spark
    from lookalike.storage import tables

    vectors = np.random.default_rng(0).standard_normal((args.n, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.validate(
            {
                "catalog.path": f"{tmp}/catalog.parquet",
                "output.root": f"{tmp}/out",
                "spark.master": "local[2]",
                "spark.conf": {"spark.ui.enabled": "false"},
            },
            base_dir=Path(tmp),
            need_paths=(),
        )
        spark = get_spark(cfg)
        files = {}
        for way, clustered in (("clustered", True), ("mixed", False)):
            root = f"{tmp}/{way}"
            write_embeddings(spark, vectors, root, Path(tmp), shards=args.shards, clustered=clustered)
            files[way] = tables.current_files(tables.table_path(root, "embeddings"))
        spark.stop()
        seconds: dict[str, list[float]] = {way: [] for way in files}
        for _ in range(ROUNDS):
            for way, paths in files.items():
                seconds[way].append(read_every_shard(paths, args.shards))
        print(f"{args.n:,} x {args.dim}-d in {args.shards} shards, every shard read once:")
        for way, paths in files.items():
            decoded = rows_decoded(paths, args.shards)
            print(
                f"  {way:9s} {min(seconds[way]):6.2f} s  ({len(paths)} files, rows decoded "
                f"{decoded:,} = {decoded / args.n:.1f}x the table)"
            )
        print(f"clustered vs mixed: {min(seconds['mixed']) / min(seconds['clustered']):.2f}x faster")


if __name__ == "__main__":
    main()

"""What an unchanged night costs against a full one: `lookalike nightly` three times over the same demo data.

  full       a first run on an empty output root: every image embedded, every shard built and queried
  unchanged  the same command again: nothing changed, so nothing should be embedded, built or queried
  one image  one catalog image rewritten: one image embedded, its shard rebuilt and re-queried

Each run is the real command in its own process (JVM start included, as the scheduler sees it); the ratios
are what to read.

    .venv/bin/python benchmarks/nightly_incremental.py --n 2000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from lookalike.demo_data import build_demo_data
from lookalike.storage import tables


def nightly(conf: Path) -> float:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "--log-level", "WARNING", "nightly", "--conf", str(conf)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"nightly failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="demo catalog items (default 2000)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nightly-bench-"))
    build_demo_data(work / "demo", limit=args.n, seed=7)
    conf = work / "nightly.yaml"
    conf.write_text(
        f"catalog: {{path: {work}/demo/catalog.parquet}}\nevents: {{path: {work}/demo/events.parquet}}\n"
        f"output: {{root: {work}/out}}\nembed: {{image_size: 112}}\n"
        "spark: {conf: {spark.ui.enabled: 'false'}}\n"
    )
    seconds = {"full": nightly(conf), "unchanged": nightly(conf)}
    catalog = pd.read_parquet(work / "demo/catalog.parquet")
    image = work / "demo" / catalog["image_uri"].iloc[0]
    ImageOps.mirror(Image.open(image)).save(image)
    seconds["one image"] = nightly(conf)

    runs = tables.read_arrow(tables.table_path(str(work / "out"), "runs")).to_pandas()
    by_run = {
        run: {row.stage: dict(row.metrics) for row in group.itertuples()} for run, group in runs.groupby("run_id")
    }
    print(f"\nnightly over {args.n} demo items (embed, index, similar, recommend, export), one process per run")
    print(f"{'run':<12}{'seconds':>9}{'embedded':>10}{'built':>7}{'queried':>9}{'recommend':>11}")
    for (name, s), run in zip(seconds.items(), sorted(by_run)):
        m = by_run[run]
        print(
            f"{name:<12}{s:>9.1f}{m['embed']['embedded']:>10.0f}{m['index']['shards_built']:>7.0f}"
            f"{m['similar'].get('shards_recomputed', 0):>9.0f}"
            f"{'skipped' if m['recommend'].get('unchanged') else 'ran':>11}"
        )
    print(
        f"\nunchanged / full: {seconds['unchanged'] / seconds['full']:.2f}x   "
        f"one image / full: {seconds['one image'] / seconds['full']:.2f}x"
    )


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"(benchmark wall time {time.time() - started:.0f} s)")

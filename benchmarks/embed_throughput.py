"""Embed throughput: the Spark stage end to end against a plain single-process PyTorch loop.

Same N catalog images (Fashion-MNIST demo files), same model, same cores, same run. Each variant runs in its
own process so that its malloc settings and thread counts are its own:

  loop            decode, preprocess, infer in one Python process, torch fp32 eager using every core, tuned
                  malloc, the same batch size as the stage: the baseline. Its end-to-end clock runs from before
                  `import torch` to the embeddings written as Parquet (what a plain script doing the stage's job
                  pays); its steady clock covers only the decode-infer loop.
  loop-onnx       the same loop with ONNX Runtime (`embed.runtime: onnx`), every core; its vectors are compared
                  with the loop's: cosine per image, and precision@10 by category over the first 5,000 items
  spark           `embed.run` end to end on local[*] (one task per core, one thread per task, ONNX Runtime: the
                  default `embed.runtime: auto` on a CPU), with the
                  SparkSession already up, as in a nightly run: Python workers importing torch and loading the
                  model, the catalog checks, the Delta commits are all inside its clock
  spark-half      the same stage over the first half of the images: with `spark`, it gives the stage's
                  marginal rate, (N - N/2) / (t_N - t_N/2), which cancels the per-run fixed cost, to compare
                  with the loop's steady rate
  spark-torch     spark-half with embed.runtime=torch
  spark-no-malloc spark-half with spark.tune_malloc=false (glibc defaults)
  spark-224       spark-half at the model's native 224 px instead of the configured size

The ratios printed at the end are what to read; absolute rates vary with the machine and its neighbours.

    .venv/bin/python benchmarks/embed_throughput.py --n 40000
    .venv/bin/python benchmarks/embed_throughput.py --n 20000 --skip-slow   # what docs/benchmarks.md quotes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.embed.models import device
from lookalike.session import MALLOC_ENV

LOOP = """
import time
started = time.perf_counter()
import json, sys
import numpy as np, pandas as pd, pyarrow as pa, pyarrow.parquet as pq, torch
from PIL import Image
from lookalike.embed.models import cache, device
catalog, out, runtime = sys.argv[1], sys.argv[5], sys.argv[6]
size, batch, threads = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
embedder = cache.get_embedder("efficientnet-lite0", device="cpu", image_size=size, runtime=runtime)
rows = pd.read_parquet(catalog)
paths = rows["image_uri"].tolist()
folder = catalog.rsplit("/", 1)[0]
loop_started = time.perf_counter()
out_vectors = []
for i in range(0, len(paths), batch):
    images = []
    for p in paths[i:i + batch]:
        with open(f"{folder}/{p}", "rb") as f:
            images.append(Image.open(f).convert("RGB"))
    out_vectors.append(embedder.embed(images))
loop_seconds = time.perf_counter() - loop_started
vectors = np.concatenate(out_vectors)
pq.write_table(pa.table({"item_id": rows["item_id"], "embedding": list(vectors)}), out)
print(json.dumps({"images": len(vectors), "seconds": time.perf_counter() - started, "steady": loop_seconds}))
"""

STAGE = """
import json, sys, time
from pathlib import Path
from lookalike import config
from lookalike.embed import stage as embed
from lookalike.session import get_spark
cfg = config.load(sys.argv[1], sys.argv[2:])
spark = get_spark(cfg)
spark.range(4).count()  # JVM and Python workers up before the clock starts, as in a nightly run
started = time.perf_counter()
result = embed.run(cfg, spark, "bench")
seconds = time.perf_counter() - started
print(json.dumps({"images": result.rows_out, "seconds": seconds, "model_loads": result.metrics["model_loads"]}))
"""


def _run(code: str, args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"variant failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _quality(torch_vectors: Path, onnx_vectors: Path, catalog: str, items: int = 5000) -> dict[str, float]:
    """Cosine of each image's ONNX Runtime vector to its torch vector, and precision@10 by category of both."""
    a = np.stack(pd.read_parquet(torch_vectors)["embedding"].to_numpy())
    b = np.stack(pd.read_parquet(onnx_vectors)["embedding"].to_numpy())
    labels = pd.read_parquet(catalog)["category"].to_numpy()[:items]

    def precision(vectors: np.ndarray) -> float:
        scores = vectors @ vectors.T
        np.fill_diagonal(scores, -np.inf)
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        return float((labels[top] == labels[:, None]).mean())

    cosines = np.sum(a * b, axis=1)
    return {
        "cos_min": float(cosines.min()),
        "cos_mean": float(cosines.mean()),
        "p10_torch": precision(a[:items]),
        "p10_onnx": precision(b[:items]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--n",
        type=int,
        default=40000,
        help="images (default 40000: the stage's fixed cost per run is then a small share)",
    )
    parser.add_argument("--image-size", type=int, default=112, help="input size of the main variants")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=device.CPU_BATCH_SIZE,
        help="inference batch of the loop and the stage (default: the stage's CPU default)",
    )
    parser.add_argument("--skip-slow", action="store_true", help="only loop and spark at --image-size")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every variant, interleaved; each variant's fastest round is reported "
        "(a shared machine's neighbours only ever slow a round down)",
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lookalike.cli",
            "--log-level",
            "WARNING",
            "demo-data",
            "--out",
            str(work / "demo"),
            "--limit",
            str(args.n),
        ],
        check=True,
    )
    catalog = str(work / "demo" / "catalog.parquet")
    half = work / "demo" / "catalog_half.parquet"
    rows = pd.read_parquet(catalog)
    rows.iloc[: len(rows) // 2].to_parquet(half)
    conf = work / "bench.yaml"
    conf.write_text(
        f"catalog: {{path: {catalog}}}\nembed: {{batch_size: {args.batch_size}, "
        f"image_size: {args.image_size}}}\nspark: {{conf: {{spark.ui.enabled: 'false'}}}}\n"
    )
    tuned = {**os.environ, **MALLOC_ENV}
    plain = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}

    def stage(name: str, *sets: str, env: dict[str, str] = plain) -> dict:
        return _run(STAGE, [str(conf), f"output.root={work / name}", *sets], env)  # a fresh root: no reuse

    def fastest(results: dict[str, dict], name: str, result: dict) -> None:
        if name not in results or result["seconds"] < results[name]["seconds"]:
            results[name] = result

    results: dict[str, dict] = {}

    def loop(runtime: str) -> dict:
        out = str(work / f"loop-{runtime}.parquet")
        return _run(LOOP, [catalog, str(args.image_size), str(args.batch_size), str(cores), out, runtime], tuned)

    for r in range(args.repeat):
        for name, runtime in (("loop", "torch"), ("loop-onnx", "onnx")):
            result = loop(runtime)
            fastest(results, name, result)
            fastest(results, f"{name}-steady", {"images": result["images"], "seconds": result["steady"]})
        fastest(results, "spark", stage(f"spark{r}"))
        fastest(results, "spark-half", stage(f"half{r}", f"catalog.path={half}"))
        fastest(results, "spark-torch", stage(f"torch{r}", f"catalog.path={half}", "embed.runtime=torch"))
        if not args.skip_slow:
            fastest(
                results, "spark-no-malloc", stage(f"nomalloc{r}", f"catalog.path={half}", "spark.tune_malloc=false")
            )
            fastest(results, "spark-224", stage(f"s224{r}", f"catalog.path={half}", "embed.image_size=224"))
    print(
        f"\n{args.n} Fashion-MNIST images, efficientnet-lite0, {cores} cores, batch {args.batch_size}, "
        f"fastest of {args.repeat} round(s)"
    )
    print(f"{'variant':<18}{'px':>5}{'images':>8}{'seconds':>9}{'img/s':>9}")
    for name, r in results.items():
        px = 224 if name == "spark-224" else args.image_size
        print(f"{name:<18}{px:>5}{r['images']:>8}{r['seconds']:>9.1f}{r['images'] / r['seconds']:>9.1f}")
    rate = {name: r["images"] / r["seconds"] for name, r in results.items()}
    marginal = (results["spark"]["images"] - results["spark-half"]["images"]) / (
        results["spark"]["seconds"] - results["spark-half"]["seconds"]
    )
    fixed = results["spark"]["seconds"] - results["spark"]["images"] / marginal
    print(f"\nspark stage / plain torch loop, end to end: {rate['spark'] / rate['loop']:.2f}x  (target >= 1.5)")
    print(f"onnx loop / torch loop, steady:             {rate['loop-onnx-steady'] / rate['loop-steady']:.2f}x")
    print(f"spark onnx / spark torch (half):            {rate['spark-half'] / rate['spark-torch']:.2f}x")
    q = _quality(work / "loop-torch.parquet", work / "loop-onnx.parquet", catalog)
    print(
        f"onnx vs torch vectors: cosine min {q['cos_min']:.6f} mean {q['cos_mean']:.6f} (target >= 0.99); "
        f"precision@10 by category {q['p10_onnx']:.4f} vs {q['p10_torch']:.4f} "
        f"(difference {q['p10_onnx'] - q['p10_torch']:+.4f}, target within 0.01)"
    )
    print(
        f"spark stage marginal / torch loop steady: {marginal / rate['loop-steady']:.2f}x  ({marginal:.1f} img/s; "
        f"fixed cost per stage run {fixed:.1f} s)"
    )
    if not args.skip_slow:
        print(f"tuned malloc / glibc default (stage):   {rate['spark-half'] / rate['spark-no-malloc']:.2f}x")
        print(f"{args.image_size} px / 224 px (stage):              {rate['spark-half'] / rate['spark-224']:.2f}x")
    print(f"model loads in the stage: {results['spark']['model_loads']}")


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"(benchmark wall time {time.time() - started:.0f} s)")

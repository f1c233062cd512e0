"""Search latency: `lookalike.Searcher` per query on one core, on a 200,000-item build, against exact search.

The build: `--n` clustered unit vectors of the default model's dimension (1280 for EfficientNet-Lite0;
`index_build.cluster_model`, shaped like image embeddings) written as `embeddings` under the model's real
version string, in `--shards` shards (categories), indexed by the real index stage (IVF-PQ, tuned to its
recall target). Synthetic vectors make the build affordable here (embedding 200,000 images would take an
hour); latency does not depend on what the vectors show. The queries are real photos
(`photo_sources.colour_photos`, JPEG-encoded), so the embedding part is the real decoder and model.

One process, one thread for torch and FAISS (`--threads`), after a warm-up; per query, in the same run:

  with embedding     `searcher.search(jpeg_bytes, k=10)`: decode, preprocess, model, every shard, merge
  search only        `searcher.search_vectors(vector, k=10)`: every shard's IVF-PQ search, exact re-rank, merge
  exact              brute force over all n vectors (one matrix-vector product and a top-k): the baseline

Printed: p50, p99 and mean of each in ms, and search-only over exact. Targets (issue 16): with embedding,
p50 < 50 ms and p99 < 150 ms on this CPU.

    .venv/bin/python benchmarks/search_latency.py                 # 200,000 x 1280 in 4 shards, ~6 min here
    .venv/bin/python benchmarks/search_latency.py --n 50000 --queries 200
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import photo_sources  # noqa: E402
from index_build import cluster_model, sample  # noqa: E402
from similar_items import write_embeddings  # noqa: E402

K = 10


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):7.1f}  p99 {np.percentile(ms, 99):7.1f}  mean {ms.mean():7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="items in the build")
    parser.add_argument("--shards", type=int, default=4, help="shards (categories) the items fall in")
    parser.add_argument("--queries", type=int, default=500, help="timed queries (real photos, reused in turn)")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads while timing")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import faiss
    import torch

    from lookalike import config
    from lookalike.embed.models import registry
    from lookalike.index import stage as index
    from lookalike.search.searcher import Searcher
    from lookalike.session import get_spark

    spec = registry.get_spec(registry.DEFAULT_MODEL)
    model = registry.model_version(spec.name, None, spec.image_size)
    with tempfile.TemporaryDirectory(prefix="search-latency-") as tmp:
        work = Path(tmp)
        cfg = config.validate(
            {"output.root": str(work / "out"), "catalog.path": str(work), "spark.conf": {"spark.ui.enabled": "false"}},
            base_dir=work,
        )
        vectors = sample(cluster_model(spec.dim, max(10, args.n // 500), args.seed), args.n, args.seed + 1)
        spark = get_spark(cfg)
        started = time.perf_counter()
        write_embeddings(spark, vectors, cfg["output.root"], work, model=model, shards=args.shards)
        built = index.run(cfg, spark, "b1")
        spark.stop()
        print(
            f"build: {args.n} x {spec.dim} in {args.shards} shards, {time.perf_counter() - started:.0f} s; "
            f"{built.metrics}"
        )

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        searcher = Searcher.open(cfg["output.root"], refresh_every_s=3600)
        photos = photo_sources.colour_photos(200)
        jpegs = []
        for photo in photos:
            buffer = io.BytesIO()
            photo.save(buffer, "JPEG", quality=85)
            jpegs.append(buffer.getvalue())
        print(
            f"searcher: build {searcher.build}, model {searcher.model}; queries: {len(jpegs)} real photos "
            f"(median {int(np.median([len(j) for j in jpegs]))} bytes), {args.threads} thread(s)"
        )
        for jpeg in jpegs[:20]:  # warm-up: model, allocator, FAISS
            searcher.search(jpeg, k=K)
        with_embedding, search_only, exact = [], [], []
        for q in range(args.queries):
            jpeg = jpegs[q % len(jpegs)]
            t0 = time.perf_counter()
            hits = searcher.search(jpeg, k=K)
            with_embedding.append(time.perf_counter() - t0)
            query = vectors[(q * 7919) % args.n][None, :]  # a catalog-like vector for the search-only parts
            t0 = time.perf_counter()
            searcher.search_vectors(query, K)
            search_only.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scores = vectors @ query[0]
            top = np.argpartition(-scores, K)[:K]
            top[np.argsort(-scores[top])]
            exact.append(time.perf_counter() - t0)
            assert len(hits) == K
        print(f"\n{'with embedding':16} {percentiles(with_embedding)}")
        print(f"{'search only':16} {percentiles(search_only)}")
        print(f"{'exact':16} {percentiles(exact)}")
        ratio = np.median(search_only) / np.median(exact)
        print(
            f"\nsearch only / exact (p50): {ratio:.2f}x; embedding's share of the with-embedding p50: "
            f"{1 - np.median(search_only) / np.median(with_embedding):.0%}"
        )
        print(
            f"targets: p50 < 50 ms: {np.percentile(with_embedding, 50) * 1000 < 50}; "
            f"p99 < 150 ms: {np.percentile(with_embedding, 99) * 1000 < 150}"
        )


if __name__ == "__main__":
    main()

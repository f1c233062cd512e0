"""Index updates without training: a shard that changed a little, updated from its previous index against
trained afresh, same vectors, same run.

On clustered unit vectors shaped like image embeddings (`index_build.cluster_model`), a shard of `--n` items
is built (trained, added, tuned); then `--change` of its items are replaced by new items of the same catalog
and the shard is built twice from the changed vectors: once reusing the first build's trained quantizers
(`shard_index.build(previous=...)`, what the index stage does while `index.update_max_drift` allows) and once
trained afresh. Both are tuned to the same target recall; recall@10 is measured on fresh queries against
exact search. A shard whose items were mostly replaced is also updated, to show the drift check refusing it.

    .venv/bin/python benchmarks/index_update.py --n 200000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_build import cluster_model, sample  # noqa: E402  (the same vectors as the index benchmark)

from lookalike.index import shard_index  # noqa: E402
from lookalike.index.params import choose_params  # noqa: E402

MODEL = "synthetic@0/256"


def recall(built: shard_index.BuiltIndex, vectors: np.ndarray, queries: np.ndarray) -> float:
    _, found = shard_index.search(built.index, vectors, queries, 10, built.nprobe, built.rerank_k)
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    return shard_index.recall_at_k(found, truth, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="items in the shard (default 200,000)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--change", type=float, default=0.01, help="share of items replaced (default 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = cluster_model(args.dim, max(1, args.n // 500), args.seed)
    vectors = sample(model, args.n, args.seed + 1)
    queries = sample(model, 1000, args.seed + 2)
    params = choose_params(args.n, args.dim)
    print(
        f"{args.n:,} x {args.dim}, {params.factory}; {args.change:.0%} of items replaced; "
        f"faiss threads {faiss.omp_get_max_threads()}"
    )

    first = shard_index.build(vectors, params, exact_fallback=False)
    with tempfile.TemporaryDirectory() as folder:
        shard_index.save(first, folder, ids=[str(i) for i in range(args.n)], model=MODEL, extra={"run_id": "first"})
        previous = shard_index.load(folder, expected_dim=args.dim, expected_model=MODEL, mmap=False)
    replaced = int(args.n * args.change)
    changed = np.concatenate([vectors[replaced:], sample(model, replaced, args.seed + 3)])

    timings = {}
    built = {}
    for name, prior in (("updated", previous), ("retrained", None)):
        started = time.perf_counter()
        built[name] = shard_index.build(changed, params, exact_fallback=False, previous=prior, max_drift=0.1)
        timings[name] = time.perf_counter() - started
    print(f"\n{'variant':<11}{'seconds':>9}{'train s':>9}{'nprobe':>8}{'rerank':>8}{'recall@10':>11}  update")
    for name, b in built.items():
        print(
            f"{name:<11}{timings[name]:>9.1f}{b.train_seconds:>9.1f}{b.nprobe:>8}{b.rerank_k:>8}"
            f"{recall(b, changed, queries):>11.3f}  {dict((k, v) for k, v in b.update.items() if k != 'index')}"
        )
    ratio = timings["retrained"] / timings["updated"]
    print(f"\nupdate / retrain time: {1 / ratio:.2f} (training afresh {ratio:.1f}x slower)")

    other = cluster_model(args.dim, max(1, args.n // 500), args.seed + 10)  # a catalog mostly of new products
    renewed = np.concatenate([vectors[: args.n // 2], sample(other, args.n - args.n // 2, args.seed + 4)])
    refused = shard_index.build(renewed, params, exact_fallback=False, previous=previous, max_drift=0.1)
    print(
        f"half the shard from other clusters: reused {refused.update['reused']}, drift {refused.update['drift']:.3f}, "
        f"{refused.update.get('retrained_because')}"
    )


if __name__ == "__main__":
    main()

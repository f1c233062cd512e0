"""Benchmark: lookalike's shard index builder against autofaiss and exact Flat search, same vectors, same run.

Measures, on clustered unit vectors shaped like image embeddings, each builder's wall time, index bytes
and recall@10 on fresh queries (vectors from the same clusters that are in no index), against the exact
top-10. Targets: lookalike recall@10 >= 0.95, index bytes <= 1/8 of Flat float32, build time <= autofaiss.

autofaiss 2.18 needs numpy<2 and faiss-cpu<=1.13.2 (and a pyarrow built for numpy 1), which the project's
environment does not have, so it runs in a subprocess with its own interpreter; vectors go over .npy files:

    python3 -m venv /tmp/af
    /tmp/af/bin/pip install autofaiss==2.18.0 'faiss-cpu<=1.13.2' 'numpy<2' 'pyarrow<18'
    .venv/bin/python benchmarks/index_build.py --autofaiss-python /tmp/af/bin/python

autofaiss gets the same memory budget for its index as lookalike's target (1/8 of Flat) and chooses
everything else itself (index type, nprobe tuned to its default 10 ms/query). Its search path is its index
alone; lookalike's is IVF-PQ candidates re-ranked exactly with the float32 vectors (lookalike.index.shard_index).
Without --autofaiss-python the autofaiss row is skipped.

This file only imports the standard library and NumPy at the top: the autofaiss worker mode runs it
under autofaiss's interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

K = 10
DEFAULT_N = 500_000
SCALE_NOTE = (
    "default scale 500,000, not 1,000,000: at 1,000,000 vectors autofaiss switches to 16,384 clusters "
    "trained on all of them in 320-d (5.2e13 multiply-adds of k-means alone, 20+ minutes on this 2-core "
    "machine), while 500,000 runs whole in about 6 minutes; --n 1000000 runs the full scale"
)


class ClusterModel(NamedTuple):
    """Gaussian clusters on the unit sphere: centres, how often each is drawn, how loose each is, and the
    per-dimension scale of all variation."""

    centres: np.ndarray
    weights: np.ndarray
    spreads: np.ndarray
    spectrum: np.ndarray


def cluster_model(dim: int, clusters: int, seed: int) -> ClusterModel:
    """Clusters shaped like image-embedding neighbourhoods rather than like isotropic noise.

    Embedding spectra decay: variance falls off as 1/(1+i) over dimensions (for centres and for the
    spread around them alike), so most variation lives in a few dozen directions, as in real embeddings
    (an effective dimension of ~23 at 256-d), and centres share directions instead of being nearly
    orthogonal. Cluster popularity is log-normal (a few big categories, a long tail) and tightness
    uneven, from near-duplicates to loose categories.
    """
    rng = np.random.default_rng(seed)
    spectrum = (1.0 + np.arange(dim, dtype=np.float32)) ** -0.5
    spectrum *= np.sqrt(dim) / np.linalg.norm(spectrum)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) * spectrum
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, clusters)
    spreads = rng.uniform(0.3, 1.3, clusters).astype(np.float32)
    return ClusterModel(centres, weights / weights.sum(), spreads, spectrum)


def sample(model: ClusterModel, n: int, seed: int) -> np.ndarray:
    """`n` L2-normalised float32 vectors drawn from the model, in chunks to bound temporary memory."""
    rng = np.random.default_rng(seed)
    dim = model.centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        size = min(100_000, n - start)
        which = rng.choice(len(model.centres), size=size, p=model.weights)
        noise = rng.standard_normal((size, dim), dtype=np.float32) * model.spectrum
        chunk = model.centres[which] + noise * (model.spreads[which, None] / np.sqrt(dim))
        out[start : start + size] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def run_autofaiss_worker(folder: Path) -> None:
    """Build with autofaiss under its own interpreter and search the queries with what it chose."""
    import faiss
    from autofaiss import build_index

    job = json.loads((folder / "job.json").read_text())
    started = time.perf_counter()
    _, infos = build_index(
        embeddings=str(folder / "embeddings"),
        index_path=str(folder / "autofaiss.index"),
        index_infos_path=str(folder / "autofaiss_infos.json"),
        metric_type="ip",
        max_index_memory_usage=job["max_index_memory_usage"],
        current_memory_available=job["current_memory_available"],
        nb_cores=job["nb_cores"],
    )
    build_seconds = time.perf_counter() - started
    index = faiss.read_index(str(folder / "autofaiss.index"))
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    queries = np.load(folder / "queries.npy")
    started = time.perf_counter()
    _, ids = index.search(queries, K)
    search_seconds = time.perf_counter() - started
    np.save(folder / "autofaiss_ids.npy", ids)
    (folder / "autofaiss_result.json").write_text(
        json.dumps(
            {
                "build_seconds": build_seconds,
                "search_seconds": search_seconds,
                "factory": f"{infos['index_key']} ({infos['index_param']})",
                "bytes": (folder / "autofaiss.index").stat().st_size,
                "faiss_version": faiss.__version__,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help=f"vectors in the shard (default {DEFAULT_N:,})")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=None, help="default: n / 500")
    parser.add_argument("--queries", type=int, default=1000, help="fresh queries for recall@10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autofaiss-python", help="interpreter of a venv with autofaiss 2.18 (see above)")
    parser.add_argument("--workdir", help="where to put vectors and indexes (default: a temporary folder)")
    parser.add_argument("--autofaiss-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.autofaiss_worker:
        run_autofaiss_worker(Path(args.autofaiss_worker))
        return
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        benchmark(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="index_build_") as workdir:
            benchmark(args, Path(workdir))


def benchmark(args: argparse.Namespace, workdir: Path) -> None:
    import faiss

    from lookalike.index import shard_index
    from lookalike.index.params import MAX_BYTES_RATIO, choose_params

    if args.n is None:
        args.n = DEFAULT_N
        print(SCALE_NOTE)
    clusters = args.clusters or max(1, args.n // 500)
    print(
        f"scale: n={args.n:,} x dim={args.dim}, {clusters:,} clusters, {args.queries:,} fresh queries, seed {args.seed}"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    model = cluster_model(args.dim, clusters, args.seed)
    vectors = sample(model, args.n, args.seed + 1)
    queries = sample(model, args.queries, args.seed + 2)
    flat_bytes = 4 * args.n * args.dim
    rows: list[tuple[str, str, float, int, float, float]] = []

    started = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(vectors)
    flat_build = time.perf_counter() - started
    started = time.perf_counter()
    _, truth = flat.search(queries, K)
    flat_search = time.perf_counter() - started
    faiss.write_index(flat, str(workdir / "flat.faiss"))
    rows.append(("exact flat", "Flat", flat_build, (workdir / "flat.faiss").stat().st_size, 1.0, flat_search))
    del flat

    params = choose_params(args.n, args.dim)
    built = shard_index.build(vectors, params, seed=args.seed)
    manifest = shard_index.save(built, workdir / "lookalike", ids=[str(i) for i in range(args.n)], model="synthetic")
    started = time.perf_counter()
    _, found = shard_index.search(built.index, vectors, queries, K, built.nprobe, built.rerank_k)
    ours_search = time.perf_counter() - started
    ours_recall = shard_index.recall_at_k(found, truth, K)
    rows.append(
        (
            "lookalike",
            f"{params.factory} (nprobe={built.nprobe}, re-rank {built.rerank_k})",
            built.build_seconds,
            manifest["bytes"],
            ours_recall,
            ours_search,
        )
    )

    autofaiss = None
    if args.autofaiss_python:
        autofaiss = run_autofaiss(args, workdir, vectors, queries, flat_bytes)
        rows.append(
            (
                "autofaiss",
                autofaiss["factory"],
                autofaiss["build_seconds"],
                autofaiss["bytes"],
                shard_index.recall_at_k(np.load(workdir / "autofaiss_ids.npy"), truth, K),
                autofaiss["search_seconds"],
            )
        )
    else:
        print("autofaiss: skipped (no --autofaiss-python)")

    print()
    print(f"{'builder':<11} {'build s':>8} {'index MB':>9} {'vs flat':>8} {'recall@10':>9} {'ms/query':>9}  index")
    for name, factory, seconds, size, recall, search_seconds in rows:
        print(
            f"{name:<11} {seconds:>8.1f} {size / 1e6:>9.1f} {size / flat_bytes:>8.3f} {recall:>9.4f} "
            f"{1000 * search_seconds / args.queries:>9.3f}  {factory}"
        )
    print()
    print(
        f"lookalike build: train {built.train_seconds:.1f} s on {params.train_size:,} vectors, add "
        f"{built.add_seconds:.1f} s, tuning {built.tune_seconds:.1f} s; (nprobe, rerank_k, recall@10) "
        f"tried: {[(nprobe, rerank_k, round(recall, 4)) for nprobe, rerank_k, recall in built.tuning]}"
    )
    print(
        f"lookalike recall@10 in its manifest (own vectors as queries, self excluded): "
        f"{built.recall_at_10:.4f}; on fresh queries: {ours_recall:.4f}"
    )
    print(f"ratio recall@10 lookalike: {ours_recall:.4f} (target >= {params.target_recall})")
    print(
        f"ratio bytes lookalike / flat float32: {manifest['bytes'] / flat_bytes:.4f} (target <= {MAX_BYTES_RATIO:.3f})"
    )
    if autofaiss is not None:
        print(
            f"ratio build time lookalike / autofaiss: {built.build_seconds / autofaiss['build_seconds']:.3f} "
            f"(target <= 1.0)"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at end (other work on this machine slows every row)")


def run_autofaiss(
    args: argparse.Namespace, workdir: Path, vectors: np.ndarray, queries: np.ndarray, flat_bytes: int
) -> dict:
    """Hand the vectors to the autofaiss worker and read back what it built and found."""
    (workdir / "embeddings").mkdir(exist_ok=True)
    np.save(workdir / "embeddings" / "vectors.npy", vectors)
    np.save(workdir / "queries.npy", queries)
    (workdir / "job.json").write_text(
        json.dumps(
            {
                "max_index_memory_usage": f"{flat_bytes // 8}B",
                "current_memory_available": "16G",
                "nb_cores": os.cpu_count(),
            }
        )
    )
    subprocess.run([args.autofaiss_python, __file__, "--autofaiss-worker", str(workdir)], check=True)
    return json.loads((workdir / "autofaiss_result.json").read_text())


if __name__ == "__main__":
    main()

"""One shard's FAISS index: build (train, add, tune the search on measured recall), search, save, load.

Thin wrappers around FAISS with no Spark in them: the index stage calls `build` and `save` once per shard
inside a Spark task; the similar-items and recommendation stages call `load` and `search`. Parameters come
from `index_params.choose_params`.

Search path. A Flat shard is searched exactly. An IVF-PQ shard is always searched in two steps: the index
proposes `rerank_k` candidates (PQ scores, `nprobe` lists), then those candidates are re-scored exactly
against the shard's float32 vectors and the best `k` kept. PQ scores alone capped recall@10 at 0.24-0.41
on tightly clustered vectors (DESIGN.md), and the similar-items table must hold true cosines anyway, so
the exact step is part of the search path, not an option. The recall `build` measures and the manifest
reports is of exactly this path, with the parameters `search` is then given.

Where the re-rank vectors come from. They are not stored beside the index: the caller passes the shard's
vectors from the `embeddings` table, in FAISS id order (`LoadedShard.align` reorders them by `item_id`).
The table is already the float32 source of truth, the similar-items stage holds those vectors anyway as
its queries, and a copy per nightly run under `indexes/<run_id>/` would cost four times the index on disk
again. `manifest.json` records `vectors_sha256`, the SHA-256 of the float32 vectors in FAISS id order that
the index was built from; `align` refuses vectors that differ (re-embedded since the build), because
re-ranking with other vectors than the index was built from returns wrong neighbours silently.

Memory a task needs per shard (n vectors of dimension d, 4 bytes a float; `IndexParams.estimated_bytes`
gives the index size before building, the manifest's `bytes` after):

- Index stage (`build` + `save`): the shard's vectors, 4*n*d, plus while training three copies of the
  training sample (the sample, its rotation, its residuals), 3 * 4*train_size*d with train_size =
  max(20*nlist, 32,768) capped at n, then the index and batches of 65,536 rotated vectors being added.
  A Flat shard instead needs 2 * 4*n*d (its index copies the vectors). Any copy the caller still holds
  (an Arrow column beside its NumPy array) comes on top.
- Search stages (`load` + `search`): the index plus the shard's vectors for re-ranking, 4*n*d (in the
  similar-items stage these are also its queries), plus ~32 MB of gathered candidates and the
  (queries x k) results. A Flat shard needs only its index, 4*n*d.
- Measured here: 1,000,000 x 256-d (vectors 1.02 GB, RR256,IVF4096,PQ64 index 77 MB) peaked at 1.73 GB
  building and 1.42 GB searching; 200,000 x 1280-d (vectors 1.02 GB, index 84 MB) at 2.69 GB building.
  By the same arithmetic 1,000,000 x 1280-d (EfficientNet-Lite0; vectors 5.1 GB, index 0.36 GB,
  training sample 0.82 GB) needs about 8 GB to build and 5.6 GB to search. Executor memory must cover
  the largest shard times the tasks an executor runs at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lookalike.index.params import (
    PQ_CENTROIDS,
    PQ_KMEANS_ITERATIONS,
    PQ_TRAIN_POINTS,
    RECALL_K,
    TRAIN_POINTS_PER_LIST,
    IndexParams,
    flat_params,
)
from lookalike.storage.uri import filesystem

INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "ids.parquet", "manifest.json"
ID_COLUMN = "item_id"
MANIFEST_VERSION = 1
NORM_TOLERANCE = 1e-3
"""How far from 1 a vector's L2 norm may be: inner product equals cosine only for unit vectors."""
PLATEAU_GAIN = 0.002
"""Recall@10 gained by doubling nprobe below which more lists are not worth probing (see `_tune`)."""
RERANK_DOUBLINGS = 3
"""Tuning may re-rank up to 2**3 = 8 times the planned candidates (800 for k=10): beyond that the exact
step's memory traffic (candidates x dim x 4 bytes per query) outweighs the index's saving."""
RERANK_BATCH_BYTES = 32 * 2**20
"""Candidate ids (8 bytes each) proposed at once when re-ranking, and the block of rows `exact_search`
scores at once: bounds the transient memory of both."""
EXACT_FILTER_BYTES = 64 * 2**20
"""A filter that keeps at most this many bytes of a shard's vectors (12,800 items of 1280-d) is searched
exactly over them: cheaper than probing the index deep enough to find k of so few."""
ADD_BATCH = 65_536
"""Vectors added to the index at once: a rotation (RR, OPQ, PCA) makes a transformed copy of whatever
is added, which would otherwise be a second copy of the whole shard."""
QE_SAMPLE = 2000
"""Vectors `quantization_error` encodes and decodes: its mean is then within ~2% at any shard size. Drift
compares a sample of the whole shard at training with one of the whole shard now, so the items that did not
change weigh the same in both, and what moves it is the new vectors. Codebooks fit their own training points
better than new ones (at 12,000 x 64-d, trained on all, fresh vectors of the same clusters measured 22%
worse), so a shard that is mostly new items drifts past the threshold and trains afresh, as it should."""


@dataclass(frozen=True)
class BuiltIndex:
    """A trained, filled and tuned index with what the manifest reports about it. `build_seconds` is
    the whole of `build`; train, add and tune are its main parts.

    `tuning` lists the (nprobe, rerank_k, recall@10) settings in the order tried; the chosen one is the
    first that reached `params.target_recall`, or the best one if none did (`target_reached` False).
    Flat shards have nprobe 0 and rerank_k 0; `tuning` is empty unless IVF-PQ was tuned first. `considered`
    holds the tuned IVF-PQ search and exact search as measured on the same queries (empty for a shard Flat
    by its size), `choice` why the index kept is the one kept.
    """

    index: faiss.Index
    params: IndexParams
    nprobe: int
    rerank_k: int
    recall_at_10: float
    target_reached: bool
    eval_queries: int
    tuning: tuple[tuple[int, int, float], ...]
    build_seconds: float
    train_seconds: float
    add_seconds: float
    tune_seconds: float
    vectors_sha256: str
    considered: tuple[dict[str, Any], ...] = ()
    choice: str = "flat: too few items for IVF-PQ (index.flat_below)"
    update: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedShard:
    """A shard read back by `load`: the index, its item ids (row i = FAISS id i) and its manifest."""

    folder: str
    index: faiss.Index
    item_ids: pa.Array
    manifest: Mapping[str, Any]

    def align(self, item_ids: Sequence[str] | pa.Array | pa.ChunkedArray, vectors: np.ndarray) -> np.ndarray:
        """The shard's vectors in FAISS id order, taken from `vectors` (rows matching `item_ids`, any
        order, extra rows ignored), checked against the vectors the index was built from."""
        positions = pc.index_in(self.item_ids, value_set=_as_string_array(item_ids))
        missing = positions.null_count
        if missing:
            raise ValueError(
                f"{self.folder}: {missing} of the shard's {len(self.item_ids)} item ids have "
                f"no vector in the {len(item_ids)} given"
            )
        aligned = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[positions.to_numpy()])
        digest = vectors_sha256(aligned)
        if digest != self.manifest["vectors_sha256"]:
            raise ValueError(
                f"{self.folder}: the given vectors differ from those the index was built from "
                f"(sha256 {digest[:12]}... != {self.manifest['vectors_sha256'][:12]}...); "
                "re-ranking needs the same embeddings, rebuild the index"
            )
        return aligned

    def search(
        self, vectors: np.ndarray | None, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search` with the shard's tuned nprobe and re-rank candidates, the candidates scaled up in
        proportion when `k` exceeds the 10 that recall was tuned for (k=11, to drop the query item
        itself, re-ranks 110 where 100 were tuned).

        `allowed` (a bool per FAISS id) restricts the results to those items, and every query still gets
        min(k, allowed items) results: a filter keeping few items is searched exactly over them (at most
        `EXACT_FILTER_BYTES` of vectors); otherwise the index searches only allowed ids with nprobe scaled
        up by the share they are of the shard, and any query that still comes back short is searched
        exactly over the allowed items.
        """
        rerank_k = math.ceil(self.manifest["rerank_k"] * max(1.0, k / RECALL_K))
        nprobe = self.manifest["nprobe"]
        if allowed is None:
            return search(self.index, vectors, queries, k, nprobe, rerank_k)
        rows = np.flatnonzero(allowed)
        if rerank_k == 0:  # Flat: the index's own search is exact and complete over the allowed ids
            return search(self.index, vectors, queries, k, 0, 0, allowed=allowed)
        if vectors is None:
            raise ValueError(f"{self.folder}: a filtered IVF search re-ranks, it needs the shard's vectors")
        if rows.size * self.index.d * 4 <= EXACT_FILTER_BYTES:
            return exact_search(vectors, rows, queries, k)
        deeper = min(self.manifest["nlist"], math.ceil(nprobe * self.index.ntotal / rows.size))
        scores, ids = search(self.index, vectors, queries, k, deeper, rerank_k, allowed=allowed)
        short = np.flatnonzero((ids[:, : min(k, rows.size)] < 0).any(axis=1))
        if short.size:
            scores[short], ids[short] = exact_search(vectors, rows, queries[short], k)
        return scores, ids


def build(
    vectors: np.ndarray,
    params: IndexParams,
    *,
    seed: int = 0,
    eval_queries: int = 1000,
    exact_fallback: bool = True,
    previous: LoadedShard | None = None,
    max_drift: float | None = None,
) -> BuiltIndex:
    """Train on a seeded random sample of `params.train_size` rows, add every row (FAISS id = row
    position), then tune the search on measured recall (`_tune`).

    Tuning takes `eval_queries` of the shard's own vectors (seeded) as queries and finds their exact
    top-10 by brute force. Each query's own row is left out of both lists, as the similar-items stage
    leaves an item out of its own neighbours. A Flat shard's recall is measured the same way (1.0 but
    for ties).

    Updates without training: given the shard's index from the previous build (`previous`, loaded with
    `mmap=False`) with the same
    factory, its trained quantizers are reused, emptied and filled with the current vectors, when the drift
    of their `quantization_error` from the one measured at training is at most `max_drift` (None: always
    train). Re-adding every vector keeps FAISS id = row position; adding is cheap next to training. nprobe
    and re-ranking are tuned and recall measured again either way.

    Never slower than exact search: the searches tuning makes and the exact search that finds the truth are
    timed on the same `eval_queries` rows (1,000: enough rows for exact search to run as one efficient BLAS
    product, as in the similar stage; at 200 it ran 5x slower per query). With `exact_fallback`, tuning stops
    as soon as a setting short of the target takes longer than exact search did, and a shard whose tuned
    search is not faster than exact search is built Flat.
    That happens where vectors have little cluster structure: the target recall then needs a large share
    of the lists probed and many candidates re-ranked, and a BLAS product over every vector costs less.
    """
    started = time.perf_counter()
    vectors = _checked_vectors(vectors, params)
    rng = np.random.default_rng(seed)
    n = params.n
    index = faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)

    training = time.perf_counter()
    update: dict[str, Any] = {}
    if params.kind == "ivfpq":
        sample = np.sort(rng.choice(n, params.train_size, replace=False))  # drawn either way: same queries below
        reused, update = _reuse_training(previous, params, vectors, seed, max_drift)
        if reused is not None:
            index = reused
        else:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            # faiss's bundled stubs miss most of its SWIG API (fields, search parameters, callback IO).
            ivf.cp.seed = seed  # type: ignore[attr-defined]
            ivf.pq.cp.seed = seed  # type: ignore[attr-defined]
            ivf.cp.min_points_per_centroid = TRAIN_POINTS_PER_LIST  # type: ignore[attr-defined]
            ivf.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS // PQ_CENTROIDS  # type: ignore[attr-defined]
            ivf.pq.cp.niter = PQ_KMEANS_ITERATIONS  # type: ignore[attr-defined]
            index.train(vectors[sample])
            baseline = quantization_error(index, vectors, seed)
            update = {**update, "reused": False, "trained_in": None, "quantization_error": baseline}
    trained = time.perf_counter()
    _add_all(index, vectors)
    added = time.perf_counter()

    query_rows = np.sort(rng.choice(n, min(eval_queries, n), replace=False))
    queries = vectors[query_rows]
    exact_started = time.perf_counter()
    _, exact = faiss.knn(queries, vectors, RECALL_K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    exact_seconds = time.perf_counter() - exact_started
    truth = _without_self(exact, query_rows, RECALL_K)
    tried: list[tuple[int, int, float]] = []
    seconds_of: dict[tuple[int, int], float] = {}

    def measure(nprobe: int, rerank_k: int) -> float:
        started = time.perf_counter()
        _, found = search(index, vectors, queries, RECALL_K + 1, nprobe, rerank_k)
        seconds = seconds_of[nprobe, rerank_k] = time.perf_counter() - started
        recall = recall_at_k(_without_self(found, query_rows, RECALL_K), truth, RECALL_K)
        tried.append((nprobe, rerank_k, recall))
        if exact_fallback and nprobe > 0 and seconds > exact_seconds and recall < params.target_recall:
            raise _SlowerThanExact(nprobe, rerank_k, recall, seconds)
        return recall

    def entry(factory: str, recall: float, seconds: float, queries: int, **search: int) -> dict[str, Any]:
        return {"factory": factory, **search, "recall_at_10": recall, "query_seconds": seconds, "queries": queries}

    considered: tuple[dict[str, Any], ...] = ()
    choice = BuiltIndex.choice
    tuning: tuple[tuple[int, int, float], ...] = ()
    if params.kind == "ivfpq":
        factory, flat = params.factory, False
        try:
            tuning, (nprobe, rerank_k, recall) = _tune(measure, params)
            ivf_seconds = seconds_of[nprobe, rerank_k]
        except _SlowerThanExact as slow:
            # Deeper settings only cost more: the target cannot be reached faster than exact search.
            tuning, flat = tuple(tried), True
            nprobe, rerank_k, recall, ivf_seconds = slow.nprobe, slow.rerank_k, slow.recall, slow.seconds
            choice = (
                f"flat: tuning {factory} stopped at nprobe {nprobe}, rerank_k {rerank_k}: "
                f"{ivf_seconds / exact_seconds:.1f}x the time of exact search at recall@10 {recall:.3f}"
            )
        else:
            speedup = exact_seconds / max(ivf_seconds, 1e-9)
            if speedup > 1.0:
                choice = f"ivfpq: {speedup:.1f}x faster than exact search at recall@10 {recall:.3f}"
            elif not exact_fallback:
                choice = f"ivfpq (index.exact_fallback off): exact search was {1 / speedup:.1f}x faster"
            else:
                flat = True
                choice = f"flat: the tuned {factory} search took {1 / speedup:.1f}x the time of exact search"
        considered = (
            entry(factory, recall, ivf_seconds, len(query_rows), nprobe=nprobe, rerank_k=rerank_k),
            entry("Flat", 1.0, exact_seconds, len(query_rows)),
        )
        if flat:
            params = flat_params(n, params.dim, params.target_recall)
            index = faiss.IndexFlatIP(params.dim)
            _add_all(index, vectors)
    if params.kind == "flat":
        nprobe, rerank_k, recall = 0, 0, measure(0, 0)
    tuned = time.perf_counter()
    digest = vectors_sha256(vectors)

    return BuiltIndex(
        index=index,
        params=params,
        nprobe=nprobe,
        rerank_k=rerank_k,
        recall_at_10=recall,
        target_reached=recall >= params.target_recall,
        eval_queries=len(query_rows),
        tuning=tuning,
        build_seconds=time.perf_counter() - started,
        train_seconds=trained - training,
        add_seconds=added - trained,
        tune_seconds=tuned - added,
        vectors_sha256=digest,
        considered=considered,
        choice=choice,
        update=update,
    )


def quantization_error(index: faiss.Index, vectors: np.ndarray, seed: int) -> float:
    """Mean squared error of a seeded sample of `vectors` encoded and decoded by a trained IVF-PQ `index`
    (coarse centroid plus PQ residual): how well its codebooks fit these vectors."""
    rows = vectors[np.sort(np.random.default_rng(seed + 1).choice(len(vectors), min(len(vectors), QE_SAMPLE), False))]
    decoded = index.sa_decode(index.sa_encode(rows))
    return float(np.mean(np.sum((rows - decoded) ** 2, axis=1)))


def _reuse_training(
    previous: LoadedShard | None, params: IndexParams, vectors: np.ndarray, seed: int, max_drift: float | None
) -> tuple[faiss.Index | None, dict[str, Any]]:
    """The previous build's trained index, emptied, when it has this shard's factory and its codebooks still
    fit: the new vectors' `quantization_error` at most `1 + max_drift` times the one measured when it was
    trained (else None), and what the manifest's `update` records of the check."""
    if previous is None or max_drift is None:
        return None, {}
    manifest = previous.manifest
    baseline = manifest.get("update", {}).get("quantization_error")
    if manifest["factory"] != params.factory:
        because = f"the previous index is {manifest['factory']}, this shard needs {params.factory}"
        return None, {"retrained_because": because}
    if not baseline:
        return None, {"retrained_because": "the previous index recorded no quantization error (built before updates)"}
    index = faiss.clone_index(previous.index)
    index.reset()
    error = quantization_error(index, vectors, seed)
    drift = error / baseline - 1.0
    checked = {"drift": drift, "max_drift": max_drift, "quantization_error": baseline}
    if drift > max_drift:
        return None, {**checked, "retrained_because": f"drift {drift:.3f} > index.update_max_drift {max_drift}"}
    trained_in = manifest["update"].get("trained_in") or manifest.get("run_id")
    return index, {**checked, "reused": True, "trained_in": trained_in}


def _add_all(index: faiss.Index, vectors: np.ndarray) -> None:
    """Every vector into `index` (FAISS id = row), `ADD_BATCH` at a time."""
    for start in range(0, len(vectors), ADD_BATCH):
        index.add(vectors[start : start + ADD_BATCH])


class _SlowerThanExact(Exception):
    """Raised by `build`'s recall measurement when an IVF-PQ setting short of the target already took longer
    than exact search over the same queries: tuning stops there, and the shard is built Flat."""

    def __init__(self, nprobe: int, rerank_k: int, recall: float, seconds: float):
        super().__init__(f"nprobe {nprobe}, rerank_k {rerank_k}: recall@10 {recall:.3f} in {seconds:.3f} s")
        self.nprobe, self.rerank_k, self.recall, self.seconds = nprobe, rerank_k, recall, seconds


def search(
    index: faiss.Index,
    vectors: np.ndarray | None,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    rerank_k: int,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` (scores, ids) per query, best first; ids are FAISS ids (rows of `vectors`); only ids whose
    `allowed` entry is true when it is given (a bool per FAISS id).

    `rerank_k` > 0: the index proposes max(rerank_k, k) candidates from `nprobe` inverted lists and
    they are re-scored exactly against `vectors` (the shard's float32 vectors in FAISS id order; a
    memory-mapped array works), so scores are true cosines. Queries go through in batches whose proposed
    candidate ids stay under `RERANK_BATCH_BYTES`, so memory does not grow with the number of queries
    beyond the (q, k) results. `rerank_k` == 0: the index's own scores (exact for Flat, where
    `vectors` may be None). `nprobe` applies to IVF indexes only. Rows with fewer than `k` results (a
    tiny shard, or too few candidates in the probed lists) are padded with id -1 and score -inf.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must have shape (q, {index.d}), got {queries.shape}")
    bitmap = None if allowed is None else np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
    selector = None if bitmap is None else faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
    inner: faiss.SearchParameters | None
    if nprobe > 0:
        inner = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)  # type: ignore[call-arg]
    else:
        inner = None if selector is None else faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
    search_params = (
        faiss.SearchParametersPreTransform(index_params=inner)  # type: ignore[call-arg]
        if inner is not None and isinstance(index, faiss.IndexPreTransform)
        else inner
    )
    if rerank_k == 0:
        scores, ids = index.search(queries, k, params=search_params)
        return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids
    if vectors is None or vectors.shape != (index.ntotal, index.d):
        raise ValueError(
            f"re-ranking needs the shard's vectors with shape ({index.ntotal}, {index.d}), got "
            f"{None if vectors is None else vectors.shape}"
        )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # once: FAISS reads it in place every batch
    candidates = max(rerank_k, k)
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    batch = max(1, RERANK_BATCH_BYTES // (candidates * 8))
    for start in range(0, len(queries), batch):
        rows = slice(start, start + batch)
        _, proposed = index.search(queries[rows], candidates, params=search_params)
        scores[rows], ids[rows] = _rerank(vectors, queries[rows], proposed, k)
    return scores, ids


def exact_search(vectors: np.ndarray, rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` (scores, FAISS ids) of each query among `rows` of `vectors`, best first, padded with
    -1 / -inf; the rows are read in blocks of `RERANK_BATCH_BYTES`, so memory does not grow with them."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    block = max(1, RERANK_BATCH_BYTES // (vectors.shape[1] * 4))
    for start in range(0, rows.size, block):
        ids = rows[start : start + block]
        scores = queries @ np.asarray(vectors[ids], dtype=np.float32).T
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_ids = np.take_along_axis(merged_ids, top, axis=1)
    return best_scores, np.where(np.isfinite(best_scores), best_ids, -1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int) -> float:
    """Share of the true top-`k` neighbours that appear in the found top-`k`, over all queries.

    Ids of -1 (padding) never count; a query whose true list is shorter than k (a shard with fewer than
    k other items) is judged on the neighbours that exist. With no true neighbours at all the recall is
    1.0: there was nothing to miss.
    """
    found = np.asarray(found_ids)[:, :k]
    true = np.asarray(true_ids)[:, :k]
    if found.shape[0] != true.shape[0]:
        raise ValueError(f"found_ids has {found.shape[0]} rows but true_ids has {true.shape[0]}")
    valid = true >= 0
    hits = ((found[:, :, None] == true[:, None, :]) & valid[:, None, :]).any(axis=1).sum()
    total = valid.sum()
    return 1.0 if total == 0 else float(hits / total)


def vectors_sha256(vectors: np.ndarray) -> str:
    """SHA-256 of float32 vectors' bytes in row order: identifies the exact vectors an index was built
    from, so that re-ranking with different ones is caught (`LoadedShard.align`)."""
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).data).hexdigest()


def save(
    built: BuiltIndex,
    folder: str | os.PathLike[str],
    *,
    ids: Sequence[str] | pa.Array | pa.ChunkedArray,
    model: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `index.faiss` (FAISS's own format), `ids.parquet` (column `item_id`, row i = FAISS id i)
    and `manifest.json` into `folder` (a local path or a URI pyarrow understands, e.g. s3://...), and
    return the manifest.

    The manifest is written last, so a shard folder without one is an interrupted write. `extra` adds
    fields (run id, shard key, ...) but may not replace the ones `load` checks and `search` relies on.
    """
    item_ids = _as_string_array(ids)
    if len(item_ids) != built.index.ntotal:
        raise ValueError(f"{folder}: {len(item_ids)} ids for an index of {built.index.ntotal} vectors")
    fs, root = filesystem(folder)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{INDEX_FILE}") as stream:
        faiss.write_index(built.index, faiss.PyCallbackIOWriter(stream.write))  # type: ignore[attr-defined]
    pq.write_table(pa.table({ID_COLUMN: item_ids}), f"{root}/{IDS_FILE}", filesystem=fs)

    params = built.params
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_VERSION,
        "factory": params.factory,
        "kind": params.kind,
        "metric": "inner_product",
        "dim": params.dim,
        "out_dim": params.out_dim,
        "ntotal": int(built.index.ntotal),
        "nlist": params.nlist,
        "m": params.m,
        "nbits": params.nbits,
        "rotation": params.rotation,
        "train_size": params.train_size,
        "nprobe": built.nprobe,
        "rerank": built.rerank_k > 0,
        "rerank_k": built.rerank_k,
        "recall_at_10": built.recall_at_10,
        "target_recall": params.target_recall,
        "target_reached": built.target_reached,
        "eval_queries": built.eval_queries,
        "tuning": [
            {"nprobe": nprobe, "rerank_k": rerank_k, "recall_at_10": recall}
            for nprobe, rerank_k, recall in built.tuning
        ],
        "model": model,
        "build_seconds": built.build_seconds,
        "train_seconds": built.train_seconds,
        "add_seconds": built.add_seconds,
        "tune_seconds": built.tune_seconds,
        "bytes": fs.get_file_info(f"{root}/{INDEX_FILE}").size,
        "flat_bytes": params.flat_bytes,
        "vectors_sha256": built.vectors_sha256,
        "faiss_version": faiss.__version__,
        "considered": list(built.considered),
        "choice": built.choice,
        "update": dict(built.update),
        "reused_training": bool(built.update.get("reused", False)),
    }
    clashes = sorted(set(extra or {}) & set(manifest))
    if clashes:
        raise ValueError(f"extra manifest fields may not replace {clashes}")
    manifest.update(extra or {})
    with fs.open_output_stream(f"{root}/{MANIFEST_FILE}") as stream:
        stream.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def load(folder: str | os.PathLike[str], *, expected_dim: int, expected_model: str, mmap: bool = True) -> LoadedShard:
    """Read a shard written by `save`, refusing one built for another model or dimension, or whose
    index, ids and manifest disagree on the number of vectors (a mixed-up or partly written folder).

    A local index file is memory-mapped where FAISS can (`IO_FLAG_MMAP_IFC`: a Flat index's codes are
    used in place, shared by every process that maps them, and paged in as searched; IVF indexes are
    read into memory). Build folders are never rewritten, and a mapped file that a cleanup deletes stays
    readable until it is unmapped, so mapping is safe under a running nightly. `mmap=False` reads it whole,
    for an index that is to be changed (`build`'s `previous`: mapped inverted lists are read-only)."""
    fs, root = filesystem(folder)
    if fs.get_file_info(f"{root}/{MANIFEST_FILE}").type == pafs.FileType.NotFound:
        raise ValueError(f"{folder}: no {MANIFEST_FILE} (not a shard folder, or its write was interrupted)")
    with fs.open_input_stream(f"{root}/{MANIFEST_FILE}") as stream:
        manifest = json.loads(stream.read())
    if manifest["model"] != expected_model:
        raise ValueError(f"{folder}: index built with model {manifest['model']!r}, expected {expected_model!r}")
    if manifest["dim"] != expected_dim:
        raise ValueError(f"{folder}: index has dimension {manifest['dim']}, expected {expected_dim}")
    if mmap and isinstance(fs, pafs.LocalFileSystem):  # memory-mapped: a Flat shard's vectors stay in the page cache
        index = faiss.read_index(f"{root}/{INDEX_FILE}", faiss.IO_FLAG_MMAP_IFC)
    else:
        with fs.open_input_stream(f"{root}/{INDEX_FILE}") as stream:
            index = faiss.read_index(faiss.PyCallbackIOReader(stream.read))  # type: ignore[attr-defined]
    item_ids = pq.read_table(f"{root}/{IDS_FILE}", filesystem=fs, columns=[ID_COLUMN])[ID_COLUMN].combine_chunks()
    if index.d != manifest["dim"]:
        raise ValueError(f"{folder}: {INDEX_FILE} has dimension {index.d}, manifest says {manifest['dim']}")
    if not index.ntotal == len(item_ids) == manifest["ntotal"]:
        raise ValueError(
            f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors, {IDS_FILE} {len(item_ids)} ids, "
            f"manifest ntotal {manifest['ntotal']}"
        )
    return LoadedShard(folder=str(folder), index=index, item_ids=item_ids, manifest=manifest)


def _checked_vectors(vectors: np.ndarray, params: IndexParams) -> np.ndarray:
    """C-contiguous float32 of the planned shape, every row of unit length (else IP is not cosine)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (params.n, params.dim):
        raise ValueError(f"vectors have shape {vectors.shape}, the plan is for ({params.n}, {params.dim})")
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))  # no (n, d) temporary, unlike np.linalg.norm
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if bad.size:
        raise ValueError(f"{bad.size} vectors are not L2-normalised (row {bad[0]} has norm {norms[bad[0]]:.4f})")
    return vectors


def _tune(
    measure: Callable[[int, int], float], params: IndexParams
) -> tuple[tuple[tuple[int, int, float], ...], tuple[int, int, float]]:
    """Try search settings from cheap to dear until one reaches the target recall. Returns every
    (nprobe, rerank_k, recall) tried, in order, and the chosen one: the first to reach the target, else
    the best recall (the cheaper setting on ties).

    nprobe doubles (1, 2, 4, ... nlist) at `params.rerank_k` re-ranked candidates. When doubling nprobe
    gains less than `PLATEAU_GAIN`, the PQ codes, not the lists probed, are what limits recall: the
    right candidates are found but ranked too low to be re-scored. Then the candidates double (up to
    `RERANK_DOUBLINGS` times) and nprobe resumes from the last value that still helped.
    """
    ladder = _nprobe_ladder(params.nlist)
    tried: list[tuple[int, int, float]] = []
    start = 0
    for doubling in range(RERANK_DOUBLINGS + 1):
        rerank_k = params.rerank_k * 2**doubling
        previous = -1.0
        for step in range(start, len(ladder)):
            recall = measure(ladder[step], rerank_k)
            tried.append((ladder[step], rerank_k, recall))
            if recall >= params.target_recall:
                return tuple(tried), tried[-1]
            if recall - previous < PLATEAU_GAIN:
                break
            previous = recall
        start = max(0, step - 1)
    return tuple(tried), max(tried, key=lambda tried_step: (tried_step[2], -tried_step[1], -tried_step[0]))


def _nprobe_ladder(nlist: int) -> list[int]:
    """1, 2, 4, ... doubling, ending at nlist: recall grows roughly with log(nprobe), cost with nprobe."""
    ladder = [1]
    while ladder[-1] < nlist:
        ladder.append(min(2 * ladder[-1], nlist))
    return ladder


def _without_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """First `k` ids of each row other than the row's own id, order kept (padding -1 stays last)."""
    is_self = ids == self_ids[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)[:, :k]


def _rerank(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidates (-1 = none, trailing; at least `k` columns);
    the best `k` of each row, best first, ties in FAISS id order (as `exact_search` and the similar stage's
    exhaustive scoring break them).

    FAISS's `knn_inner_products_by_idx` reads each candidate's vector in place: 5x the speed of gathering
    them into a NumPy array and multiplying (0.10 s against 0.54 s for 10,000 queries x 100 candidates at
    256-d on one thread here), and the gather was most of a search's time. `vectors` and `queries` are
    C-contiguous float32 (`search` makes them so once, not per batch)."""
    candidates = np.ascontiguousarray(candidates, dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    faiss.knn_inner_products_by_idx(  # type: ignore[attr-defined]
        faiss.swig_ptr(queries),
        faiss.swig_ptr(vectors),
        faiss.swig_ptr(candidates),
        vectors.shape[1],
        len(queries),
        len(vectors),
        candidates.shape[1],
        k,
        faiss.swig_ptr(scores),
        faiss.swig_ptr(ids),
        candidates.shape[1],
    )
    scores[ids < 0] = -np.inf  # FAISS leaves the lowest float, not -inf, where a row had fewer than k
    order = np.lexsort((ids, -scores), axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    return scores, np.where(np.isfinite(scores), np.take_along_axis(ids, order, axis=1), -1)


def _as_string_array(ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    return ids.cast(pa.string()) if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string())


def matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """An array<float> column as an (n, dim) float32 matrix, without a Python object per row."""
    flat = pc.list_flatten(column).to_numpy()
    if flat.size != len(column) * dim:
        raise ValueError(f"embeddings are not all {dim}-dimensional")
    return flat.astype(np.float32, copy=False).reshape(len(column), dim)


def matrices(column: pa.ChunkedArray, dim: int) -> list[np.ndarray]:
    """An array<float> column whose rows hold any number of `dim`-vectors as one (m, dim) float32 matrix per
    row, views of one flat array: `to_pylist` made a Python float of every value, and was half of the
    recommend stage's scoring time (users' member vectors, `benchmarks/scale.py`)."""
    flat = pc.list_flatten(column).to_numpy().astype(np.float32, copy=False)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if flat.size % dim or np.any(lengths % dim):
        raise ValueError(f"vectors are not all {dim}-dimensional")
    if not len(column):
        return []
    return np.split(flat.reshape(-1, dim), np.cumsum(lengths // dim)[:-1])

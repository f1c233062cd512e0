"""The similar stage's search math as pure NumPy: filtered, widened and exactly re-ranked neighbour searches
of one target shard (the "Search" part of `lookalike.similar.stage`'s docstring).

The target is anything with the `Target` shape; the stage passes one shard's FAISS index and vectors.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import pyarrow as pa

from lookalike.index.params import RECALL_K

RESULT_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("rank", pa.int32()), ("similar_item_id", pa.string()), ("score", pa.float32())]
)
WIDEN = 4
"""A row still short of k after filtering is asked again with this many times the candidates."""
MAX_WIDENINGS = 2
"""Wider searches before a short row is scored exhaustively: re-rank cost grows with the candidates, so
past ~16x the planned fetch scoring the whole shard is about as cheap and certainly complete."""
EXACT_SHARE = 4
"""A search for more than 1/4 of a shard's items goes straight to exhaustive scoring."""
EXACT_BATCH_BYTES = 64 * 2**20
"""Score matrix computed at once by exhaustive scoring: bounds its transient memory."""


class Target(Protocol):
    """One shard as a search sees it: vectors in FAISS id order, and per FAISS id the exclusion key and
    whether the item may be a neighbour."""

    @property
    def vectors(self) -> np.ndarray: ...

    @property
    def keys(self) -> np.ndarray: ...

    @property
    def eligible(self) -> np.ndarray: ...

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, FAISS ids) of `fetch` exactly re-scored candidates per query, best first."""
        ...


def rerank_budget(tuned: int, fetch: int) -> int:
    """Exact re-rank candidates for a search of `fetch` results.

    The index was tuned on `tuned` candidates for the 11 results of a query that finds itself first
    (`shard_index.build` drops self), so each further 10 results get another `tuned`. Flat (0) stays 0.
    """
    return tuned * max(1, math.ceil((fetch - 1) / RECALL_K))


def group_sizes(query_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """How many of the target's items share each query's exclusion key (itself, its duplicates): all of
    them score at the top and are filtered out, so they are asked for on top of k."""
    values, counts = np.unique(keys, return_counts=True)
    at = np.minimum(np.searchsorted(values, query_keys), len(values) - 1)
    return np.where(values[at] == query_keys, counts[at], 0)


def planned_fetch(k: int, excluded: np.ndarray, eligible_share: float) -> np.ndarray:
    """Candidates per query so that k usually survive one search: k plus the query's own group, scaled by
    the share of the target that may be a neighbour at all."""
    return np.ceil((k + excluded) / eligible_share).astype(np.int64)


def select(
    ids: np.ndarray,
    scores: np.ndarray,
    query_keys: np.ndarray,
    keys: np.ndarray,
    eligible: np.ndarray,
    k: int,
    min_score: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k candidates of each row (rows best first, at least k columns) that may be neighbours of
    the row's query: a real id, another exclusion key, eligible, not under `min_score`. Returns (ids,
    scores) padded with -1 and -inf, and how many each row kept."""
    safe = np.maximum(ids, 0)
    usable = (ids >= 0) & eligible[safe] & (keys[safe] != query_keys[:, None])
    if min_score is not None:
        usable &= scores >= min_score
    order = np.argsort(~usable, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(usable, order, axis=1)
    return (
        np.where(kept, np.take_along_axis(ids, order, axis=1), -1),
        np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32),
        kept.sum(axis=1),
    )


def settled(kept: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int, min_score: float | None) -> np.ndarray:
    """Rows a wider search cannot improve: k kept, or candidates already under `min_score` (the rest of
    the shard scores lower still)."""
    done = kept >= k
    if min_score is not None:
        done |= np.where(ids >= 0, scores, np.inf).min(axis=1) < min_score
    return done


def exhaustive(
    vectors: np.ndarray,
    queries: np.ndarray,
    query_keys: np.ndarray,
    keys: np.ndarray,
    eligible: np.ndarray,
    k: int,
    min_score: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every item of the shard scored: complete by construction, for the rows the index could not fill."""
    n = len(vectors)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    top = min(k, n)
    batch = max(1, EXACT_BATCH_BYTES // (4 * n))
    for start in range(0, len(queries), batch):
        rows = slice(start, start + batch)
        exact = queries[rows] @ vectors.T
        usable = eligible[None, :] & (keys[None, :] != query_keys[rows, None])
        if min_score is not None:
            usable &= exact >= min_score
        exact = np.where(usable, exact, -np.inf)
        best = np.argpartition(-exact, top - 1, axis=1)[:, :top]
        best_scores = np.take_along_axis(exact, best, axis=1)
        order = np.lexsort((best, -best_scores), axis=1)  # best first, ties in FAISS id (item_id) order
        best, best_scores = np.take_along_axis(best, order, axis=1), np.take_along_axis(best_scores, order, axis=1)
        ids[rows, :top] = np.where(np.isfinite(best_scores), best, -1)
        scores[rows, :top] = best_scores
    return ids, scores


def neighbours(
    target: Target, queries: np.ndarray, query_keys: np.ndarray, k: int, min_score: float | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The k best neighbours in `target` of each query, best first, as FAISS ids and cosines (-1/-inf
    padding where fewer exist), and how many distinct queries needed exhaustive scoring."""
    _, first, inverse = np.unique(query_keys, return_index=True, return_inverse=True)
    reps, rep_keys = queries[first], query_keys[first]
    ids = np.full((len(reps), k), -1, dtype=np.int64)
    scores = np.full((len(reps), k), -np.inf, dtype=np.float32)
    if not target.eligible.any():
        return ids[inverse], scores[inverse], 0
    n = len(target.vectors)
    fetch = planned_fetch(k, group_sizes(rep_keys, target.keys), float(target.eligible.mean()))
    pending, to_score = np.arange(len(reps)), []
    for _ in range(MAX_WIDENINGS + 1):
        wide = fetch[pending] * EXACT_SHARE > n
        to_score.append(pending[wide])
        pending, short = pending[~wide], [np.empty(0, dtype=np.int64)]
        for size in np.unique(fetch[pending]):
            rows = pending[fetch[pending] == size]
            found_scores, found = target.search(reps[rows], int(size))
            ids[rows], scores[rows], kept = select(
                found, found_scores, rep_keys[rows], target.keys, target.eligible, k, min_score
            )
            short.append(rows[~settled(kept, found, found_scores, k, min_score)])
        pending = np.concatenate(short)
        fetch[pending] *= WIDEN
    rows = np.concatenate([*to_score, pending])
    if rows.size:
        ids[rows], scores[rows] = exhaustive(
            target.vectors, reps[rows], rep_keys[rows], target.keys, target.eligible, k, min_score
        )
    return ids[inverse], scores[inverse], int(rows.size)


def result_rows(query_ids: pa.Array, target_ids: pa.Array, ids: np.ndarray, scores: np.ndarray) -> pa.RecordBatch:
    """One row per found neighbour; rank is its column + 1, dense because padding only trails.
    Scores are clipped to [-1, 1]: a cosine, even where float32 rounding puts a twin at 1.0000001."""
    found = ids >= 0
    rows, columns = np.nonzero(found)
    return pa.record_batch(
        [
            query_ids.take(rows),
            pa.array(columns + 1, type=pa.int32()),
            target_ids.take(ids[found]),
            pa.array(np.clip(scores[found], -1.0, 1.0)),
        ],
        schema=RESULT_SCHEMA,
    )

"""The math of recommendations, as plain NumPy functions a Spark task calls: no Spark, no FAISS.

A user's history becomes weighted interest vectors (`interests`); candidates found for those interests are
scored by blending visual similarity with co-visitation (`blend`), explained by the history items that
contributed most (`top_contributors`), and merged so that every interest gets its share of the list
(`fair_merge`). Each step is a function of its inputs alone, so the tests check them on hand-made numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_SILHOUETTE = 0.5
"""A history is split into several interests only when the split's weighted silhouette (cosine distance)
reaches this: "reasonable structure" in Kaufman and Rousseeuw's reading (a split of 8 noisy copies of
one vector scores up to ~0.3, two separate tastes ~0.9). A silhouette compares
distances within and between clusters, so the test holds in any embedding space, whatever the usual cosine
between unrelated items is there."""
KMEANS_ROUNDS = 20


def decay(age_days: np.ndarray, half_life_days: float | None) -> np.ndarray:
    """Weight multiplier of events `age_days` old: halves every `half_life_days`; None keeps every event whole.
    Ages are measured from the newest event in the data, not the wall clock, so a re-run gives the same table."""
    if half_life_days is None:
        return np.ones_like(age_days, dtype=np.float64)
    return np.power(0.5, np.maximum(age_days, 0.0) / half_life_days)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _centroids(vectors: np.ndarray, weights: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    members = labels[None, :] == np.arange(k)[:, None]  # (k, items)
    return _normalise(members @ (vectors * weights[:, None]))


def _kmeans(vectors: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted spherical k-means, seeded deterministically by farthest-first from the heaviest item."""
    seeds = [int(np.argmax(weights))]
    for _ in range(1, k):
        closeness = (vectors @ vectors[seeds].T).max(axis=1)
        seeds.append(int(np.argmin(closeness)))
    centroids = vectors[seeds].astype(np.float64)
    labels = np.zeros(len(vectors), dtype=np.int64)
    for step in range(KMEANS_ROUNDS):
        new = np.argmax(vectors @ centroids.T, axis=1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        centroids = _centroids(vectors, weights, labels, k)
    return centroids, labels


def silhouette(distances: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean silhouette of a clustering, from a square distance matrix; a member alone in its
    cluster counts 0, as in the usual definition."""
    clusters = np.unique(labels)
    if len(clusters) < 2:
        return 0.0
    member = labels[None, :] == clusters[:, None]  # (clusters, items)
    totals = member @ weights  # weight of each cluster
    sums = (distances * weights[None, :]) @ member.T  # (items, clusters): weighted distance sums
    own = np.searchsorted(clusters, labels)
    rows = np.arange(len(labels))
    own_weight = totals[own] - weights  # the item itself is at distance 0 and not counted
    alone = own_weight <= 0
    inside = sums[rows, own] / np.where(alone, 1.0, own_weight)
    between = sums / totals[None, :]
    between[rows, own] = np.inf
    nearest = between.min(axis=1)
    scores = np.where(alone, 0.0, (nearest - inside) / np.maximum(np.maximum(nearest, inside), 1e-12))
    return float((scores * weights).sum() / weights.sum())


def interests(
    vectors: np.ndarray, weights: np.ndarray, max_interests: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A history's interest vectors: (centroids (k, d) L2-normalised, each item's interest label, each
    interest's share of the weight), heaviest interest first.

    One interest unless a split has real structure (`MIN_SILHOUETTE`); otherwise the k in 2..max with the
    best silhouette. A shopper of shoes only gets one shoe vector, not three slightly different ones; a
    shopper of shoes and saucepans gets two, so the saucepans are not averaged into a vector near neither.
    """
    vectors = _normalise(np.asarray(vectors, dtype=np.float64))
    weights = np.asarray(weights, dtype=np.float64)
    labels = np.zeros(len(vectors), dtype=np.int64)
    centroids = _centroids(vectors, weights, labels, 1)
    # Rows told apart by their bytes (+ 0.0 makes -0.0 into 0.0): np.unique(axis=0) took 80% of a profile's time.
    distinct = len({row.tobytes() for row in np.round(vectors, 6) + 0.0})
    if distinct > 2 and max_interests > 1:
        distances = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0)
        best = MIN_SILHOUETTE
        for k in range(2, min(max_interests, distinct - 1) + 1):
            split, split_labels = _kmeans(vectors, weights, k)
            score = silhouette(distances, split_labels, weights)
            if score >= best:
                best, centroids, labels = score, split, split_labels
    used = np.unique(labels)  # an emptied cluster is dropped
    shares = np.array([weights[labels == c].sum() for c in used]) / weights.sum()
    order = np.argsort(-shares, kind="stable")
    relabel = np.empty(labels.max() + 1, dtype=np.int64)
    relabel[used[order]] = np.arange(len(used))
    return centroids[used[order]].astype(np.float32), relabel[labels], shares[order]


def quotas(shares: Sequence[float] | np.ndarray, n: int) -> list[int]:
    """Slots per interest out of n, in proportion to its weight share (largest remainder), then at least one
    each while slots last, taken from the largest: a minor interest is not drowned by a major one."""
    exact = [s * n for s in shares]
    slots = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - slots[i]), i))
    for i in by_remainder[: n - sum(slots)]:
        slots[i] += 1
    for i in range(min(len(shares), n)):
        if slots[i] == 0:
            slots[max(range(len(slots)), key=lambda j: (slots[j], -j))] -= 1
            slots[i] = 1
    return slots


def fair_merge(interest: np.ndarray, score: np.ndarray, shares: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """Positions of the n candidates to keep, in rank order.

    Each candidate belongs to one interest. Interests take turns, heaviest first, each taking its best
    remaining candidate while it has quota left (`quotas`); slots an interest cannot fill go to the best
    remaining candidates of any interest. Ties in score break by position, so the result is deterministic.
    """
    order = np.lexsort((np.arange(len(score)), -score))
    queues = {i: [p for p in order if interest[p] == i] for i in range(len(shares))}
    left = quotas(shares, n)
    picked: list[int] = []
    taken = np.zeros(len(score), dtype=bool)
    while len(picked) < n and any(left[i] and queues[i] for i in queues):
        for i in range(len(shares)):
            if left[i] and queues[i] and len(picked) < n:
                p = queues[i].pop(0)
                picked.append(p)
                taken[p] = True
                left[i] -= 1
    for p in order:
        if len(picked) >= n:
            break
        if not taken[p]:
            picked.append(p)
            taken[p] = True
    return np.asarray(picked, dtype=np.int64)


def blend(visual: np.ndarray, covisit: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * visual cosine + weight * co-visitation scaled to [0, 1] by the user's best.

    Co-visitation lives on its own scale (sums of damped counts), so it is scaled per user; a candidate
    no one co-visited gets 0 there and competes on looks alone, which is what lets new and rarely seen
    items in."""
    top = covisit.max() if len(covisit) else 0.0
    scaled = covisit / top if top > 0 else np.zeros_like(covisit)
    return ((1.0 - weight) * visual + weight * scaled).astype(np.float32)


def top_contributors(names: Sequence[str], contributions: np.ndarray, limit: int) -> list[str]:
    """The history items with the largest positive contributions, largest first (ties by name)."""
    order = sorted(range(len(names)), key=lambda i: (-contributions[i], names[i]))
    return [names[i] for i in order[:limit] if contributions[i] > 0]

"""The recommend stage's per-user math on plain arrays: a user's interests as profile rows, each candidate's best
interest, whether it can still reach the list, its `because` members, and one user's ranked list with its reasons
(steps 2, 4 and 5 of `lookalike.recommend.stage`). The stage calls these once per user inside tasks that hold many
users' rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lookalike.recommend import taste

ENTRY_SLACK = 1e-5
"""Float32 room in `could_enter`'s comparison: a candidate that might tie the last kept score counts."""
TARGETS_PER_INTEREST = 2
"""Shards an interest searches: those holding most of its members' weight. An interest is a cluster of
similar items, which rarely spans more than a category or two; searching every shard for every user would
multiply the work by the number of shards."""


def profile_rows(
    user_id: str, items: list[str], weights: np.ndarray, shard_of: list[str], vectors: np.ndarray, max_interests: int
) -> list[dict[str, Any]]:
    """A user's interests as profile rows (see `taste.interests`); `items` in `item_id` order, so that each
    interest's members are too."""
    centroids, labels, shares = taste.interests(vectors, weights, max_interests)
    rows = []
    for k in range(len(centroids)):
        members = np.flatnonzero(labels == k)
        by_shard: dict[str, float] = {}
        for m in members:
            by_shard[shard_of[m]] = by_shard.get(shard_of[m], 0.0) + float(weights[m])
        targets = sorted(by_shard, key=lambda s: (-by_shard[s], s))[:TARGETS_PER_INTEREST]
        rows.append(
            {
                "user_id": user_id,
                "interest": k,
                "share": float(shares[k]),
                "vector": centroids[k],
                "targets": targets,
                "members": [items[m] for m in members],
                "member_weights": weights[members].astype(np.float32),
                "member_vectors": np.asarray(vectors[members], dtype=np.float32).ravel(),
            }
        )
    return rows


def best_interest(interests: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate vector's best interest (the first of equals) and its cosine to it."""
    sims = candidates @ interests.T
    best = np.argmax(sims, axis=1)
    return best, sims[np.arange(len(candidates)), best]


def contenders(
    interest: np.ndarray, visual: np.ndarray, order: np.ndarray, covisited: np.ndarray, n: int, covisit_weight: float
) -> np.ndarray:
    """Positions of the candidates (one shard's, of one user, bought and unavailable items already gone) that
    can still reach the user's n: every co-visited one, and of the rest each interest's n best by their
    looks-only blended score (`taste.blend` with no co-visitation, as `rank_user` computes it), ties by
    `order` (the rank of the item id: `fair_merge` breaks ties by position, and positions are in item id
    order). A candidate behind n others of its interest is behind them in that interest's queue and in the
    list's fill order wherever the others live, so it is never kept: the scoring tasks drop it instead of
    explaining, writing and shuffling it to the ranking step (most of ~200 candidates a user for 10 kept)."""
    looks = taste.blend(visual.astype(np.float64), np.zeros(len(visual)), covisit_weight)
    ranked = np.lexsort((order, -looks, interest))
    grouped = interest[ranked]
    within = np.arange(len(ranked)) - np.searchsorted(grouped, grouped, side="left")
    keep = covisited.copy()
    keep[ranked[within < n]] = True
    return np.flatnonzero(keep)


def explain(
    best: np.ndarray,
    members: list[list[str]],
    member_weights: list[np.ndarray],
    member_vectors: list[np.ndarray],
    candidates: np.ndarray,
    because: int,
) -> tuple[list[list[str]], list[np.ndarray]]:
    """For each candidate vector, the members of its best interest (`best_interest`) with the largest
    weight * cosine to it: names and contributions, largest first, ties by name."""
    names: list[list[str]] = [[] for _ in range(len(candidates))]
    contribs: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(candidates)
    for k in np.unique(best):
        rows = np.flatnonzero(best == k)
        by_name = np.argsort(np.asarray(members[k], dtype=object), kind="stable")
        parts = (candidates[rows] @ member_vectors[k][by_name].T) * member_weights[k][by_name]
        order = np.argsort(-parts, axis=1, kind="stable")[:, :because]
        for row, picked, values in zip(rows, by_name[order], np.take_along_axis(parts, order, axis=1)):
            names[row] = [members[k][i] for i in picked]
            contribs[row] = values.astype(np.float32)
    return names, contribs


def rank_user(
    interest: np.ndarray, visual: np.ndarray, covisit: np.ndarray, shares: np.ndarray, n: int, covisit_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """One user's candidates (one per item, in `item_id` order) to their top n: positions in rank order and
    blended scores (`taste.blend`, `taste.fair_merge`)."""
    score = taste.blend(visual, covisit, covisit_weight)
    keep = taste.fair_merge(interest, score, shares, n)
    return keep, score[keep]


def entry_score(interest: np.ndarray, kept_scores: np.ndarray, shares: np.ndarray, n: int) -> float:
    """The blended score a new candidate must reach to change this ranked list (`rank_user`'s scores), or
    -inf when any candidate would: the list is short, or an interest has fewer candidates than its quota (a
    newcomer of that interest takes a slot whatever its score). Otherwise each interest's picks are its best
    and the rest of the list is the best left, so a candidate under every kept score changes nothing."""
    counts = np.bincount(interest, minlength=len(shares))
    if len(kept_scores) < n or np.any(counts < np.asarray(taste.quotas(shares, n))):
        return -np.inf
    return float(kept_scores.min())


def could_enter(
    interests: np.ndarray,
    targets: list[list[str]],
    entry: float,
    vectors: np.ndarray,
    shards: list[str],
    covisit_weight: float,
) -> bool:
    """Whether any of these new or changed item vectors could enter the list of a user whose interests (one
    row each, with the shards each searches) and `entry_score` were recorded: the item lives in a shard an
    interest searches, and its visual share of the blend, (1 - weight) x its best cosine to an interest,
    reaches the entry score (its co-visitation share is 0 for users whose history nobody co-visited it with;
    the others are recomputed anyway). An upper bound: the index might not even propose it."""
    searched = {s for shard_list in targets for s in shard_list}
    reachable = np.array([s in searched for s in shards], dtype=bool)
    if not reachable.any():
        return False
    if not np.isfinite(entry):
        return True
    best = (vectors[reachable] @ interests.T).max(axis=1)
    return bool(np.any((1.0 - covisit_weight) * best >= entry - ENTRY_SLACK))


def reasons(
    visual_because: Sequence[str],
    visual_contrib: Sequence[float],
    covisit_because: Sequence[str] | None,
    covisit_contrib: Sequence[float] | None,
    covisit_top: float,
    covisit_weight: float,
    because: int,
) -> list[str]:
    """One recommendation's `because`: the history items with the largest blended contributions, the visual
    ones weighted as the score weights looks, the co-visited ones scaled by the user's best co-visitation
    (`covisit_top`) as `taste.blend` scales them."""
    parts: dict[str, float] = {}
    for name, value in zip(visual_because, visual_contrib):
        parts[name] = parts.get(name, 0.0) + (1.0 - covisit_weight) * float(value)
    if covisit_top > 0 and covisit_because is not None and covisit_contrib is not None:
        for name, value in zip(covisit_because, covisit_contrib):
            parts[name] = parts.get(name, 0.0) + covisit_weight * float(value) / covisit_top
    names = sorted(parts)
    return taste.top_contributors(names, np.array([parts[x] for x in names]), because)

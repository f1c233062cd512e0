"""The recommend stage's per-user math on plain arrays: a user's interests as profile rows, each candidate's
best interest and its `because` members, and one user's ranked list (steps 2, 4 and 5 of
`lookalike.recommend.stage`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from lookalike.recommend import taste

TARGETS_PER_INTEREST = 2
"""Shards an interest searches: those holding most of its members' weight. An interest is a cluster of
similar items, which rarely spans more than a category or two; searching every shard for every user would
multiply the work by the number of shards."""


def profile_rows(
    user_id: str, items: list[str], weights: np.ndarray, shard_of: list[str], vectors: np.ndarray, max_interests: int
) -> list[dict[str, Any]]:
    """A user's interests as PROFILE_SCHEMA rows (see `taste.interests`)."""
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


def score_user(
    interests: np.ndarray,
    members: list[list[str]],
    member_weights: list[np.ndarray],
    member_vectors: list[np.ndarray],
    candidates: np.ndarray,
    because: int,
) -> tuple[np.ndarray, np.ndarray, list[list[str]], list[np.ndarray]]:
    """Each candidate vector's best interest, its cosine to it, and the members of that interest with the
    largest weight * cosine to the candidate (names and contributions, largest first)."""
    sims = candidates @ interests.T
    best = np.argmax(sims, axis=1)
    visual = sims[np.arange(len(candidates)), best]
    names, contribs = [], []
    for row, k in enumerate(best):
        parts = member_weights[k] * (member_vectors[k] @ candidates[row])
        order = sorted(range(len(parts)), key=lambda i: (-parts[i], members[k][i]))[:because]
        names.append([members[k][i] for i in order])
        contribs.append(parts[order].astype(np.float32))
    return best, visual, names, contribs


def rank_user(frame: pd.DataFrame, shares: np.ndarray, n: int, covisit_weight: float, because: int) -> pd.DataFrame:
    """One user's candidates (one row per item) to their top n: blend, fair merge, `because`."""
    covisit = frame["covisit"].fillna(0.0).to_numpy(dtype=np.float64)
    score = taste.blend(frame["visual"].to_numpy(dtype=np.float64), covisit, covisit_weight)
    keep = taste.fair_merge(frame["interest"].to_numpy(), score, shares, n)
    top = covisit.max() if len(covisit) else 0.0
    reasons = []
    for p in keep:
        parts: dict[str, float] = {}
        for name, value in zip(frame["visual_because"].iat[p], frame["visual_contrib"].iat[p]):
            parts[name] = parts.get(name, 0.0) + (1.0 - covisit_weight) * float(value)
        if top > 0 and frame["covisit_because"].iat[p] is not None:
            for name, value in zip(frame["covisit_because"].iat[p], frame["covisit_contrib"].iat[p]):
                parts[name] = parts.get(name, 0.0) + covisit_weight * float(value) / top
        names = sorted(parts)
        reasons.append(taste.top_contributors(names, np.array([parts[x] for x in names]), because))
    return pd.DataFrame(
        {
            "user_id": frame["user_id"].iat[0] if len(frame) else None,
            "rank": np.arange(1, len(keep) + 1, dtype=np.int32),
            "item_id": frame["item_id"].to_numpy()[keep],
            "score": score[keep],
            "because": reasons,
        }
    )

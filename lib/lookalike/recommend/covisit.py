"""Co-visitation pair counts of many users' histories at once, in NumPy: the counting step of
`history.covisitation`, run inside a Spark task over users' rows.

Generating every pair of a user's items as Spark rows and aggregating them there makes tens of millions of
rows for a catalog of heavy users (MovieLens-100K: 11.6 million pairs from 943 users); summing them here
first, a block of users at a time, hands Spark only the distinct pairs of each block.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MAX_PAIRS = 4_000_000
"""Pairs summed at once (about 100 MB of keys and weights): bounds a task's memory whatever its users."""


def damping(lengths: np.ndarray) -> np.ndarray:
    """Weight of each pair of a history of `lengths` items: 1 / log2(2 + length), so a user who touched
    everything says little about any one pair."""
    return 1.0 / np.log2(2.0 + np.asarray(lengths, dtype=np.float64))


def pair_counts(
    codes: np.ndarray, bounds: np.ndarray, max_pairs: int = MAX_PAIRS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(item, other, count) for every ordered pair of two different items in one history, summed over the
    histories of a block of users, block by block.

    `codes` are integer item codes, one user's items at `codes[bounds[u]:bounds[u + 1]]`, each item at most
    once per user. A block holds users until their pairs would pass `max_pairs` (a user with more has a
    block alone); the same pair may come from several blocks, and the caller sums those.
    """
    lengths = np.diff(bounds)
    weights = damping(lengths)
    start = 0
    while start < len(lengths):
        end, pairs = start, 0
        while end < len(lengths) and (end == start or pairs + int(lengths[end]) ** 2 <= max_pairs):
            pairs += int(lengths[end]) ** 2
            end += 1
        yield _block(codes, bounds[start : end + 1], weights[start:end])
        start = end


def _block(codes: np.ndarray, bounds: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lefts, rights, parts = [], [], []
    for user, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        items = np.asarray(codes[a:b], dtype=np.int64)
        m = len(items)
        if m > 1:
            lefts.append(np.repeat(items, m))
            rights.append(np.tile(items, m))
            parts.append(np.full(m * m, weights[user]))
    if not lefts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    left, right = np.concatenate(lefts), np.concatenate(rights)
    keys, where = np.unique((left << 32) | right, return_inverse=True)
    counts = np.bincount(where, weights=np.concatenate(parts))
    item, other = keys >> 32, keys & 0xFFFFFFFF
    distinct = item != other
    return item[distinct], other[distinct], counts[distinct]

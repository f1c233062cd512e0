"""Co-visitation in NumPy, inside Spark tasks: the pairs of many users' histories summed at once
(`pair_counts`), then each item's best co-visited items (`top_pairs`). `history.covisitation` runs them.

Generating every pair of a user's items as Spark rows and aggregating them there makes tens of millions of
rows for a catalog of heavy users (MovieLens-100K: 11.6 million pairs from 943 users); summing them here
first hands Spark only the distinct pairs of a task's users, which it moves once to the task that ranks
them, instead of through a self-join, an aggregation, two joins and a window.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MAX_PAIRS = 4_000_000
"""Pairs summed at once, and distinct pairs held before they are handed on (each about 100 MB of keys and
weights): bounds a task's memory whatever its users."""


def damping(lengths: np.ndarray) -> np.ndarray:
    """Weight of each pair of a history of `lengths` items: 1 / log2(2 + length), so a user who touched
    everything says little about any one pair."""
    return 1.0 / np.log2(2.0 + np.asarray(lengths, dtype=np.float64))


def pair_counts(
    codes: np.ndarray, bounds: np.ndarray, max_pairs: int = MAX_PAIRS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(item, other, count) for every ordered pair of two different items in one history, each pair's
    `damping(history length)` summed over the histories.

    `codes` are integer item codes (below 2**31), one user's items at `codes[bounds[u]:bounds[u + 1]]`, each
    item at most once per user. Users' pairs are summed a block at a time (users until their pairs would
    pass `max_pairs`; a user with more has a block alone) into a running sum, which is handed on when it
    holds more than `max_pairs` distinct pairs: the same pair may then come in several parts, and the
    caller sums those.
    """
    lengths = np.diff(bounds)
    weights = damping(lengths)
    running: tuple[np.ndarray, np.ndarray] | None = None
    start = 0
    while start < len(lengths):
        end, pairs = start, 0
        while end < len(lengths) and (end == start or pairs + int(lengths[end]) ** 2 <= max_pairs):
            pairs += int(lengths[end]) ** 2
            end += 1
        block = _block(codes, bounds[start : end + 1], weights[start:end])
        running = block if running is None else _sum(np.r_[running[0], block[0]], np.r_[running[1], block[1]])
        if len(running[0]) > max_pairs:
            yield _split(*running)
            running = None
        start = end
    if running is not None and len(running[0]):
        yield _split(*running)


def _block(codes: np.ndarray, bounds: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The summed pairs of one block of users, as (pair keys, sums)."""
    keys, parts = [], []
    for user, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        items = np.asarray(codes[a:b], dtype=np.int64)
        m = len(items)
        if m > 1:
            pair = (np.repeat(items, m) << 32) | np.tile(items, m)
            distinct = pair >> 32 != pair & 0xFFFFFFFF
            keys.append(pair[distinct])
            parts.append(np.full(int(distinct.sum()), weights[user]))
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    return _sum(np.concatenate(keys), np.concatenate(parts))


def _sum(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distinct, where = np.unique(keys, return_inverse=True)
    return distinct, np.bincount(where, weights=values, minlength=len(distinct))


def _split(keys: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return keys >> 32, keys & 0xFFFFFFFF, sums


def top_pairs(
    item: np.ndarray,
    other: np.ndarray,
    count: np.ndarray,
    users: np.ndarray,
    name_rank: np.ndarray,
    neighbours: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item, other, covisit): the parts of each (item, other) summed and divided by sqrt(users), the
    product of the two items' user counts (the same in every part), then each item's `neighbours` largest,
    largest first, ties broken by the other item's name (`name_rank[code]` orders codes by name)."""
    keys = (np.asarray(item, dtype=np.int64) << 32) | np.asarray(other, dtype=np.int64)
    distinct, first, where = np.unique(keys, return_index=True, return_inverse=True)
    covisit = np.bincount(where, weights=count, minlength=len(distinct)) / np.sqrt(users[first].astype(np.float64))
    items, others = distinct >> 32, distinct & 0xFFFFFFFF
    order = np.lexsort((name_rank[others], -covisit, items))
    items, others, covisit = items[order], others[order], covisit[order]
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
    place = np.arange(len(items)) - np.repeat(starts, np.diff(np.r_[starts, len(items)]))
    keep = place < neighbours
    return items[keep], others[keep], covisit[keep]

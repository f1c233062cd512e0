"""Co-visitation pair counts in NumPy (`covisit.pair_counts`) and the grouping of sorted rows into whole
users across Arrow batches (`distributor.key_groups`), against plain Python on random histories."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from lookalike import distributor
from lookalike.recommend import covisit


def _histories(rng: np.random.Generator, users: int, items: int) -> list[np.ndarray]:
    return [rng.choice(items, size=int(rng.integers(0, 12)), replace=False) for _ in range(users)]


def _expected(histories: list[np.ndarray]) -> dict[tuple[int, int], float]:
    counts: dict[tuple[int, int], float] = defaultdict(float)
    for history in histories:
        for i in history:
            for j in history:
                if i != j:
                    counts[int(i), int(j)] += 1.0 / np.log2(2.0 + len(history))
    return counts


@pytest.mark.parametrize("max_pairs", [1, 50, covisit.MAX_PAIRS])
def test_pair_counts_sum_every_users_damped_pairs_whatever_the_blocks(max_pairs: int) -> None:
    histories = _histories(np.random.default_rng(5), users=60, items=25)
    codes = np.concatenate(histories).astype(np.int64)
    bounds = np.concatenate(([0], np.cumsum([len(h) for h in histories])))
    got: dict[tuple[int, int], float] = defaultdict(float)
    blocks = 0
    for item, other, count in covisit.pair_counts(codes, bounds, max_pairs=max_pairs):
        blocks += 1
        for i, j, c in zip(item, other, count):
            got[int(i), int(j)] += float(c)
    expected = _expected(histories)
    assert got.keys() == expected.keys()
    assert all(got[pair] == pytest.approx(expected[pair]) for pair in expected)
    if max_pairs == covisit.MAX_PAIRS:
        assert blocks == 1
    if max_pairs == 1:
        assert blocks >= sum(len(h) > 1 for h in histories)  # every user with a pair alone in a block


def test_pair_counts_hand_on_the_running_sum_when_it_holds_too_many_pairs() -> None:
    histories = _histories(np.random.default_rng(9), users=200, items=300)
    codes = np.concatenate(histories).astype(np.int64)
    bounds = np.concatenate(([0], np.cumsum([len(h) for h in histories])))
    parts = list(covisit.pair_counts(codes, bounds, max_pairs=500))
    assert len(parts) > 1
    assert all(len(item) > 0 for item, _, _ in parts)


def test_top_pairs_sum_partials_and_keep_each_items_best_ties_by_name() -> None:
    # codes 0..3 name "d", "c", "b", "a": name_rank orders them by name
    name_rank = np.array([3, 2, 1, 0])
    item = np.array([0, 0, 0, 0, 1, 1, 0])
    other = np.array([1, 2, 3, 1, 0, 2, 3])
    count = np.array([1.0, 2.0, 1.0, 1.0, 4.0, 8.0, 1.0])
    users = np.array([16, 16, 16, 16, 16, 16, 16])  # the product of the two items' user counts
    items, others, scores = covisit.top_pairs(item, other, count, users, name_rank, neighbours=2)
    rows = list(zip(items.tolist(), others.tolist(), scores.tolist()))
    # item 0: other 1 -> 2 / 4, other 2 -> 2 / 4 ("b"), other 3 -> 2 / 4 ("a"): the tie goes to "a", "b"
    assert rows == [(0, 3, 0.5), (0, 2, 0.5), (1, 2, 2.0), (1, 0, 1.0)]


def test_pair_counts_of_histories_too_short_for_a_pair_yield_nothing() -> None:
    assert list(covisit.pair_counts(np.array([3, 4], dtype=np.int64), np.array([0, 1, 2]))) == []


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 7, 100])
def test_key_groups_hand_over_whole_groups_however_the_batches_cut_them(batch_rows: int) -> None:
    keys = ["a", "a", "a", "b", "c", "c", "d", "d", "d", "d", "e"]
    table = pa.table({"user_id": keys, "value": list(range(len(keys)))})
    batches = table.to_batches(max_chunksize=batch_rows)
    seen: list[tuple[str, list[int]]] = []
    for group_table, bounds in distributor.key_groups(batches, "user_id"):
        assert bounds[0] == 0 and bounds[-1] == group_table.num_rows
        users, values = group_table["user_id"].to_pylist(), group_table["value"].to_pylist()
        seen += [(users[a], values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    assert seen == [("a", [0, 1, 2]), ("b", [3]), ("c", [4, 5]), ("d", [6, 7, 8, 9]), ("e", [10])]


def test_key_groups_of_no_rows_yield_nothing() -> None:
    empty = pa.table({"user_id": pa.array([], pa.string())})
    assert list(distributor.key_groups(empty.to_batches(), "user_id")) == []
    assert list(distributor.key_groups([], "user_id")) == []

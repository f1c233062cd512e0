"""The recommendation math on hand-made numbers: decay, interests, quotas, fair merge, blend, because."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lookalike.recommend import scoring, taste


def _unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_decay_halves_every_half_life_and_none_keeps_weights() -> None:
    ages = np.array([0.0, 30.0, 60.0, -5.0])
    assert taste.decay(ages, 30.0) == pytest.approx([1.0, 0.5, 0.25, 1.0])
    assert taste.decay(ages, None) == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_one_taste_gives_one_interest_even_when_more_are_allowed() -> None:
    rng = np.random.default_rng(0)
    centre = _unit(*rng.normal(size=16))
    history = np.stack([_unit(*(centre + 0.05 * rng.normal(size=16))) for _ in range(8)])
    centroids, labels, shares = taste.interests(history, np.ones(8), max_interests=3)
    assert len(centroids) == 1 and set(labels) == {0} and shares == pytest.approx([1.0])
    assert float(centroids[0] @ centre) > 0.99


def test_two_tastes_give_two_interests_heaviest_first_with_weight_shares() -> None:
    shoes, pans = _unit(1, 0, 0, 0), _unit(0, 0, 1, 0)
    history = np.stack(
        [_unit(1, 0.05, 0, 0), _unit(1, -0.05, 0, 0), _unit(0, 0, 1, 0.05), _unit(0, 0, 1, -0.05), _unit(0.02, 0, 1, 0)]
    )
    weights = np.array([1.0, 1.0, 2.0, 2.0, 2.0])  # the pans weigh more
    centroids, labels, shares = taste.interests(history, weights, max_interests=3)
    assert len(centroids) == 2
    assert float(centroids[0] @ pans) > 0.99 and float(centroids[1] @ shoes) > 0.99
    assert labels.tolist() == [1, 1, 0, 0, 0]
    assert shares == pytest.approx([6 / 8, 2 / 8])


def test_interests_never_exceed_the_maximum_or_the_distinct_items() -> None:
    history = np.eye(6)
    assert len(taste.interests(history, np.ones(6), max_interests=2)[0]) <= 2
    same = np.tile(_unit(1, 2, 3), (4, 1))
    assert len(taste.interests(same, np.ones(4), max_interests=3)[0]) == 1


def test_interest_weights_pull_the_centroid() -> None:
    history = np.stack([_unit(1, 0), _unit(0.8, 0.6)])
    light = taste.interests(history, np.array([1.0, 1.0]), 1)[0][0]
    heavy = taste.interests(history, np.array([10.0, 1.0]), 1)[0][0]
    assert float(heavy @ _unit(1, 0)) > float(light @ _unit(1, 0))


def test_quotas_follow_shares_and_give_every_interest_a_slot() -> None:
    assert taste.quotas([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert taste.quotas([0.9, 0.05, 0.05], 10) == [8, 1, 1]  # the minor tastes are not drowned
    assert taste.quotas([0.6, 0.4], 1) == [1, 0]
    assert sum(taste.quotas([0.37, 0.33, 0.3], 7)) == 7


def test_fair_merge_interleaves_interests_and_fills_unused_quota() -> None:
    # Interest 0's candidates all score higher, yet interest 1 keeps its share of the list.
    interest = np.array([0, 0, 0, 0, 1, 1])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    picked = taste.fair_merge(interest, score, [0.5, 0.5], 4)
    assert picked.tolist() == [0, 4, 1, 5]
    # Interest 1 has one candidate only: the slot it cannot use goes to the best remaining.
    picked = taste.fair_merge(np.array([0, 0, 0, 1]), np.array([0.9, 0.8, 0.7, 0.1]), [0.5, 0.5], 4)
    assert picked.tolist() == [0, 3, 1, 2]
    assert taste.fair_merge(np.array([0, 0]), np.array([0.2, 0.9]), [1.0], 5).tolist() == [1, 0]


def test_blend_scales_covisitation_per_user_and_lets_unvisited_items_compete_on_looks() -> None:
    visual = np.array([0.9, 0.5, 0.7])
    covisit = np.array([0.0, 4.0, 2.0])
    assert taste.blend(visual, covisit, 0.5) == pytest.approx([0.45, 0.75, 0.6])
    assert taste.blend(visual, covisit, 0.0) == pytest.approx(visual)
    assert taste.blend(visual, np.zeros(3), 0.5) == pytest.approx(visual / 2)


def test_top_contributors_largest_positive_first_ties_by_name() -> None:
    names = ["b", "a", "c", "d"]
    assert taste.top_contributors(names, np.array([0.5, 0.5, 0.9, -0.1]), 3) == ["c", "a", "b"]
    assert taste.top_contributors(names, np.array([0.0, -1.0, 0.2, 0.0]), 3) == ["c"]


def test_entry_score_is_the_last_kept_score_unless_any_newcomer_would_get_in() -> None:
    interest = np.array([0, 0, 0, 1, 1, 1])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=np.float32)
    keep = taste.fair_merge(interest, score, [0.5, 0.5], 4)
    assert scoring.entry_score(interest, score[keep], np.array([0.5, 0.5]), 4) == pytest.approx(0.5)
    # The second interest has one candidate for its two slots: a newcomer of it gets in whatever its score.
    short = np.array([0, 0, 0, 0, 0, 1])
    keep = taste.fair_merge(short, score, [0.5, 0.5], 4)
    assert scoring.entry_score(short, score[keep], np.array([0.5, 0.5]), 4) == -np.inf
    # A list shorter than n takes anything.
    assert scoring.entry_score(interest[:2], score[:2], np.array([1.0]), 4) == -np.inf


def test_could_enter_only_through_a_searched_shard_and_above_the_entry_score() -> None:
    interests = np.stack([_unit(1, 0, 0), _unit(0, 1, 0)])
    targets = [["Shoe"], ["Bag"]]
    near, far = _unit(1, 0.1, 0)[None, :], _unit(0, 0, 1)[None, :]
    assert scoring.could_enter(interests, targets, 0.4, near, ["Shoe"], 0.5)  # 0.5 x 0.995 >= 0.4
    assert not scoring.could_enter(interests, targets, 0.6, near, ["Shoe"], 0.5)  # its visual half is < 0.6
    assert not scoring.could_enter(interests, targets, 0.1, far, ["Shoe"], 0.5)  # looks like nothing they like
    assert not scoring.could_enter(interests, targets, -np.inf, near, ["Pan"], 0.5)  # a shard no interest searches
    assert scoring.could_enter(interests, targets, -np.inf, far, ["Bag"], 0.5)  # an open list takes anything


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    interests=st.integers(1, 3),
    shard_count=st.integers(1, 3),
    weight=st.sampled_from([0.0, 0.3, 1.0]),
    coarse=st.booleans(),
)
def test_contenders_drop_only_candidates_that_can_never_be_ranked(
    seed: int, n: int, interests: int, shard_count: int, weight: float, coarse: bool
) -> None:
    """Pruning each shard's candidates to its contenders keeps the user's ranked list, scores and entry score
    exactly: with ties (coarse cosines), co-visited candidates, several shards and any blend weight."""
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 40))
    visual = rng.uniform(-1, 1, m).astype(np.float32)
    if coarse:
        visual = np.round(visual, 1).astype(np.float32)
    interest = rng.integers(0, interests, m)
    covisit = np.where(rng.random(m) < 0.3, rng.uniform(0, 5, m), 0.0)
    shard = rng.integers(0, shard_count, m)
    shares = rng.dirichlet(np.ones(interests))
    keep_all, score_all = scoring.rank_user(interest, visual.astype(np.float64), covisit, shares, n, weight)

    kept = np.zeros(m, dtype=bool)
    for s in range(shard_count):  # positions are in item id order: a candidate's position is its id's rank
        mine = np.flatnonzero(shard == s)
        kept[mine[scoring.contenders(interest[mine], visual[mine], mine, covisit[mine] > 0, n, weight)]] = True
    rest = np.flatnonzero(kept)
    keep, score = scoring.rank_user(interest[rest], visual[rest].astype(np.float64), covisit[rest], shares, n, weight)
    assert rest[keep].tolist() == keep_all.tolist()
    assert score.tolist() == score_all.tolist()
    assert scoring.entry_score(interest[rest], score, shares, n) == scoring.entry_score(interest, score_all, shares, n)

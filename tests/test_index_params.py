"""index_params.choose_params: the rules that turn a shard's size into FAISS parameters."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lookalike.index.params import (
    FLAT_BELOW,
    MAX_BYTES_RATIO,
    MAX_SUB_DIM,
    MIN_IVFPQ_N,
    MIN_POINTS_PER_CENTROID,
    MIN_SUB_DIM,
    PQ_TRAIN_POINTS,
    RERANK_K,
    TARGET_RECALL,
    TRAIN_POINTS_PER_LIST,
    choose_params,
)


def test_small_shards_are_exact_flat() -> None:
    params = choose_params(500, 1280)
    assert (params.kind, params.factory, params.nlist, params.m, params.rerank_k) == ("flat", "Flat", 0, 0, 0)
    assert params.estimated_bytes == params.flat_bytes == 4 * 500 * 1280
    assert choose_params(FLAT_BELOW - 1, 256).kind == "flat"
    assert choose_params(FLAT_BELOW, 256).kind == "ivfpq"


def test_ivfpq_cannot_go_below_what_pq_can_train_on() -> None:
    assert choose_params(MIN_IVFPQ_N - 1, 256, flat_below=0).kind == "flat"
    assert choose_params(MIN_IVFPQ_N, 256, flat_below=0).kind == "ivfpq"


def test_flat_below_moves_the_threshold() -> None:
    assert choose_params(50_000, 256, flat_below=100_000).kind == "flat"


def test_50k_by_256() -> None:
    params = choose_params(50_000, 256)
    assert params.kind == "ivfpq"
    assert params.factory == f"RR256,IVF{params.nlist},PQ{params.m}np"
    # ~4 sqrt(n) = 894, as a power of two, with >= 39 points per list in the shard.
    assert params.nlist in (512, 1024)
    assert params.nlist & (params.nlist - 1) == 0
    assert 50_000 / params.nlist >= MIN_POINTS_PER_CENTROID
    assert 256 % params.m == 0 and MIN_SUB_DIM <= 256 // params.m <= MAX_SUB_DIM
    assert params.bytes_ratio <= MAX_BYTES_RATIO
    assert params.nbits == 8 and params.out_dim == 256
    assert params.target_recall == TARGET_RECALL and params.rerank_k == RERANK_K
    assert TRAIN_POINTS_PER_LIST * params.nlist <= params.train_size <= 50_000


@pytest.mark.parametrize(
    "n, dim",
    [
        (10_000, 256),
        (12_345, 64),
        (100_000, 384),
        (1_000_000, 256),
        (1_000_000, 1280),
        (30_000, 1280),
        (5_000_000, 512),
    ],
)
def test_rules_hold_across_sizes(n: int, dim: int) -> None:
    params = choose_params(n, dim, flat_below=0)
    assert params.kind == "ivfpq"
    assert n >= MIN_POINTS_PER_CENTROID * params.nlist
    assert params.nlist <= 2 ** math.ceil(math.log2(4 * math.sqrt(n)))
    assert dim % params.m == 0 and MIN_SUB_DIM <= dim // params.m <= MAX_SUB_DIM
    assert params.bytes_ratio <= MAX_BYTES_RATIO
    assert min(n, PQ_TRAIN_POINTS) <= params.train_size <= n
    assert params.factory.endswith(f"IVF{params.nlist},PQ{params.m}np")


def test_nlist_grows_with_n() -> None:
    sizes = [choose_params(n, 256).nlist for n in (FLAT_BELOW, 50_000, 200_000, 1_000_000, 10_000_000)]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    assert choose_params(1_000_000, 256).nlist == 4096


def test_random_rotation_is_dropped_when_its_matrix_breaks_the_budget() -> None:
    # A 1280 x 1280 rotation is 6.5 MB: too much for 10,000 vectors (51 MB flat), fine for 100,000.
    assert choose_params(10_000, 1280, flat_below=0).rotation == "none"
    assert choose_params(100_000, 1280).rotation == "rr"


def test_most_accurate_codes_that_fit() -> None:
    # 4 dims per sub-quantizer fits the budget at 256-d and a million vectors: m = 64, 72 bytes a vector.
    params = choose_params(1_000_000, 256)
    assert (params.m, params.rotation) == (64, "rr")
    assert params.estimated_bytes < 1_000_000 * 80


def test_reduce_dim_uses_opq_by_default() -> None:
    params = choose_params(200_000, 256, reduce_dim=128)
    assert params.rotation == "opq" and params.out_dim == 128
    assert params.factory == f"OPQ{params.m}_128,IVF{params.nlist},PQ{params.m}np"
    assert 128 % params.m == 0


def test_reduce_dim_with_pca() -> None:
    params = choose_params(200_000, 256, reduce_dim=64, rotation="pca")
    assert params.factory == f"PCA64,IVF{params.nlist},PQ{params.m}np"
    assert params.rotation == "pca" and params.out_dim == 64


def test_opq_without_reduction_and_no_rotation() -> None:
    assert choose_params(200_000, 256, rotation="opq").factory.startswith("OPQ64,IVF")
    assert choose_params(200_000, 256, rotation="none").factory.startswith("IVF")


def test_flat_ignores_reduction() -> None:
    params = choose_params(1_000, 256, reduce_dim=64)
    assert params.kind == "flat" and params.out_dim == 256 and params.rotation == "none"


def test_params_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        choose_params(50_000, 256).nlist = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0, dim=256), "n must be >= 1"),
        (dict(n=100, dim=0), "dim must be >= 1"),
        (dict(n=100, dim=256, flat_below=-1), "flat_below"),
        (dict(n=100, dim=256, target_recall=0.0), "target_recall"),
        (dict(n=100, dim=256, target_recall=1.5), "target_recall"),
        (dict(n=100, dim=256, reduce_dim=512), "reduce_dim must be between 1 and dim=256"),
        (dict(n=100, dim=256, reduce_dim=0), "reduce_dim"),
        (dict(n=100, dim=256, rotation="svd"), "rotation must be"),
        (dict(n=100, dim=256, rotation="pca"), "needs reduce_dim"),
        (dict(n=100, dim=256, reduce_dim=64, rotation="rr"), "reduce_dim needs rotation"),
        (dict(n=50_000, dim=13), "no divisor"),
    ],
)
def test_invalid_inputs_are_refused_clearly(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_params(**kwargs)

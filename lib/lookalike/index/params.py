"""Choosing a shard's FAISS index from its size: one pure function, no FAISS import.

The index stage builds one index per shard inside a Spark task. Shards differ by orders of magnitude (a
small category has hundreds of items, a big one millions), so the parameters are derived from `n` and
`dim` by the rules below rather than configured per shard, in the style of autofaiss. Every rule is a
FAISS rule of thumb made explicit, with the reason beside it, so that a surprising manifest can be traced
back to one line here. Keeping this free of FAISS lets tests and the driver reason about a plan (and its
memory) before any executor spends time training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["flat", "ivfpq"]
Rotation = Literal["none", "rr", "opq", "pca"]

RECALL_K = 10
"""Neighbours per query when measuring recall: DESIGN.md's manifest reports `recall_at_10`."""

TARGET_RECALL = 0.95
"""Recall@10 the nprobe tuning aims for, on the exact path `shard_index.search` takes."""

MIN_POINTS_PER_CENTROID = 39
"""FAISS's k-means warns below 39 training points per centroid: fewer leave centroids poorly placed."""

PQ_CENTROIDS = 256
"""Centroids per PQ sub-quantizer with 8-bit codes (2**8)."""

NBITS = 8
"""Bits per PQ code. 8 is the layout FAISS's CPU scanners are fastest for, and one byte per sub-vector
makes the memory arithmetic in `_ivfpq_bytes` exact."""

MIN_IVFPQ_N = MIN_POINTS_PER_CENTROID * PQ_CENTROIDS
"""9,984: below this the PQ codebooks (256 centroids each) cannot get 39 points per centroid, so an
IVF-PQ index cannot be trained properly whatever `flat_below` says; such shards are always Flat."""

FLAT_BELOW = 32_768
"""Default `index.flat_below`: shards smaller than this get an exact Flat index, because below it IVF-PQ
costs more than it saves. FAISS's k-means for 4-d PQ sub-quantizers runs ~10x slower on fewer than
~32,000 training points (measured here: 0.6 s per codebook at 31,000 points, 0.06 s at 32,000), so a
small shard's PQ training is slow exactly where exact search is cheap. Measured on one thread: at
20,000 x 256-d, exact search of every item against the shard took 2.0 s, building IVF-PQ 27 s; at
20,000 x 1280-d, 9.7 s against 162 s. Flat is exact, and its memory at this size small (168 MB at
1280-d)."""

TRAIN_POINTS_PER_LIST = 20
"""Coarse k-means trains on 20 points per inverted list, below FAISS's advice (30-256; the build lowers its
warning threshold to match). Training time is linear in it and is the largest cost of a build; exact re-ranking
makes up for coarser lists. Measured at 100,000 x 256-d (benchmarks/index_build.py's data), 64 per list instead
of 39 trained 1.7x longer for the same recall@10 after nprobe tuning (0.962 vs 0.961 at nprobe 16, 100
re-ranked); at 200,000 x 256-d (RR256,IVF2048,PQ64np, 100 re-ranked, 2 threads, twice each in one process on
a loaded machine), 20 per list (with PQ trained on `PQ_TRAIN_POINTS`) trained in 59-64 s against 76-77 s for
39 per list (PQ on 65,536), at recall@10 0.932 / 0.983 / 0.993 against 0.929 / 0.981 / 0.992 at nprobe
4 / 8 / 16."""

PQ_KMEANS_ITERATIONS = 10
"""Iterations of the PQ codebooks' k-means, against FAISS's default of 25 (its coarse k-means for the
inverted lists already runs 10). Later iterations move codebook centroids too little to change which
candidates exact re-ranking finds: at 200,000 x 256-d (RR256,IVF2048,PQ64np, 100 re-ranked, 2 threads),
training took 10.8 s against 14.3 s at 25, recall@10 0.974 / 0.990 against 0.974 / 0.989 at nprobe 8 / 16.
On looser clusters (random-pair cosine 0.01, 10th neighbour 0.58) both k-means at 10 against both at 25
gave recall@10 0.710 / 0.930 / 0.975 either way at nprobe 8 / 32 / 64."""

PQ_TRAIN_POINTS = 128 * PQ_CENTROIDS
"""At least 32,768 training points, whatever nlist: past FAISS's slow k-means path for small training
sets (see `FLAT_BELOW`), and 128 points per PQ centroid. The codebooks train on this many of them (the build
caps FAISS's own subsample of 256 per centroid): 64 codebooks on 65,536 points took about 3x as long as on
32,768 at 200,000 x 256-d."""

MIN_SUB_DIM, MAX_SUB_DIM = 4, 8
"""Dimensions per PQ sub-quantizer. One byte per 4-8 floats is where 8-bit PQ is accurate enough to pick
re-rank candidates: fewer dims waste code bytes (the index outgrows 1/8 of Flat), more lose accuracy
faster than they save memory."""

MAX_BYTES_RATIO = 1 / 8
"""Budget for an IVF-PQ index: at most 1/8 of the float32 Flat index over the same vectors."""

ID_BYTES = 8
"""FAISS inverted lists store a 64-bit id beside every code (and a 64-bit size per list)."""

RERANK_K = 10 * RECALL_K
"""IVF-PQ candidates re-scored exactly for the top 10, to start tuning from: DESIGN.md measured
recall@10 going from 0.24-0.41 (PQ codes alone, tightly clustered vectors) to 0.999 with ~10x k
candidates re-scored. The build raises it where the shard needs more."""


@dataclass(frozen=True)
class IndexParams:
    """A shard's index plan. Fields that do not apply to a Flat index are 0.

    `factory` is the `faiss.index_factory` string; the other fields repeat its numbers so callers and
    manifests need not parse it. `out_dim` is the dimension PQ works in (`dim` unless reduced).
    `estimated_bytes` is the serialised index size: codes and ids plus centroids, codebooks and rotation.
    """

    kind: Kind
    factory: str
    n: int
    dim: int
    out_dim: int
    nlist: int
    m: int
    nbits: int
    train_size: int
    rotation: Rotation
    target_recall: float
    rerank_k: int
    estimated_bytes: int

    @property
    def flat_bytes(self) -> int:
        """Bytes of the float32 vectors themselves: the Flat index, and the yardstick for compression."""
        return 4 * self.n * self.dim

    @property
    def bytes_ratio(self) -> float:
        """Estimated index bytes over Flat bytes (1.0 for Flat, target <= `MAX_BYTES_RATIO` for IVF-PQ)."""
        return self.estimated_bytes / self.flat_bytes


def choose_params(
    n: int,
    dim: int,
    *,
    flat_below: int = FLAT_BELOW,
    reduce_dim: int | None = None,
    target_recall: float = TARGET_RECALL,
    rotation: Rotation | None = None,
) -> IndexParams:
    """Choose the index for a shard of `n` L2-normalised `dim`-d vectors.

    Inner product is the metric throughout: vectors are L2-normalised, so it equals cosine.

    - `n < max(flat_below, MIN_IVFPQ_N)`: exact Flat. Small shards gain nothing from compression and
      cannot train IVF-PQ (see `MIN_IVFPQ_N`); `reduce_dim` and `rotation` do not apply to them.
    - Otherwise IVF-PQ with 8-bit codes, trained without polysemous codes (the `np` suffix: DESIGN.md
      measured ~45 s of extra training for codes the search path never uses). `nlist` by `_choose_nlist`,
      rotation and `m` by `_choose_rotation_and_m`, `train_size` by `_choose_train_size`.
    - `rotation` (default: chosen) is applied before IVF-PQ. "rr", a random orthogonal rotation, is the
      default without `reduce_dim`: embeddings put most of their variance in a few directions, which
      leaves most PQ sub-quantizers idle; a random rotation spreads it evenly at no training cost and
      leaves inner products unchanged (recall@10 0.87 -> 0.96 at 100,000 x 256-d, re-ranking 100
      candidates, in benchmarks/index_build.py's data). "opq" learns such a rotation (a little better,
      ~6x the training time) and is the default with `reduce_dim`, which it also projects to. "pca"
      reduces more cheaply but centres the data, which biases inner products by each candidate's
      projection on the mean, so it leans harder on re-ranking. "none" keeps the raw dimensions.

    `target_recall` is carried to the build, which tunes nprobe (and, if needed, the number of re-ranked
    candidates) until recall@10 of the re-ranked search path reaches it.
    """
    _check_positive("n", n)
    _check_positive("dim", dim)
    if flat_below < 0:
        raise ValueError(f"flat_below must be >= 0, got {flat_below}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if reduce_dim is not None and not 1 <= reduce_dim <= dim:
        raise ValueError(f"reduce_dim must be between 1 and dim={dim}, got {reduce_dim}")
    if rotation is not None and rotation not in ("none", "rr", "opq", "pca"):
        raise ValueError(f"rotation must be 'none', 'rr', 'opq' or 'pca', got {rotation!r}")
    if reduce_dim is not None and rotation in ("none", "rr"):
        raise ValueError(f"reduce_dim needs rotation 'opq' or 'pca' to reduce with, got {rotation!r}")
    if reduce_dim is None and rotation == "pca":
        raise ValueError("rotation='pca' needs reduce_dim (PCA at full dimension only adds cost)")

    if n < max(flat_below, MIN_IVFPQ_N):
        return flat_params(n, dim, target_recall)

    out_dim = reduce_dim if reduce_dim is not None else dim
    nlist = _choose_nlist(n)
    if rotation is None and reduce_dim is not None:
        rotation = "opq"
    rotation, m = _choose_rotation_and_m(n, dim, out_dim, nlist, rotation)
    return IndexParams(
        kind="ivfpq",
        factory=f"{_rotation_prefix(rotation, m, dim, out_dim)}IVF{nlist},PQ{m}np",
        n=n,
        dim=dim,
        out_dim=out_dim,
        nlist=nlist,
        m=m,
        nbits=NBITS,
        train_size=_choose_train_size(n, nlist),
        rotation=rotation,
        target_recall=target_recall,
        rerank_k=RERANK_K,
        estimated_bytes=_ivfpq_bytes(n, dim, out_dim, nlist, m, rotation),
    )


def flat_params(n: int, dim: int, target_recall: float = TARGET_RECALL) -> IndexParams:
    """An exact Flat index: for small shards, and for shards where the tuned IVF-PQ search measured no
    faster than exact search (`shard_index.build`)."""
    return IndexParams(
        kind="flat",
        factory="Flat",
        n=n,
        dim=dim,
        out_dim=dim,
        nlist=0,
        m=0,
        nbits=0,
        train_size=0,
        rotation="none",
        target_recall=target_recall,
        rerank_k=0,
        estimated_bytes=4 * n * dim,
    )


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _rotation_prefix(rotation: Rotation, m: int, dim: int, out_dim: int) -> str:
    """Factory prefix: `RR{d}`, `OPQ{m}_{out}` (reducing) or `OPQ{m}` (rotating only), `PCA{out}`."""
    if rotation == "rr":
        return f"RR{dim},"
    if rotation == "opq":
        return f"OPQ{m}_{out_dim}," if out_dim != dim else f"OPQ{m},"
    if rotation == "pca":
        return f"PCA{out_dim},"
    return ""


def _choose_nlist(n: int) -> int:
    """Inverted lists: 4 * sqrt(n) rounded to the nearest power of two (FAISS's guideline is 4-16 sqrt(n);
    the low end keeps coarse training and assignment cheap), then halved until every list can get
    `MIN_POINTS_PER_CENTROID` training points out of the shard."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and n < MIN_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    return nlist


def _choose_rotation_and_m(
    n: int, dim: int, out_dim: int, nlist: int, rotation: Rotation | None
) -> tuple[Rotation, int]:
    """PQ sub-quantizers `m` (dividing `out_dim`, `MIN_SUB_DIM`-`MAX_SUB_DIM` dims each), and the rotation
    when not given: the largest `m` (the most accurate codes) whose whole index fits `MAX_BYTES_RATIO` of
    Flat, with a random rotation if its dim x dim matrix still fits (it does not for small shards of
    wide vectors: 6.5 MB at 1280-d), else without. If nothing fits (very small dims, where the 8-byte ids
    alone exceed the budget), the most compact `m`."""
    ms = [m for m in range(out_dim, 0, -1) if out_dim % m == 0 and MIN_SUB_DIM <= out_dim // m <= MAX_SUB_DIM]
    if not ms:
        raise ValueError(
            f"dimension {out_dim} has no divisor giving {MIN_SUB_DIM}-{MAX_SUB_DIM} dims per PQ "
            f"sub-quantizer; set reduce_dim to a multiple of {MAX_SUB_DIM}"
        )
    budget = MAX_BYTES_RATIO * 4 * n * dim
    rotations: tuple[Rotation, ...] = (rotation,) if rotation is not None else ("rr", "none")
    for candidate in rotations:
        for m in ms:
            if _ivfpq_bytes(n, dim, out_dim, nlist, m, candidate) <= budget:
                return candidate, m
    return rotations[-1], ms[-1]


def _choose_train_size(n: int, nlist: int) -> int:
    """Training sample: `TRAIN_POINTS_PER_LIST` per list, at least `PQ_TRAIN_POINTS` for the codebooks,
    at most the shard. Coarse k-means time is linear in it, and it is the largest single cost of a build."""
    return min(n, max(TRAIN_POINTS_PER_LIST * nlist, PQ_TRAIN_POINTS))


def _ivfpq_bytes(n: int, dim: int, out_dim: int, nlist: int, m: int, rotation: Rotation) -> int:
    """Serialised size of an IVF-PQ index: per vector, m code bytes and an 8-byte id; per list, its
    8-byte size; fixed, the float32 coarse centroids, PQ codebooks (256 x out_dim floats in all) and the
    rotation (a full PCA also keeps its dim x dim eigenvectors, mean and eigenvalues). Headers (a few
    hundred bytes) are left out."""
    rotation_floats = {
        "none": 0,
        "rr": dim * dim,
        "opq": out_dim * dim,
        "pca": dim * dim + out_dim * dim + 2 * dim + out_dim,
    }[rotation]
    fixed_floats = nlist * out_dim + PQ_CENTROIDS * out_dim + rotation_floats
    return n * (m * NBITS // 8 + ID_BYTES) + nlist * ID_BYTES + 4 * fixed_floats

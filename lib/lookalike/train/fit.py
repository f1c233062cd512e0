"""Fitting a head on backbone vectors: NumPy arrays in, the head's tensors and its validation metrics out.

No Spark and no files here (`train.stage` gathers the arrays and writes the artefact), so every case (no
labels, one label value, nulls, behaviour only) is tested in milliseconds.

The head starts as the PCA projection of the training vectors (an MLP's ReLU branch starts at zero), so
before any step it already ranks items almost as the frozen backbone does; training moves it only as far as
the held-out loss keeps improving, and the best epoch's weights are kept. Items (and behaviour pairs) are
split once, seeded: the validation share stops training early and is where the metrics in `head.json` come
from, frozen backbone against tuned head, on the same items.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lookalike.errors import LookalikeError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BATCH = 512  # items (or pairs) per step: enough in-batch negatives for both contrastive losses
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
MAX_PAIR_STEPS = 500  # steps per epoch when only behaviour pairs are learned from
EVAL_QUERIES = 2000  # validation queries of the retrieval metrics
EVAL_DATABASE = 50_000  # training items the held-out queries search while choosing the epoch
K = 10


class TrainError(LookalikeError):
    """Nothing to learn from, or settings that cannot train (a one-line reason)."""


@dataclass(frozen=True)
class TrainData:
    """What a head learns from: unit backbone vectors, label codes per column (-1: null) and behaviour pairs
    (rows of two indices into `features`)."""

    features: np.ndarray
    labels: dict[str, np.ndarray]
    pairs: np.ndarray


@dataclass(frozen=True)
class TrainOptions:
    kind: str = "linear"
    dim: int = 256
    loss: str = "supcon"
    behaviour_weight: float = 0.5
    temperature: float = 0.1
    max_epochs: int = 40
    patience: int = 4
    validation_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Fitted:
    tensors: dict[str, np.ndarray]
    metrics: dict[str, float]


def usable_labels(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The label columns with at least two values among their non-null codes (one value teaches nothing)."""
    kept = {}
    for name, codes in labels.items():
        values = np.unique(codes[codes >= 0])
        if len(values) >= 2:
            kept[name] = codes
        else:
            log.warning("train: label column %s has %d distinct value(s): ignored", name, len(values))
    return kept


def split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of `n` rows, the validation share at least one row when n >= 2."""
    order = rng.permutation(n)
    n_val = min(n - 1, max(1 if n >= 2 else 0, round(n * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def precision_at_k(vectors: np.ndarray, codes: np.ndarray, k: int = K, queries: int = EVAL_QUERIES) -> float:
    """Mean share of each labelled item's k nearest other items (cosine) that carry its label."""
    labelled = np.flatnonzero(codes >= 0)
    if len(labelled) < 2:
        return float("nan")
    base, base_codes = vectors[labelled], codes[labelled]
    picks = labelled[:queries] if len(labelled) <= queries else labelled[:: math.ceil(len(labelled) / queries)]
    rows = np.searchsorted(labelled, picks)
    scores = base[rows] @ base.T
    scores[np.arange(len(rows)), rows] = -np.inf
    k = min(k, len(labelled) - 1)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((base_codes[top] == base_codes[rows][:, None]).mean())


def precision_against(
    queries: np.ndarray, query_codes: np.ndarray, base: np.ndarray, base_codes: np.ndarray, k: int = K
) -> float:
    """Mean share of each labelled query's k nearest `base` rows that carry its label (queries not in base)."""
    labelled = np.flatnonzero(query_codes >= 0)[:EVAL_QUERIES]
    if len(labelled) == 0 or len(base) == 0:
        return float("nan")
    k = min(k, len(base))
    scores = queries[labelled] @ base.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((base_codes[top] == query_codes[labelled][:, None]).mean())


def pair_recall_at_k(vectors: np.ndarray, pairs: np.ndarray, k: int = K, queries: int = EVAL_QUERIES) -> float:
    """Share of pairs (a, b) whose b is among a's k nearest other items of the pairs' items."""
    if len(pairs) == 0:
        return float("nan")
    pairs = pairs[:queries]
    items = np.unique(pairs)
    where = {item: i for i, item in enumerate(items)}
    base = vectors[items]
    a = np.array([where[i] for i in pairs[:, 0]])
    b = np.array([where[i] for i in pairs[:, 1]])
    scores = base[a] @ base.T
    scores[np.arange(len(a)), a] = -np.inf
    target = scores[np.arange(len(a)), b]
    return float(((scores > target[:, None]).sum(axis=1) < k).mean())


def fit(data: TrainData, options: TrainOptions) -> Fitted:
    """Train a head; TrainError when neither labels (two values or more) nor behaviour pairs are usable."""
    import torch

    from lookalike.train import losses

    started = time.perf_counter()
    features = np.ascontiguousarray(data.features, dtype=np.float32)
    n, d_in = features.shape
    labels = usable_labels(data.labels)
    pairs = data.pairs if options.behaviour_weight > 0 else np.empty((0, 2), dtype=np.int64)
    if not labels and len(pairs) < 2:
        raise TrainError(
            f"nothing to learn from: no label column of train.label_columns {sorted(data.labels)} has two values "
            f"or more, and there are {len(pairs)} behaviour pairs (events with train.behaviour_weight > 0)"
        )
    if options.dim > d_in:
        raise TrainError(f"train.dim {options.dim} is larger than the backbone's {d_in} dimensions")
    rng = np.random.default_rng(options.seed)
    torch.manual_seed(options.seed)
    train_items, val_items = split(n, options.validation_fraction, rng)
    train_pairs_index, val_pairs_index = split(len(pairs), options.validation_fraction, rng)
    val_pairs = pairs[val_pairs_index]
    # The head is small: a GPU, when the driver has one, only shortens the matrix products.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.from_numpy(features).to(device)
    model = _Head(features[train_items], options, rng, device)
    proxies = {
        name: torch.nn.Parameter(torch.from_numpy(_class_means(model, x, codes, train_items)).to(device))
        for name, codes in labels.items()
        if options.loss == "proxy"
    }
    codes = {name: torch.from_numpy(c.astype(np.int64)).to(device) for name, c in labels.items()}
    pair_tensor = torch.from_numpy(np.asarray(pairs, dtype=np.int64)).to(device)
    optimiser = torch.optim.AdamW([*model.parameters(), *proxies.values()], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def loss_of(items: np.ndarray, pair_rows: np.ndarray) -> torch.Tensor:
        total = torch.zeros((), device=device)
        if labels and len(items):
            index = torch.from_numpy(items).to(device)
            z = model(x[index])
            for name in labels:
                target = codes[name][index]
                if options.loss == "proxy":
                    total = total + losses.proxy(z, target, proxies[name], options.temperature)
                else:
                    total = total + losses.supcon(z, target, options.temperature)
            total = total / len(labels)
        if len(pair_rows):
            chosen = pair_tensor[torch.from_numpy(pair_rows).to(device)]
            weight = options.behaviour_weight if labels else 1.0
            total = total + weight * losses.pairs(model(x[chosen[:, 0]]), model(x[chosen[:, 1]]), options.temperature)
        return total

    def validation_loss() -> float:
        with torch.no_grad():
            chunks = max(1, min(20, math.ceil(max(len(val_items), len(val_pairs_index)) / BATCH)))
            item_chunks = np.array_split(val_items, chunks) if labels else [np.empty(0, np.int64)] * chunks
            pair_chunks = np.array_split(val_pairs_index, chunks)
            return float(np.mean([loss_of(i, p) for i, p in zip(item_chunks, pair_chunks)]))

    primary = next(iter(labels.values()), None)
    known = train_items if primary is None else train_items[primary[train_items] >= 0]
    database = np.sort(rng.choice(known, size=min(len(known), EVAL_DATABASE), replace=False))

    def validation_score() -> float:
        """What epochs are chosen by, lower is better: with labels, minus the held-out items' precision@10
        by the first label column against the training items (what a new item of the catalog will see);
        else the held-out pairs' loss. A label loss can fall while retrieval gets worse."""
        if primary is None:
            return validation_loss()
        with torch.no_grad():
            queries = model(x[torch.from_numpy(val_items).to(device)]).cpu().numpy()
            base = model(x[torch.from_numpy(database).to(device)]).cpu().numpy()
        return -precision_against(queries, primary[val_items], base, primary[database])

    steps = (
        math.ceil(len(train_items) / BATCH)
        if labels
        else min(MAX_PAIR_STEPS, math.ceil(len(train_pairs_index) / BATCH))
    )
    best, best_state, best_epoch, epoch = validation_score(), model.state(), 0, 0
    initial = best
    batches = Batches(next(iter(labels.values()))[train_items], train_items) if labels else None
    for epoch in range(1, options.max_epochs + 1):
        for _ in range(steps):
            items = batches.draw(rng) if batches is not None else np.empty(0, np.int64)
            pair_rows = (
                rng.choice(train_pairs_index, size=min(BATCH, len(train_pairs_index)), replace=False)
                if len(train_pairs_index) >= 2
                else np.empty(0, np.int64)
            )
            optimiser.zero_grad()
            loss = loss_of(items, pair_rows)
            loss.backward()
            optimiser.step()
        current = validation_score()
        log.debug("train: epoch %d, validation score %.4f (best %.4f)", epoch, current, best)
        if current < best - 1e-4:
            best, best_state, best_epoch = current, model.state(), epoch
        elif epoch - best_epoch >= options.patience:
            break
    tensors = best_state
    log.info(
        "train: %d epochs, best %d: validation score %.4f (%.4f before training)", epoch, best_epoch, best, initial
    )
    metrics = {
        "epochs": float(epoch),
        "best_epoch": float(best_epoch),
        "validation_score": best,  # minus precision@10 by the first label, or the pairs' loss (`validation_score`)
        "validation_score_at_start": initial,
        "train_items": float(len(train_items)),
        "validation_items": float(len(val_items)),
        "train_pairs": float(len(train_pairs_index)),
        "validation_pairs": float(len(val_pairs)),
        "seconds": round(time.perf_counter() - started, 3),
    }
    metrics |= evaluate(features, labels, val_items, database, val_pairs, tensors, options.kind)
    judged = int((primary[val_items] >= 0).sum()) if primary is not None else len(val_pairs)
    _refuse_if_worse(metrics, next(iter(labels), None), min(judged, EVAL_QUERIES))
    return Fitted(tensors, metrics)


def _refuse_if_worse(metrics: dict[str, float], primary: str | None, queries: int) -> None:
    """A TrainError when the head ranks held-out items clearly worse than the frozen backbone (by the first
    label's precision@10, else the pairs' recall@10): publishing it would make every vector worse. Clearly:
    by more than two standard errors of the measure over its `queries` (and at least 0.01), so a small
    validation share does not refuse a head by chance."""
    key = f"precision_at_10_{primary}" if primary is not None else "pair_recall_at_10"
    frozen, tuned = metrics.get(f"{key}_frozen"), metrics.get(f"{key}_head")
    if frozen is None or tuned is None or math.isnan(frozen) or math.isnan(tuned) or queries == 0:
        return
    margin = max(0.01, 2 * math.sqrt(frozen * (1 - frozen) / queries))
    if tuned >= frozen - margin:
        return
    raise TrainError(
        f"the trained head ranks held-out items worse than the frozen backbone ({key} {tuned:.4f} < "
        f"{frozen:.4f}): not published. More labelled items per value, or a larger train.dim, may help"
    )


def evaluate(
    features: np.ndarray,
    labels: dict[str, np.ndarray],
    val_items: np.ndarray,
    database: np.ndarray,
    val_pairs: np.ndarray,
    tensors: dict[str, np.ndarray],
    kind: str,
) -> dict[str, float]:
    """Frozen backbone against tuned head on held-out data: each held-out item's precision@10 by each label
    among the `database` training items (what a new item of the catalog meets), and each held-out pair's
    recall@10."""
    from lookalike.embed.models.head import Head

    tuned = Head("candidate", "candidate", kind, tensors).apply(features)
    metrics = {}
    for name, codes in labels.items():
        for what, vectors in (("frozen", features), ("head", tuned)):
            metrics[f"precision_at_10_{name}_{what}"] = precision_against(
                vectors[val_items], codes[val_items], vectors[database], codes[database]
            )
    if len(val_pairs):
        metrics["pair_recall_at_10_frozen"] = pair_recall_at_k(features, val_pairs)
        metrics["pair_recall_at_10_head"] = pair_recall_at_k(tuned, val_pairs)
    return {key: round(value, 4) for key, value in metrics.items()}


class Batches:
    """Class-balanced batches for the label losses: P label values, K items of each (the usual sampler of
    metric learning). Random batches of a catalog with thousands of product types hold almost no two items
    of one type, so an in-batch contrastive loss would have nothing to pull together; here every drawn item
    has K - 1 partners. K grows when there are few values, so a batch still holds about BATCH items. Items
    whose label is null, or whose value has a single item, are drawn uniformly to fill the batch: they add
    negatives (and, with behaviour, their pairs still teach)."""

    K_MIN = 4

    def __init__(self, codes: np.ndarray, items: np.ndarray):
        order = np.argsort(codes, kind="stable")
        values, starts, counts = np.unique(codes[order], return_index=True, return_counts=True)
        keep = (values >= 0) & (counts >= 2)
        self.groups = [items[order[s : s + c]] for s, c, k in zip(starts, counts, keep) if k]
        self.k = max(self.K_MIN, BATCH // max(1, len(self.groups)))
        self.p = max(1, BATCH // self.k)
        self.items = items

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        chosen = rng.choice(len(self.groups), size=min(self.p, len(self.groups)), replace=False)
        parts = [rng.choice(self.groups[g], size=min(self.k, len(self.groups[g])), replace=False) for g in chosen]
        drawn = np.concatenate(parts) if parts else np.empty(0, np.int64)
        if len(drawn) < BATCH // 2:  # few or no repeated values: fill with random items as negatives
            fill = rng.choice(self.items, size=min(len(self.items), BATCH - len(drawn)), replace=False)
            drawn = np.unique(np.concatenate([drawn, fill]))
        return drawn.astype(np.int64)


class _Head:
    """The head being trained, as torch parameters in the artefact's layout (`head.Head`)."""

    def __init__(self, sample: np.ndarray, options: TrainOptions, rng: np.random.Generator, device: torch.device):
        import torch

        self.kind = options.kind
        w1, b1 = _pca_init(sample, options.dim, rng)
        tensors = {"w1": torch.from_numpy(w1), "b1": torch.from_numpy(b1)}
        if options.kind == "mlp":
            d_in, hidden = sample.shape[1], options.dim
            w2 = rng.standard_normal((d_in, hidden)).astype(np.float32) * math.sqrt(2.0 / d_in)
            tensors |= {"w2": torch.from_numpy(w2), "b2": torch.zeros(hidden), "w3": torch.zeros(hidden, options.dim)}
        self.params = {name: torch.nn.Parameter(tensor.to(device)) for name, tensor in tensors.items()}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        p = self.params
        out = x @ p["w1"] + p["b1"]
        if self.kind == "mlp":
            out = out + torch.relu(x @ p["w2"] + p["b2"]) @ p["w3"]
        return torch.nn.functional.normalize(out, dim=1)

    def state(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in self.params.items()}


def _class_means(model: _Head, x: torch.Tensor, codes: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Each label value's proxy to start from: the mean of its training items under the initial head (random
    for a value without any), so the proxy loss starts where the items are instead of pulling them apart."""
    import torch

    labelled = items[codes[items] >= 0]
    with torch.no_grad():
        z = model(x[torch.from_numpy(labelled).to(x.device)]).cpu().numpy()
    sums = np.zeros((int(codes.max()) + 1, z.shape[1]), dtype=np.float32)
    np.add.at(sums, codes[labelled], z)
    empty = np.linalg.norm(sums, axis=1) == 0
    sums[empty] = np.random.default_rng(0).standard_normal((int(empty.sum()), z.shape[1]))
    return sums / np.linalg.norm(sums, axis=1, keepdims=True)


def _pca_init(sample: np.ndarray, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(w, b) projecting centred vectors on their top `dim` principal axes (random ones past the sample's rank)."""
    rows = sample[rng.choice(len(sample), size=min(len(sample), 20000), replace=False)]
    mean = rows.mean(axis=0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    w = rng.standard_normal((sample.shape[1], dim)).astype(np.float32) * 0.01
    rank = min(dim, vt.shape[0])
    w[:, :rank] = vt[:rank].T
    return w.astype(np.float32), (-mean @ w).astype(np.float32)

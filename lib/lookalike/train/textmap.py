"""The text map: a linear map from title vectors (all-MiniLM-L6-v2, 384-d) into the image space the index
searches, learned from the catalog's own (title, image) pairs, so `search --text` needs no captioned data.

- `ridge`: closed-form ridge regression of the image vectors on the title vectors, its strength chosen on a
  held-out share by the recall it gives (pure NumPy).
- `contrastive`: the same linear map trained with symmetric InfoNCE against the fixed image vectors,
  starting from the ridge solution (torch): it learns to rank the right image first rather than to land
  near it on average.
Both return (weights (text_dim, dim), bias (dim,)) for `head.Head.map_text`, and their held-out recall@10.
"""

from __future__ import annotations

import math

import numpy as np

from lookalike.embed.models.head import l2_normalise

RIDGE_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)
EVAL_QUERIES = 2000
K = 10


def recall_at_k(queries: np.ndarray, targets: np.ndarray, k: int = K) -> float:
    """Share of rows i whose target row i is among the k targets nearest to query i (cosine).

    Ties are ranked fairly: a target tied with t others counts as ranked in the middle of them (as a random
    order among equals would on average), so identical titles do not all count as found first."""
    if len(queries) == 0:
        return float("nan")
    queries = queries[:EVAL_QUERIES]
    scores = l2_normalise(queries) @ l2_normalise(targets).T
    own = scores[np.arange(len(queries)), np.arange(len(queries))][:, None]
    rank = (scores > own + 1e-6).sum(axis=1) + ((np.abs(scores - own) <= 1e-6).sum(axis=1) - 1) / 2
    return float((rank < k).mean())


def ridge(text: np.ndarray, image: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """argmin |(T - mean_T) W + b - Y|^2 + strength |W|^2, solved in closed form."""
    t_mean, y_mean = text.mean(axis=0), image.mean(axis=0)
    t = text - t_mean
    gram = t.T @ t + strength * np.eye(t.shape[1])
    w = np.linalg.solve(gram, t.T @ (image - y_mean))
    return w.astype(np.float32), (y_mean - t_mean @ w).astype(np.float32)


def fit_ridge(text: np.ndarray, image: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Ridge with the strength of `RIDGE_STRENGTHS` that ranks the held-out rows `val` best, refit on all."""
    train = np.setdiff1d(np.arange(len(text)), val)
    scored = []
    for strength in RIDGE_STRENGTHS:
        w, b = ridge(text[train], image[train], strength)
        scored.append((recall_at_k(text[val] @ w + b, image[val]), strength))
    recall, strength = max(scored)
    w, b = ridge(text, image, strength)
    return w, b, {"text_recall_at_10": round(recall, 4), "text_ridge_strength": strength}


def fit_contrastive(
    text: np.ndarray, image: np.ndarray, val: np.ndarray, temperature: float, epochs: int = 30, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """A linear map trained with InfoNCE from the ridge solution; the epoch with the best held-out recall wins."""
    import torch

    from lookalike.train import losses

    train = np.setdiff1d(np.arange(len(text)), val)
    _, _, chosen = fit_ridge(text, image, val)
    w0, b0 = ridge(text[train], image[train], chosen["text_ridge_strength"])
    w, b = torch.nn.Parameter(torch.from_numpy(w0)), torch.nn.Parameter(torch.from_numpy(b0))
    optimiser = torch.optim.AdamW([w, b], lr=1e-3, weight_decay=1e-4)
    t, y = torch.from_numpy(text.astype(np.float32)), torch.from_numpy(image.astype(np.float32))
    rng = np.random.default_rng(seed)
    best = (recall_at_k(text[val] @ w0 + b0, image[val]), w0, b0)
    for _ in range(epochs):
        order = rng.permutation(train)
        for start in range(0, len(order), 512):
            rows = torch.from_numpy(order[start : start + 512])
            mapped = torch.nn.functional.normalize(t[rows] @ w + b, dim=1)
            optimiser.zero_grad()
            losses.pairs(mapped, y[rows], temperature).backward()
            optimiser.step()
        current = w.detach().numpy().copy(), b.detach().numpy().copy()
        recall = recall_at_k(text[val] @ current[0] + current[1], image[val])
        if recall > best[0]:
            best = (recall, *current)
    return best[1], best[2], {"text_recall_at_10": round(best[0], 4)}


def held_out(n: int, fraction: float, seed: int) -> np.ndarray:
    """The seeded held-out rows of `n` pairs (at least one when there are two)."""
    size = min(n - 1, max(1, math.ceil(n * fraction))) if n >= 2 else 0
    return np.sort(np.random.default_rng(seed + 1).permutation(n)[:size])

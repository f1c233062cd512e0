"""The metric-learning losses `lookalike train` can use: pure torch functions of a batch of unit vectors.

- `supcon`: supervised contrastive (Khosla et al. 2020): every item pulls the batch's items of its label and
  pushes the rest; items whose label is null (-1), or that have no partner in the batch, add nothing.
- `proxy`: one learned unit proxy per label value, softmax over cosines to the proxies (normalised softmax,
  "NormFace" / Proxy-NCA++ without the ranking tricks): needs no partner in the batch, so it suits labels
  with many rare values.
- `pairs`: InfoNCE over behaviour pairs (two items one shopper visited in one session), symmetric, with the
  other pairs of the batch as negatives: what CLIP uses for (image, text) pairs.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors that have a positive of -log(sum over positives / sum over all others)."""
    known = labels >= 0
    z, labels = z[known], labels[known]
    if len(z) < 2:
        return z.sum() * 0.0
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~eye
    anchors = positive.any(dim=1)
    if not anchors.any():
        return z.sum() * 0.0
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    return -positives[anchors].mean()


def proxy(z: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of cosine-to-proxy logits; `proxies` is (label values, dim), normalised here."""
    known = labels >= 0
    if not known.any():
        return z.sum() * 0.0
    logits = z[known] @ F.normalize(proxies, dim=1).T / temperature
    return F.cross_entropy(logits, labels[known])


def pairs(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` should match row i of `b` among every row of `b`, and the reverse."""
    if len(a) < 2:
        return a.sum() * 0.0
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

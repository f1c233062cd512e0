"""Image + title vectors (`embed.input: image+title`): one unit vector per item from its image vector and its
title's text vector, weighted by `embed.title_weight` (w).

The fused vector is the concatenation `[sqrt(1 - w) * image, sqrt(w) * title]` of the two unit vectors, so the
cosine of two fused items is exactly `(1 - w) * image cosine + w * title cosine`: the weight says how much of
the similarity comes from the words, and each part stays readable from the vector (its first and last
dimensions). An item whose title is missing or blank is `[image, 0]`, one whose image cannot be used
`[0, title]`: each compares on what it has, scaled by the weight of that part (an image-only item scores at
most sqrt(1 - w) against a full one). Queries follow the same rule: a query image is `[image, 0]`, a query
text `[0, title]`, or with a head's text map `[sqrt(1 - w) * mapped, sqrt(w) * title]`. Pure NumPy.
"""

from __future__ import annotations

import numpy as np

from lookalike.embed.models.head import l2_normalise


def fused_version(image_version: str, weight: float, text_version: str) -> str:
    """The `model` value of fused vectors: `<image version>+title@<weight>:<text model version>`."""
    return f"{image_version}+title@{weight:g}:{text_version}"


def fuse(image: np.ndarray, title: np.ndarray, weight: float) -> np.ndarray:
    """Rows of unit image vectors and unit title vectors (a row of zeros where a part is missing) -> unit fused
    rows; a row with neither part stays zero (callers never store one)."""
    image = np.asarray(image, dtype=np.float32)
    title = np.asarray(title, dtype=np.float32)
    has_image = np.abs(image).sum(axis=1, keepdims=True) > 0
    has_title = np.abs(title).sum(axis=1, keepdims=True) > 0
    both = has_image & has_title
    a = np.where(both, np.sqrt(1.0 - weight), 1.0).astype(np.float32)
    b = np.where(both, np.sqrt(weight), 1.0).astype(np.float32)
    return l2_normalise(np.concatenate([a * image, b * title], axis=1))


def image_query(image: np.ndarray, title_dim: int) -> np.ndarray:
    """Query images against fused vectors: their image part only."""
    return fuse(image, np.zeros((len(image), title_dim), dtype=np.float32), 0.0)


def text_query(title: np.ndarray, image_dim: int, weight: float, mapped: np.ndarray | None = None) -> np.ndarray:
    """Query texts against fused vectors: the title part, and the image part a text map gives (`mapped`)."""
    image = np.zeros((len(title), image_dim), dtype=np.float32) if mapped is None else mapped
    return fuse(image, title, weight)

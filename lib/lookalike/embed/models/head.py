"""A trained head: the small network `lookalike train` learns on top of a frozen backbone, and its artefact.

The head maps a backbone's unit feature vectors (e.g. EfficientNet-Lite0's 1280-d) to the catalog-tuned
vectors the index searches (`apply`), and may carry the text map that puts a title's all-MiniLM-L6-v2 vector
into that same space (`map_text`, for text-to-image search). Both are plain matrix products, so they run in
NumPy everywhere: executors, the searcher, a service; torch is needed only to train.

An artefact is a folder `<output.root>/models/<version>/` holding `head.safetensors` (the tensors) and
`head.json` (what it is: its version, the backbone version it was trained on, its shape, loss, data version,
validation metrics, and the sha256 of the tensors file), written last, so a folder without `head.json` is
an unfinished write. `models/LATEST` names the newest (`storage.published`). A head is refused with a
one-line `HeadError` when its files are missing, do not match their recorded digest, or were trained on
another backbone than the one embedding now.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.storage import files, published

MODELS = "models"
TENSORS, METADATA = "head.safetensors", "head.json"
KINDS = ("linear", "mlp")
TEXT_MODEL = "all-minilm-l6-v2"  # the registry text model whose title vectors a text map reads
FORMAT = 1  # head.json's layout; a newer one is refused rather than misread


class HeadError(LookalikeError):
    """A head that cannot be used: missing, corrupt, or trained on another backbone."""


def versioned(backbone: str, head_version: str | None) -> str:
    """A `model` column value: the backbone's version alone, or with `+head@<version>` when a head made it, so a
    new head changes every vector's version and vectors of two heads never share an index."""
    return backbone if head_version is None else f"{backbone}+head@{head_version}"


def models_folder(output_root: str) -> str:
    return f"{output_root.rstrip('/')}/{MODELS}"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Head:
    """A loaded head. `tensors` holds `w1`, `b1` (the linear map), for an MLP also `w2`, `b2`, `w3` (a ReLU
    branch added to it: `x w1 + b1 + relu(x w2 + b2) w3`, which starts as the linear map when `w3` is zero),
    and `text_w`, `text_b` when it maps titles; every weight matrix is (inputs, outputs)."""

    version: str
    backbone: str  # the model version (`registry.model_version`) whose features it reads
    kind: str
    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.tensors["w1"].shape[1])

    @property
    def input_dim(self) -> int:
        return int(self.tensors["w1"].shape[0])

    @property
    def maps_text(self) -> bool:
        return "text_w" in self.tensors

    def model_version(self) -> str:
        """What the `model` column says for vectors made with this head (`versioned`)."""
        return versioned(self.backbone, self.version)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Unit backbone features (n, input_dim) -> unit tuned vectors (n, dim)."""
        t = self.tensors
        features = np.asarray(features, dtype=np.float32)
        x = features @ t["w1"] + t["b1"]
        if self.kind == "mlp":
            x += np.maximum(features @ t["w2"] + t["b2"], 0.0) @ t["w3"]
        return l2_normalise(x)

    def map_text(self, text_vectors: np.ndarray) -> np.ndarray:
        """Unit title vectors of the text model -> unit vectors in this head's image space."""
        if not self.maps_text:
            raise HeadError(f"head {self.version} has no text map: train it with train.text_map set")
        x = np.asarray(text_vectors, dtype=np.float32) @ self.tensors["text_w"] + self.tensors["text_b"]
        return l2_normalise(x)


def save(output_root: str, version: str, head: Head) -> str:
    """Write `head` as `models/<version>/` (tensors, then `head.json` last), then point `models/LATEST` at it;
    returns the folder. Older complete versions beyond the newest 5 are pruned (never the one just written)."""
    from safetensors.numpy import save as save_tensors

    folder = f"{models_folder(output_root)}/{version}"
    blob = save_tensors({name: np.ascontiguousarray(array, dtype=np.float32) for name, array in head.tensors.items()})
    files.write_bytes(f"{folder}/{TENSORS}", blob)
    metadata = {
        **head.metadata,
        "format": FORMAT,
        "version": version,
        "backbone": head.backbone,
        "kind": head.kind,
        "dim": head.dim,
        "input_dim": head.input_dim,
        "text_map": head.maps_text,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    files.write_text(f"{folder}/{METADATA}", json.dumps(metadata, indent=2, sort_keys=True))
    published.publish(models_folder(output_root), version)
    published.prune(models_folder(output_root), 5, version, METADATA)
    return folder


def resolve_version(output_root: str, setting: str) -> str | None:
    """The head version `model.head` names: None for `none`, and for `latest` before any head was trained."""
    if setting == "none":
        return None
    if setting == "latest":
        return published.latest(models_folder(output_root))
    return setting


def load(output_root: str, version: str) -> Head:
    """The head `models/<version>/`, checked whole: metadata, digest, tensor names and shapes."""
    folder = f"{models_folder(output_root)}/{version}"
    text = files.read_text(f"{folder}/{METADATA}")
    if text is None:
        raise HeadError(f"model.head: no trained head {version!r} under {models_folder(output_root)} (no {METADATA})")
    try:
        meta = json.loads(text)
        kind, backbone, digest = meta["kind"], meta["backbone"], meta["tensors_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise HeadError(f"head {version}: {METADATA} is not a head's metadata ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise HeadError(f"head {version}: {METADATA} has format {meta.get('format')!r}, this lookalike reads {FORMAT}")
    blob = files.read_bytes(f"{folder}/{TENSORS}")
    if blob is None or hashlib.sha256(blob).hexdigest() != digest:
        what = "is missing" if blob is None else "does not match the sha256 recorded in head.json"
        raise HeadError(f"head {version}: {folder}/{TENSORS} {what}: the artefact is corrupt; train again")
    from safetensors.numpy import load as load_tensors

    tensors = dict(load_tensors(blob))
    head = Head(version, backbone, kind, tensors, meta)
    check(head)
    return head


def check(head: Head) -> None:
    """Refuse a head whose tensors do not chain (names and shapes), with the head's version in the message."""
    t = head.tensors
    need = ["w1", "b1"] + (["w2", "b2", "w3"] if head.kind == "mlp" else [])
    if head.kind not in KINDS or any(name not in t for name in need):
        raise HeadError(f"head {head.version}: a {head.kind!r} head needs tensors {need}, found {sorted(t)}")
    d_in, dim = t["w1"].shape
    shapes_ok = t["b1"].shape == (dim,) and (
        head.kind == "linear"
        or (
            t["w2"].shape[0] == d_in and t["b2"].shape == t["w2"].shape[1:] and t["w3"].shape == (t["w2"].shape[1], dim)
        )
    )
    if head.maps_text:
        shapes_ok = shapes_ok and t["text_w"].shape[1] == dim and t["text_b"].shape == (dim,)
    if not shapes_ok:
        raise HeadError(f"head {head.version}: tensor shapes do not chain: { {k: v.shape for k, v in t.items()} }")


def for_backbone(output_root: str, setting: str, backbone: str) -> Head | None:
    """The head `model.head` names for vectors of `backbone`, loaded and checked; None without one.

    A head trained on another backbone (another model, weights or input size) would read features it never
    saw: refused with what to do instead.
    """
    version = resolve_version(output_root, setting)
    if version is None:
        return None
    head = load(output_root, version)
    if head.backbone != backbone:
        raise HeadError(
            f"model.head: head {version} was trained on {head.backbone}, but model.name and embed.image_size give "
            f"{backbone}; run `lookalike train` for this backbone or set model.head: none"
        )
    return head

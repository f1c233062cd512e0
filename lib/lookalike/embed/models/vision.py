"""Image models: pixel preprocessing and the `Embedder` that runs a headless vision model.

Preprocessing is split from inference (`pixels` per image in a thread pool, `batch` to stack, or
`preprocess` for both) so that CPU work on the next images overlaps inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lookalike.embed.decode import to_rgb
from lookalike.embed.models.device import autocast
from lookalike.embed.models.registry import TORCHVISION_PREFIX, ModelError, ModelSpec
from lookalike.embed.models.weights import load_weights, read_state_dict

if TYPE_CHECKING:
    import torch

# Resampling work is cut by an exact integer reduce first, then a fair bilinear pass over at most 3x the output
# size: Pillow documents this as indistinguishable from full resampling, and it is 2x faster on 12 MP photos.
_REDUCING_GAP = 3.0


def center_crop_box(width: int, height: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """The centred square, in source pixels, that resize-shorter-side-then-centre-crop keeps.

    Resizing the shorter side to S / f and cropping S is the same as cropping a square of f * shorter side and
    resizing it to S. Doing it in that order never builds the huge intermediate that a 2000x3 banner would
    need (a 170,000 px wide image), and resamples only the pixels that survive the crop.
    """
    side = crop_fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


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


def preprocess(
    images: Sequence[Image.Image], image_size: int, crop_fraction: float, pin_memory: bool = False
) -> torch.Tensor:
    """A batch of images as one uint8 (N, 3, S, S) tensor: `to_pixels` per image, then `stack_pixels`."""
    return stack_pixels([to_pixels(image, image_size, crop_fraction) for image in images], image_size, pin_memory)


def _replace_last_linear(model: torch.nn.Module) -> None:
    """Turn a classifier into a feature extractor: the last Linear layer (the ImageNet head) becomes Identity.

    For every registry architecture the model's output is then its penultimate layer: the pooled features for
    ResNet/ConvNeXt/EfficientNet (ConvNeXt keeps its LayerNorm), the 1280-d hidden layer for MobileNetV3.
    """
    import torch

    last = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][-1]
    model.set_submodule(last, torch.nn.Identity())


def build_model(spec: ModelSpec, weights_path: str, image_size: int | None) -> torch.nn.Module:
    """The architecture with the weights from `weights_path`, headless, in eval mode, on the CPU.

    `EfficientNet.from_pretrained` is not used: it loads without map_location and prints to stdout.
    """
    if spec.name.startswith(TORCHVISION_PREFIX):
        import torchvision

        model = torchvision.models.get_model(spec.name.removeprefix(TORCHVISION_PREFIX), weights=None)
    else:
        from efficientnet_lite_pytorch import EfficientNet

        # The package pads convolutions TF-style with padding precomputed for one input size; building it for
        # the size actually fed keeps "SAME" padding exact (built for 224 and fed 112, the last stage is 3x3).
        model = EfficientNet.from_name(spec.name, image_size=image_size)
    load_weights(model, read_state_dict(weights_path), spec.name, weights_path)
    _replace_last_linear(model)
    return model.eval().requires_grad_(False)


def inference_graph(spec: ModelSpec, module: torch.nn.Module) -> torch.nn.Module:
    """The whole of inference as one torch module: uint8 NCHW pixels in, unit-norm float32 rows out.

    (x / 255 - mean) / std is folded into one multiply and one subtract. torch runs this module directly and
    ONNX Runtime runs its export (`onnx_runtime`), so the two runtimes compute one function.
    """
    import torch

    assert spec.mean is not None and spec.std is not None  # an image model (checked by `Embedder`)

    class InferenceGraph(torch.nn.Module):
        scale: torch.Tensor
        shift: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.model = module
            std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * std))
            self.register_buffer("shift", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1) / std)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.float() * self.scale - self.shift
            return torch.nn.functional.normalize(self.model(x).float(), dim=1)

    return InferenceGraph().eval().requires_grad_(False)


class Embedder:
    """One loaded model on one device: PIL images in, L2-normalised float32 rows out.

    `runtime` is `torch` or `onnx` (ONNX Runtime, CPU only: `device.resolve_runtime`). torch runs
    channels-last on both devices: on CUDA float16 autocast then uses tensor cores without layout
    transposes; on the CPU (float32) it measured 1.4-1.7x faster than the contiguous layout for
    EfficientNet-Lite0 at 112 and 224 px. On CUDA, pinned uint8 batches are copied asynchronously.
    """

    def __init__(
        self,
        spec: ModelSpec,
        module: torch.nn.Module,
        device: torch.device,
        image_size: int,
        version: str,
        runtime: str = "torch",
    ):
        import torch

        if spec.crop_fraction is None or spec.mean is None or spec.std is None:
            raise ModelError(f"{spec.name} is not an image model")
        self.spec = spec
        self.crop_fraction = spec.crop_fraction
        self.device = device
        self.image_size = image_size
        self.version = version
        self.dim = spec.dim
        self.runtime = runtime
        self._cuda = device.type == "cuda"
        graph = inference_graph(spec, module)
        self._onnx = None
        if runtime == "onnx":
            from lookalike.embed.models import onnx_runtime

            self._onnx = onnx_runtime.load(graph, image_size, version, torch.get_num_threads())
        self._graph = graph.to(device).to(memory_format=torch.channels_last)

    @property
    def exported(self) -> bool:
        """Whether loading this embedder ran the ONNX exporter (False for torch, or a cached export)."""
        return self._onnx is not None and self._onnx.exported

    def pixels(self, image: Image.Image) -> np.ndarray:
        """This model's preprocessing of one image (see `to_pixels`), for a decode thread pool."""
        return to_pixels(image, self.image_size, self.crop_fraction)

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
        if self._onnx is not None:
            return self._onnx.run(batch.numpy())
        with torch.inference_mode(), self._precision():
            x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return self._graph(x).cpu().numpy()

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """`infer(preprocess(images))`, for callers that do not overlap the two."""
        return self.infer(self.preprocess(images))

"""Where and how a model runs: the task's device (Spark's GPU addresses to a torch device), the default batch
per device, and the precision policy every model shares. torch is imported inside functions only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Every model's precision policy: float16 autocast on CUDA (tensor cores), plain float32 on the CPU."""
    import torch

    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


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
        raise RuntimeError(
            f"Spark gave GPU address {address!r}, which is neither a CUDA index nor listed in "
            f"CUDA_VISIBLE_DEVICES={visible_devices!r}"
        )
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
            raise RuntimeError(
                "device 'cuda' requested but torch sees no CUDA GPU on this worker "
                "(torch.cuda.is_available() is False); use 'auto' or 'cpu'"
            )
        return torch.device("cpu")
    if not gpu_addresses:
        return torch.device("cuda", 0)
    index = cuda_index(gpu_addresses[0], os.environ.get("CUDA_VISIBLE_DEVICES"))
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"Spark assigned GPU {gpu_addresses[0]!r} but torch sees only {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


RUNTIMES = ("auto", "torch", "onnx")


def resolve_runtime(requested: str, device: torch.device) -> str:
    """What runs an image model on `device`: `torch` or `onnx` (ONNX Runtime, `embed.runtime`).

    'auto' takes ONNX Runtime on the CPU (2.4x torch's eager fp32 there, equal embeddings) and torch on
    a GPU (CUDA kernels and fp16). 'onnx' on a GPU is an error: this build of ONNX Runtime runs on the CPU, and
    moving a GPU task's inference there silently would be many times slower.
    """
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if device.type == "cuda":
        if requested == "onnx":
            raise RuntimeError("embed.runtime 'onnx' runs on the CPU but this task embeds on a GPU; use 'auto'")
        return "torch"
    return "torch" if requested == "torch" else "onnx"

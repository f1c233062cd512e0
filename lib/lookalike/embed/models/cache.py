"""The per-worker model cache: a model loads once per Python worker, not once per task.

Cached in this module (not in the job script) because Spark keeps a reused Python worker's imported modules
alive across tasks (`spark.python.worker.reuse`). `load_count` counts real loads, for tests and metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from lookalike.embed.models.registry import DEFAULT_MODEL, ModelSpec, get_spec, model_version, weights_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_cache: dict[tuple[str, str | None, str, int | None, str], Any] = {}
_cache_lock = threading.Lock()
_loads = 0


def _input_size(spec: ModelSpec, image_size: int | None) -> int | None:
    # A text model has no pixel size: `embed.image_size` does not apply to it.
    return (image_size or spec.image_size) if spec.modality == "image" else None


def load_embedder(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    runtime: str = "auto",
) -> Any:
    """Load a model now (uncached; workers should call `get_embedder`). Logs one INFO line per load.

    Returns a `vision.Embedder` for image models (run by `runtime`, see `device.resolve_runtime`) and a
    `text.TextEmbedder` for text models, which torch always runs.
    """
    import torch

    from lookalike.embed.models.device import resolve_runtime

    global _loads
    started = time.perf_counter()
    spec = get_spec(name)
    size = _input_size(spec, image_size)
    path = weights_file(name, weights)
    version = model_version(name, path, size)
    target = torch.device(device)
    if target.type == "cuda":
        # Batches have one fixed shape, so letting cuDNN pick the fastest kernels once pays off at once.
        torch.backends.cudnn.benchmark = True
    embedder: Any
    if spec.modality == "text":
        from lookalike.embed.models import text

        embedder = text.TextEmbedder(spec, text.build_model(spec, path), text.tokenizer_path(name), target, version)
        shape = f"{spec.max_tokens} tokens"
    else:
        from lookalike.embed.models import vision

        assert size is not None  # an image model always has an input size
        runs = resolve_runtime(runtime, target)
        module = vision.build_model(spec, path, size)
        embedder = vision.Embedder(spec, module, target, size, version, runs)
        shape = f"{size} px, {runs}" + (", exported to ONNX" if embedder.exported else "")
    _loads += 1
    log.info("loaded model %s (%s) on %s in %.2f s", version, shape, target, time.perf_counter() - started)
    return embedder


def get_embedder(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    runtime: str = "auto",
) -> Any:
    """The process-wide embedder (`Embedder` or `TextEmbedder`) for these arguments, loaded on first use.

    Cached in this module (not in the job script) because Spark keeps a reused Python worker's imported
    modules alive across tasks: the model then loads once per worker instead of once per task.
    """
    import torch

    key = (
        name,
        None if weights is None else os.path.abspath(os.fspath(weights)),
        str(torch.device(device)),
        _input_size(get_spec(name), image_size),
        runtime,
    )
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_embedder(name, weights, device, image_size, runtime)
        return _cache[key]


_heads: dict[tuple[str, str], Any] = {}


def get_head(output_root: str, version: str) -> Any:
    """The process-wide `head.Head` `models/<version>` of `output_root`, loaded (and checked) on first use."""
    from lookalike.embed.models import head

    key = (output_root, version)
    with _cache_lock:
        if key not in _heads:
            _heads[key] = head.load(output_root, version)
        return _heads[key]


def load_count() -> int:
    """How many models this process has actually loaded (cache hits do not count)."""
    return _loads

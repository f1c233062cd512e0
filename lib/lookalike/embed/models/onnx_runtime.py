"""An image model run by ONNX Runtime on the CPU: exported once per machine from the torch model, then cached.

ONNX Runtime fuses convolutions with their BatchNorm and activation and runs them with kernels tuned for the
CPU it finds (AVX-512, VNNI): a decode-and-embed loop over EfficientNet-Lite0 at 112 px ran 2.4x faster than
with torch's eager fp32, with embeddings equal to 1e-6 (`benchmarks/embed_throughput.py`). The graph exported is the
whole of `Embedder.infer` (`vision.inference_graph`: uint8 pixels in, unit-norm rows out), so nothing
but the pixels crosses from Python per batch.

Export (torch's `torch.export`-based exporter) takes seconds, so its result is kept in a per-user cache,
keyed by everything that shapes the graph: `LOOKALIKE_CACHE_DIR`, else `$XDG_CACHE_HOME/lookalike`, else
`~/.cache/lookalike`, under `onnx/`. A file is written whole and renamed into place, so workers exporting at
once never read half a file; one that fails to load is exported again; the newest `CACHE_KEEP` are kept.
Where no cache folder can be made (a read-only home on an executor), each worker exports in memory instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime
    import torch

log = logging.getLogger(__name__)

# Bump when `vision.inference_graph` or the export arguments change what a cached file holds.
GRAPH_REVISION = 1
# Exported models kept (newest first); an EfficientNet-Lite0 export is 14 MB.
CACHE_KEEP = 16


def cache_dir() -> Path:
    """Where exported models are kept (see the module docstring for the order of places)."""
    if os.environ.get("LOOKALIKE_CACHE_DIR"):
        return Path(os.environ["LOOKALIKE_CACHE_DIR"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lookalike" / "onnx"


def cache_key(model_version: str) -> str:
    """The file name for a model version's graph under this torch and exporter: a change of either re-exports."""
    import onnxscript
    import torch

    text = f"{model_version}|torch {torch.__version__}|onnxscript {onnxscript.__version__}|graph {GRAPH_REVISION}"
    return hashlib.sha256(text.encode()).hexdigest()[:24] + ".onnx"


def export(graph: torch.nn.Module, image_size: int) -> bytes:
    """The graph as an ONNX model with a dynamic batch dimension (uint8 NCHW pixels in)."""
    import torch

    example = torch.zeros((2, 3, image_size, image_size), dtype=torch.uint8)
    for name in ("onnxscript", "onnx_ir"):  # they log every rewrite pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # The exporter reports each decomposition it applies; none of them is a problem for a CNN.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
        )
    assert program is not None  # `dynamo=True` always returns the program
    return bytes(program.model_proto.SerializeToString())


def _write_whole(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    for old in sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
        old.unlink(missing_ok=True)


def _session(model: bytes | str, threads: int) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle ORT threads would otherwise spin between batches, taking the core from the decode threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """One exported model in one ONNX Runtime session: `run(uint8 NCHW pixels) -> (N, dim) float32`."""

    def __init__(self, session: onnxruntime.InferenceSession, exported: bool):
        self._session = session
        self._input = session.get_inputs()[0].name
        self.exported = exported  # whether this load ran the exporter (False: read from the cache)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        output = self._session.run(None, {self._input: np.ascontiguousarray(pixels)})[0]
        return np.asarray(output, dtype=np.float32)


def load(graph: torch.nn.Module, image_size: int, model_version: str, threads: int) -> OnnxModel:
    """The graph in an ONNX Runtime session with `threads` intra-op threads, from the cache when it is there."""
    path = cache_dir() / cache_key(model_version)
    if path.is_file():
        try:
            return OnnxModel(_session(str(path), threads), exported=False)
        except Exception as err:  # a truncated or foreign file: export again over it
            log.warning("re-exporting %s: cached ONNX model %s does not load (%s)", model_version, path, err)
    data = export(graph, image_size)
    try:
        _write_whole(path, data)
    except OSError as err:
        log.warning("ONNX model cache %s is not writable (%s); exporting per worker", path.parent, err)
    return OnnxModel(_session(data, threads), exported=True)

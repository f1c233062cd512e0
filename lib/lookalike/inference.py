"""Executor side of the embed stage: catalog rows in, embedding or failure rows out.

One call handles one Arrow batch of a partition. Reading, hashing, decoding and preprocessing run in a small
thread pool (Pillow and file reads release the GIL) so that the next images are ready while torch runs the
current batch. An image whose bytes hash to the sha256 already stored for this model is not decoded at all:
that is what makes an unchanged night cheap. Every per-image failure becomes a row with its `ImageError`
kind; nothing a single image does can fail the task.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lookalike.decode import ImageError, decode_image
from lookalike.models import Embedder
from lookalike.reader import read_bytes

EMBEDDED, UNCHANGED, FAILED = "embedded", "unchanged", "failed"
OUTPUT_SCHEMA = ("status string, embedding array<float>, image_sha256 string, width int, height int, "
                 "error_kind string, error_message string")
_COLUMNS = ["status", "embedding", "image_sha256", "width", "height", "error_kind", "error_message"]


@dataclass(frozen=True)
class EmbedSettings:
    """What an executor needs to embed images; plain values so it pickles into the UDF."""

    model_name: str
    weights: str | None
    image_size: int
    decode_size: int  # JPEGs decode at reduced scale down to this shorter side (image_size / crop fraction)
    batch_size: int
    device: str
    max_pixels: int
    max_bytes: int
    decode_threads: int


@dataclass
class _Loaded:
    """One image after the CPU-side work: either preprocessed pixels or the reason it failed."""

    sha256: str | None = None
    pixels: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    error: ImageError | None = None
    unchanged: bool = False


def _load(uri: str | None, known_sha: str | None, settings: EmbedSettings, embedder: Embedder) -> _Loaded:
    try:
        if uri is None or not uri.strip():
            raise ImageError("missing", "catalog row has no image_uri")
        data = read_bytes(uri, settings.max_bytes)
        sha = hashlib.sha256(data).hexdigest()
        if sha == known_sha:
            return _Loaded(sha256=sha, unchanged=True)
        decoded = decode_image(data, settings.max_pixels, target_size=settings.decode_size)
        return _Loaded(sha256=sha, pixels=embedder.pixels(decoded.image), width=decoded.width,
                       height=decoded.height)
    except ImageError as err:
        return _Loaded(error=err)


def _batches(loaded: Iterator[_Loaded], size: int) -> Iterator[list[_Loaded]]:
    batch: list[_Loaded] = []
    for item in loaded:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_rows(uris: Sequence[str | None], known_sha: Sequence[str | None], settings: EmbedSettings,
               embedder: Embedder, pool: ThreadPoolExecutor) -> pd.DataFrame:
    """One output row per input row, in order: status, embedding (when embedded), sha, size, error."""
    loaded = pool.map(lambda pair: _load(pair[0], pair[1], settings, embedder), zip(uris, known_sha))
    rows: list[dict] = []
    for batch in _batches(loaded, settings.batch_size):
        ready = [item for item in batch if item.pixels is not None]
        vectors = iter(embedder.infer(embedder.batch([item.pixels for item in ready])) if ready else ())
        for item in batch:
            row = dict.fromkeys(_COLUMNS)  # None, not NaN: Arrow must see nulls in the array and int columns
            if item.error is not None:
                row.update(status=FAILED, error_kind=item.error.kind, error_message=item.error.message)
            elif item.unchanged:
                row.update(status=UNCHANGED, image_sha256=item.sha256)
            else:
                row.update(status=EMBEDDED, embedding=next(vectors), image_sha256=item.sha256,
                           width=item.width, height=item.height)
            rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS).astype({"width": "Int32", "height": "Int32"})

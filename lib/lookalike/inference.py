"""Executor side of the embed stage: catalog rows in, embedding or failure rows out.

One call handles one Arrow batch of a partition. Reading, hashing, decoding and preprocessing run in a small
thread pool (Pillow and file reads release the GIL) so that the next images are ready while torch runs the
current batch. An image whose bytes hash to the sha256 already stored for this model is not decoded at all:
that is what makes an unchanged night cheap. Every per-image failure becomes a row with its `ImageError`
kind; nothing a single image does can fail the task.

With `embed.input: title` a row's content is its title instead (`embed_titles`): its "sha256" is that of the
title's UTF-8 bytes, so an unchanged title is not embedded again either, and a row without text fails as
`no_text`. Titles need no reading or decoding, so they are tokenised and embedded in the task's own thread.
"""
from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pandas as pd

from lookalike.decode import ImageError, decode_image
from lookalike.models import Embedder
from lookalike.reader import read_bytes

if TYPE_CHECKING:
    from lookalike.text_models import TextEmbedder

T, R = TypeVar("T"), TypeVar("R")

EMBEDDED, UNCHANGED, FAILED = "embedded", "unchanged", "failed"
NO_TEXT = "no_text"  # the quarantine kind of a title-input row whose title is null, empty or only whitespace
OUTPUT_SCHEMA = ("status string, embedding array<float>, image_sha256 string, width int, height int, "
                 "error_kind string, error_message string")
_COLUMNS = ["status", "embedding", "image_sha256", "width", "height", "error_kind", "error_message"]


@dataclass(frozen=True)
class EmbedSettings:
    """What an executor needs to embed images (or titles); plain values so it pickles into the UDF."""

    model_name: str
    weights: str | None
    image_size: int | None  # None with a text model
    decode_size: int | None  # JPEGs decode at reduced scale down to this shorter side (image_size / crop fraction)
    batch_size: int | None  # None: the device's default (`models.default_batch_size`), resolved per task
    device: str
    max_pixels: int
    max_bytes: int
    decode_threads: int
    input: str = "image"  # `embed.input`: "image" (rows carry image URIs) or "title" (rows carry titles)


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


def _prefetch(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """`pool.map(fn, items)` that runs at most `ahead` items ahead of the consumer, so decoded pixels waiting
    for the model never hold more than that many images in memory, whatever the Arrow batch size."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def embed_rows(uris: Sequence[str | None], known_sha: Sequence[str | None], settings: EmbedSettings,
               embedder: Embedder, pool: ThreadPoolExecutor) -> pd.DataFrame:
    """One output row per input row, in order: status, embedding (when embedded), sha, size, error.

    `settings.batch_size` must be resolved (not None): the UDF fills in the device's default.
    """
    loaded = _prefetch(pool, lambda pair: _load(pair[0], pair[1], settings, embedder), zip(uris, known_sha),
                       ahead=2 * settings.batch_size)
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


def text_sha256(text: str) -> str:
    """The `image_sha256` of a title-input row: sha256 of the title's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _no_text_message(title: object) -> str:
    what = "null" if not isinstance(title, str) else "empty" if not title else f"only whitespace ({title!r})"
    return f"catalog row has no title text to embed: title is {what}"


def embed_titles(titles: Sequence[str | None], known_sha: Sequence[str | None], settings: EmbedSettings,
                 embedder: TextEmbedder) -> pd.DataFrame:
    """`embed_rows` for `embed.input: title`: one output row per title, in order, width and height null.

    The titles to embed go to the model in batches of `embed.batch_size`, sorted by length first so that a
    batch pads to about its own texts' length (sentence-transformers' `encode` sorts the same way).
    """
    rows = [dict.fromkeys(_COLUMNS) for _ in titles]
    todo: list[tuple[int, str]] = []
    for i, (title, known) in enumerate(zip(titles, known_sha)):
        if not isinstance(title, str) or not title.strip():
            rows[i].update(status=FAILED, error_kind=NO_TEXT, error_message=_no_text_message(title))
            continue
        sha = text_sha256(title)
        rows[i].update(status=UNCHANGED if sha == known else EMBEDDED, image_sha256=sha)
        if sha != known:
            todo.append((i, title))
    todo.sort(key=lambda pair: len(pair[1]))
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start:start + settings.batch_size]
        for (i, _), vector in zip(batch, embedder.embed([title for _, title in batch])):
            rows[i]["embedding"] = vector
    return pd.DataFrame(rows, columns=_COLUMNS).astype({"width": "Int32", "height": "Int32"})

"""Executor side of the embed stage: catalog rows in, embedding or failure rows out.

One call handles one Arrow batch of a partition. Reading, hashing, decoding and preprocessing run in a small
thread pool (Pillow and file reads release the GIL) so that the next images are ready while torch runs the
current batch; http(s) images are read in a pool of their own (`fetch.concurrency` threads sharing the task's
`Fetcher`), because a request spends its time waiting, not computing. A URL fetched before is asked for
conditionally (`If-None-Match` / `If-Modified-Since` with the validators of the bytes seen then): a 304
means those bytes, unchanged, with nothing moved, decoded or embedded; a local file whose stat still matches
its validator (`reader.stat_tag`) is not even read. An image whose bytes hash to the
sha256 already stored for this model is not decoded at all, and a task with nothing to embed never loads the
model (`TaskModel`): that is what makes an unchanged night cheap. Every per-image failure becomes a row
with its `ImageError` kind; nothing a single image does can fail the task. A transient failure (a host down,
a timeout) of an item embedded before is `KEPT`: it keeps its embedding, and its quarantine row says so,
until a later run reaches it.

With `embed.input: title` a row's content is its title instead (`embed_titles`): its "sha256" is that of the
title's UTF-8 bytes, so an unchanged title is not embedded again either, and a row without text fails as
`no_text`. Titles need no reading or decoding, so they are tokenised and embedded in the task's own thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
import pandas as pd

from lookalike.embed.decode import ImageError, decode_image
from lookalike.embed.fetcher import Fetcher, FetchSettings, is_http, retry_delay_s
from lookalike.embed.models.cache import get_embedder, get_head, load_count
from lookalike.embed.models.device import default_batch_size, resolve_device
from lookalike.embed.models.fusion import fused_version
from lookalike.embed.models.head import Head, versioned
from lookalike.embed.models.registry import model_version
from lookalike.embed.models.vision import Embedder, to_pixels
from lookalike.embed.reader import ImagePolicy, read

if TYPE_CHECKING:
    import torch

    from lookalike.embed.models.text import TextEmbedder

T = TypeVar("T")
R = TypeVar("R")

EMBEDDED, UNCHANGED, FAILED = "embedded", "unchanged", "failed"
STILL_FAILED = "still_failed"  # the bytes that failed last time, unchanged: not decoded again, quarantine row kept
KEPT = "kept"  # failed transiently (a host down): quarantined, and its previous embedding stays meanwhile
# Kinds that are a property of the bytes alone: the same bytes fail the same way, so they are skipped until they
# change. Every other kind (missing, unreadable, forbidden, too_large, ...) depends on storage or config and is
# tried again every night; those checks cost a stat or a header read.
SKIPPED_WHILE_UNCHANGED = ("not_an_image", "decode_error")
# Decoding runs at most this many images ahead of inference: a GPU batch, 16 CPU batches, 38 MB of 224 px
# pixels. A fixed number, because the batch size is only known once the device is (`TaskModel`).
DECODE_AHEAD = 256
NO_TEXT = "no_text"  # the quarantine kind of a title-input row whose title is null, empty or only whitespace
OUTPUT_SCHEMA = (
    "status string, embedding array<float>, image_sha256 string, width int, height int, "
    "error_kind string, error_message string, etag string, last_modified string, fetched boolean, "
    "attempts int, next_retry_at timestamp, feature array<float>"
)
_COLUMNS = [
    "status",
    "embedding",
    "image_sha256",
    "width",
    "height",
    "error_kind",
    "error_message",
    "etag",  # with `last_modified`: the validators of a 200 answer (`fetched`), for the next run's request
    "last_modified",
    "fetched",
    "attempts",  # failed runs in a row, this one included
    "next_retry_at",  # when a failed http(s) image is tried again (null: the next run)
    "feature",  # with a head or fusion (`keep_features`): the backbone's vector, kept to re-derive without images
]
_DTYPES = {"width": "Int32", "height": "Int32", "attempts": "Int32", "fetched": "boolean"}


@dataclass(frozen=True)
class EmbedSettings:
    """What an executor needs to embed images (or titles); plain values so it pickles into the UDF."""

    model_name: str
    weights: str | None
    image_size: int | None  # None with a text model
    decode_size: int | None  # JPEGs decode at reduced scale down to this shorter side (image_size / crop fraction)
    crop_fraction: float | None  # the model's centre crop (`vision.to_pixels`); None with a text model
    batch_size: int | None  # None: the device's default (`device.default_batch_size`), resolved per task
    device: str
    max_pixels: int
    max_bytes: int
    decode_threads: int
    input: str = "image"  # `embed.input`: "image" or "image+title" (rows carry image URIs), "title" (titles)
    policy: ImagePolicy = ImagePolicy()  # where images may come from (`catalog.image_roots`, the catalog folder)
    fetch: FetchSettings | None = None  # how http(s) images are fetched; None: the catalog has none
    retry_delay_hours: float = 20.0  # `fetch.retry_delay_hours`
    runtime: str = "auto"  # `embed.runtime`, resolved per task with its device (`device.resolve_runtime`)
    head_root: str | None = None  # the output root whose `models/<head_version>` is the head (`model.head`)
    head_version: str | None = None  # None: the backbone's vectors are the embeddings
    title_weight: float | None = None  # `embed.title_weight` with `embed.input: image+title`, else None
    text_version: str | None = None  # the title model's version with `embed.input: image+title`
    image_dim: int | None = None  # the image vectors' dimension (the head's, else the model's)
    text_dim: int | None = None  # the title vectors' dimension with `embed.input: image+title`

    @property
    def backbone_version(self) -> str:
        """The version of the model's own vectors (`registry.model_version`), head or not."""
        return model_version(self.model_name, self.weights, self.image_size)

    @property
    def image_version(self) -> str:
        """The version of the image vectors: the backbone's, with the head's when there is one."""
        return versioned(self.backbone_version, self.head_version)

    @property
    def model_version(self) -> str:
        """What every embedding row's `model` says: the image vectors' version, fused with the titles' when
        `embed.input` is `image+title` (`fusion.fused_version`)."""
        if self.title_weight is None or self.text_version is None:
            return self.image_version
        return fused_version(self.image_version, self.title_weight, self.text_version)

    @property
    def keep_features(self) -> bool:
        """Whether the backbone's vectors are kept beside the embeddings (`features`): when the embeddings are
        not those vectors themselves (a head, or fusion with titles)."""
        return self.head_version is not None or self.title_weight is not None


class WorkRow(NamedTuple):
    """One catalog row as the task gets it: what to read, and what the last runs left about it."""

    uri: str | None
    known_sha: str | None  # sha256 of the bytes embedded last time with this model
    known_bad: str | None  # sha256 of the bytes that failed last time by their content alone
    etag: str | None  # validators of the bytes whose sha256 is `validated_sha` (one of the two above)
    last_modified: str | None
    validated_sha: str | None
    attempts: int | None  # failed runs in a row before this one


@dataclass
class _Loaded:
    """One image after the CPU-side work: either preprocessed pixels or the reason it failed."""

    sha256: str | None = None
    pixels: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    error: ImageError | None = None
    unchanged: bool = False
    still_failed: bool = False
    fetched: bool = False  # the bytes came with these validators (a 200 over http(s), or a local file's stat)
    etag: str | None = None
    last_modified: str | None = None


class TaskModel:
    """One task's device, inference batch size and model, each resolved when first needed.

    Rows whose bytes (or title) are unchanged, and rows that fail, never ask: a task with nothing to embed,
    which is most tasks of an unchanged night, neither imports torch nor loads the model.
    """

    def __init__(self, settings: EmbedSettings, gpu_addresses: Sequence[str] = (), cpus: int = 1):
        self.settings = settings
        self.loads = 0  # models this task loaded (0 when its reused worker had the model already)
        self._gpus, self._cpus = list(gpu_addresses), cpus

    @cached_property
    def device(self) -> torch.device:
        import torch

        # One torch thread per task core: with local[N], N single-threaded tasks beat one task with N threads.
        torch.set_num_threads(max(1, self._cpus))
        return resolve_device(self.settings.device, self._gpus)

    @cached_property
    def batch_size(self) -> int:
        return self.settings.batch_size or default_batch_size(self.device)

    @cached_property
    def head(self) -> Head | None:
        s = self.settings
        return None if s.head_version is None or s.head_root is None else get_head(s.head_root, s.head_version)

    @cached_property
    def embedder(self) -> Embedder | TextEmbedder:
        s = self.settings
        before = load_count()
        embedder = get_embedder(s.model_name, s.weights, self.device, s.image_size, s.runtime)
        self.loads = load_count() - before
        return embedder


def _load(row: WorkRow, settings: EmbedSettings, fetcher: Fetcher | None) -> _Loaded:
    """Read, hash and (unless the bytes are known, good or bad) decode and preprocess one image."""
    loaded = _Loaded()
    try:
        if row.uri is None or not row.uri.strip():
            raise ImageError("missing", "catalog row has no image_uri")
        got = read(row.uri, settings.max_bytes, settings.policy, fetcher, row.etag, row.last_modified)
        if got.data is None:  # 304, or a local file's stat unchanged: the validators name the bytes last seen
            loaded.sha256 = row.validated_sha
        else:
            loaded.sha256 = hashlib.sha256(got.data).hexdigest()
            loaded.fetched = is_http(row.uri) or got.etag is not None  # a local file's validator is kept too
            loaded.etag, loaded.last_modified = got.etag, got.last_modified
        if loaded.sha256 is not None and loaded.sha256 == row.known_sha:
            loaded.unchanged = True
            return loaded
        if loaded.sha256 is not None and loaded.sha256 == row.known_bad:
            loaded.still_failed = True
            return loaded
        assert got.data is not None  # the driver sends validators only for bytes known good or bad
        try:
            decoded = decode_image(got.data, settings.max_pixels, target_size=settings.decode_size)
        except ImageError as err:
            if err.kind == "not_an_image" and got.content_type:
                raise ImageError(err.kind, f"{err.message} (served as {got.content_type})") from None
            raise
        assert settings.image_size is not None and settings.crop_fraction is not None  # an image model's settings
        loaded.pixels = to_pixels(decoded.image, settings.image_size, settings.crop_fraction)
        loaded.width, loaded.height = decoded.width, decoded.height
    except ImageError as err:
        loaded.error = err
    return loaded


def _prefetch(submit: Callable[[T], Future[R]], items: Iterable[T], ahead: int) -> Iterator[R]:
    """The results of `submit(item)` in order, at most `ahead` items ahead of the consumer, so decoded pixels
    waiting for the model never hold more than that many images in memory, whatever the Arrow batch size."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(submit(item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class Readers:
    """A task's reading threads: `decode_threads` for files and object stores, `fetch.concurrency` (sharing
    one `Fetcher`) for http(s). Threads start on first use, so a catalog of files never starts a fetcher
    thread, and titles start none. `partition` is the task's: all but the stage's last may hand their slot
    over to another task (`fetcher.HostLimiter`)."""

    def __init__(self, settings: EmbedSettings, partition: int = 0):
        self.settings = settings
        self.fetcher = Fetcher(settings.fetch) if settings.fetch is not None else None
        self._hand_over = settings.fetch is not None and partition < settings.fetch.partitions - 1
        self._files = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="read")
        self._urls = ThreadPoolExecutor(
            max_workers=settings.fetch.concurrency if settings.fetch else 1, thread_name_prefix="fetch"
        )

    def submit(self, row: WorkRow) -> Future[_Loaded]:
        pool = self._urls if row.uri and is_http(row.uri) else self._files
        return pool.submit(_load, row, self.settings, self.fetcher)

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.shutdown(cancel_futures=True)
        self._urls.shutdown(cancel_futures=True)
        if self.fetcher is not None:
            self.fetcher.close(self._hand_over)


def _retry(row: WorkRow, retry_delay_hours: float, now: dt.datetime) -> dict:
    """A failing row's `attempts` (failed runs in a row) and, for an http(s) image, when it is tried next:
    later each time (`retry_delay_s`), to spare the host; a file is tried by every run."""
    attempts = (row.attempts or 0) + 1
    http = row.uri is not None and is_http(row.uri)
    return dict(
        attempts=attempts,
        next_retry_at=now + dt.timedelta(seconds=retry_delay_s(attempts, retry_delay_hours)) if http else None,
    )


def _failure(row: WorkRow, item: _Loaded, retry_delay_hours: float, now: dt.datetime) -> dict:
    """The output columns of a row whose image failed: KEPT when the failure may pass and the item has an
    embedding to keep."""
    assert item.error is not None
    kept = item.error.transient and row.known_sha is not None
    message = item.error.message + ("; its previous embedding is kept until the image can be read" if kept else "")
    return dict(
        status=KEPT if kept else FAILED,
        image_sha256=item.sha256,
        error_kind=item.error.kind,
        error_message=message,
        **_retry(row, retry_delay_hours, now),
    )


def embed_rows(work: Sequence[WorkRow], model: TaskModel, readers: Readers) -> pd.DataFrame:
    """One output row per input row, in order: status, embedding (when embedded), sha, size, error, the
    validators of a fetched image, and for failures their count and next retry time.

    A row's `known_sha` is the sha256 of the bytes embedded last time, `known_bad` that of the bytes that
    failed last time with a kind in SKIPPED_WHILE_UNCHANGED: either one unchanged means no decoding.

    The images to embed go to the model in full batches of `model.batch_size`, however many unchanged or
    failed rows lie between them.
    """
    now, delay_hours = dt.datetime.now(dt.UTC), model.settings.retry_delay_hours
    rows = [dict.fromkeys(_COLUMNS) for _ in work]  # None, not NaN: Arrow must see nulls in array and int columns
    ready: list[tuple[int, _Loaded]] = []

    def infer() -> None:
        embedder = model.embedder
        assert isinstance(embedder, Embedder)  # rows with images are embedded by an image model
        features = embedder.infer(embedder.batch([item.pixels for _, item in ready if item.pixels is not None]))
        head = model.head
        vectors = features if head is None else head.apply(features)
        for row, ((i, item), vector) in enumerate(zip(ready, vectors)):
            rows[i].update(
                status=EMBEDDED, embedding=vector, image_sha256=item.sha256, width=item.width, height=item.height
            )
            if model.settings.keep_features:
                rows[i]["feature"] = features[row]
        ready.clear()

    for i, item in enumerate(_prefetch(readers.submit, work, DECODE_AHEAD)):
        rows[i].update(fetched=item.fetched, etag=item.etag, last_modified=item.last_modified)
        if item.error is not None:
            rows[i].update(_failure(work[i], item, delay_hours, now))
        elif item.unchanged:
            rows[i].update(status=UNCHANGED, image_sha256=item.sha256)
        elif item.still_failed:
            # Its quarantine row stays; an http(s) one is tried again later than last time (stage `_commit`).
            rows[i].update(status=STILL_FAILED, image_sha256=item.sha256, **_retry(work[i], delay_hours, now))
        else:
            ready.append((i, item))
            if len(ready) == model.batch_size:
                infer()
    if ready:
        infer()
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=_COLUMNS).astype(_DTYPES)
    frame["next_retry_at"] = pd.to_datetime(frame["next_retry_at"], utc=True)
    return frame


def text_sha256(text: str) -> str:
    """The `image_sha256` of a title-input row: sha256 of the title's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _no_text_message(title: object) -> str:
    what = "null" if not isinstance(title, str) else "empty" if not title else f"only whitespace ({title!r})"
    return f"catalog row has no title text to embed: title is {what}"


def embed_titles(titles: Sequence[str | None], known_sha: Sequence[str | None], model: TaskModel) -> pd.DataFrame:
    """`embed_rows` for `embed.input: title`: one output row per title, in order, width and height null.

    The titles to embed go to the model in batches of `model.batch_size`, sorted by length first so that a
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
    embedder = model.embedder if todo else None
    for start in range(0, len(todo), model.batch_size):
        batch = todo[start : start + model.batch_size]
        assert embedder is not None and not isinstance(embedder, Embedder)  # titles go to a text model
        for (i, _), vector in zip(batch, embedder.embed([title for _, title in batch])):
            rows[i]["embedding"] = vector
    return _frame(rows)

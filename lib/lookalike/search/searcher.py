"""Search by image for a service: `Searcher.open(output_root)`, then `searcher.search(image, k)`.

No Spark in the serving process: the latest complete index build (`indexes/LATEST`) is read with FAISS, the
re-ranking vectors with delta-rs from `embeddings`, and the query image goes through the embed stage's own
reader, decoder and model (the build's, named by its `model` version), so a query is embedded exactly as the
catalog was. Every shard of the build is searched and the results merged by their exact cosine.

Filters (`where`) are SQL predicates over the catalog's columns (`search.filters`), given as the table the
searcher opens with (`catalog=`, re-read with every new build). The items a predicate keeps are cached per
build as a mask per shard, and every query still gets k results when k items match
(`LoadedShard.search`).

A `Searcher` is safe to share between threads. `refresh` (called by `search` at most every
`refresh_every_s`) notices a newer build and loads it completely before swapping one reference, so queries in
flight finish on the build they started with and none is dropped or sees half of each.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.json as pajson

from lookalike.config import SCHEMA
from lookalike.embed.decode import ImageError, decode_image
from lookalike.embed.models import cache, fusion, head, registry
from lookalike.embed.models.head import Head
from lookalike.embed.models.vision import Embedder
from lookalike.embed.reader import ImagePolicy, read_bytes
from lookalike.errors import LookalikeError
from lookalike.index import builds, shard_index
from lookalike.search.filters import CatalogFilter, FilterError
from lookalike.storage import tables
from lookalike.storage.uri import filesystem

_VERSION = re.compile(
    r"^(?P<backbone>(?P<name>[^@+]+)@[0-9a-f]+(?:/(?P<size>\d+)px)?)(?:\+head@(?P<head>[\w.-]+))?"
    r"(?:\+title@(?P<weight>[0-9.e-]+):(?P<text>[^@]+@[0-9a-f]+))?$"
)
MAX_BYTES: int = SCHEMA["embed.max_bytes"].default  # the embed stage's limits, at their defaults
MAX_PIXELS: int = SCHEMA["embed.max_pixels"].default
MASKS_KEPT = 64  # filters whose masks a build keeps; a service repeats a few (in stock, per category)


class SearchError(LookalikeError):
    """The searcher cannot serve: no build, a build whose model cannot be loaded here, or bad arguments."""


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float  # cosine of the query's embedding and the item's


@dataclass(frozen=True)
class _Shard:
    loaded: shard_index.LoadedShard
    vectors: np.ndarray  # the shard's embeddings in FAISS id order, for the exact re-rank


@dataclass(frozen=True)
class _Build:
    run_id: str
    model: str  # the build's model version
    dim: int
    embedder: Embedder | None  # None for a searcher of vectors only (`with_model=False`)
    head: Head | None  # the trained head the build's vectors went through, if any
    fusion: _Fusion | None  # with titles fused into the build's vectors
    decode_size: int  # JPEGs decode at reduced scale down to this, as in the embed stage
    shards: dict[str, _Shard]
    filter: CatalogFilter | None  # the catalog's columns, for `where`
    masks: dict[str, dict[str, np.ndarray]]  # where -> shard -> allowed FAISS ids, filled as filters come

    def allowed(self, where: str | None) -> dict[str, np.ndarray] | None:
        """Each shard's allowed FAISS ids under `where` (None: no filter)."""
        if where is None:
            return None
        if where not in self.masks:
            if self.filter is None:
                raise SearchError("this searcher has no catalog to filter on: open it with catalog=PATH")
            kept = self.filter.matching(where)
            if len(self.masks) >= MASKS_KEPT:
                self.masks.pop(next(iter(self.masks)))
            self.masks[where] = {
                name: pc.is_in(shard.loaded.item_ids, value_set=kept).to_numpy(zero_copy_only=False)
                for name, shard in self.shards.items()
            }
        return self.masks[where]


@dataclass(frozen=True)
class ModelVersion:
    """A `model` column value taken apart: `efficientnet-lite0@3f2a9c1b/112px+head@20261202T010000Z-3f2a9c`."""

    backbone: str  # the part `registry.model_version` gives
    name: str
    image_size: int | None
    head: str | None  # the head's version (`head.versioned`)
    title_weight: float | None = None  # with titles fused in (`fusion.fused_version`)
    text: str | None = None  # the title model's version then


@dataclass(frozen=True)
class _Fusion:
    """How a build's vectors fuse image and title parts (`models.fusion`)."""

    weight: float
    image_dim: int
    text_dim: int


def parse_model_version(version: str) -> ModelVersion:
    """The parts of a `model` version string: backbone name, input size, head."""
    match = _VERSION.match(version)
    if match is None:
        raise SearchError(f"model version {version!r} is not name@digest[/<size>px][+head@<version>][+title@...]")
    return ModelVersion(
        match["backbone"],
        match["name"],
        int(match["size"]) if match["size"] else None,
        match["head"],
        float(match["weight"]) if match["weight"] else None,
        match["text"],
    )


class Searcher:
    """Image search over the latest index build of one output root."""

    def __init__(
        self,
        output_root: str,
        weights: str | None,
        refresh_every_s: float,
        with_model: bool,
        catalog: str | pa.Table | None,
        catalog_format: str,
    ):
        self.output_root = output_root
        self._weights = weights
        self._with_model = with_model
        self._catalog, self._catalog_format = catalog, catalog_format
        self._refresh_every_s = refresh_every_s
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()  # one refresh at a time; searches never take it
        self._build = self._load(builds.latest_build(output_root))

    @classmethod
    def open(
        cls,
        output_root: str,
        weights: str | None = None,
        refresh_every_s: float = 10.0,
        with_model: bool = True,
        catalog: str | pa.Table | None = None,
        catalog_format: str = "parquet",
    ) -> Searcher:
        """The searcher of `output_root`'s latest build. `weights`: the weights file the build's model was
        embedded with, when it is not a packaged one (`model.weights`). `with_model=False` searches vectors
        only (`search_vectors`: the batch command embeds its queries in Spark). `catalog`: the catalog
        (a path or URI in `catalog_format`: parquet, csv, json or delta; or an Arrow table) whose columns
        `where` filters use; a path is re-read with every new build."""
        try:
            return cls(output_root, weights, refresh_every_s, with_model, catalog, catalog_format)
        except builds.IndexBuildError as err:
            raise SearchError(str(err)) from None

    @property
    def build(self) -> str:
        """The run id of the build searches use now."""
        return self._build.run_id

    @property
    def model(self) -> str:
        """The model version the build was embedded with; queries must be embedded with it too."""
        return self._build.model

    @property
    def dim(self) -> int:
        """The dimension of the build's vectors (of `search_vectors`' queries)."""
        return self._build.dim

    @property
    def shards(self) -> list[str]:
        return sorted(self._build.shards)

    def refresh(self) -> bool:
        """Switch to a newer build if `indexes/LATEST` names one; whether it switched."""
        with self._lock:
            self._checked_at = time.monotonic()
            latest = builds.latest_build(self.output_root)
            if latest == self._build.run_id:
                return False
            self._build = self._load(latest)  # one reference swap, after the whole build is loaded
            return True

    def search(self, image: bytes | str | os.PathLike[str], k: int = 10, where: str | None = None) -> list[Hit]:
        """The `k` catalog items most like `image` (its bytes, or a path or URI the embed stage could read),
        best first, among the items `where` (a SQL predicate over the catalog's columns) keeps. Raises
        ImageError for an unusable image, SearchError for a bad `k`, FilterError for a bad predicate."""
        if k < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        if time.monotonic() - self._checked_at >= self._refresh_every_s:
            self.refresh()
        build = self._build  # this query stays on this build, whatever a refresh does meanwhile
        _require_model(build)
        data = _read(image)
        allowed = build.allowed(where)  # a bad predicate fails before the image is decoded
        return _search(build, _embed(build, [data]), k, None, allowed)[0]

    def search_text(self, text: str, k: int = 10, where: str | None = None) -> list[Hit]:
        """The `k` catalog items whose images best fit `text` (e.g. "white leather trainers"): its
        all-MiniLM-L6-v2 vector through the text map `lookalike train` learned into the build's image space,
        and with image+title vectors against their titles too (`embed_text`). SearchError when the build has
        neither a head with a text map nor titles, or `text` is blank."""
        if k < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        if not text.strip():
            raise SearchError("search text is empty")
        build = self._build
        return _search(build, self.embed_text([text], build), k, None, build.allowed(where))[0]

    def embed_text(self, texts: Sequence[str], build: _Build | None = None) -> np.ndarray:
        """The vectors `search_text` queries with: titles' text vectors mapped into the build's image space."""
        build = build or self._build
        maps = build.head is not None and build.head.maps_text
        if not maps and build.fusion is None:
            raise SearchError(
                f"build {build.run_id} ({build.model}) has no text map: set model.head to a head trained with "
                "train.text_map (lookalike train), or embed.input to image+title, then embed and index again"
            )
        titles = cache.get_embedder(head.TEXT_MODEL).embed(list(texts))
        mapped = build.head.map_text(titles) if maps and build.head is not None else None
        if build.fusion is None:
            assert mapped is not None
            return mapped
        return fusion.text_query(titles, build.fusion.image_dim, build.fusion.weight, mapped)

    def image_queries(self, vectors: np.ndarray) -> np.ndarray:
        """Image vectors as the embed stage makes them (`embed_task`: through the head) -> the build's query
        vectors: themselves, or with titles fused into the build, their image part only."""
        fused = self._build.fusion
        return vectors if fused is None else fusion.image_query(vectors, fused.text_dim)

    def embed(self, images: Sequence[bytes | str | os.PathLike[str]]) -> np.ndarray:
        """The vectors `search` queries with for `images` (bytes, paths or URIs), one row each: the build's
        model after the embed stage's decoding. Raises ImageError for the first unusable image."""
        build = self._build
        _require_model(build)
        return _embed(build, [_read(image) for image in images])

    def search_vectors(
        self, queries: np.ndarray, k: int, shards: Iterable[str] | None = None, where: str | None = None
    ) -> list[list[Hit]]:
        """The `k` best items for each row of `queries` (unit vectors of the build's model), in `shards` only
        when given (names from `shards`), else in every shard; among the items `where` keeps when given."""
        if k < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        build = self._build
        return _search(build, np.asarray(queries, dtype=np.float32), k, shards, build.allowed(where))

    def _load(self, run_id: str) -> _Build:
        summary = builds.build_summary(self.output_root, run_id)
        parsed = parse_model_version(summary["model"])
        name, image_size = parsed.name, parsed.image_size
        spec = registry.get_spec(name)
        if spec.modality != "image" or image_size is None or spec.crop_fraction is None:
            raise SearchError(f"build {run_id} holds {summary['model']!r}, not an image model: it cannot search images")
        try:
            version = registry.model_version(name, self._weights, image_size)
        except (registry.ModelError, OSError) as err:
            raise SearchError(f"build {run_id}: cannot load its model {summary['model']!r}: {err}") from None
        trained = None
        if parsed.head is not None:
            try:
                trained = head.load(self.output_root, parsed.head)
            except head.HeadError as err:
                raise SearchError(f"build {run_id}: {err}") from None
        expected = head.versioned(version, parsed.head)
        fused = None
        if parsed.title_weight is not None:
            text = registry.get_spec(head.TEXT_MODEL)
            expected = fusion.fused_version(expected, parsed.title_weight, registry.model_version(text.name))
            image_dim = trained.dim if trained is not None else spec.dim
            fused = _Fusion(parsed.title_weight, image_dim, text.dim)
        if expected != summary["model"]:
            raise SearchError(
                f"build {run_id} was embedded with {summary['model']!r}, the weights here give {version!r}; "
                "open the searcher with the weights file the catalog was embedded with"
            )
        embedder = cache.get_embedder(name, self._weights, "cpu", image_size) if self._with_model else None
        rows = tables.read_arrow(
            tables.table_path(self.output_root, "embeddings"), columns=["item_id", "shard", "embedding"]
        )
        loaded, model, dim = {}, summary["model"], summary["dim"]
        for entry in summary["shards"]:
            shard = builds.load_shard(self.output_root, run_id, entry["shard"], model=model, dim=dim)
            members = rows.filter(pc.equal(rows["shard"], entry["shard"]))
            try:
                aligned = shard.align(members["item_id"], shard_index.matrix(members["embedding"], dim))
            except ValueError as err:
                why = f"the embeddings changed after build {run_id}: run `lookalike index`"
                raise SearchError(f"{err}; {why}") from None
            loaded[entry["shard"]] = _Shard(shard, aligned)
        catalog = self._catalog
        if isinstance(catalog, str):
            catalog = read_catalog(catalog, self._catalog_format)
        decode_size = math.ceil(image_size / spec.crop_fraction)
        filters = None if catalog is None else CatalogFilter(catalog)
        return _Build(run_id, model, dim, embedder, trained, fused, decode_size, loaded, filters, {})


def read_catalog(path: str, fmt: str) -> pa.Table:
    """The catalog as an Arrow table, without Spark: parquet (a file or folder), csv with a header, json
    lines, or a Delta table."""
    if fmt == "delta":
        return tables.read_arrow(path)
    if fmt not in ("parquet", "csv", "json"):
        raise SearchError(f"catalog format {fmt!r} is not parquet, csv, json or delta")
    fs, where = filesystem(path)
    try:
        if fmt == "parquet":
            return pads.dataset(where, filesystem=fs, format="parquet").to_table()
        with fs.open_input_stream(where) as stream:
            return pacsv.read_csv(stream) if fmt == "csv" else pajson.read_json(stream)
    except (OSError, pa.ArrowInvalid) as err:
        raise SearchError(f"cannot read the catalog {path} as {fmt}: {err}") from None


def _require_model(build: _Build) -> None:
    if build.embedder is None:
        raise SearchError("this searcher was opened with_model=False: it searches vectors only")


def _read(image: bytes | str | os.PathLike[str]) -> bytes:
    return image if isinstance(image, bytes) else read_bytes(os.fspath(image), MAX_BYTES, ImagePolicy())


def _embed(build: _Build, images: list[bytes]) -> np.ndarray:
    assert build.embedder is not None  # `_require_model` was called
    features = build.embedder.embed(
        [decode_image(data, MAX_PIXELS, target_size=build.decode_size).image for data in images]
    )
    vectors = features if build.head is None else build.head.apply(features)
    return vectors if build.fusion is None else fusion.image_query(vectors, build.fusion.text_dim)


def _search(
    build: _Build,
    queries: np.ndarray,
    k: int,
    shards: Iterable[str] | None,
    allowed: dict[str, np.ndarray] | None,
) -> list[list[Hit]]:
    names = sorted(build.shards) if shards is None else list(shards)
    found = []
    for name in names:
        shard = build.shards[name]
        mask = None if allowed is None else allowed[name]
        found.append((shard.loaded.item_ids, *shard.loaded.search(shard.vectors, queries, k, mask)))
    return [
        merge([(ids, scores[row : row + 1], faiss_ids[row : row + 1]) for ids, scores, faiss_ids in found], k)
        for row in range(len(queries))
    ]


def merge(per_shard: list[tuple[object, np.ndarray, np.ndarray]], k: int) -> list[Hit]:
    """The best `k` of every shard's (item ids, scores (1, k), FAISS ids (1, k)), by score; padding (-1) dropped."""
    hits = [
        Hit(item_ids[int(i)].as_py(), float(score))  # type: ignore[index]
        for item_ids, scores, ids in per_shard
        for score, i in zip(scores[0], ids[0])
        if i >= 0
    ]
    return sorted(hits, key=lambda hit: (-hit.score, hit.item_id))[:k]


__all__ = ["FilterError", "Hit", "ImageError", "SearchError", "Searcher", "merge", "parse_model_version"]

"""Configuration: one flat schema of dotted keys, YAML files, `--set key=value` overrides, validation.

Everything is checked before Spark starts, so a typo in a nightly config costs a one-line error instead of a
cluster allocation. The schema below is the single source of truth for defaults and their explanations:
docs/configuration.md is generated from it (`make docs`; a test fails when the file is stale).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lookalike.errors import LookalikeError
from lookalike.storage import uri


class ConfigError(LookalikeError, ValueError):
    """A configuration problem, with a one-line message that names the key or path."""


@dataclass(frozen=True)
class Key:
    """One configuration key: its type, default and the constraints checked before a run."""

    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    required: bool = False
    is_path: bool = False  # resolved to an absolute path; local paths are checked to exist when `must_exist`
    must_exist: bool = False
    minimum: float | None = None
    maximum: float | None = None
    item_type: builtins.type | None = None  # a list's items, a mapping's values (checked, numbers >= 0)


SCHEMA: dict[str, Key] = {
    "catalog.path": Key(
        str,
        None,
        "Catalog table: a file or folder (or URI) of items to embed.",
        required=True,
        is_path=True,
        must_exist=True,
    ),
    "catalog.format": Key(
        str,
        "parquet",
        "Format of `catalog.path`: parquet, csv, json or delta.",
        choices=("parquet", "csv", "json", "delta"),
    ),
    "catalog.image_roots": Key(
        list,
        None,
        "Prefixes (local folders or URI prefixes such as `s3a://bucket/images/`) that catalog images must lie "
        "under; anything else is quarantined as `forbidden`. Local ones are compared after resolving `..` and "
        "symlinks. Unset: any path or URI, except that a path under the catalog's own folder (every relative "
        "`image_uri`) must stay inside it.",
        nullable=True,
        is_path=True,
        item_type=str,
    ),
    "events.path": Key(
        str,
        None,
        "Interaction events (parquet) for `recommend`; unset skips recommendations.",
        nullable=True,
        is_path=True,
        must_exist=True,
    ),
    "output.root": Key(
        str,
        None,
        "Folder (or URI) under which `tables/`, `indexes/` and `export/` are written.",
        required=True,
        is_path=True,
    ),
    "spark.master": Key(str, None, "Spark master. Unset: the one spark-submit gives, else `local[*]`.", nullable=True),
    "spark.app_name": Key(
        str, "lookalike", "Spark application name (under spark-submit too, where it replaces `--name`)."
    ),
    "spark.driver_memory": Key(
        str, "4g", "Driver JVM heap (only applies when lookalike starts the JVM, not under spark-submit)."
    ),
    "spark.shuffle_partitions": Key(
        int, 16, "`spark.sql.shuffle.partitions`; adaptive execution coalesces small ones.", minimum=1
    ),
    "spark.tune_malloc": Key(
        bool,
        True,
        "Give Python workers glibc malloc settings (`MALLOC_MMAP_MAX_=0`, high trim "
        "threshold and top pad) that stop the allocator returning activation buffers"
        " to the OS every batch: about 3x CPU inference speed here. Set as "
        "`spark.executorEnv.*` on clusters too.",
    ),
    "spark.conf": Key(
        dict,
        {},
        "Extra Spark settings passed to the session verbatim, e.g. `{spark.executor.memory: "
        "8g}`. A `spark.pyspark.python` here also sets the executors' interpreter (see "
        "docs/cluster.md).",
    ),
    "export.keep": Key(int, 3, "Complete Parquet snapshots kept per exported table under `export/`.", minimum=1),
    "tables.keep_versions": Key(
        int,
        10,
        "Newest versions of each Delta table whose files are kept, so time travel to them works; after each "
        "commit, files only older versions (or crashed writes) need are deleted once "
        "`tables.vacuum_min_age_hours` old.",
        minimum=1,
    ),
    "tables.vacuum_min_age_hours": Key(
        int,
        1,
        "Safety margin of the clean-up after each commit: a file removed from a table, or written by a "
        "write that never committed, is deleted only when it has been so for this long (a reader of an older "
        "version or a write in progress may still need it).",
        minimum=0,
    ),
    "lock.stale_seconds": Key(
        float,
        600.0,
        "A run lock whose heartbeat (rewritten every 30 s) is older than this "
        "belongs to a dead run and is taken over; on the same host a lock whose "
        "process is gone is taken over at once.",
        minimum=60.0,
    ),
    "model.name": Key(str, "efficientnet-lite0", "Embedding model from the registry (see docs/stages.md, Models)."),
    "model.weights": Key(
        str,
        None,
        "Local weights file, for registry models that take one (torchvision architectures).",
        nullable=True,
        is_path=True,
        must_exist=True,
    ),
    "model.head": Key(
        str,
        "none",
        "Trained head applied to the backbone's vectors (docs/training.md): `none`, `latest` (the newest under "
        "`<output.root>/models/`, none before the first `lookalike train`), or a version name. Image input only; "
        "a head trained on another backbone is refused. Changing it re-derives every embedding from the stored "
        "backbone vectors, not from the images.",
    ),
    "embed.batch_size": Key(
        int,
        None,
        "Images (or titles) per inference batch; unset: 16 on the CPU (a batch's "
        "activations stay in cache: 1.2x faster than 64 at 112 px), 256 on a GPU.",
        nullable=True,
        minimum=1,
    ),
    "embed.image_size": Key(
        int,
        None,
        "Model input size in pixels; unset uses the model's own size (224 for lite0). Image models only.",
        nullable=True,
        minimum=16,
    ),
    "embed.input": Key(
        str,
        "image",
        "What the embed stage embeds: `image` (each item's `image_uri`, with an image "
        "model), `title` (its `title` text, with the text model `all-minilm-l6-v2`; "
        "see docs/stages.md, Text input), or `image+title` (one vector of both, weighted by "
        "`embed.title_weight`; see docs/stages.md, Image and title).",
        choices=("image", "title", "image+title"),
    ),
    "embed.title_weight": Key(
        float,
        0.3,
        "With `embed.input: image+title`: the share of two items' cosine that comes from their titles "
        "(the rest from their images). An item without a usable title compares on its image alone, one whose "
        "image fails on its title alone.",
        minimum=0.0,
        maximum=1.0,
    ),
    "embed.device": Key(
        str,
        "auto",
        "Where inference runs: `auto` (the task's GPU when Spark gives one, else CPU), "
        "`cpu`, or `cuda` (fail without a GPU).",
        choices=("auto", "cpu", "cuda"),
    ),
    "embed.runtime": Key(
        str,
        "auto",
        "What runs an image model: `auto` (ONNX Runtime on the CPU, torch on a GPU), `torch`, or `onnx` "
        "(ONNX Runtime; refused on a GPU). Embeddings agree to 1e-6 (see docs/stages.md, Runtimes).",
        choices=("auto", "torch", "onnx"),
    ),
    "embed.partition_size": Key(int, 1000, "Catalog items per Spark task (at least two tasks per core).", minimum=1),
    "embed.decode_threads": Key(
        int, 2, "Threads per task that read, decode and preprocess images ahead of inference.", minimum=1
    ),
    "embed.max_pixels": Key(
        int,
        100_000_000,
        "Images whose header claims more pixels are quarantined as `too_large` before decoding (decompression bombs).",
        minimum=1,
    ),
    "embed.max_bytes": Key(
        int, 64 * 1024 * 1024, "Image files larger than this (64 MiB) are quarantined as `too_large`.", minimum=1
    ),
    "embed.max_removed_fraction": Key(
        float,
        0.2,
        "The run stops, committing nothing, when it would remove more than this share of `embeddings` (items "
        "gone from the catalog, or whose images no longer embed): a truncated feed must not empty the tables. "
        "Checked before any inference and again before the commit. For a real catalog clean-up, run once with "
        "`--set embed.max_removed_fraction=1`.",
        minimum=0.0,
        maximum=1.0,
    ),
    "embed.max_bad_fraction": Key(
        float,
        0.2,
        "The run stops, committing nothing, when more than this share of the catalog's images fails in this "
        "run (a broken mount must not empty the table). Counted against every image: tried, unchanged, and "
        "still failing with the same bytes (those are not decoded again and do not count as failures).",
        minimum=0.0,
        maximum=1.0,
    ),
    "embed.retry_failed": Key(
        bool,
        False,
        "Embed only the catalog items now in `quarantine`, whatever their next retry time; every other item is "
        "left as it is. Set by `lookalike embed --retry-failed`; not meant for a nightly config.",
    ),
    "fetch.max_requests_per_host_per_s": Key(
        float,
        10.0,
        "Requests per second that the whole job sends to one host (scheme, name and port) for http(s) images, "
        "shared among the tasks that run at once (docs/fetching.md).",
        minimum=0.001,
    ),
    "fetch.max_connections_per_host": Key(
        int,
        4,
        "Connections (requests in flight) that the whole job keeps open to one host, shared among the tasks "
        "that run at once; each task keeps at least one.",
        minimum=1,
    ),
    "fetch.timeout_s": Key(
        float,
        10.0,
        "Seconds to connect, and to wait for each read, of an http(s) image; the whole answer must arrive "
        "within 4 times this.",
        minimum=0.001,
    ),
    "fetch.retries": Key(
        int,
        3,
        "Retries within a run of a transient http(s) failure (5xx, 408, 429, timeout, reset, short body), with "
        "exponential backoff and jitter; 429 and 503 wait for their `Retry-After` instead (up to 60 s).",
        minimum=0,
    ),
    "fetch.concurrency": Key(
        int, 16, "http(s) requests in flight per task (its reading threads for URLs).", minimum=1, maximum=256
    ),
    "fetch.max_redirects": Key(int, 5, "Redirects followed per image; a loop fails at once.", minimum=0),
    "fetch.user_agent": Key(
        str,
        "lookalike/0.1 (image similarity batch job)",
        "`User-Agent` of every http(s) request: name your crawler and a contact, as hosts ask.",
    ),
    "fetch.ca_bundle": Key(
        str,
        None,
        "PEM file of the certificate authorities trusted for https images, instead of the system's (for a "
        "private CA or a test server). Certificates are always verified.",
        nullable=True,
        is_path=True,
        must_exist=True,
    ),
    "fetch.retry_delay_hours": Key(
        float,
        20.0,
        "A failed http(s) image is tried again by the first run this long after it failed, then after twice "
        "as long per further failed run, up to 30 days; `--retry-failed` tries now.",
        minimum=0.0,
    ),
    "search.queries": Key(
        str,
        None,
        "Query table of `lookalike search` (set by `--queries`): `query_id` (required, unique), `image_uri` "
        "(required), `category` (optional: search only the shards of that `index.shard_by` value), `k` "
        "(optional, else `search.k`).",
        nullable=True,
        is_path=True,
        must_exist=True,
    ),
    "search.text": Key(
        list,
        None,
        "Words to search the catalog's images by (set by `--text`, repeatable): each text's results go to "
        "`search_results` under `query_id` `text:<the text>`. Needs a build embedded with a head that has a "
        "text map, or with `embed.input: image+title` (docs/training.md).",
        nullable=True,
        item_type=str,
    ),
    "search.queries_format": Key(
        str,
        "parquet",
        "Format of `search.queries`: parquet, csv, json or delta.",
        choices=("parquet", "csv", "json", "delta"),
    ),
    "search.k": Key(int, 10, "Results per query of `lookalike search` when the query has no `k`.", minimum=1),
    "search.duplicate_score": Key(
        float,
        0.94,
        "Cosine at or above which a search result is flagged `duplicate` (a re-uploaded listing photo: cropped, "
        "rescaled, recompressed) and the similar stage lists two catalog items in `duplicates` as `near`. "
        "Calibrated by benchmarks/search_quality.py (docs/benchmarks.md): it depends on the model.",
        minimum=-1.0,
        maximum=1.0,
    ),
    "search.where": Key(
        str,
        None,
        "SQL predicate over the catalog's columns that every result of `lookalike search` must satisfy (set by "
        "`--where`), e.g. `in_stock AND category = 'shoes'`; each query still gets k results when k items match. "
        "Evaluated by DuckDB; `in_stock` reads as in the pipeline (missing or null = in stock).",
        nullable=True,
    ),
    "index.shard_by": Key(str, "category", "Catalog column whose values name the index shards."),
    "index.max_shard_size": Key(
        int, 200_000, "Shards with more items are split into hash sub-shards (`value#00`, `value#01`, ...).", minimum=2
    ),
    "index.flat_below": Key(
        int,
        32_768,
        "Shards with fewer items get exact (Flat) search instead of IVF-PQ (PQ "
        "codebooks train poorly on fewer points).",
        minimum=1,
    ),
    "index.target_recall": Key(
        float,
        0.95,
        "nprobe (then re-ranked candidates) is raised per shard until recall@10 "
        "against exact search reaches this; the manifest says when it cannot.",
        minimum=0.0,
        maximum=1.0,
    ),
    "index.exact_fallback": Key(
        bool,
        True,
        "Build a shard Flat (exact) when its tuned IVF-PQ search measured no faster than exact search on the "
        "same queries (little cluster structure); the manifest's `considered` and `choice` say what was timed.",
    ),
    "index.update_max_drift": Key(
        float,
        0.1,
        "A changed IVF-PQ shard reuses the previous build's trained quantizers (re-adding its vectors, re-tuning) "
        "while its vectors' PQ quantization error is at most this fraction above the one measured at training; "
        "past it, or with null, it trains afresh (docs/stages.md, Updates).",
        nullable=True,
        minimum=0.0,
    ),
    "index.reduce_dim": Key(
        int,
        None,
        "Rotate and reduce vectors to this dimension (OPQ) before PQ; unset keeps the "
        "full dimension with a random rotation.",
        nullable=True,
        minimum=4,
    ),
    "index.keep_builds": Key(
        int, 3, "Complete index builds kept under `indexes/` (older and incomplete ones are removed).", minimum=1
    ),
    "similar.k": Key(int, 10, "Neighbours kept per item in `similar_items`.", minimum=1),
    "similar.scope": Key(
        str,
        "shard",
        "Where an item's neighbours come from: `shard` (its own index shard) or `all` (every shard, merged by score).",
        choices=("shard", "all"),
    ),
    "similar.min_score": Key(
        float,
        None,
        "Neighbours with a lower cosine are left out, so an item may get fewer than"
        " `k`; unset keeps the k best whatever their score.",
        nullable=True,
        minimum=-1.0,
        maximum=1.0,
    ),
    "similar.in_stock_only": Key(
        bool,
        False,
        "Only in-stock catalog items (the catalog's `in_stock`) become neighbours; every item still gets its own list.",
    ),
    "similar.exclude_duplicates": Key(
        bool,
        True,
        "Items with identical image bytes (`image_sha256`) are not each "
        "other's neighbours; they are listed in `duplicates` either way.",
    ),
    "similar.chunk_size": Key(
        int,
        10_000,
        "Most queries per Spark task: a big shard's queries are split "
        "into chunks of about this many items (fewer when that would leave "
        "a core without two tasks).",
        minimum=1,
    ),
    "recommend.n": Key(int, 10, "Recommendations kept per user.", minimum=1),
    "recommend.event_weights": Key(
        dict,
        {"view": 1.0, "cart": 3.0, "purchase": 5.0},
        "Weight of each `event_type` in a user's taste, in co-visitation and in "
        "popularity. Types not listed are ignored and named in the log.",
        item_type=float,
    ),
    "recommend.half_life_days": Key(
        float,
        30.0,
        "An event's weight halves every this many days of age, counted from "
        "the newest event in `events` (not the wall clock, so re-runs "
        "agree); unset: no decay.",
        nullable=True,
        minimum=0.001,
    ),
    "recommend.max_interests": Key(
        int,
        3,
        "Most interest vectors per user. A history with several distinct tastes is"
        " clustered; each taste searches its own shards and gets a share of the "
        "list by its weight.",
        minimum=1,
    ),
    "recommend.covisit_weight": Key(
        float,
        0.5,
        "Blend of co-visitation (1) and visual similarity (0) in `score`. "
        "Items nobody co-visited compete on looks alone.",
        minimum=0.0,
        maximum=1.0,
    ),
    "recommend.exclude_events": Key(
        list,
        ["view", "cart", "purchase"],
        "Items a user has events of these types for are never recommended to "
        "them. Drop `purchase` for repeat-purchase catalogs, `view` to let viewed "
        "items come back.",
        item_type=str,
    ),
    "recommend.in_stock_only": Key(
        bool, True, "Only in-stock catalog items are recommended (the catalog's `in_stock`)."
    ),
    "recommend.history_limit": Key(
        int,
        10,
        "A user's heaviest items (most recent among equal weights) that shape "
        "their taste and candidates: recent intent predicts the next interaction "
        "best.",
        minimum=1,
    ),
    "recommend.covisit_history": Key(
        int,
        200,
        "A user's heaviest items that count for co-visitation pairs: long, "
        "since co-visitation learns from everyone (bounds the pairs per user).",
        minimum=2,
    ),
    "recommend.candidates": Key(
        int,
        100,
        "Candidates each interest asks its shards for, and co-visited candidates "
        "kept per user, before the rules and ranking.",
        minimum=1,
    ),
    "recommend.covisit_neighbours": Key(int, 50, "Most co-visited items kept per item.", minimum=1),
    "recommend.because": Key(int, 3, "History items named in `because`.", minimum=1),
    "recommend.chunk_size": Key(
        int, 5000, "Users per scoring task (fewer when that would leave a core without two tasks).", minimum=1
    ),
    "recommend.incremental": Key(
        bool,
        True,
        "Recompute only the users whose history, candidates or stock changed since the last run and keep the "
        "others' lists (docs/stages.md); false: every user on every run that has anything to do.",
    ),
    "train.label_columns": Key(
        list,
        ["category"],
        "Catalog columns whose values label items for `lookalike train` (items with the same value should look "
        "alike); a null label adds nothing, a column with under two values is ignored; `[]` learns from "
        "behaviour alone.",
        item_type=str,
    ),
    "train.behaviour_weight": Key(
        float,
        0.5,
        "Weight of shoppers' behaviour (items viewed or bought in one session) against the labels in the loss; "
        "0 ignores `events`.",
        minimum=0.0,
    ),
    "train.session_gap_minutes": Key(
        float, 30.0, "Events of one user further apart than this belong to different sessions.", minimum=0.0
    ),
    "train.pair_window": Key(
        int,
        5,
        "Each event is paired with the next this-many events of its session (nearest in time; long sessions drift).",
        minimum=1,
    ),
    "train.schedule": Key(
        str,
        "never",
        "When `nightly` trains a new head before embedding: `never` (only `lookalike train`), `nightly`, "
        "`weekly` or `monthly` (when the newest head is older than that, or there is none).",
        choices=("never", "nightly", "weekly", "monthly"),
    ),
    "train.kind": Key(
        str, "linear", "The head: `linear` or `mlp` (one hidden ReLU layer of `train.dim`).", choices=("linear", "mlp")
    ),
    "train.dim": Key(int, 256, "Dimension of the head's output vectors (what the index stores).", minimum=8),
    "train.loss": Key(
        str,
        "supcon",
        "Metric-learning loss over labels: `supcon` (supervised contrastive, in-batch) or `proxy` (one learned "
        "proxy per label value, normalised softmax); see docs/benchmarks.md, Training.",
        choices=("supcon", "proxy"),
    ),
    "train.temperature": Key(float, 0.1, "Softmax temperature of every training loss.", minimum=0.001),
    "train.max_epochs": Key(int, 40, "Passes over the training items at most.", minimum=1),
    "train.patience": Key(int, 4, "Stop after this many epochs without a better validation loss.", minimum=1),
    "train.validation_fraction": Key(
        float, 0.1, "Share of items (and pairs) held out to stop early and to report.", minimum=0.01, maximum=0.5
    ),
    "train.max_items": Key(
        int, 200000, "Items trained on at most (a seeded sample beyond; 5 KB of vectors each in memory).", minimum=10
    ),
    "train.text_map": Key(
        str,
        "contrastive",
        "How titles are mapped into the image space for `search --text`: `contrastive` (a linear map trained "
        "with InfoNCE from the ridge solution), `ridge` (closed-form ridge regression from all-MiniLM-L6-v2 "
        "vectors), or `none`.",
        choices=("ridge", "contrastive", "none"),
    ),
    "train.text_pairs": Key(
        int, 20000, "(title, image) pairs the text map learns from at most (a seeded sample).", minimum=10
    ),
    "train.seed": Key(int, 0, "Seed of the sampling, splits and initial weights of `lookalike train`."),
    "report.items": Key(
        int, 8, "Sample items the report shows with their neighbours (spread over categories).", minimum=1, maximum=200
    ),
    "report.users": Key(
        int, 6, "Sample users the report shows with their recent history and recommendations.", minimum=1, maximum=200
    ),
    "report.examples": Key(
        int,
        5,
        "Duplicate groups, and quarantine rows per error kind, shown as examples in the report.",
        minimum=1,
        maximum=100,
    ),
    "report.runs": Key(int, 10, "Most recent runs listed in the report.", minimum=1, maximum=1000),
    "report.thumbnail_px": Key(
        int,
        96,
        "Longest side of the thumbnails embedded in the report (never enlarged; the page scales small images up).",
        minimum=16,
        maximum=512,
    ),
}


class Config(Mapping[str, Any]):
    """Validated configuration, read by dotted key: `cfg["embed.batch_size"]`."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise KeyError(f"unknown config key {key!r}")
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A new validated config with some keys replaced (used by tests and by stages that derive configs)."""
        merged = dict(self._values)
        merged.update(overrides)
        return validate(merged, base_dir=Path.cwd())


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML mappings to dotted keys; `spark.conf` stays a mapping because it is one value."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and key not in SCHEMA:
            flat.update(_flatten(value, prefix=f"{key}."))
        else:
            flat[key] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`dotted.key=value` with the value read as a YAML scalar, so `--set embed.batch_size=32` is an int."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    # A function of its own so that the checks after it still see `value` as Any, not as `object`.
    return isinstance(value, types)


def _check_type(key: str, spec: Key, value: Any) -> Any:
    if value is None:
        if spec.nullable or (spec.default is None and not spec.required):
            return None
        raise ConfigError(f"{key}: must be set")
    expected = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is an int subclass in Python; a YAML `true` for an int key is a mistake, not a 1.
    if isinstance(value, bool) and bool not in expected:
        raise ConfigError(f"{key}: expected {_type_name(spec)}, got {value!r}")
    if not _is_instance(value, expected):
        raise ConfigError(f"{key}: expected {_type_name(spec)}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    if spec.item_type is not None:
        _check_items(key, spec.item_type, value)
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"{key}: must be >= {spec.minimum}, got {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"{key}: must be <= {spec.maximum}, got {value!r}")
    return value


def _check_items(key: str, item_type: type, value: list | dict) -> None:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for name, item in items:
        ok = (
            isinstance(item, (int, float)) and not isinstance(item, bool) and item >= 0
            if item_type is float
            else isinstance(item, item_type)
        )
        if not ok:
            expected = "a number >= 0" if item_type is float else _type_name(Key(item_type, None, ""))
            raise ConfigError(f"{key}: {name!r} must be {expected}, got {item!r}")


def _type_name(spec: Key) -> str:
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


def _resolve_path(key: str, value: str, base_dir: Path) -> str:
    """A local path or `file:` URI (escapes decoded: `file:///a%20b` is `/a b`) as an absolute path; other
    URIs as they are."""
    if not uri.is_local(value):
        return value
    try:
        local = uri.file_uri_path(value) if value.startswith("file:") else value
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    path = Path(local).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return str(path.resolve())


# The paths Spark reads (the catalog, the events, and everything under output.root), and whether delta-rs opens
# tables there too.
_DATA_PATHS = {"catalog.path": False, "events.path": False, "output.root": True}


def _check_path_characters(checked: Mapping[str, Any]) -> None:
    """Refuse a local data path that holds a character Spark or delta-rs cannot take (`[`, `%41`, ...)
    with one line naming the key and the character, instead of a traceback from deep inside a stage."""
    for key, holds_tables in _DATA_PATHS.items():
        value = checked[key]
        if value is None:
            continue
        delta = holds_tables or (key == "catalog.path" and checked["catalog.format"] == "delta")
        problem = (uri.delta_problem(value) if delta else None) or uri.spark_pattern_problem(value)
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")


def validate(values: Mapping[str, Any], base_dir: Path, need_paths: Iterable[str] | None = None) -> Config:
    """Check every key against SCHEMA and fill defaults.

    `need_paths` limits the existence checks to the inputs the command actually reads (the demo-data command
    needs no catalog); `None` checks them all. Relative paths resolve against `base_dir` (the working folder).
    """
    unknown = sorted(set(values) - set(SCHEMA))
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    checked: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        value = values.get(key, spec.default)
        if value is None and spec.required:
            raise ConfigError(f"{key}: required but not set")
        value = _check_type(key, spec, value)
        if spec.is_path and value is not None:
            value = (
                [_resolve_path(key, v, base_dir) for v in value]
                if isinstance(value, list)
                else _resolve_path(key, value, base_dir)
            )
        checked[key] = value
    _check_path_characters(checked)
    for key in SCHEMA if need_paths is None else need_paths:
        spec, value = SCHEMA[key], checked.get(key)
        if spec.must_exist and value is not None and uri.is_local(value) and not os.path.exists(value):
            raise ConfigError(f"{key}: path does not exist: {value}")
    _check_model(checked["model.name"], checked["embed.input"], checked["model.weights"])
    if checked["model.head"] != "none" and checked["embed.input"] == "title":
        raise ConfigError(
            f"model.head is {checked['model.head']!r} but embed.input is {checked['embed.input']!r}: "
            "a head tunes image vectors; set model.head: none"
        )
    return Config(checked)


# What each `embed.input` reads, as the model registry's `ModelSpec.modality` names it.
_INPUT_MODALITY = {"image": "image", "title": "text", "image+title": "image"}


def _check_model(model_name: str, embed_input: str, weights: str | None) -> None:
    """model.name must be a registry model that reads what embed.input gives it (an image or a title), with
    model.weights set where the model has no packaged weights: refused here, before Spark starts, rather
    than in every task."""
    from lookalike.embed.models import registry  # imports neither torch nor Spark

    try:
        spec = registry.get_spec(model_name)
    except registry.ModelError as err:
        raise ConfigError(f"model.name: {err}") from None
    wanted = _INPUT_MODALITY[embed_input]
    if spec.modality != wanted:
        article = {"image": "an image", "text": "a text"}
        fitting = [name for name in registry.MODEL_NAMES if registry.get_spec(name).modality == wanted]
        other_input = next(name for name, modality in _INPUT_MODALITY.items() if modality == spec.modality)
        raise ConfigError(
            f"embed.input is {embed_input!r} but model.name {model_name!r} is {article[spec.modality]} model; "
            f"with embed.input: {embed_input} use {article[wanted]} model ({', '.join(fitting[:3])}"
            f"{', ...' if len(fitting) > 3 else ''}), or set embed.input: {other_input}"
        )
    if spec.needs_weights_file and weights is None:
        raise ConfigError(
            f"model.weights: {model_name} has no packaged weights; set model.weights to a local "
            "state_dict file saved with torch.save(model.state_dict(), path) (nothing is "
            "downloaded at run time)"
        )


def load(
    conf_file: str | os.PathLike[str] | None, overrides: Iterable[str] = (), need_paths: Iterable[str] | None = None
) -> Config:
    """Read a YAML config file, apply `--set` overrides and validate the result."""
    tree: dict[str, Any] = {}
    if conf_file is not None:
        path = Path(conf_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} is not valid YAML") from err
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = dict(loaded or {})
    flat = _flatten(tree)
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
    return validate(flat, base_dir=Path.cwd(), need_paths=need_paths)


REFERENCE_INTRO = """\
YAML, one section per stage (see `conf/local.yaml`, which runs on one machine over the demo data with no edits).
Relative paths resolve against the folder `lookalike` is started from. `--set dotted.key=value` overrides any
key (the value is read as YAML). Unknown keys, wrong types and missing input paths stop the command before
Spark starts with one line naming the key or path."""


def _default_text(spec: Key) -> str:
    if spec.required:
        return "required"
    if spec.default is None:
        return "unset"
    value = yaml.safe_dump(spec.default, default_flow_style=True, width=1000).strip().removesuffix("\n...")
    return f"`{value.removesuffix(' ...').strip()}`"


def reference_markdown() -> str:
    """docs/configuration.md: every key of SCHEMA with its default, constraints and meaning, so defaults and
    explanations are typed once, here (`make docs` writes it; a test fails when the file is stale)."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from lookalike.config.SCHEMA by `make docs`: edit the schema, not this file. -->",
        "",
        REFERENCE_INTRO,
    ]
    section = None
    for key, spec in SCHEMA.items():
        prefix = key.split(".", 1)[0]
        if prefix != section:
            section = prefix
            lines += ["", f"## {prefix}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        limits = []
        if spec.choices is not None:
            limits.append("one of " + ", ".join(f"`{choice}`" for choice in spec.choices))
        if spec.minimum is not None:
            limits.append(f">= {spec.minimum:g}")
        if spec.maximum is not None:
            limits.append(f"<= {spec.maximum:g}")
        meaning = " ".join(spec.help.split()) + (f" ({'; '.join(limits)})" if limits else "")
        kind = _type_name(spec).replace("a string", "string").replace("an integer", "integer")
        kind = kind.replace("a number", "number").replace("a mapping", "mapping").replace("a list", "list")
        meaning = meaning.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {_default_text(spec)} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(reference_markdown())

"""Planning the similar stage as pure functions: which shards to recompute ("Incremental" in
`lookalike.similar.stage`), and how the searches are cut into units and Spark tasks ("Work layout")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lookalike.config import Config

STATE_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """The config that decides the table's content; a change recomputes every shard."""

    k: int
    scope: str
    min_score: float | None
    in_stock_only: bool
    exclude_duplicates: bool

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        return cls(
            k=cfg["similar.k"],
            scope=cfg["similar.scope"],
            min_score=cfg["similar.min_score"],
            in_stock_only=cfg["similar.in_stock_only"],
            exclude_duplicates=cfg["similar.exclude_duplicates"],
        )


@dataclass(frozen=True, order=True)
class Unit:
    """Search the queries of one staged chunk of `source` against the index of `target`."""

    target: str
    source: str
    chunk: int
    size: int


def changed_shards(
    previous: Mapping[str, Any] | None, fingerprints: Mapping[str, str], settings: Settings, table_version: int | None
) -> set[str]:
    """The shards whose `similar_items` rows must be recomputed (module docstring, "Incremental")."""
    everything = set(fingerprints)
    if (
        previous is None
        or previous.get("version") != STATE_VERSION
        or previous["settings"] != asdict(settings)
        or table_version is None
        or previous["table_version"] != table_version
    ):
        return everything
    changed = {shard for shard, fp in fingerprints.items() if previous["shards"].get(shard) != fp}
    if settings.scope == "all" and (changed or set(previous["shards"]) != everything):
        return everything
    return changed


def plan_units(chunk_sizes: Mapping[str, Mapping[int, int]], targets: list[str], scope: str) -> list[Unit]:
    """Every (target, query chunk) pair to search, sorted by target so that a worker reuses a loaded shard."""
    return sorted(
        Unit(target, source, chunk, size)
        for source, chunks in chunk_sizes.items()
        for chunk, size in chunks.items()
        for target in (targets if scope == "all" else [source])
    )


def task_size(chunk_size: int, queries: int, targets_per_query: int, parallelism: int) -> int:
    """Searches per task: `similar.chunk_size`, or fewer when that would leave a core idle, so that every
    core gets about two tasks (a small catalog is not one task on one core)."""
    return max(1, min(chunk_size, math.ceil(queries * targets_per_query / (2 * parallelism))))


def pack(units: list[Unit], per_task: int) -> list[list[Unit]]:
    """Consecutive units grouped into tasks of about `per_task` queries: a big chunk is a task of its
    own, many small shards share one, so that a catalog of tiny categories does not pay one task each."""
    tasks: list[list[Unit]] = []
    size = per_task
    for unit in units:
        if size + unit.size > per_task:
            tasks.append([])
            size = 0
        tasks[-1].append(unit)
        size += unit.size
    return tasks


def fingerprint(vectors_sha256: str, count: int, digest: str) -> str:
    """What a shard's rows depend on: the vectors its index was built from and its rows in `embeddings`."""
    return f"{vectors_sha256}:{count}:{digest}"

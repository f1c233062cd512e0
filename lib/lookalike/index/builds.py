"""Index builds as the stages that search them see them: `indexes/<run_id>/` folders behind `indexes/LATEST`.

The index stage writes builds; the similar and recommend stages read the latest one through this module:
which build is current, its summary, whether it was made from the current embeddings, and one shard of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lookalike.embed import shards
from lookalike.errors import LookalikeError
from lookalike.index import shard_index
from lookalike.storage import files, published

BUILD_SUMMARY = "build.json"
"""Written into a build's folder after all its shards: the marker of a complete build."""


class IndexBuildError(LookalikeError):
    """No usable index build: none published yet, or one built for other embeddings."""


class StaleIndexError(IndexBuildError):
    """The latest index build does not match the current embeddings: `lookalike index` must run first."""


def indexes_root(output_root: str) -> str:
    return f"{output_root.rstrip('/')}/indexes"


def latest_build(output_root: str) -> str:
    """The run id of the newest complete build, from `indexes/LATEST`."""
    build = published.latest(indexes_root(output_root))
    if build is None:
        raise IndexBuildError(f"no index build published under {indexes_root(output_root)} (run `lookalike index`)")
    return build


def build_summary(output_root: str, run_id: str) -> dict:
    """The summary of one complete build: its model, dimension and one entry per shard."""
    return files.read_json(f"{indexes_root(output_root)}/{run_id}/{BUILD_SUMMARY}")


def check_fresh(
    counts: Mapping[str, int], models: Iterable[str], summary: Mapping[str, Any], build: str, then: str
) -> None:
    """Refuse a build made for other embeddings: another model, or a shard whose item count differs from
    `counts` (items per shard in `embeddings` now). `then` names the command to re-run afterwards."""
    fix = f"re-run `lookalike index` (after `lookalike embed`), then `{then}`"
    models = sorted(set(models))
    if models != [summary["model"]]:
        raise StaleIndexError(
            f"embeddings hold model(s) {models}, index build {build} was made for {summary['model']!r}; {fix}"
        )
    built = {entry["shard"]: entry["ntotal"] for entry in summary["shards"]}
    for shard in sorted(set(counts) | set(built)):
        have, indexed = counts.get(shard, 0), built.get(shard, 0)
        if have != indexed:
            raise StaleIndexError(
                f"shard {shard!r} has {have} items in embeddings but {indexed} in index build "
                f"{build}: embeddings changed since the index was built; {fix}"
            )


def load_shard(output_root: str, run_id: str, shard: str, *, model: str, dim: int) -> shard_index.LoadedShard:
    """One shard of a build, checked against the model and dimension of the embeddings it will search."""
    try:
        return shard_index.load(
            f"{indexes_root(output_root)}/{run_id}/{shards.folder_name(shard)}", expected_dim=dim, expected_model=model
        )
    except ValueError as err:
        raise IndexBuildError(f"{err}; re-run `lookalike index` after `lookalike embed`") from err


@dataclass(frozen=True)
class SearchJob:
    """What a task searching one index build needs, as plain values pickled into its closure; the similar and
    recommend stages extend it with their own settings."""

    output_root: str
    build: str
    model: str
    dim: int
    staging: str  # the run's staged rows: a worker's cached shard is only good for the run that staged it

    def cache_key(self, shard: str) -> tuple[str, str, str]:
        """The key of `shard` in `distributor.worker_cached`: its build and the run's staged rows."""
        return (self.build, shard, self.staging)

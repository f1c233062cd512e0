"""The index stage: `embeddings` -> one FAISS index per shard under `indexes/<run_id>/`, then `LATEST`.

Driver side only. Spark groups the embeddings by shard and hands each shard to one task
(`applyInPandas`), which chooses parameters from the shard's size (`index_params`), builds, tunes and saves
the index (`shard_index`). The driver writes a build summary and only then `indexes/LATEST`, so readers only
ever see complete builds; a build that dies leaves `LATEST` on the previous one, and its partial folder is
removed by a later run's pruning. Builds older than the newest `index.keep_builds` are removed.

Incremental: each shard's summary row records `members` (`members_digest`: its items, their vectors, the
index settings). A shard whose members are unchanged since the latest build is not
rebuilt: its files are copied into the new build, so every build folder stays complete on its own.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lookalike import index_params, shard_index, shards, storage, tables
from lookalike.config import Config
from lookalike.errors import LookalikeError
from lookalike.stages import StageResult

log = logging.getLogger(__name__)
T = TypeVar("T")
J = TypeVar("J", bound="SearchJob")

LATEST = "LATEST"
BUILD_SUMMARY = "build.json"
SUMMARY_SCHEMA = ("shard string, folder string, ntotal long, kind string, factory string, nprobe int, "
                  "recall_at_10 double, target_reached boolean, bytes long, build_seconds double")
SHARD_FILES = (shard_index.INDEX_FILE, shard_index.IDS_FILE, shard_index.MANIFEST_FILE)  # manifest last


class IndexBuildError(LookalikeError):
    """No usable index build: none published yet, or one built for other embeddings."""


class StaleIndexError(IndexBuildError):
    """The latest index build does not match the current embeddings: `lookalike index` must run first."""


def indexes_root(output_root: str) -> str:
    return f"{output_root.rstrip('/')}/indexes"


def latest_build(output_root: str) -> str:
    """The run id of the newest complete build, from `indexes/LATEST`."""
    text = storage.read_text(f"{indexes_root(output_root)}/{LATEST}")
    if text is None:
        raise IndexBuildError(f"no index build published under {indexes_root(output_root)} (run `lookalike index`)")
    return text.strip()


def build_summary(output_root: str, run_id: str) -> dict:
    """The summary of one complete build: its model, dimension and one entry per shard."""
    return storage.read_json(f"{indexes_root(output_root)}/{run_id}/{BUILD_SUMMARY}")


def check_fresh(counts: Mapping[str, int], models: Iterable[str], summary: Mapping[str, Any], build: str,
                then: str) -> None:
    """Refuse a build made for other embeddings: another model, or a shard whose item count differs from
    `counts` (items per shard in `embeddings` now). `then` names the command to re-run afterwards."""
    fix = f"re-run `lookalike index` (after `lookalike embed`), then `{then}`"
    models = sorted(set(models))
    if models != [summary["model"]]:
        raise StaleIndexError(f"embeddings hold model(s) {models}, index build {build} was made for "
                              f"{summary['model']!r}; {fix}")
    built = {entry["shard"]: entry["ntotal"] for entry in summary["shards"]}
    for shard in sorted(set(counts) | set(built)):
        have, indexed = counts.get(shard, 0), built.get(shard, 0)
        if have != indexed:
            raise StaleIndexError(f"shard {shard!r} has {have} items in embeddings but {indexed} in index build "
                                  f"{build}: embeddings changed since the index was built; {fix}")


def load_shard(output_root: str, run_id: str, shard: str, *, model: str, dim: int) -> shard_index.LoadedShard:
    """One shard of a build, checked against the model and dimension of the embeddings it will search."""
    try:
        return shard_index.load(f"{indexes_root(output_root)}/{run_id}/{shards.folder_name(shard)}",
                                expected_dim=dim, expected_model=model)
    except ValueError as err:
        raise IndexBuildError(f"{err}; re-run `lookalike index` after `lookalike embed`") from err


# ---------------------------------------------------------------------------------- search tasks

@dataclass(frozen=True)
class SearchJob:
    """What a task searching one index build needs, as plain values pickled into its closure; the similar and
    recommend stages extend it with their own settings."""

    output_root: str
    build: str
    model: str
    dim: int
    staging: str  # the run's staged rows: a worker's cached shard is only good for the run that staged it


_worker_shard: dict[tuple[str, str, str], Any] = {}


def worker_shard(job: J, shard: str, load: Callable[[J, str], T]) -> tuple[T, bool]:
    """The worker's copy of `shard` as `load(job, shard)` prepares it, and whether it was loaded just now.

    Cached in this module, which a reused Python worker keeps across tasks (like `models.get_embedder`),
    keyed by build, shard and staging folder. One entry only, whichever stage asks: the previous shard is
    dropped before the next loads, so a worker never holds two.
    """
    key = (job.build, shard, job.staging)
    if key in _worker_shard:
        return _worker_shard[key], False
    _worker_shard.clear()
    _worker_shard[key] = load(job, shard)
    return _worker_shard[key], True


def _prune(output_root: str, keep: int, current: str) -> list[str]:
    """Remove builds beyond the newest `keep` complete ones, and any incomplete build but `current`."""
    fs, root = storage.filesystem(indexes_root(output_root))
    folders = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(root))
                     if info.type == pafs.FileType.Directory)
    complete = [name for name in folders
                if fs.get_file_info(f"{root}/{name}/{BUILD_SUMMARY}").type == pafs.FileType.File]
    keep_set = set(complete[-keep:]) | {current}
    removed = [name for name in folders if name not in keep_set]
    for name in removed:
        fs.delete_dir(f"{root}/{name}")
    return removed


def _shard_builder(build_dir: str, run_id: str, cfg: Config):
    """The per-shard task body; closes over plain values only."""
    flat_below, reduce_dim = cfg["index.flat_below"], cfg["index.reduce_dim"]
    target_recall = cfg["index.target_recall"]

    def build_one(pdf: pd.DataFrame) -> pd.DataFrame:
        pdf = pdf.sort_values("item_id", ignore_index=True)  # FAISS ids stable for the same members
        shard, models_seen = pdf["shard"].iloc[0], pdf["model"].unique()
        if len(models_seen) != 1:
            raise ValueError(f"shard {shard!r} mixes models {list(models_seen)}; re-run embed")
        vectors = np.stack(pdf["embedding"].to_numpy()).astype(np.float32, copy=False)
        params = index_params.choose_params(len(vectors), vectors.shape[1], flat_below=flat_below,
                                            reduce_dim=reduce_dim, target_recall=target_recall)
        built = shard_index.build(vectors, params, seed=0)
        folder = f"{build_dir}/{shards.folder_name(shard)}"
        manifest = shard_index.save(built, folder, ids=pdf["item_id"].tolist(), model=models_seen[0],
                                    extra={"shard": shard, "run_id": run_id})
        return pd.DataFrame([{"shard": shard, "folder": folder, **{k: manifest[k] for k in (
            "ntotal", "kind", "factory", "nprobe", "recall_at_10", "target_reached", "bytes",
            "build_seconds")}}])

    return build_one


def members_digest(embeddings: DataFrame, settings: str) -> dict[str, str]:
    """Per shard, what its index depends on: item count, an order-free digest of (item id, vector) and the
    index settings. The vectors are hashed, not trusted to change with their embed run id, so a table
    rewritten by other means is never served by a stale index; a columnar scan costs far less than a build."""
    digest = F.sum(F.xxhash64("item_id", "embedding").cast("decimal(38,0)"))
    rows = embeddings.groupBy("shard").agg(F.count("*").alias("n"), digest.alias("digest")).collect()
    return {r["shard"]: f"{r['n']}:{r['digest']}:{settings}" for r in rows}


def _reusable(root: str, model: str, dim: int, members: Mapping[str, str]) -> dict[str, dict]:
    """Summary rows of the latest build's shards whose members and settings are unchanged."""
    try:
        previous = build_summary(root, latest_build(root))
    except IndexBuildError:
        return {}
    if previous is None or previous["model"] != model or previous["dim"] != dim:
        return {}
    return {row["shard"]: row for row in previous["shards"] if members.get(row["shard"]) == row.get("members")}


def _copy_shard(source: str, target: str) -> None:
    """An unchanged shard carried into the new build: its files copied, the manifest last, so the copy is
    only usable once complete (a crash mid-copy leaves a folder without manifest, which `load` refuses)."""
    fs, src = storage.filesystem(source)
    _, dst = storage.filesystem(target)
    fs.create_dir(dst, recursive=True)
    for name in SHARD_FILES:
        fs.copy_file(f"{src}/{name}", f"{dst}/{name}")


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    root = cfg["output.root"]
    emb_path = tables.table_path(root, "embeddings")
    embeddings = tables.read(spark, emb_path).select("item_id", "shard", "embedding", "model", "run_id")
    model_dims = embeddings.select("model", F.size("embedding").alias("dim")).distinct().collect()
    if len(model_dims) != 1:
        raise IndexBuildError(f"embeddings hold {len(model_dims)} model/dimension pairs "
                              f"{[tuple(r) for r in model_dims]}; expected exactly one (re-run embed)")
    model, dim = model_dims[0]["model"], model_dims[0]["dim"]
    settings = f"{cfg['index.flat_below']}/{cfg['index.reduce_dim']}/{cfg['index.target_recall']}"
    members = members_digest(embeddings, settings)
    reused = _reusable(root, model, dim, members)
    build_dir = f"{indexes_root(root)}/{run_id}"
    to_build = sorted(set(members) - set(reused))
    log.info("index %s: %d shards of model %s (dim %d) -> %s: %d to build, %d unchanged and reused", run_id,
             len(members), model, dim, build_dir, len(to_build), len(reused))
    rows = []
    for shard, row in sorted(reused.items()):
        folder = f"{build_dir}/{shards.folder_name(shard)}"
        _copy_shard(row["folder"], folder)
        rows.append({**row, "folder": folder})
    if to_build:
        built = (embeddings.filter(F.col("shard").isin(to_build)).repartition(len(to_build), "shard")
                 .groupBy("shard").applyInPandas(_shard_builder(build_dir, run_id, cfg), SUMMARY_SCHEMA)
                 .toPandas())
        rows += built.assign(members=built["shard"].map(members)).to_dict("records")
    summary = pd.DataFrame(rows).sort_values("shard", ignore_index=True)
    for row in summary.itertuples():
        log.info("index %s: shard %s: %d items, %s, nprobe %d, recall@10 %.3f%s%s", run_id, row.shard, row.ntotal,
                 row.factory, row.nprobe, row.recall_at_10, "" if row.target_reached else " (below target)",
                 " (reused)" if row.shard in reused else "")
    storage.write_text(f"{build_dir}/{BUILD_SUMMARY}", json.dumps(
        {"run_id": run_id, "model": model, "dim": dim, "shards": summary.to_dict("records")}, indent=2))
    storage.write_text(f"{indexes_root(root)}/{LATEST}", run_id)
    removed = _prune(root, cfg["index.keep_builds"], run_id)
    if removed:
        log.info("index %s: removed old or incomplete builds %s", run_id, removed)
    total = int(summary["ntotal"].sum())
    metrics = {"shards": float(len(summary)), "shards_built": float(len(to_build)),
               "shards_reused": float(len(reused)), "min_recall_at_10": float(summary["recall_at_10"].min()),
               "mean_recall_at_10": float((summary["recall_at_10"] * summary["ntotal"]).sum() / max(total, 1)),
               "index_bytes": float(summary["bytes"].sum()), "seconds": round(time.time() - started, 3)}
    return StageResult("index", rows_in=total, rows_out=len(summary), metrics=metrics)

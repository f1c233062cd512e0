"""The index stage: `embeddings` -> one FAISS index per shard under `indexes/<run_id>/`, then `LATEST`.

Driver side only. Spark groups the embeddings by shard and hands each shard to one task
(`applyInPandas`), which chooses parameters from the shard's size (`index_params`), builds, tunes and saves
the index (`shard_index`). The driver writes a build summary and only then `indexes/LATEST`, so readers only
ever see complete builds; a build that dies leaves `LATEST` on the previous one, and its partial folder is
removed by a later run's pruning. Builds older than the newest `index.keep_builds` are removed.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lookalike import index_params, shard_index, shards, tables
from lookalike.config import Config
from lookalike.errors import LookalikeError
from lookalike.stages import StageResult

log = logging.getLogger(__name__)

LATEST = "LATEST"
BUILD_SUMMARY = "build.json"
SUMMARY_SCHEMA = ("shard string, folder string, ntotal long, kind string, factory string, nprobe int, "
                  "recall_at_10 double, target_reached boolean, bytes long, build_seconds double")


class IndexBuildError(LookalikeError):
    """No usable index build: none published yet, or one built for other embeddings."""


def indexes_root(output_root: str) -> str:
    return f"{output_root.rstrip('/')}/indexes"


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    return (pafs.LocalFileSystem(), path) if "://" not in path else pafs.FileSystem.from_uri(path)


def latest_build(output_root: str) -> str:
    """The run id of the newest complete build, from `indexes/LATEST`."""
    fs, root = _fs(indexes_root(output_root))
    if fs.get_file_info(f"{root}/{LATEST}").type == pafs.FileType.NotFound:
        raise IndexBuildError(f"no index build published under {indexes_root(output_root)} (run `lookalike index`)")
    with fs.open_input_stream(f"{root}/{LATEST}") as stream:
        return stream.read().decode().strip()


def build_summary(output_root: str, run_id: str) -> dict:
    """The summary of one complete build: its model, dimension and one entry per shard."""
    fs, root = _fs(indexes_root(output_root))
    with fs.open_input_stream(f"{root}/{run_id}/{BUILD_SUMMARY}") as stream:
        return json.loads(stream.read())


def load_shard(output_root: str, run_id: str, shard: str, *, model: str, dim: int) -> shard_index.LoadedShard:
    """One shard of a build, checked against the model and dimension of the embeddings it will search."""
    try:
        return shard_index.load(f"{indexes_root(output_root)}/{run_id}/{shards.folder_name(shard)}",
                                expected_dim=dim, expected_model=model)
    except ValueError as err:
        raise IndexBuildError(f"{err}; re-run `lookalike index` after `lookalike embed`") from err


def _write_text(path: str, text: str) -> None:
    """Replace a small file so that a reader sees the old or the new text, never a mix."""
    fs, local = _fs(path)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{local}.tmp-{time.time_ns()}"
        with fs.open_output_stream(tmp) as stream:
            stream.write(text.encode())
        fs.move(tmp, local)  # rename(2): atomic on a local or POSIX file system
    else:
        with fs.open_output_stream(local) as stream:  # one PUT: object stores replace whole objects
            stream.write(text.encode())


def _prune(output_root: str, keep: int, current: str) -> list[str]:
    """Remove builds beyond the newest `keep` complete ones, and any incomplete build but `current`."""
    fs, root = _fs(indexes_root(output_root))
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


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    root = cfg["output.root"]
    emb_path = tables.table_path(root, "embeddings")
    embeddings = tables.read(spark, emb_path).select("item_id", "shard", "embedding", "model")
    model_dims = embeddings.select("model", F.size("embedding").alias("dim")).distinct().collect()
    if len(model_dims) != 1:
        raise IndexBuildError(f"embeddings hold {len(model_dims)} model/dimension pairs "
                          f"{[tuple(r) for r in model_dims]}; expected exactly one (re-run embed)")
    model, dim = model_dims[0]["model"], model_dims[0]["dim"]
    n_shards = embeddings.select("shard").distinct().count()
    build_dir = f"{indexes_root(root)}/{run_id}"
    log.info("index %s: %d shards of model %s (dim %d) -> %s", run_id, n_shards, model, dim, build_dir)
    summary = (embeddings.repartition(n_shards, "shard")
               .groupBy("shard").applyInPandas(_shard_builder(build_dir, run_id, cfg), SUMMARY_SCHEMA)
               .toPandas().sort_values("shard"))
    for row in summary.itertuples():
        log.info("index %s: shard %s: %d items, %s, nprobe %d, recall@10 %.3f%s", run_id, row.shard, row.ntotal,
                 row.factory, row.nprobe, row.recall_at_10, "" if row.target_reached else " (below target)")
    _write_text(f"{build_dir}/{BUILD_SUMMARY}", json.dumps(
        {"run_id": run_id, "model": model, "dim": dim, "shards": summary.to_dict("records")}, indent=2))
    _write_text(f"{indexes_root(root)}/{LATEST}", run_id)
    removed = _prune(root, cfg["index.keep_builds"], run_id)
    if removed:
        log.info("index %s: removed old or incomplete builds %s", run_id, removed)
    total = int(summary["ntotal"].sum())
    metrics = {"shards": float(len(summary)), "min_recall_at_10": float(summary["recall_at_10"].min()),
               "mean_recall_at_10": float((summary["recall_at_10"] * summary["ntotal"]).sum() / max(total, 1)),
               "index_bytes": float(summary["bytes"].sum()), "seconds": round(time.time() - started, 3)}
    return StageResult("index", rows_in=total, rows_out=len(summary), metrics=metrics)

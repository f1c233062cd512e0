"""The index stage: `embeddings` -> one FAISS index per shard under `indexes/<run_id>/`, then `LATEST`.

The driver runs one Spark task per shard to build (`distributor.run_tasks`), which reads the shard's rows with
Arrow straight from the files of the `embeddings` version the driver read (`tables.read_files`: no staged copy,
no Python object per row; like the similar stage's loads, it decodes the row groups its shard may be in),
chooses parameters from the shard's size (`index.params`), builds, tunes and saves the index
(`index.shard_index`). Fewer shards to build than cores: each task's FAISS gets the cores the idle ones would
have had (`faiss_threads`), so one big shard does not train on one core. The driver writes a build summary and
only then `indexes/LATEST`, so readers only ever see complete builds; a build that dies leaves `LATEST` on the
previous one, and its partial folder is removed by a later run's pruning. Builds older than the newest
`index.keep_builds` are removed.

Incremental: each shard's summary row records `members` (`members_digest`: its items, their vectors, the
index settings). A shard whose members are unchanged since the latest build is not rebuilt: its files are
copied into the new build, so every build folder stays complete on its own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lookalike import distributor
from lookalike.config import Config
from lookalike.embed import shards
from lookalike.index import params as index_params
from lookalike.index import shard_index
from lookalike.index.builds import BUILD_SUMMARY, IndexBuildError, build_summary, indexes_root, latest_build
from lookalike.results import StageResult
from lookalike.storage import files, published, tables
from lookalike.storage.uri import filesystem

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("folder", pa.string()),
        ("ntotal", pa.int64()),
        ("kind", pa.string()),
        ("factory", pa.string()),
        ("nprobe", pa.int32()),
        ("recall_at_10", pa.float64()),
        ("target_reached", pa.bool_()),
        ("bytes", pa.int64()),
        ("build_seconds", pa.float64()),
        ("reused_training", pa.bool_()),
    ]
)
SHARD_FILES = (shard_index.INDEX_FILE, shard_index.IDS_FILE, shard_index.MANIFEST_FILE)  # manifest last


def build_task(
    embeddings: tuple[str, ...],
    dim: int,
    threads: int,
    build_dir: str,
    run_id: str,
    cfg: Config,
    updatable: Mapping[str, str],
) -> Callable[[str], Iterator[pa.RecordBatch]]:
    """The per-shard task body: the shard's rows of the `embeddings` files in, its index saved (FAISS on
    `threads` threads), its summary row out. `updatable` maps shards to their folder in the previous build,
    whose training `shard_index.build` may reuse. Closes over plain values only."""
    flat_below, reduce_dim = cfg["index.flat_below"], cfg["index.reduce_dim"]
    target_recall, exact_fallback = cfg["index.target_recall"], cfg["index.exact_fallback"]
    max_drift = cfg["index.update_max_drift"]

    def build_shard(shard: str) -> Iterator[pa.RecordBatch]:
        import faiss

        faiss.omp_set_num_threads(threads)
        rows = tables.read_files(embeddings, ["item_id", "embedding", "model"], pc.field("shard") == shard)
        models_seen = pc.unique(rows["model"]).to_pylist()
        if len(models_seen) != 1:
            raise ValueError(f"shard {shard!r} mixes models {models_seen}; re-run embed")
        order = pc.sort_indices(rows["item_id"]).to_numpy()  # FAISS ids stable for the same members
        vectors = shard_index.matrix(rows["embedding"], dim)[order]
        item_ids = rows["item_id"].take(order)
        del rows
        params = index_params.choose_params(
            len(vectors), vectors.shape[1], flat_below=flat_below, reduce_dim=reduce_dim, target_recall=target_recall
        )
        previous = None
        if shard in updatable and max_drift is not None:
            try:
                previous = shard_index.load(
                    updatable[shard], expected_dim=params.dim, expected_model=models_seen[0], mmap=False
                )
            except (OSError, ValueError) as err:  # pruned or unreadable: train afresh
                log.warning("index %s: shard %s trains afresh: previous index unreadable (%s)", run_id, shard, err)
        built = shard_index.build(
            vectors, params, seed=0, exact_fallback=exact_fallback, previous=previous, max_drift=max_drift
        )
        folder = f"{build_dir}/{shards.folder_name(shard)}"
        manifest = shard_index.save(
            built, folder, ids=item_ids, model=models_seen[0], extra={"shard": shard, "run_id": run_id}
        )
        row = {"shard": shard, "folder": folder, **{name: manifest[name] for name in SUMMARY_SCHEMA.names[2:]}}
        yield pa.RecordBatch.from_pylist([row], schema=SUMMARY_SCHEMA)

    return build_shard


def faiss_threads(spark: SparkSession, tasks: int) -> int:
    """FAISS threads for each of `tasks` concurrent build tasks: a task's cores (`spark.task.cpus`), or more
    where there are fewer tasks than cores, up to one executor's cores (all of them in local mode; on a
    cluster `spark.executor.cores`, 1 when unset). The scheduler hands tasks without a preferred location to
    executors round-robin, so a task that takes its idle neighbours' cores does not oversubscribe a machine."""
    conf = spark.sparkContext.getConf()
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    cores = spark.sparkContext.defaultParallelism
    executor_cores = (
        cores if str(spark.sparkContext.master).startswith("local") else int(conf.get("spark.executor.cores", "1"))
    )
    return max(task_cpus, min(executor_cores, cores // max(1, tasks)))


def members_digest(embeddings: DataFrame, settings: str) -> dict[str, str]:
    """Per shard, what its index depends on: item count, an order-free digest of (item id, vector) and the
    index settings. The vectors are hashed, not trusted to change with their embed run id, so a table
    rewritten by other means is never served by a stale index; a columnar scan costs far less than a build."""
    digest = F.sum(F.xxhash64("item_id", "embedding").cast("decimal(38,0)"))
    rows = embeddings.groupBy("shard").agg(F.count("*").alias("n"), digest.alias("digest")).collect()
    return {r["shard"]: f"{r['n']}:{r['digest']}:{settings}" for r in rows}


def _previous_shards(root: str, model: str, dim: int) -> list[dict]:
    """Summary rows of the latest build, if it was made for this model and dimension."""
    try:
        previous = build_summary(root, latest_build(root))
    except IndexBuildError:
        return []
    if previous is None or previous["model"] != model or previous["dim"] != dim:
        return []
    return list(previous["shards"])


def _reusable(previous: list[dict], members: Mapping[str, str]) -> dict[str, dict]:
    """The previous rows of shards whose members and settings are unchanged: copied, not built."""
    return {row["shard"]: row for row in previous if members.get(row["shard"]) == row.get("members")}


def _updatable(previous: list[dict], to_build: list[str], settings: str) -> dict[str, str]:
    """The previous folders of changed IVF-PQ shards built with these settings: their training may be reused."""
    wanted = set(to_build)
    return {
        row["shard"]: row["folder"]
        for row in previous
        if row["shard"] in wanted and row["kind"] == "ivfpq" and str(row.get("members", "")).endswith(f":{settings}")
    }


def _copy_shard(source: str, target: str) -> None:
    """An unchanged shard carried into the new build: its files copied, the manifest last, so the copy is
    only usable once complete (a crash mid-copy leaves a folder without manifest, which `load` refuses)."""
    fs, src = filesystem(source)
    _, dst = filesystem(target)
    fs.create_dir(dst, recursive=True)
    for name in SHARD_FILES:
        fs.copy_file(f"{src}/{name}", f"{dst}/{name}")


def run(cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    started = time.time()
    root = cfg["output.root"]
    emb_path = tables.table_path(root, "embeddings")
    version = tables.version(emb_path)  # tasks read the files of the version Spark reads
    embeddings = tables.read(spark, emb_path, version).select("item_id", "shard", "embedding", "model", "run_id")
    model_dims = embeddings.select("model", F.size("embedding").alias("dim")).distinct().collect()
    if len(model_dims) != 1:
        raise IndexBuildError(
            f"embeddings hold {len(model_dims)} model/dimension pairs "
            f"{[tuple(r) for r in model_dims]}; expected exactly one (re-run embed)"
        )
    model, dim = model_dims[0]["model"], model_dims[0]["dim"]
    settings = "/".join(
        str(cfg[key]) for key in ("index.flat_below", "index.reduce_dim", "index.target_recall", "index.exact_fallback")
    )
    members = members_digest(embeddings, settings)
    previous = _previous_shards(root, model, dim)
    reused = _reusable(previous, members)
    build_dir = f"{indexes_root(root)}/{run_id}"
    to_build = sorted(set(members) - set(reused))
    updatable = _updatable(previous, to_build, settings)
    log.info(
        "index %s: %d shards of model %s (dim %d) -> %s: %d to build, %d unchanged and reused",
        run_id,
        len(members),
        model,
        dim,
        build_dir,
        len(to_build),
        len(reused),
    )
    rows = []
    for shard, row in sorted(reused.items()):
        folder = f"{build_dir}/{shards.folder_name(shard)}"
        _copy_shard(row["folder"], folder)
        rows.append({**row, "folder": folder})
    if to_build:
        task = build_task(
            tuple(tables.current_files(emb_path, version)),
            dim,
            faiss_threads(spark, len(to_build)),
            build_dir,
            run_id,
            cfg,
            updatable,
        )
        built: pd.DataFrame = distributor.run_tasks(spark, to_build, task, SUMMARY_SCHEMA).toPandas()
        rows += built.assign(members=built["shard"].map(members)).to_dict("records")
    summary = pd.DataFrame(rows).sort_values("shard", ignore_index=True)
    for row in summary.itertuples():
        log.info(
            "index %s: shard %s: %d items, %s, nprobe %d, recall@10 %.3f%s%s%s",
            run_id,
            row.shard,
            row.ntotal,
            row.factory,
            row.nprobe,
            row.recall_at_10,
            "" if row.target_reached else " (below target)",
            " (reused)" if row.shard in reused else "",
            " (updated: trained quantizers reused)" if row.shard not in reused and row.reused_training is True else "",
        )
    files.write_text(
        f"{build_dir}/{BUILD_SUMMARY}",
        json.dumps({"run_id": run_id, "model": model, "dim": dim, "shards": summary.to_dict("records")}, indent=2),
    )
    published.publish(indexes_root(root), run_id)
    removed = published.prune(indexes_root(root), cfg["index.keep_builds"], run_id, BUILD_SUMMARY)
    if removed:
        log.info("index %s: removed old or incomplete builds %s", run_id, removed)
    total = int(summary["ntotal"].sum())
    metrics = {
        "shards": float(len(summary)),
        "shards_built": float(len(to_build)),
        "shards_reused": float(len(reused)),
        "shards_updated": float(sum(bool(row.get("reused_training")) for row in rows if row["shard"] not in reused)),
        "min_recall_at_10": float(summary["recall_at_10"].min()),
        "mean_recall_at_10": float((summary["recall_at_10"] * summary["ntotal"]).sum() / max(total, 1)),
        "index_bytes": float(summary["bytes"].sum()),
        "seconds": round(time.time() - started, 3),
    }
    return StageResult("index", rows_in=total, rows_out=len(summary), metrics=metrics)

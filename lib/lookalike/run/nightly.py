"""The nightly run: embed -> index -> similar -> recommend under one run id, then the exports; `train` first
when `train.schedule` says a new head is due, so the same night's embed re-derives every vector with it.

Every stage is incremental on its own (unchanged images are not embedded, unchanged shards not rebuilt or
re-queried, unchanged inputs not re-recommended) and commits atomically, so a run killed anywhere is
finished by the next: what was committed is reused, what was not is redone, and no table holds half a
write. Exports are published only after every stage succeeded, at one point (`export/LATEST`), and only
for the stages that ran. Every table commit applies the config's retention (`tables.keep_versions`). The
caller holds the run lock (`lock.py`).
"""

from __future__ import annotations

import logging
import time

from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.errors import LookalikeError
from lookalike.results import StageResult
from lookalike.run import export, runs, stages

log = logging.getLogger(__name__)


def _train_due(cfg: Config) -> bool:
    """Whether `train.schedule` asks for a new head tonight (never before anything was embedded)."""
    from lookalike.storage import tables
    from lookalike.train.stage import due  # torch is imported only when training runs

    return due(cfg) and tables.exists(tables.table_path(cfg["output.root"], "embeddings"))


def run(cfg: Config, spark: SparkSession, run_id: str) -> list[StageResult]:
    started, clock = runs.now(), time.time()
    root = cfg["output.root"]
    results: list[StageResult] = []
    if _train_due(cfg):
        try:
            results.append(stages.run_logged("train", cfg, spark, run_id))
        except LookalikeError as err:  # the night's tables matter more than a fresh head: embed with the last one
            log.warning("nightly %s: train failed, embedding with the previous head: %s", run_id, err)
    for name in stages.STAGES:
        if name == "recommend" and cfg["events.path"] is None:
            log.warning("nightly %s: events.path is not set, recommend skipped", run_id)
            continue
        try:
            results.append(stages.run_logged(name, cfg, spark, run_id))
        except BaseException:
            runs.record(root, run_id, "nightly", runs.FAILED, started, runs.now())
            raise
    export_started = runs.now()
    done = export.publish(spark, root, run_id, cfg["export.keep"], [r.stage for r in results])
    rows = sum(done.snapshots[table].rows for table in done.written)
    runs.record(
        root,
        run_id,
        "export",
        runs.SUCCEEDED,
        export_started,
        runs.now(),
        rows,
        rows,
        {
            **{f"{table}_rows": float(done.snapshots[table].rows) for table in done.written},
            "snapshots_kept": float(len(done.snapshots) - len(done.written)),
        },
    )
    seconds = time.time() - clock
    runs.record(
        root,
        run_id,
        "nightly",
        runs.SUCCEEDED,
        started,
        runs.now(),
        metrics={"seconds": round(seconds, 3), "stages": float(len(results))},
    )
    log.info("nightly %s: done in %.0f s: %s", run_id, seconds, ", ".join(r.stage for r in results))
    return results

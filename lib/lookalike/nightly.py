"""The nightly run: every built stage in order, under one run id, on one SparkSession.

Stages that are not built yet are skipped by name and the run says so: it never reports work it did not do.
"""
from __future__ import annotations

import logging

from pyspark.sql import SparkSession

from lookalike import stages
from lookalike.config import Config
from lookalike.stages import StageResult

log = logging.getLogger(__name__)


def run(cfg: Config, spark: SparkSession, run_id: str) -> list[StageResult]:
    results: list[StageResult] = []
    for name in stages.STAGES:
        if not stages.is_built(name):
            log.warning("nightly %s: stage %s is not built yet, skipped", run_id, name)
            continue
        log.info("nightly %s: %s starting", run_id, name)
        results.append(stages.load_stage(name)(cfg, spark, run_id))
        log.info("nightly %s: %s done: %s", run_id, name, results[-1])
    skipped = [name for name in stages.STAGES if not stages.is_built(name)]
    log.info("nightly %s: ran %s; not built yet: %s", run_id,
             [r.stage for r in results] or "nothing", skipped or "none")
    return results

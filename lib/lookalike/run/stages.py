"""The stages in nightly order, and running one stage with its `runs` row.

A stage is a function `run(cfg, spark, run_id) -> StageResult`, named here as "module:function" so that
`lookalike --help` and config checks never import torch or faiss.
"""

from __future__ import annotations

import importlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lookalike.results import StageResult

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lookalike.config import Config

log = logging.getLogger(__name__)

STAGES: dict[str, str] = {
    "embed": "lookalike.embed.stage:run",
    "index": "lookalike.index.stage:run",
    "similar": "lookalike.similar.stage:run",
    "recommend": "lookalike.recommend.stage:run",
}


# Commands that run like a stage (under the lock, with a `runs` row) but not in the nightly.
COMMANDS: dict[str, str] = {"search": "lookalike.search.batch:run", "train": "lookalike.train.stage:run"}

StageFn = Callable[["Config", "SparkSession", str], StageResult]


def new_run_id() -> str:
    """Sortable by time, unique across concurrent submissions: 20261122T031500Z-3f2a9c."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def load_stage(name: str) -> StageFn:
    """The stage's run function; imported only when the stage actually runs."""
    module, _, function = (STAGES | COMMANDS)[name].partition(":")
    return getattr(importlib.import_module(module), function)


def run_logged(name: str, cfg: Config, spark: SparkSession, run_id: str) -> StageResult:
    """Run one stage and append its row to `runs`: `succeeded` with its counts and metrics, or `failed`
    (then the error propagates)."""
    from lookalike.run import runs

    started = runs.now()
    log.info("run %s: %s starting", run_id, name)
    try:
        result = load_stage(name)(cfg, spark, run_id)
    except BaseException:
        runs.record(cfg["output.root"], run_id, name, runs.FAILED, started, runs.now())
        raise
    runs.record(
        cfg["output.root"],
        run_id,
        name,
        runs.SUCCEEDED,
        started,
        runs.now(),
        result.rows_in,
        result.rows_out,
        result.metrics,
    )
    log.info("run %s: %s done: %s", run_id, name, result)
    return result

"""Which stages exist, in nightly order, and what every stage hands back.

A stage is a function `run(cfg, spark, run_id) -> StageResult`, named here as "module:function" so that
`lookalike --help` and config checks never import torch or faiss. A stage that is not built yet maps to None:
the CLI says so and exits non-zero, and `nightly` skips it by name instead of pretending it ran.
"""
from __future__ import annotations

import importlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lookalike.config import Config

STAGES: dict[str, str | None] = {
    "embed": "lookalike.embed:run",
    "index": "lookalike.index:run",
    "similar": "lookalike.similar:run",
    "recommend": None,
}


@dataclass
class StageResult:
    """Counts and metrics of one stage run, logged and later written to the `runs` table."""

    stage: str
    rows_in: int
    rows_out: int
    metrics: dict[str, float] = field(default_factory=dict)


StageFn = Callable[["Config", "SparkSession", str], StageResult]


def new_run_id() -> str:
    """Sortable by time, unique across concurrent submissions: 20261122T031500Z-3f2a9c."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def is_built(name: str) -> bool:
    return STAGES.get(name) is not None


def load_stage(name: str) -> StageFn:
    """The stage's run function; imported only when the stage actually runs."""
    target = STAGES[name]
    if target is None:
        raise NotImplementedError(name)
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)

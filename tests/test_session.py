"""The session factory: settings from config, master resolution, the workers' interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from lookalike.session import resolve_master, session_settings
from tests.conftest import make_config


def test_settings_from_config(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"spark.shuffle_partitions": 7, "spark.conf": {"spark.foo": "bar"}})
    settings = session_settings(cfg)
    assert settings["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    assert settings["spark.python.worker.reuse"] == "true"
    assert settings["spark.sql.shuffle.partitions"] == "7"
    assert settings["spark.foo"] == "bar"
    assert settings["spark.executorEnv.MALLOC_MMAP_MAX_"] == "0"
    assert "spark.executorEnv.MALLOC_MMAP_MAX_" not in session_settings(
        make_config(tmp_path, **{"spark.tune_malloc": False})
    )


def test_master_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert resolve_master(make_config(tmp_path, **{"spark.master": None})) == "local[*]"
    assert resolve_master(make_config(tmp_path, **{"spark.master": "spark://h:7077"})) == "spark://h:7077"
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "12345")  # what spark-submit sets for its Python driver
    assert resolve_master(make_config(tmp_path, **{"spark.master": None})) is None


def test_live_session(spark: SparkSession) -> None:
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert conf.get("spark.python.worker.reuse") == "true"
    assert spark.sparkContext.master == "local[2]"
    # Workers run this interpreter (the venv's), and they inherit the malloc settings.
    got = (
        spark.sparkContext.parallelize([0], 1)
        .map(lambda _: (__import__("sys").executable, __import__("os").environ.get("MALLOC_MMAP_MAX_")))
        .collect()
    )
    assert got == [(sys.executable, "0")]

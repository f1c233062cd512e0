"""Shared fixtures: one SparkSession for the whole test session (starting a JVM costs seconds).

Every test that uses the `spark` fixture, directly or through another fixture, is marked `spark`, so
`pytest -m "not spark"` runs the pure tests alone; modules whose tests start Spark in a subprocess mark
themselves with `pytestmark = pytest.mark.spark`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from lookalike import config as config_mod
from lookalike.session import get_spark

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp: Path, **overrides: object) -> config_mod.Config:
    """A valid config whose output lives under `tmp`; catalog defaults to an empty placeholder file."""
    tmp.mkdir(parents=True, exist_ok=True)
    catalog = tmp / "catalog.parquet"
    if "catalog.path" not in overrides and not catalog.exists():
        catalog.write_bytes(b"")
    values = {
        "catalog.path": str(catalog),
        "output.root": str(tmp / "out"),
        "spark.master": "local[2]",
        "spark.shuffle_partitions": 4,
        "spark.driver_memory": "2g",
        "spark.conf": {"spark.ui.enabled": "false"},
    }
    values.update(overrides)
    return config_mod.validate(values, base_dir=tmp)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="module")
def one_faiss_thread() -> Iterator[None]:
    """One OpenMP thread: on a busy 2-core machine FAISS's spinning threads make small builds 10x slower."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    session = get_spark(make_config(tmp_path_factory.mktemp("spark")))
    yield session
    session.stop()

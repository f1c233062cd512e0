"""The one SparkSession factory: every command and job gets its session here, built from config.

Settings that matter for this pipeline live in one place: Arrow for pandas UDFs, Python worker reuse (so a
model cached in a package module loads once per worker, not once per task), the interpreter the workers run,
and quiet logs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from lookalike.config import Config

log = logging.getLogger(__name__)

# glibc returns big activation buffers to the OS after every batch by default; the page faults that follow
# dominated CPU inference here (15 -> 46 img/s, DESIGN.md "Environment facts"). Keeping freed memory in the
# process costs some resident memory and nothing else.
MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}

LOG4J2_FILE = Path(__file__).with_name("log4j2.properties")


def under_spark_submit() -> bool:
    """True when spark-submit started this Python process (it then owns the master and the JVM)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def session_settings(cfg: Config) -> dict[str, str]:
    """Spark settings derived from config, as a plain dict so tests can check them without a JVM."""
    settings = {
        "spark.app.name": cfg["spark.app_name"],
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
        "spark.python.worker.reuse": "true",
        "spark.sql.shuffle.partitions": str(cfg["spark.shuffle_partitions"]),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.session.timeZone": "UTC",
        # Delta readers expect int64 microsecond timestamps; Spark's default INT96 is a legacy encoding.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": cfg["spark.driver_memory"],
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{LOG4J2_FILE}",
        "spark.executorEnv.PYSPARK_PYTHON": worker_python(cfg),
    }
    if cfg["spark.tune_malloc"]:
        settings.update({f"spark.executorEnv.{name}": value for name, value in MALLOC_ENV.items()})
    settings.update({str(k): str(v) for k, v in cfg["spark.conf"].items()})
    return settings


def worker_python(cfg: Config) -> str:
    """The interpreter executors start for Python work.

    PySpark takes it from the driver's PYSPARK_PYTHON alone: a `spark.pyspark.python` given to the session
    builder never reaches the workers. So `spark.pyspark.python` in `spark.conf` wins (a venv shipped to a
    cluster, e.g. `./environment/bin/python`), then PYSPARK_PYTHON (spark-submit exports its own
    `--conf spark.pyspark.python` as that), then this interpreter (one host, or nodes with the venv at the
    same path).
    """
    return str(cfg["spark.conf"].get("spark.pyspark.python") or os.environ.get("PYSPARK_PYTHON") or sys.executable)


def resolve_master(cfg: Config) -> str | None:
    """The master to set: config wins, then spark-submit's own (None: leave it alone), else local[*]."""
    if cfg["spark.master"]:
        return cfg["spark.master"]
    return None if under_spark_submit() else "local[*]"


def get_spark(cfg: Config) -> SparkSession:
    """Build (or join) the session for this process from config."""
    # Workers must run this interpreter (the venv's), or they start the system python without our packages.
    os.environ["PYSPARK_PYTHON"] = worker_python(cfg)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if cfg["spark.tune_malloc"]:
        # In local mode the Python workers are children of the JVM we are about to start: they inherit this.
        for name, value in MALLOC_ENV.items():
            os.environ.setdefault(name, value)
    builder = SparkSession.builder
    master = resolve_master(cfg)
    if master is not None:
        builder = builder.master(master)
    for key, value in session_settings(cfg).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info(
        "spark session: master=%s, default parallelism=%d",
        spark.sparkContext.master,
        spark.sparkContext.defaultParallelism,
    )
    return spark

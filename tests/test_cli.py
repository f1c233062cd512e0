"""The command line: every DESIGN.md command is listed, errors are one line, every stage has its job, and the
exit status is the command's own whatever interpreter shutdown does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyspark
import pytest

from lookalike import cli
from lookalike import config as config_mod
from lookalike.run import stages
from tests.conftest import REPO

SPARK_HOME = Path(pyspark.__file__).resolve().parent

# Loaded by every Python process that finds it on PYTHONPATH: a shutdown hook that aborts (what delta-rs can do
# at exit, delta-io/delta-rs#2184: status 134), and a record of what os._exit was called with and whether a
# SparkContext was still running then.
ABORTING_SHUTDOWN = """
import atexit, json, os, sys

atexit.register(os.abort)
_exit = os._exit


def _recorded_exit(code):
    pyspark = sys.modules.get("pyspark")
    running = bool(pyspark and pyspark.SparkContext._active_spark_context)
    with open(os.environ["EXIT_RECORD"], "w") as record:
        json.dump({"code": code, "spark_running": running}, record)
    _exit(code)


os._exit = _recorded_exit
"""

COMMANDS = ["demo-data", "embed", "index", "similar", "recommend", "nightly", "report"]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


def test_config_error_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("catalog: {path: nowhere.parquet}\noutput: {root: out}\n")
    out = run("embed", "--conf", str(conf), cwd=tmp_path)
    assert out.returncode == cli.EXIT_CONFIG
    assert out.stderr.strip().splitlines() == [
        f"lookalike: config error: catalog.path: path does not exist: {tmp_path}/nowhere.parquet"
    ]
    out = run("embed", "--conf", str(conf), "--set", "embed.batch_size=x", cwd=tmp_path)
    assert "embed.batch_size: expected an integer, got 'x'" in out.stderr


def test_jobs_are_thin_entries_for_every_stage() -> None:
    for stage in [*stages.STAGES, *stages.COMMANDS, "nightly"]:
        text = (REPO / "jobs" / f"{stage}.py").read_text()
        assert f'run_job("{stage}")' in text


def test_torchvision_model_without_weights_is_refused_before_spark(tmp_path: Path) -> None:
    (tmp_path / "catalog.parquet").write_bytes(b"")  # exists; never read, the config is refused first
    conf = tmp_path / "tv.yaml"
    conf.write_text("catalog: {path: catalog.parquet}\noutput: {root: out}\nmodel: {name: torchvision/resnet18}\n")
    out = run("embed", "--conf", str(conf), cwd=tmp_path)
    assert out.returncode == cli.EXIT_CONFIG
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("lookalike: config error: model.weights: torchvision/resnet18 has no packaged weights")
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def aborting_env(tmp_path: Path) -> dict[str, str]:
    """This interpreter's environment with ABORTING_SHUTDOWN installed as sitecustomize."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ABORTING_SHUTDOWN)
    path = os.pathsep.join([str(site), str(REPO / "lib"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "EXIT_RECORD": str(tmp_path / "exit.json")}


def exit_record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "exit.json").read_text())


def test_an_aborting_shutdown_cannot_change_the_exit_status(tmp_path: Path) -> None:
    env = aborting_env(tmp_path)
    plain = subprocess.run([sys.executable, "-c", "pass"], env=env, capture_output=True, timeout=60)
    assert plain.returncode == -6  # the hook works: an ordinary exit is aborted (SIGABRT)
    conf = tmp_path / "bad.yaml"
    conf.write_text("catalog: {path: nowhere.parquet}\noutput: {root: out}\n")
    # Each case's own output must come out too: os._exit flushes nothing itself.
    for args, code, said in [
        (["-m", "lookalike.cli", "--help"], 0, "usage: lookalike"),
        (["-m", "lookalike.cli", "embed", "--conf", str(conf)], cli.EXIT_CONFIG, "lookalike: config error:"),
        (["-m", "lookalike.cli", "embed"], 2, "the following arguments are required: --conf"),
        ([str(REPO / "jobs" / "embed.py"), "--conf", str(conf)], cli.EXIT_CONFIG, "lookalike: config error:"),
    ]:
        out = subprocess.run(
            [sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == code, (args, out.stderr)
        assert said in out.stdout + out.stderr, args
        assert exit_record(tmp_path) == {"code": code, "spark_running": False}


def test_main_returns_the_status_in_process(tmp_path: Path) -> None:
    conf = tmp_path / "bad.yaml"
    conf.write_text("catalog: {path: nowhere.parquet}\noutput: {root: out}\n")
    assert cli.main(["embed", "--conf", str(conf)]) == cli.EXIT_CONFIG  # and this process goes on


@pytest.mark.spark
def test_spark_submit_job_stops_spark_then_exits_with_its_own_status(tmp_path: Path) -> None:
    """Under spark-submit, whose JVM waits for the Python driver and exits with its status: the session is
    stopped before the process leaves (the event log is complete), and the aborting hook never runs."""
    pd.DataFrame({"item_id": ["a"], "image_uri": ["a.png"], "category": ["x"]}).to_parquet(tmp_path / "catalog.parquet")
    conf = tmp_path / "conf.yaml"
    conf.write_text('catalog: {path: catalog.parquet}\noutput: {root: out}\nspark: {master: "local[1]"}\n')
    job = tmp_path / "report_job.py"
    job.write_text('from lookalike.cli import run_job\n\nrun_job("report")\n')
    events = tmp_path / "eventlog"
    events.mkdir()
    submit = [
        str(SPARK_HOME / "bin" / "spark-submit"),
        *("--conf", "spark.ui.enabled=false", "--conf", "spark.eventLog.enabled=true"),
        *("--conf", f"spark.eventLog.dir=file:{events}", "--conf", "spark.eventLog.rolling.enabled=false"),
        *("--conf", "spark.eventLog.compress=false", "--conf", f"spark.pyspark.driver.python={sys.executable}"),
        *(str(job), "--conf", str(conf), "--out", str(tmp_path / "report.html")),
    ]
    env = {**aborting_env(tmp_path), "SPARK_HOME": str(SPARK_HOME), "PYSPARK_PYTHON": sys.executable}
    out = subprocess.run(submit, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert exit_record(tmp_path) == {"code": 0, "spark_running": False}
    assert (tmp_path / "report.html").stat().st_size > 0
    [log] = list(events.iterdir())
    assert not log.name.endswith(".inprogress")
    assert '"Event":"SparkListenerApplicationEnd"' in log.read_text()


def test_command_flags_are_config_overrides() -> None:
    args = cli._parser().parse_args(["embed", "--conf", "c.yaml", "--set", "fetch.retries=1", "--retry-failed"])
    assert cli.overrides(args) == ["fetch.retries=1", "embed.retry_failed=true"]
    assert cli.overrides(cli._parser().parse_args(["index", "--conf", "c.yaml"])) == []
    search = cli._parser().parse_args(["search", "--conf", "c.yaml", "--queries", "q.parquet"])
    assert cli.overrides(search) == ['search.queries="q.parquet"']
    where = ["search", "--conf", "c.yaml", "--queries", "true", "--where", "in_stock AND category = 'a=b'"]
    flags = cli.overrides(cli._parser().parse_args(where))
    assert [config_mod.parse_override(flag) for flag in flags] == [
        ("search.queries", "true"),  # text, not YAML's boolean
        ("search.where", "in_stock AND category = 'a=b'"),
    ]
    with pytest.raises(SystemExit):  # only embed has it
        cli._parser().parse_args(["index", "--conf", "c.yaml", "--retry-failed"])

"""The command line: every DESIGN.md command is listed, errors are one line, every stage has its job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lookalike import cli
from lookalike.run import stages
from tests.conftest import REPO

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
    for stage in [*stages.STAGES, "nightly"]:
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

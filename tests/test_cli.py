"""The command line: every DESIGN.md command is listed, errors are one line, unbuilt stages say so."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lookalike import cli, stages
from tests.conftest import REPO

COMMANDS = ["demo-data", "embed", "index", "similar", "recommend", "nightly", "report"]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


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
        f"lookalike: config error: catalog.path: path does not exist: {tmp_path}/nowhere.parquet"]
    out = run("embed", "--conf", str(conf), "--set", "embed.batch_size=x", cwd=tmp_path)
    assert "embed.batch_size: expected an integer, got 'x'" in out.stderr


@pytest.mark.parametrize("stage", [name for name in stages.STAGES if not stages.is_built(name)] + ["report"])
def test_unbuilt_stages_say_so(tmp_path: Path, stage: str) -> None:
    (tmp_path / "catalog.parquet").write_bytes(b"")
    conf = tmp_path / "c.yaml"
    conf.write_text("catalog: {path: catalog.parquet}\noutput: {root: out}\n")
    extra = ["--out", "r.html"] if stage == "report" else []
    out = run(stage, "--conf", str(conf), *extra, cwd=tmp_path)
    assert out.returncode == cli.EXIT_NOT_BUILT
    assert f"the {stage} " in out.stderr and "not built yet" in out.stderr


def test_jobs_are_thin_entries_for_every_stage() -> None:
    for stage in [*stages.STAGES, "nightly"]:
        text = (REPO / "jobs" / f"{stage}.py").read_text()
        assert f'run_job("{stage}")' in text

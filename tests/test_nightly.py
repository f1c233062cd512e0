"""`lookalike nightly` as the scheduler runs it: a real process, killed with SIGKILL at several points.

One clean run over a small demo catalog is the reference. A second output root then goes through a chain
of runs each killed mid-stage (embed, index, similar, recommend), and a last run that completes; its tables
must equal the reference row by row. Between kills, every table must be whole: readable, no duplicate keys.
Also checked: the lock refuses a second live run, the `runs` log, the exports, and that an unchanged re-run
does no work.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lookalike.demo_data import build_demo_data
from lookalike.run import export, lock
from lookalike.storage import files, tables

pytestmark = pytest.mark.spark  # every test runs `lookalike nightly` in a subprocess

N_ITEMS = 160
TABLE_KEYS = {
    "embeddings": ["item_id"],
    "similar_items": ["item_id", "rank"],
    "quarantine": ["item_id"],
    "recommendations": ["user_id", "rank"],
}
VOLATILE = {"run_id", "embedded_at", "seen_at"}  # differ between runs by design


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nightly")
    build_demo_data(folder / "demo", limit=N_ITEMS, seed=7)
    return folder


def write_conf(folder: Path, root: str) -> Path:
    conf = folder / f"{root}.yaml"
    conf.write_text(f"""
catalog: {{path: {folder}/demo/catalog.parquet}}
events: {{path: {folder}/demo/events.parquet}}
output: {{root: {folder}/{root}}}
spark: {{master: "local[2]", driver_memory: 1g, shuffle_partitions: 4, conf: {{spark.ui.enabled: "false"}}}}
embed: {{image_size: 64, batch_size: 32}}
similar: {{k: 5}}
recommend: {{n: 5}}
""")
    return conf


def start(conf: Path, command: str = "nightly") -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lookalike.cli", command, "--conf", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_when(proc: subprocess.Popen, pattern: str, delay: float) -> str:
    """SIGKILL the whole process group (driver, JVM, Python workers) `delay` s after a log line matches."""
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "".join(seen)
    raise AssertionError(f"the run ended before {pattern!r}:\n{''.join(seen)[-4000:]}")


def snapshot(root: Path) -> dict[str, pd.DataFrame]:
    found = {}
    for name, keys in TABLE_KEYS.items():
        path = tables.table_path(str(root), name)
        if tables.exists(path):
            frame = tables.read_arrow(path).to_pandas()
            assert not frame.duplicated(keys).any(), f"{name} has duplicate {keys} rows"
            found[name] = frame.drop(columns=[c for c in frame.columns if c in VOLATILE]).sort_values(
                keys, ignore_index=True
            )
    return found


def same_rows(left: pd.DataFrame, right: pd.DataFrame, name: str) -> None:
    """Equal row by row: vectors and scores to float32 noise, everything else exactly."""
    assert list(left.columns) == list(right.columns) and len(left) == len(right), name
    for column in left.columns:
        a, b = left[column].tolist(), right[column].tolist()
        if column in ("embedding", "score"):
            assert (
                np.abs(
                    np.array([np.asarray(x, dtype=np.float64) for x in a])
                    - np.array([np.asarray(y, dtype=np.float64) for y in b])
                ).max()
                < 1e-5
            ), (name, column)
        else:
            plain = [list(x) if isinstance(x, np.ndarray) else x for x in a]
            assert plain == [list(y) if isinstance(y, np.ndarray) else y for y in b], (name, column)


def runs_table(root: Path) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), "runs")).to_pandas()


@pytest.fixture(scope="module")
def reference(demo: Path) -> tuple[Path, str]:
    """A clean nightly; while it runs, a second one on the same root must refuse."""
    conf = write_conf(demo, "clean")
    proc = start(conf)
    while not (demo / "clean" / lock.LOCK_FILE).exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        time.sleep(0.2)
    second = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "nightly", "--conf", str(conf)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = finish(proc)
    assert second.returncode == 1
    assert "output root is in use by run" in second.stderr and "nightly" in second.stderr
    return demo / "clean", log


def test_clean_run_logs_every_stage_and_exports(reference: tuple[Path, str]) -> None:
    root, _ = reference
    runs = runs_table(root)
    assert runs["run_id"].nunique() == 1
    assert sorted(runs["stage"]) == sorted(["embed", "index", "similar", "recommend", "export", "nightly"])
    assert (runs["status"] == "succeeded").all()
    metrics = {row.stage: dict(row.metrics) for row in runs.itertuples()}
    assert metrics["embed"]["embedded"] == N_ITEMS and metrics["embed"]["images_per_s"] > 0
    assert 0.9 <= metrics["index"]["min_recall_at_10"] <= 1.0
    run_id = runs["run_id"].iloc[0]
    for name in export.EXPORTED:
        folder = Path(export.export_root(str(root), name))
        assert export.latest(str(root), name) == run_id
        assert (folder / f"run_id={run_id}" / "_SUCCESS").exists()
        exported = pd.read_parquet(folder / f"run_id={run_id}")
        assert len(exported) == len(tables.read_arrow(tables.table_path(str(root), name)))
    assert not (root / lock.LOCK_FILE).exists(), "the lock is released"
    assert not list((root / files.STAGING).glob("*/*")), "no staging left behind"


def test_unchanged_rerun_does_no_work(reference: tuple[Path, str], demo: Path) -> None:
    root, _ = reference
    before = snapshot(root)
    finish(start(write_conf(demo, "clean")))
    runs = runs_table(root)
    last = runs[runs["run_id"] == runs["run_id"].max()]
    metrics = {row.stage: dict(row.metrics) for row in last.itertuples()}
    assert metrics["embed"]["embedded"] == 0 and metrics["embed"]["unchanged"] == N_ITEMS
    assert metrics["index"]["shards_built"] == 0
    assert metrics["similar"]["shards_recomputed"] == 0
    assert metrics["recommend"]["unchanged"] == 1
    after = snapshot(root)
    for name in before:
        same_rows(before[name], after[name], name)


def test_killed_runs_are_finished_by_the_next_run(reference: tuple[Path, str], demo: Path) -> None:
    conf = write_conf(demo, "crashy")
    root = demo / "crashy"
    points = [
        ("embed", r"embed \S+: \d+ catalog items", 4.0),
        ("index", r"index \S+: \d+ shards of model", 1.0),
        ("similar", r"similar \S+: \d+ of \d+ shards to compute", 1.0),
        ("recommend", r"recommend \S+: \d+ users in", 1.0),
    ]
    killed = []
    for stage, pattern, delay in points:
        log = kill_when(start(conf), pattern, delay)
        killed.append(re.search(r"run (\S+) holds", log).group(1))
        snapshot(root)  # every table that exists is whole: readable, no duplicate keys
        assert (root / lock.LOCK_FILE).exists(), f"killed mid-{stage}: the dead run's lock stays"
    finish(start(conf))
    reference_tables, final = snapshot(reference[0]), snapshot(root)
    assert sorted(final) == sorted(reference_tables)
    for name in reference_tables:
        same_rows(reference_tables[name], final[name], name)
    runs = runs_table(root)
    interrupted = runs[runs["status"] == "interrupted"]
    assert sorted(interrupted["run_id"]) == sorted(killed)
    assert not list((root / files.STAGING).glob("*/*")), "the dead runs' staging was cleared"

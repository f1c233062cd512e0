"""`lookalike nightly` as the scheduler runs it: a real process, killed with SIGKILL at several points.

One clean run over a small demo catalog is the reference. A second output root then goes through a chain
of runs each killed mid-stage (embed, index, similar, recommend), and a last run that completes; its tables
must equal the reference row by row. Each kill is placed from what the run shows (a log line, the first
shard of its index build on disk) and where it landed is read back from what the run left (its `runs` rows,
its outputs' versions): every one of them must have hit its stage before that stage's commit. Between kills,
every table must be whole: readable, no duplicate keys. Also checked: the lock refuses a second live run, the
`runs` log, the exports, and that an unchanged re-run does no work.

The process, trigger, landing and table comparison helpers are the chaos benchmark's (`benchmarks/chaos.py`),
which kills runs the same way at random.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import chaos
from lookalike.demo_data import build_demo_data
from lookalike.run import export, lock
from lookalike.storage import files, tables

pytestmark = pytest.mark.spark  # every test runs `lookalike nightly` in a subprocess

N_ITEMS = 160


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


def finish(nightly: chaos.Nightly, timeout: float = 600) -> str:
    status = nightly.wait(timeout)
    assert status == 0, nightly.log[-4000:]
    return nightly.log


def snapshot(root: Path) -> dict[str, pd.DataFrame]:
    """Every table that exists, without its volatile columns; each must be whole: no duplicate keys."""
    found = {}
    for name, spec in chaos.TABLES.items():
        frame = chaos.read_rows(root, name)
        if frame is not None:
            assert chaos.duplicate_keys(name, frame) == 0, f"{name} has duplicate {spec.key} rows"
            found[name] = frame
    return found


def same_rows(left: pd.DataFrame, right: pd.DataFrame, name: str) -> None:
    """Equal row by row: vectors and scores to float32 noise, everything else exactly (`chaos.diff`)."""
    found = chaos.diff(name, left, right)
    assert found.equal, (name, found)


def runs_table(root: Path) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), "runs")).to_pandas()


def first_shard_built(watch: chaos.Watch) -> bool:
    """Mid-index: the run's build folder holds a finished shard, so its other shards are still to come."""
    run_id = watch.nightly.run_id(watch.root)
    return run_id is not None and any((watch.root / "indexes" / run_id).glob("*/manifest.json"))


@pytest.fixture(scope="module")
def reference(demo: Path) -> tuple[Path, str]:
    """A clean nightly; while it runs, a second one on the same root must refuse."""
    conf = write_conf(demo, "clean")
    nightly = chaos.Nightly(conf)
    while not (demo / "clean" / lock.LOCK_FILE).exists():
        assert nightly.running, nightly.log[-4000:]
        time.sleep(0.2)
    second = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "nightly", "--conf", str(conf)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = finish(nightly)
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
    finish(chaos.Nightly(write_conf(demo, "clean")))
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
    points = [  # (stage, kill trigger, the commit it must come before)
        ("embed", chaos.on_line(r"embed \S+: \d+ catalog items"), "embeddings"),
        ("index", first_shard_built, "index"),
        ("similar", chaos.on_line(r"similar \S+: \d+ of \d+ shards to compute"), "similar_items"),
        ("recommend", chaos.on_line(r"recommend \S+: \d+ users in"), "recommendations"),
    ]
    killed = []
    for stage, trigger, commit in points:
        done = chaos.night(conf, root, trigger)
        assert done.killed and done.run_id is not None and done.landing is not None, done.log[-4000:]
        assert done.landing.phase == stage, f"meant to kill mid-{stage}, landed {done.landing}"
        assert done.landing.position < chaos.commit_at(commit), f"landed {done.landing}, after {commit}"
        killed.append(done.run_id)
        snapshot(root)  # every table that exists is whole: readable, no duplicate keys
        assert (root / lock.LOCK_FILE).exists(), f"killed mid-{stage}: the dead run's lock stays"
    finish(chaos.Nightly(conf))
    reference_tables, final = snapshot(reference[0]), snapshot(root)
    assert sorted(final) == sorted(reference_tables)
    for name in reference_tables:
        same_rows(reference_tables[name], final[name], name)
    runs = runs_table(root)
    interrupted = runs[runs["status"] == "interrupted"]
    assert sorted(interrupted["run_id"]) == sorted(killed)
    assert not list((root / files.STAGING).glob("*/*")), "the dead runs' staging was cleared"

"""The chaos benchmark (`benchmarks/chaos.py`) in small: four nights over a changing 60-item catalog, killed
where the test chooses, then compared with a clean run row by row and file by file.

Each kill is placed from what the run shows, never from a clock, and where it landed is read back from what
the run left (its `runs` rows, its tables' Delta versions), so the test knows it killed on both sides of a
commit:

1. the first night, on an empty root, the moment embed has planned its work: before embed commits;
2. after a catalog change, the moment `embeddings` has a new version: after embed's commit, before index's;
3. after another change, the moment `recommendations` has a new version: after recommend's commit, before the
   exports are published;
4. after another change, not killed: the night that must finish what the killed ones left.

Then the benchmark's own ending, less its extra clean run (which could only hide what night 4 got wrong):
a reference run on a fresh root, every table equal (nothing lost, nothing doubled), every run in `runs`
once, and no file that nothing refers to.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from benchmarks import chaos
from lookalike.demo_data import FASHION_MNIST_DIR
from lookalike.index.builds import BUILD_SUMMARY
from lookalike.run import runs
from lookalike.storage import tables

pytestmark = pytest.mark.spark  # every night is a real `lookalike nightly` process

N_ITEMS = 60
SEED = 1  # its three changes break an image (missing file), repair it, break another (HTML bytes): asserted
SPARE = 12  # demo images beyond the catalog, for added items and replaced images


def landed(done: chaos.Night) -> chaos.Landing:
    assert done.killed and done.run_id is not None and done.landing is not None, done.log[-4000:]
    return done.landing


def test_killed_nights_end_where_a_clean_run_would(tmp_path: Path) -> None:
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (make datasets)")
    rng = random.Random(SEED)
    sizes = chaos.Sizes.for_catalog(N_ITEMS)
    session = chaos.Session.prepare(tmp_path, N_ITEMS, SPARE, rng)

    before_embed = session.run(chaos.on_line(r"embed \S+: \d+ catalog items"))
    changes = [session.catalog.change(sizes)]
    after_embed = session.run(chaos.on_commit("embeddings"))
    changes.append(session.catalog.change(sizes))
    after_recommend = session.run(chaos.on_commit("recommendations"))
    changes.append(session.catalog.change(sizes))
    unkilled = session.run()  # the night that finishes what the killed ones left: its tables must be right
    reference = chaos.night(session.reference_conf, session.reference)

    first, second, third = (landed(done) for done in (before_embed, after_embed, after_recommend))
    assert first.phase == "embed" and first.position < chaos.commit_at("embeddings"), first
    assert chaos.commit_at("embeddings") <= second.position < chaos.commit_at("index"), second
    assert chaos.commit_at("recommendations") <= third.position < chaos.commit_at("export"), third
    for done in (unkilled, reference):
        assert done.status == 0, done.log[-4000:]

    verdict = chaos.measure(session)
    assert verdict.clean, "\n".join(chaos.report(verdict))
    summary = " | ".join(changes)
    assert all(kind in summary for kind in ("missing 1", "fixed 1", "html 1")), summary
    assert verdict.diffs["quarantine"].rows == len(session.catalog.broken) > 0


def test_a_run_killed_right_after_taking_over_still_logs_the_run_it_took_over(tmp_path: Path) -> None:
    """Found by the benchmark: a run killed while its Spark session started, after it had taken over a dead
    run's lock, lost the dead run's `interrupted` row; the one after it only learnt of the second."""
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (make datasets)")
    session = chaos.Session.prepare(tmp_path, 40, 4, random.Random(SEED))
    first = session.run(chaos.on_line(r"embed \S+: \d+ catalog items"))
    second = session.run(chaos.on_line(r"run \S+ holds "))  # the lock is taken over; Spark is starting
    assert first.killed and second.killed
    assert session.run().status == 0
    log = tables.read_arrow(tables.table_path(str(session.root), runs.RUNS)).to_pandas()
    interrupted = set(log.loc[log["status"] == runs.INTERRUPTED, "run_id"])
    assert {first.run_id, second.run_id} <= interrupted, log[["run_id", "stage", "status"]]
    assert chaos.diff_runs(session.root, session.held_lock()).lost == 0


# --- the instrument: a zero above only means something if these counts can be non-zero -----------------


def embeddings(*rows: tuple[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"item_id": [r[0] for r in rows], "embedding": [np.array(r[1], dtype=np.float32) for r in rows]}
    )


def neighbours(*rows: tuple[str, int, str, float]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["item_id", "rank", "similar_item_id", "score"])


def test_diff_counts_lost_doubled_and_changed_rows() -> None:
    reference = embeddings(("a", [1, 0]), ("b", [0, 1]), ("c", [0.6, 0.8]))
    assert chaos.diff("embeddings", reference, embeddings(("a", [1, 1e-6]), ("b", [0, 1]), ("c", [0.6, 0.8]))).equal
    found = chaos.diff("embeddings", reference, embeddings(("a", [1, 0]), ("a", [1, 0]), ("c", [0.8, 0.6])))
    assert (found.rows, found.lost, found.doubled) == (3, 2, 2)  # b lost, a doubled, c changed: lost and doubled
    assert chaos.diff("embeddings", reference, None).lost == 3


def test_diff_lets_tied_scores_swap_and_nothing_else() -> None:
    reference = neighbours(("q", 1, "b", 0.9), ("q", 2, "c", 0.8), ("q", 3, "d", 0.8), ("q", 4, "e", 0.7))
    swapped = neighbours(("q", 1, "b", 0.9), ("q", 2, "d", 0.8), ("q", 3, "c", 0.8), ("q", 4, "e", 0.7))
    cut = neighbours(("q", 1, "b", 0.9), ("q", 2, "c", 0.8), ("q", 3, "d", 0.8), ("q", 4, "x", 0.7))
    assert chaos.diff("similar_items", reference, swapped).equal
    assert chaos.diff("similar_items", reference, cut).equal  # another item tied at the last score: the cut
    wrong = chaos.diff("similar_items", reference, swapped[:3])  # the last neighbour lost
    assert (wrong.lost, wrong.doubled) == (1, 0)
    moved = neighbours(("q", 1, "c", 0.8), ("q", 2, "b", 0.9), ("q", 3, "d", 0.8), ("q", 4, "e", 0.7))
    assert not chaos.diff("similar_items", reference, moved).equal
    twice = neighbours(("q", 1, "b", 0.9), ("q", 2, "c", 0.8), ("q", 3, "c", 0.8), ("q", 4, "e", 0.7))
    assert chaos.diff("similar_items", reference, twice).doubled == 1


def test_orphans_are_found_in_every_area(tmp_path: Path) -> None:
    root = tmp_path / "out"
    table = tables.table_path(str(root), "similar_items")
    for _ in range(chaos.KEEP_VERSIONS + 1):  # the first version's file is kept by no kept version
        write_deltalake(table, pa.table({"x": [1]}), mode="overwrite")
    stray = Path(table) / "data" / "20260101T000000-dead" / "part-0.parquet"  # a write that never committed
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"PAR1")
    builds = root / "indexes"
    for run in ("r1", "r2", "r3", "r4"):
        (builds / run).mkdir(parents=True)
        if run != "r4":  # r4 died mid-build
            (builds / run / BUILD_SUMMARY).write_text("{}")
    (builds / "LATEST").write_text("r3")
    snapshot = root / "export" / "similar_items" / "run_id=r9"
    snapshot.mkdir(parents=True)
    (snapshot / "part-0.parquet").write_bytes(b"PAR1")  # no _SUCCESS
    (root / "staging" / "r8" / "similar").mkdir(parents=True)
    (root / "staging" / "r8" / "similar" / "part-0.parquet").write_bytes(b"PAR1")
    (root / "staging" / "r9").mkdir()  # an empty run folder is fine
    (root / "state").mkdir()
    (root / "state" / "similar_items.json").write_text("{}")
    (root / "state" / "similar_items.json.tmp-1").write_text("{")
    (root / "_lock.json").write_text("{}")
    found = chaos.orphans(root)
    assert len(found["similar_items"]) == 2 and str(stray.relative_to(table)) in found["similar_items"]
    assert found["indexes"] == ["indexes/r1/build.json", "indexes/r4"]  # beyond index.keep_builds, incomplete
    assert found["export"] == ["export/similar_items/run_id=r9/part-0.parquet"]
    assert found["staging"] == ["staging/r8/similar/part-0.parquet"]
    assert sorted(found["other"]) == ["_lock.json", "state/similar_items.json.tmp-1"]


def test_runs_log_misses_and_repeats_are_counted(tmp_path: Path) -> None:
    now = runs.now()
    for run_id, stage, status in (
        ("a", "nightly", runs.SUCCEEDED),
        ("b", "embed", runs.SUCCEEDED),  # held the lock, then no nightly row: its interruption went unrecorded
        ("c", "nightly", runs.SUCCEEDED),
        ("c", "nightly", runs.INTERRUPTED),
    ):
        runs.record(str(tmp_path), run_id, stage, status, now, now)
    found = chaos.diff_runs(tmp_path, ["a", "b", "c"])
    assert (found.rows, found.lost, found.doubled) == (4, 1, 1)

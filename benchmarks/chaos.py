"""Chaos nights: `lookalike nightly` killed with SIGKILL at random moments over a catalog that keeps changing,
then checked against a clean run row by row and file by file.

What it does, all from one seeded `random.Random` (`--seed`), so the same arguments replay the same chaos:

1. builds the Fashion-MNIST demo data (`--limit` catalog items plus a pool of spare images) and runs one
   nightly over it on an empty output root, unkilled: the initial build, whose duration estimates T;
2. runs `--runs` nights. Before each, the catalog changes a little: items added (spare images), removed,
   images replaced by another image's bytes (same `item_id`), a few broken (HTML bytes written into the image
   file, or `image_uri` pointed at a missing file) and some broken ones repaired. About one night in ten is a
   bad feed instead (30% of the rows dropped, or 30% of the images missing): `embed.max_removed_fraction` or
   `embed.max_bad_fraction` must refuse it with nothing committed, and the feed is whole again the next night.
   Each other night is killed with SIGKILL (the whole process group: driver, JVM, Python workers) at a moment
   drawn uniformly from (0, T), or not killed (about one in four). T is the mean duration of the nights so far
   that ran to the end, the initial build's until there is one: a kill drawn after the night's end finds it
   done ("ended before its kill");
3. runs one clean nightly over the final catalog on the chaos root, and one on a fresh root: the reference;
4. compares every table of the chaos root with the reference and looks for files nothing refers to.

Where each kill landed is read from what the run left, not from the clock: the stage that was running (the
first without a `succeeded` row of the run in `runs`) and which of its commits had happened (a new Delta
version of `embeddings` or `quarantine` for embed, `indexes/LATEST` naming the run for index, `duplicates`
or `similar_items` for similar, `recommendations` for recommend, the `export/LATEST` manifest for export).
"starting" is before the first stage: before the run took the lock, or while its Spark session started.

How to read the output. One line per night: the catalog change (+added -removed ~replaced, html/missing
broken, fixed), the kill time (or "no kill", or the bad feed), where the kill landed and the exit status
(-9: killed). Then a histogram of the landing points, and one line per table:

    table            rows   lost  doubled  orphaned_files

- rows: rows in the chaos root's table. lost: reference rows with no equal row there. doubled: rows there with
  no equal reference row (a duplicate key, or a row the reference does not have; a row whose content differs
  counts once lost and once doubled). Equal means every column but the volatile ones (`run_id`, timestamps,
  quarantine's `attempts`, which counts the runs that tried),
  vectors and scores to 1e-5; in `similar_items` and `recommendations` items whose scores tie within 1e-5 may
  come in either order, and the last tie at the cut may be another item with the same score.
- `runs` is the log, not compared with the reference: lost counts runs that held the lock but have no
  `nightly` row (`succeeded`, `failed` or `interrupted`), doubled counts repeated (run_id, stage) rows.
- orphaned_files: files in the table's folder (`_delta_log` aside) that none of the newest
  `tables.keep_versions` versions references, after the retention of the last run (the chaos config sets
  `tables.vacuum_min_age_hours: 0`, so nothing is spared for its age). The lines below the tables count the
  same beside them: index builds that are incomplete or beyond `index.keep_builds` (LATEST's always kept),
  export snapshots without `_SUCCESS` or beyond `export.keep`, anything left under `staging/`, and stray
  files (temporary files of an interrupted write, a lock left behind, recommend state that
  `state/recommendations.json` does not point at).

Target: 0 lost, 0 doubled, 0 orphaned, every bad feed refused with nothing committed, and every night that
was neither killed nor a bad feed exiting 0. The exit status is 1 otherwise. The work folder (`--out`, default
a new temporary folder) is kept for a look afterwards.

    .venv/bin/python benchmarks/chaos.py --runs 20 --limit 300 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from lookalike.demo_data import FASHION_MNIST_DIR, build_demo_data
from lookalike.index.builds import BUILD_SUMMARY, indexes_root
from lookalike.run import export, lock, runs
from lookalike.storage import files, published, tables

POLL_SECONDS = 0.05  # how often a kill trigger looks at the run
TOLERANCE = 1e-5  # vectors and scores: float32 noise between runs that batch items differently
P_NO_KILL = 0.25
P_BAD_FEED = 0.1
BAD_FEED_SHARE = 0.3  # well over both guards' 0.2
MAX_BROKEN_SHARE = 0.08  # broken images at any time: far from embed.max_bad_fraction
HTML = b"<html><body><h1>503 Service Unavailable</h1></body></html>"

# The chaos config's retention, which the orphan check judges against.
KEEP_VERSIONS, KEEP_BUILDS, EXPORT_KEEP = 3, 2, 2


# --- the tables and how their rows compare --------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    """A table's unique key, the columns that differ between runs by design, and for ranked lists the column
    each rank lists (ranks of equal score may come in either order)."""

    key: tuple[str, ...]
    volatile: tuple[str, ...]
    entry: str | None = None  # ranked tables: key = (owner, rank), entry = what the rank holds


TABLES = {
    "embeddings": TableSpec(("item_id",), ("run_id", "embedded_at")),
    "quarantine": TableSpec(("item_id",), ("run_id", "seen_at", "attempts", "next_retry_at")),
    "duplicates": TableSpec(("item_id",), ("run_id",)),
    "similar_items": TableSpec(("item_id", "rank"), ("run_id",), entry="similar_item_id"),
    "recommendations": TableSpec(("user_id", "rank"), ("run_id",), entry="item_id"),
}
FLOATS = ("embedding", "score")


def read_rows(root: str | Path, name: str) -> pd.DataFrame | None:
    """The current version of table `name` without its volatile columns, sorted by key; None if absent."""
    path = tables.table_path(str(root), name)
    if not tables.exists(path):
        return None
    spec = TABLES[name]
    frame = tables.read_arrow(path).to_pandas()
    return frame.drop(columns=[c for c in spec.volatile if c in frame.columns]).sort_values(
        list(spec.key), ignore_index=True
    )


def duplicate_keys(name: str, frame: pd.DataFrame) -> int:
    """Rows beyond the first of their key: a whole table has none."""
    return int(frame.duplicated(list(TABLES[name].key)).sum())


@dataclass(frozen=True)
class Diff:
    """How one table of a root compares with the reference (module docstring: lost, doubled)."""

    rows: int
    lost: int
    doubled: int
    examples: tuple[str, ...] = ()

    @property
    def equal(self) -> bool:
        return self.lost == 0 and self.doubled == 0


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _same(a: Any, b: Any, column: str) -> bool:
    if column in FLOATS:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return x.shape == y.shape and bool(np.all(np.abs(x - y) < TOLERANCE))
    a, b = _plain(a), _plain(b)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True  # a null int column reads as NaN
    return bool(a == b)


def _rows_equal(a: dict[str, Any], b: dict[str, Any], columns: Iterable[str]) -> bool:
    return all(_same(a[c], b[c], c) for c in columns)


def diff(name: str, reference: pd.DataFrame | None, found: pd.DataFrame | None) -> Diff:
    """Compare `found` (a root's `read_rows`) with the `reference` root's rows of the same table."""
    ref_rows = [] if reference is None else reference.to_dict("records")
    got_rows = [] if found is None else found.to_dict("records")
    if reference is not None and found is not None and list(reference.columns) != list(found.columns):
        return Diff(len(got_rows), len(ref_rows), len(got_rows), (f"columns {list(found.columns)}",))
    spec = TABLES[name]
    compare = _diff_ranked if spec.entry else _diff_keyed
    lost, doubled = compare(spec, ref_rows, got_rows)
    examples = [f"lost {tuple(r[k] for k in spec.key)}" for r in lost[:3]]
    examples += [f"doubled {tuple(r[k] for k in spec.key)}" for r in doubled[:3]]
    return Diff(len(got_rows), len(lost), len(doubled), tuple(examples))


def _group(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[c] for c in columns), []).append(row)
    return grouped


def _diff_keyed(spec: TableSpec, ref: list[dict], got: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows matched by key, then compared on every other column."""
    by_ref, by_got = _group(ref, spec.key), _group(got, spec.key)
    lost: list[dict] = []
    doubled: list[dict] = []
    for key in by_ref.keys() | by_got.keys():
        left, right = list(by_ref.get(key, [])), list(by_got.get(key, []))
        columns = [c for c in (left or right)[0] if c not in spec.key]
        for row in right:
            match = next((r for r in left if _rows_equal(r, row, columns)), None)
            if match is None:
                doubled.append(row)
            else:
                left.remove(match)
        lost += left
    return lost, doubled


def _diff_ranked(spec: TableSpec, ref: list[dict], got: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per owner (an item, a user), each listed entry is matched with the reference's same entry if its rank
    lies in the same run of tied scores; an entry left over in the last tie of the list may match another
    one with the same score (which of several tied items makes the cut is not fixed)."""
    owner, rank = spec.key
    assert spec.entry is not None
    entry = spec.entry
    by_ref, by_got = _group(ref, (owner,)), _group(got, (owner,))
    lost: list[dict] = []
    doubled: list[dict] = []
    for key in by_ref.keys() | by_got.keys():
        left = sorted(by_ref.get(key, []), key=lambda r: r[rank])
        right = sorted(by_got.get(key, []), key=lambda r: r[rank])
        columns = [c for c in (left or right)[0] if c not in (owner, rank)]
        ties: dict[int, tuple[int, int]] = {}  # reference rank -> (first, last) rank of its run of tied scores
        start = 0
        for i in range(1, len(left) + 1):
            if i == len(left) or abs(left[i]["score"] - left[i - 1]["score"]) >= TOLERANCE:
                for row in left[start:i]:
                    ties[row[rank]] = (left[start][rank], left[i - 1][rank])
                start = i
        unmatched = list(left)
        rest = []
        for row in right:
            match = next(
                (
                    r
                    for r in unmatched
                    if r[entry] == row[entry]
                    and ties[r[rank]][0] <= row[rank] <= ties[r[rank]][1]
                    and _rows_equal(r, row, columns)
                ),
                None,
            )
            if match is None:
                rest.append(row)
            else:
                unmatched.remove(match)
        last = ties[left[-1][rank]] if left else (0, -1)
        for row in list(rest):
            match = next(
                (
                    r
                    for r in unmatched
                    if ties[r[rank]] == last
                    and last[0] <= row[rank] <= last[1]
                    and _same(r["score"], row["score"], "score")
                ),
                None,
            )
            if match is not None:
                unmatched.remove(match)
                rest.remove(row)
        lost += unmatched
        doubled += rest
    return lost, doubled


def diff_runs(root: str | Path, held_lock: Iterable[str]) -> Diff:
    """The `runs` log: every run that held the lock ends with one `nightly` row, and no (run, stage) twice."""
    frame = tables.read_arrow(tables.table_path(str(root), runs.RUNS)).to_pandas()
    doubled = frame[frame.duplicated(["run_id", "stage"])]
    ended = set(frame.loc[frame["stage"] == "nightly", "run_id"])
    missing = sorted(set(held_lock) - ended)
    examples = [f"no nightly row for run {r}" for r in missing[:3]]
    examples += [f"doubled ({r.run_id}, {r.stage})" for r in doubled.head(3).itertuples()]
    return Diff(len(frame), len(missing), len(doubled), tuple(examples))


# --- files nothing refers to ----------------------------------------------------------------------------


def _files_under(folder: Path, skip: str | None = None) -> list[Path]:
    found = []
    for here, dirs, names in os.walk(folder):
        if skip in dirs:
            dirs.remove(skip)
        found += [Path(here) / n for n in names]
    return sorted(found)


def table_orphans(root: str | Path, name: str, keep_versions: int = KEEP_VERSIONS) -> list[str]:
    """Files of table `name` that none of its newest `keep_versions` versions references."""
    folder = Path(tables.table_path(str(root), name))
    if not folder.exists():
        return []
    on_disk = {str(p.relative_to(folder)) for p in _files_under(folder, skip="_delta_log")}
    if not DeltaTable.is_deltatable(str(folder)):
        return sorted(on_disk)  # a first write that never committed
    current = DeltaTable(str(folder)).version()
    referenced: set[str] = set()
    for version in range(max(0, current - keep_versions + 1), current + 1):
        actions = DeltaTable(str(folder), version=version).get_add_actions(flatten=True)
        referenced.update(str(p) for p in actions.column("path").to_pylist())
    return sorted(on_disk - referenced)


def _versioned_orphans(folder: Path, marker: str, prefix: str, keep: int, current: str | None) -> list[Path]:
    """Version folders under `folder` that pruning should have removed, and anything else but LATEST."""
    if not folder.exists():
        return []
    found = published.versions(str(folder), marker, prefix)
    complete = [v for v, done in found if done]
    kept = {f"{prefix}{v}" for v in complete[-keep:]} | ({f"{prefix}{current}"} if current else set())
    stray: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name == published.LATEST or entry.name in kept:
            continue
        if entry.is_dir():
            stray += _files_under(entry) or [entry]  # an empty folder counts once
        else:
            stray.append(entry)
    return stray


def orphans(root: str | Path) -> dict[str, list[str]]:
    """Everything under the output root that nothing current or kept refers to, by area: each table, then
    `indexes`, `export`, `staging` and `other` (stray files beside them, a lock left behind)."""
    root = Path(root)
    found: dict[str, list[str]] = {}
    table_names = sorted(p.name for p in (root / "tables").iterdir()) if (root / "tables").exists() else []
    for name in table_names:
        found[name] = table_orphans(root, name)
    builds = Path(indexes_root(str(root)))
    found["indexes"] = [
        str(p.relative_to(root))
        for p in _versioned_orphans(builds, BUILD_SUMMARY, "", KEEP_BUILDS, published.latest(str(builds)))
    ]
    manifest = export.manifest(str(root)) or {}
    stray_export: list[Path] = []
    export_dir = root / "export"
    if export_dir.exists():
        for entry in sorted(export_dir.iterdir()):
            if entry.name == export.MANIFEST:
                continue
            if entry.is_dir() and entry.name in export.EXPORTED:
                named = manifest[entry.name].run_id if entry.name in manifest else None
                stray_export += _versioned_orphans(entry, export.SUCCESS, export.PREFIX, EXPORT_KEEP, named)
            else:
                stray_export += _files_under(entry) if entry.is_dir() else [entry]
    found["export"] = [str(p.relative_to(root)) for p in stray_export]
    staging = root / files.STAGING
    # Empty per-run folders may stay until the next run; files may not.
    found["staging"] = [str(p.relative_to(root)) for p in _files_under(staging)] if staging.exists() else []
    state = files.read_json(files.state_path(str(root), "recommendations")) or {}
    referenced = [Path(folder) for folder in state.get("state", {}).values()]  # the recommend state's datasets
    other = [
        p
        for p in (_files_under(root / "state") if (root / "state").exists() else [])
        if p.suffix != ".json" and not any(p.is_relative_to(folder) for folder in referenced)
    ]
    known = {"tables", "indexes", "export", files.STAGING, "state", lock.LOCK_FILE + lock.MUTEX_SUFFIX}
    for entry in sorted(root.iterdir()):
        if entry.name not in known:
            other += _files_under(entry) if entry.is_dir() else [entry]
    found["other"] = [str(p.relative_to(root)) for p in other]
    return found


# --- what a run has committed, and where a kill landed --------------------------------------------------

STAGE_OUTPUTS = {  # in the order each stage commits them
    "embed": ("embeddings", "quarantine"),
    "index": ("index",),
    "similar": ("duplicates", "similar_items"),
    "recommend": ("recommendations",),
    "export": ("export",),
}
PHASES = ("starting", *STAGE_OUTPUTS, "finishing")


def output_marker(root: str | Path, output: str) -> object:
    """What changes when `output` is committed: a table's Delta version, the run id in `indexes/LATEST`,
    the run id of the `export/LATEST` manifest."""
    if output == "index":
        return published.latest(indexes_root(str(root)))
    if output == "export":
        body = files.read_json(export.manifest_path(str(root)))
        return None if body is None else body["run_id"]
    return tables.version(tables.table_path(str(root), output))


def outputs(root: str | Path) -> dict[str, object]:
    return {o: output_marker(root, o) for stage in STAGE_OUTPUTS.values() for o in stage}


def runs_rows(root: str | Path, run_id: str) -> pd.DataFrame:
    path = tables.table_path(str(root), runs.RUNS)
    if not tables.exists(path):
        return pd.DataFrame(columns=["run_id", "stage", "status"])
    frame = tables.read_arrow(path, columns=["run_id", "stage", "status"]).to_pandas()
    return frame[frame["run_id"] == run_id]


@dataclass(frozen=True)
class Landing:
    """Where a kill landed: the phase that was running and which of its commits had happened."""

    phase: str  # "starting", a stage, or "finishing" (after the export row)
    committed: tuple[str, ...] = ()  # the phase's outputs that the run had committed
    locked: bool = True  # starting: whether the run had taken the lock
    finished: bool = False  # finishing: whether the `nightly` row was written

    @property
    def position(self) -> tuple[int, int]:
        """Order in a run's timeline: (phase, how far through the phase's commits). Compare with `commit_at`."""
        done = [STAGE_OUTPUTS[self.phase].index(o) + 1 for o in self.committed] if self.committed else [0]
        return PHASES.index(self.phase), max(done)

    def __str__(self) -> str:
        if self.phase == "starting":
            return "starting, lock held" if self.locked else "starting, before the lock"
        if self.phase == "finishing":
            return "finished, before exit" if self.finished else "after export, before the nightly row"
        many = len(STAGE_OUTPUTS[self.phase]) > 1
        if not self.committed:
            return f"{self.phase}, before its commit{'s' if many else ''}"
        return f"{self.phase}, after committing {' + '.join(self.committed)}" if many else f"{self.phase}, after commit"


def commit_at(output: str) -> tuple[int, int]:
    """The timeline position (`Landing.position`) just after `output` is committed."""
    stage = next(s for s, outs in STAGE_OUTPUTS.items() if output in outs)
    return PHASES.index(stage), STAGE_OUTPUTS[stage].index(output) + 1


def landing(root: str | Path, run_id: str | None, lines: list[str], before: dict[str, object]) -> Landing:
    """Where a killed run stopped, from what it left: its `runs` rows, its outputs against `before`."""
    if run_id is None:
        return Landing("starting", locked=False)
    rows = runs_rows(root, run_id)
    done = set(rows.loc[rows["status"] == runs.SUCCEEDED, "stage"])
    if "nightly" in done:
        return Landing("finishing", finished=True)
    phase = next((stage for stage in STAGE_OUTPUTS if stage not in done), None)
    if phase is None:
        return Landing("finishing")
    if phase == "embed" and not any(f"{run_id}: embed starting" in line for line in lines):
        return Landing("starting")
    return Landing(phase, tuple(o for o in STAGE_OUTPUTS[phase] if output_marker(root, o) != before[o]))


# --- running and killing nightly ------------------------------------------------------------------------


class Nightly:
    """One `lookalike nightly` process in its own process group (so that a kill takes the JVM and the Python
    workers with it), its output (stdout and stderr) read into `lines` as it comes."""

    def __init__(self, conf: Path):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lookalike.cli", "nightly", "--conf", str(conf)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the driver, its JVM and the JVM's Python workers."""
        with contextlib.suppress(ProcessLookupError):  # it had already ended
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float | None = None) -> int:
        """The exit status once the process ended and its output was read (-9: killed)."""
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        return status

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def run_id(self, root: str | Path) -> str | None:
        """The run id this process ran under: from its log, or from the lock it left (killed right after
        taking it); None if it never took the lock."""
        for line in self.lines:
            found = re.search(r"run (\S+) holds ", line)
            if found:
                return found.group(1)
        holder = files.read_json(f"{root}/{lock.LOCK_FILE}")
        return holder["run_id"] if holder and holder.get("pid") == self.proc.pid else None


@dataclass
class Watch:
    """What a kill trigger may look at: the running process and the output root as it was before the run."""

    nightly: Nightly
    root: Path
    before: dict[str, object]


Trigger = Callable[[Watch], bool]


def after_seconds(seconds: float) -> Trigger:
    return lambda watch: watch.nightly.elapsed >= seconds


def on_line(pattern: str) -> Trigger:
    """As soon as a log line matches `pattern`."""
    found = re.compile(pattern)
    return lambda watch: any(found.search(line) for line in list(watch.nightly.lines))


def on_commit(output: str) -> Trigger:
    """As soon as `output` (a table, "index" or "export") has been committed by this run."""
    return lambda watch: output_marker(watch.root, output) != watch.before[output]


@dataclass(frozen=True)
class Night:
    """One nightly run as the chaos saw it."""

    status: int
    seconds: float
    kill_at: float | None  # when it was killed (None: not killed, or it ended first)
    run_id: str | None
    landing: Landing | None
    log: str
    committed: tuple[str, ...]  # every output this run changed

    @property
    def killed(self) -> bool:
        return self.status == -signal.SIGKILL


def night(conf: Path, root: Path, trigger: Trigger | None = None, timeout: float = 1800) -> Night:
    """Run one nightly; SIGKILL it as soon as `trigger` says so. Reads where the kill landed."""
    before = outputs(root)
    nightly = Nightly(conf)
    watch = Watch(nightly, root, before)
    kill_at = None
    while nightly.running and nightly.elapsed < timeout:
        if trigger is not None and trigger(watch):
            kill_at = nightly.elapsed
            nightly.kill()
            break
        time.sleep(POLL_SECONDS)
    if nightly.running:
        nightly.kill()  # past the timeout: a hung run is a finding too, reported by its status
    status = nightly.wait(timeout=60)
    seconds = nightly.elapsed
    run_id = nightly.run_id(root)
    killed = status == -signal.SIGKILL
    after = outputs(root)
    return Night(
        status=status,
        seconds=seconds,
        kill_at=kill_at if killed else None,
        run_id=run_id,
        landing=landing(root, run_id, nightly.lines, before) if killed else None,
        log=nightly.log,
        committed=tuple(o for o in after if after[o] != before[o]),
    )


# --- the catalog that changes between nights ------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Most items per night for each kind of change."""

    add: int
    remove: int
    replace: int
    breaks: int

    @classmethod
    def for_catalog(cls, n: int) -> Sizes:
        """Small nights: about 1% removed or newly broken at most, far under `embed.max_removed_fraction`
        even when several killed nights' changes pile up for one run."""
        return cls(add=max(1, n // 100), remove=max(1, n // 150), replace=max(1, n // 100), breaks=max(1, n // 300))


class Catalog:
    """The catalog the chaos nights read (`chaos_catalog.parquet` in the demo folder, so relative image URIs
    resolve there), changed in place between nights, images included."""

    def __init__(self, demo: Path, size: int, rng: random.Random):
        rows = pq.read_table(demo / "catalog.parquet").to_pylist()
        if len(rows) <= size:
            raise SystemExit(f"the demo folder has {len(rows)} items, needs more than {size}")
        self.demo, self.rng = demo, rng
        self.schema = pq.read_schema(demo / "catalog.parquet")
        self.path = demo / "chaos_catalog.parquet"
        self.rows: dict[str, dict[str, Any]] = {row["item_id"]: row for row in rows[:size]}
        self.spare = rows[size:]  # images for new items and for replacements, each used once
        rng.shuffle(self.spare)
        self.broken: dict[str, tuple[str, bytes | str]] = {}  # item -> ("html", old bytes) or ("missing", old uri)
        self.write()

    def write(self, rows: Iterable[dict[str, Any]] | None = None) -> None:
        table = pa.Table.from_pylist(list(self.rows.values() if rows is None else rows), schema=self.schema)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)

    def _file(self, row: dict[str, Any]) -> Path:
        return self.demo / row["image_uri"]

    def change(self, sizes: Sizes) -> str:
        """One night's changes; returns their summary (+added -removed ~replaced, broken, fixed)."""
        rng = self.rng
        healthy = sorted(set(self.rows) - set(self.broken))
        removed = rng.sample(sorted(self.rows), min(rng.randint(0, sizes.remove), len(self.rows) // 10))
        for item in removed:
            del self.rows[item]
            self.broken.pop(item, None)
        healthy = [i for i in healthy if i in self.rows]
        replaced = rng.sample(healthy, min(rng.randint(1, sizes.replace), len(healthy), len(self.spare)))
        for item in replaced:
            self._file(self.rows[item]).write_bytes(self._file(self.spare.pop()).read_bytes())
        added = [self.spare.pop() for _ in range(min(rng.randint(1, sizes.add), len(self.spare)))]
        for row in added:
            self.rows[row["item_id"]] = row
        room = int(MAX_BROKEN_SHARE * len(self.rows)) - len(self.broken)
        fresh = [i for i in healthy if i not in replaced]
        broken = rng.sample(fresh, max(0, min(rng.randint(0, sizes.breaks), room, len(fresh))))
        kinds: Counter[str] = Counter()
        for item in broken:
            row = self.rows[item]
            if rng.random() < 0.5:
                self.broken[item] = ("html", self._file(row).read_bytes())
                self._file(row).write_bytes(HTML)
                kinds["html"] += 1
            else:
                self.broken[item] = ("missing", row["image_uri"])
                row["image_uri"] = f"images/missing/{item}.png"
                kinds["missing"] += 1
        fixed = [i for i in sorted(self.broken) if i not in broken and rng.random() < 0.3]
        for item in fixed:
            kind, old = self.broken.pop(item)
            if kind == "html":
                assert isinstance(old, bytes)
                self._file(self.rows[item]).write_bytes(old)
            else:
                self.rows[item]["image_uri"] = old
        self.write()
        return (
            f"+{len(added)} -{len(removed)} ~{len(replaced)} html {kinds['html']} missing {kinds['missing']} "
            f"fixed {len(fixed)}"
        )

    def bad_feed(self) -> str:
        """Write tonight's feed with 30% of its rows dropped or 30% of its images missing (the catalog itself
        stays as it was: `write()` restores it); returns what it did."""
        n = round(BAD_FEED_SHARE * len(self.rows))
        hit = set(self.rng.sample(sorted(self.rows), n))
        if self.rng.random() < 0.5:
            self.write(row for item, row in self.rows.items() if item not in hit)
            return f"bad feed: {n} of {len(self.rows)} rows dropped"
        self.write(
            {**row, "image_uri": f"mount-gone/{item}.png"} if item in hit else row for item, row in self.rows.items()
        )
        return f"bad feed: {n} of {len(self.rows)} images missing"


# --- one chaos session ----------------------------------------------------------------------------------


def write_conf(path: Path, catalog: Path, events: Path, root: Path, spark_local: Path) -> Path:
    """The chaos config: small and fast (32 px, local[2]), retention that the orphan check can judge."""
    conf = {
        "catalog": {"path": str(catalog)},
        "events": {"path": str(events)},
        "output": {"root": str(root)},
        "spark": {
            "master": "local[2]",
            "driver_memory": "1g",
            "shuffle_partitions": 4,
            "conf": {"spark.ui.enabled": "false", "spark.local.dir": str(spark_local)},
        },
        "embed": {"image_size": 32, "batch_size": 32, "partition_size": 100},
        "similar": {"k": 5},
        "recommend": {"n": 5},
        "index": {"keep_builds": KEEP_BUILDS},
        "export": {"keep": EXPORT_KEEP},
        "tables": {"keep_versions": KEEP_VERSIONS, "vacuum_min_age_hours": 0},
    }
    path.write_text(json.dumps(conf, indent=2) + "\n")  # JSON is YAML
    return path


@dataclass
class Session:
    """A work folder: the demo data, the catalog the nights change, the chaos root and the reference root."""

    work: Path
    catalog: Catalog
    conf: Path
    root: Path
    reference_conf: Path
    reference: Path
    nights: list[Night] = field(default_factory=list)

    @classmethod
    def prepare(cls, work: Path, size: int, spare: int, rng: random.Random) -> Session:
        if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
            raise SystemExit("needs Fashion-MNIST: `apt-get install dataset-fashion-mnist` (make datasets)")
        work.mkdir(parents=True, exist_ok=True)
        demo = work / "demo"
        build_demo_data(demo, limit=size + spare, seed=rng.randrange(2**31), workers=1)
        catalog = Catalog(demo, size, rng)
        events = demo / "events.parquet"
        (work / "spark-local").mkdir(exist_ok=True)
        root, reference = work / "chaos", work / "reference"
        return cls(
            work=work,
            catalog=catalog,
            conf=write_conf(work / "chaos.yaml", catalog.path, events, root, work / "spark-local"),
            root=root,
            reference_conf=write_conf(work / "reference.yaml", catalog.path, events, reference, work / "spark-local"),
            reference=reference,
        )

    def run(self, trigger: Trigger | None = None) -> Night:
        done = night(self.conf, self.root, trigger)
        self.nights.append(done)
        return done

    def held_lock(self) -> list[str]:
        return [n.run_id for n in self.nights if n.run_id is not None]


@dataclass(frozen=True)
class Verdict:
    """The chaos root against the reference: a Diff per table (and `runs`), orphans by area."""

    diffs: dict[str, Diff]
    orphans: dict[str, list[str]]

    @property
    def clean(self) -> bool:
        return all(d.equal for d in self.diffs.values()) and not any(self.orphans.values())


def measure(session: Session) -> Verdict:
    """After the clean run and the reference: compare every table, find every orphan."""
    diffs = {name: diff(name, read_rows(session.reference, name), read_rows(session.root, name)) for name in TABLES}
    diffs["runs"] = diff_runs(session.root, session.held_lock())
    return Verdict(diffs, orphans(session.root))


def report(verdict: Verdict) -> list[str]:
    """The per-table lines of the module docstring, the areas beside the tables, totals, and examples."""
    lines = [f"{'table':<17}{'rows':>7}{'lost':>7}{'doubled':>9}{'orphaned_files':>16}"]
    totals = [0, 0, 0, 0]
    names = list(verdict.diffs) + [a for a in verdict.orphans if a not in verdict.diffs]
    for name in names:
        d = verdict.diffs.get(name)
        orphaned = len(verdict.orphans.get(name, []))
        if d is None:
            lines.append(f"{name:<17}{'-':>7}{'-':>7}{'-':>9}{orphaned:>16}")
        else:
            lines.append(f"{name:<17}{d.rows:>7}{d.lost:>7}{d.doubled:>9}{orphaned:>16}")
            totals[:3] = [totals[0] + d.rows, totals[1] + d.lost, totals[2] + d.doubled]
        totals[3] += orphaned
    lines.append(f"{'total':<17}{totals[0]:>7}{totals[1]:>7}{totals[2]:>9}{totals[3]:>16}")
    for name in names:
        d = verdict.diffs.get(name)
        for example in d.examples if d else ():
            lines.append(f"  {name}: {example}")
        for path in verdict.orphans.get(name, [])[:3]:
            lines.append(f"  {name}: orphan {path}")
    return lines


def landing_histogram(nights: Iterable[Night]) -> list[str]:
    """Kills per landing point, in the order of a run's timeline."""
    landed = sorted(
        (n.landing for n in nights if n.landing is not None), key=lambda x: (x.position, x.locked, x.finished)
    )
    counts = Counter(str(x) for x in landed)
    return [f"  {counts[label]:>3}  {label}" for label in dict.fromkeys(str(x) for x in landed)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="chaos nights (default 20)")
    parser.add_argument("--limit", type=int, default=300, help="catalog items at the start (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="work folder, new or empty (default: a temp folder)")
    args = parser.parse_args()
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty")
    work = args.out or Path(tempfile.mkdtemp(prefix="chaos-"))
    rng = random.Random(args.seed)
    sizes = Sizes.for_catalog(args.limit)
    session = Session.prepare(work, args.limit, args.runs * (sizes.add + sizes.replace) + 10, rng)
    print(f"chaos: {args.runs} nights over {args.limit} demo items, seed {args.seed}, work folder {work}", flush=True)
    problems: list[str] = []

    first = session.run()
    print(f"night  0  initial build, no kill{'':<31}exit {first.status:>3}  {first.seconds:6.1f} s", flush=True)
    if first.status != 0:
        problems.append(f"the initial build exited {first.status}")
    durations = [first.seconds]
    refused = killed = 0
    last_bad = False
    for i in range(1, args.runs + 1):
        if i > 1 and not last_bad and rng.random() < P_BAD_FEED:
            what = session.catalog.bad_feed()
            done = session.run()
            session.catalog.write()  # the feed is whole again tomorrow
            ok = done.status == 1 and "nothing was committed" in done.log and not done.committed
            refused += ok
            committed = ", ".join(done.committed) or "nothing"
            if not ok:
                problems.append(f"night {i}: {what} not refused cleanly (exit {done.status}, committed {committed})")
            outcome = "refused, nothing committed" if ok else f"NOT REFUSED CLEANLY: committed {committed}"
            print(f"night {i:>2}  {what:<36}{outcome:<34}exit {done.status:>3}  {done.seconds:6.1f} s", flush=True)
            last_bad = True
            continue
        last_bad = False
        change = session.catalog.change(sizes)
        period = float(np.mean(durations[1:] or durations))
        kill_at = None if rng.random() < P_NO_KILL else rng.uniform(0, period)
        done = session.run(None if kill_at is None else after_seconds(kill_at))
        if done.killed:
            killed += 1
            where = str(done.landing)
        else:
            where = "no kill" if kill_at is None else f"ended before its kill at {kill_at:.1f} s"
            if done.status == 0:
                durations.append(done.seconds)
            else:
                problems.append(f"night {i} exited {done.status}: {done.log.strip().splitlines()[-1:]}")
        when = f"kill at {done.kill_at:5.1f} s" if done.killed and done.kill_at is not None else ""
        line = f"night {i:>2}  {change:<36}{when:<17}{where:<44}exit {done.status:>3}  {done.seconds:6.1f} s"
        print(line, flush=True)

    final = session.run()
    print(f"clean run over the final catalog ({len(session.catalog.rows)} items): exit {final.status}", flush=True)
    reference = night(session.reference_conf, session.reference)
    print(f"reference run on a fresh root: exit {reference.status}", flush=True)
    for name, done in (("the clean run", final), ("the reference run", reference)):
        if done.status != 0:
            problems.append(f"{name} exited {done.status}: {done.log[-2000:]}")

    print(f"\nnights: {args.runs}, killed: {killed}, bad feeds refused: {refused}, problems: {len(problems)}")
    print("where the kills landed:")
    print("\n".join(landing_histogram(session.nights)) or "  (no kills)")
    verdict = measure(session)
    print()
    print("\n".join(report(verdict)))
    for problem in problems:
        print(f"problem: {problem}")
    print(f"work folder kept: {work}")
    return 0 if verdict.clean and not problems else 1


if __name__ == "__main__":
    started = time.time()
    status = main()
    print(f"(benchmark wall time {time.time() - started:.0f} s)")
    sys.exit(status)

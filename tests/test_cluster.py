"""A real cluster: `spark-submit jobs/nightly.py` on a Spark standalone master with two workers.

The master and both workers run from the Spark distribution inside the pyspark wheel (`spark-class`, on
127.0.0.1 and free ports, so parallel CI runs cannot collide; README's commands use the usual 7077). The
nightly runs there over a small Fashion-MNIST demo catalog with two broken rows added while the same nightly
runs in local mode (`local[2]`, in this process) over the same input. Every table both runs wrote must hold
the same rows: `embeddings` (ids, shards, hashes; vectors allclose), `quarantine`, `duplicates`,
`similar_items` and `recommendations` (same items at the same ranks, scores allclose; an item may only move
where its score ties), and any table a later stage adds; the index builds hold the same shards and ids.

What a cluster adds over local mode and this test exercises: executors in other JVMs with their own working
folders, Python workers started by those executors (they must run the venv's interpreter and get the malloc
settings through `spark.executorEnv.*`; a /proc watcher checks both), files written by executors that the
driver lists and commits, accumulators, and a driver started by spark-submit rather than by lookalike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyspark
import pytest
import yaml
from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.demo_data import FASHION_MNIST_DIR, build_demo_data
from lookalike.embed import shards
from lookalike.index import builds
from lookalike.run import nightly
from lookalike.session import MALLOC_ENV, session_settings, worker_python
from lookalike.storage import tables
from tests.conftest import REPO, make_config

N_ITEMS = 300
WORKERS = 2
WORKER_MEMORY = "2g"
EXECUTOR_MEMORY = "1g"
DAEMON_MEMORY = "256m"  # master and worker JVMs only schedule; the default 1g each is waste on a shared box
START_TIMEOUT_S = 120
SUBMIT_TIMEOUT_S = 600  # a hung cluster, not a slow one: a busy 2-core box has taken 5 minutes
APP_NAME = "lookalike-cluster-test"
TIE = 1e-5  # cosines this close are a tie: either order is a right answer
VECTOR_ATOL = 1e-4
SPARK_HOME = Path(pyspark.__file__).resolve().parent
VOLATILE_COLUMNS = {"run_id", "embedded_at", "seen_at", "started_at", "finished_at"}
RANKED = {"similar_items": ("item_id", "similar_item_id"), "recommendations": ("user_id", "item_id")}
EXPECTED_TABLES = {"embeddings", "quarantine", "duplicates", "similar_items"}


def _needs(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------ processes


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all held open at once, so the OS cannot hand one out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process now running (Linux /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(roots: list[int]) -> list[int]:
    tree, found, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def stop(procs: list[subprocess.Popen]) -> None:
    """TERM each process group (every process was started in its own session), then KILL what is left,
    including descendants that left the group (pyspark's daemon makes a group of its own)."""
    pids = descendants([p.pid for p in procs if p.poll() is None])
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 15
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.time()))
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    for pid in pids:  # our own children only: collected from the trees of the processes started here
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


SPARK_INFO = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d INFO ")


def tail(path: Path, lines: int = 60, quiet: bool = True) -> str:
    """The end of a log; `quiet` drops Spark's own INFO lines (keeps lookalike's, warnings, tracebacks)."""
    try:
        text = [
            line for line in path.read_text(errors="replace").splitlines() if not (quiet and SPARK_INFO.match(line))
        ]
    except OSError as err:
        return f"({err})"
    return "\n".join(text[-lines:])


@dataclass
class Cluster:
    """A standalone master and its workers, each a process group of ours, with their logs."""

    folder: Path
    env: dict[str, str]
    ports: list[int] = field(default_factory=lambda: free_ports(2 + WORKERS))  # master, its UI, worker UIs
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.ports[0]}"

    @property
    def web_port(self) -> int:
        return self.ports[1]

    def work_dir(self, n: int) -> Path:
        return self.folder / f"worker-{n}"

    def _start(self, name: str, args: list[str]) -> None:
        log = self.folder / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.procs.append(
                subprocess.Popen(
                    [str(SPARK_HOME / "bin" / "spark-class"), *args],
                    env=self.env,
                    cwd=self.folder,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def start(self) -> None:
        self._start(
            "master",
            [
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports[0]),
                "--webui-port",
                str(self.web_port),
            ],
        )
        for n in range(WORKERS):
            self.work_dir(n).mkdir()
            self._start(
                f"worker-{n}",
                [
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    "127.0.0.1",
                    "--webui-port",
                    str(self.ports[2 + n]),
                    "--cores",
                    "1",
                    "--memory",
                    WORKER_MEMORY,
                    "--work-dir",
                    str(self.work_dir(n)),
                    self.url,
                ],
            )

    def state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/json/", timeout=5) as response:
            return json.loads(response.read())

    def wait_for_workers(self) -> None:
        deadline, alive = time.time() + START_TIMEOUT_S, 0
        while time.time() < deadline:
            dead = [log.stem for proc, log in zip(self.procs, self.logs) if proc.poll() is not None]
            if dead:
                pytest.fail(f"{dead} exited while the cluster started\n{self.report()}")
            try:
                alive = sum(w["state"] == "ALIVE" for w in self.state()["workers"])
            except OSError:
                alive = 0
            if alive == WORKERS:
                return
            time.sleep(1)
        pytest.fail(f"{alive} of {WORKERS} workers registered in {START_TIMEOUT_S}s\n{self.report()}")

    def executor_logs(self) -> list[Path]:
        return sorted(self.folder.glob("worker-*/app-*/*/stderr"))

    def report(self) -> str:
        parts = [f"--- {log.name} ---\n{tail(log, 40, quiet=False)}" for log in self.logs]
        parts += [f"--- executor {p.relative_to(self.folder)} ---\n{tail(p, 80)}" for p in self.executor_logs()]
        return "\n".join(parts)


class PythonWatcher:
    """Records the interpreter (argv[0]) and malloc settings of every Python process under the workers while
    a job runs: the executors' Python workers live as long as their executor, so a poll every half second
    sees them."""

    def __init__(self, roots: list[int]):
        self.roots, self.seen = roots, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            for pid in descendants(self.roots):
                if pid in self.seen or pid in self.roots:
                    continue
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if not any(b"pyspark" in arg for arg in argv) or b"java" in argv[0]:
                        continue
                    env = dict(
                        item.split(b"=", 1)
                        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                        if b"=" in item
                    )
                except OSError:
                    continue
                self.seen[pid] = (argv[0].decode(), {k: env.get(k.encode(), b"").decode() for k in MALLOC_ENV})

    def __enter__(self) -> PythonWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Started here, waited for in the test: the JVMs boot while the local run works."""
    _needs(shutil.which("java") is not None or "JAVA_HOME" in os.environ, "needs Java for Spark")
    _needs((FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(), "needs `apt-get install dataset-fashion-mnist`")
    folder = tmp_path_factory.mktemp("cluster")
    env = {
        **os.environ,
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_DAEMON_MEMORY": DAEMON_MEMORY,
        "SPARK_CONF_DIR": str(folder / "conf"),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    for name in (*MALLOC_ENV, "PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_MASTER_PORT"):
        env.pop(name, None)  # nothing of this process's own Spark or malloc setup may leak into the cluster
    (folder / "conf").mkdir()
    handle = Cluster(folder, env)
    try:
        handle.start()
        yield handle
    finally:
        stop(handle.procs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo catalog plus a missing image and a file that is not one, so quarantine has rows."""
    folder = tmp_path_factory.mktemp("demo")
    summary = build_demo_data(folder, limit=N_ITEMS, workers=1)
    (folder / "images" / "not-an-image.png").write_text("this is text, not a PNG")
    table = pq.read_table(summary.catalog_path).to_pandas()
    bad = pd.DataFrame(
        {
            "item_id": ["bad-missing", "bad-text"],
            "category": ["Bag", "Bag"],
            "image_uri": ["images/Bag/no-such-file.png", "images/not-an-image.png"],
            "title": ["Missing bag", "Text bag"],
            "in_stock": [True, True],
        }
    )
    path = folder / "catalog-with-bad-rows.parquet"
    pd.concat([table, bad[table.columns]], ignore_index=True).to_parquet(path, index=False)
    return path


def settings(demo: Path, root: Path) -> dict:
    return {
        "catalog.path": str(demo),
        "events.path": str(demo.parent / "events.parquet"),
        "output.root": str(root),
        "spark.shuffle_partitions": 4,
        "embed.image_size": 64,
        "embed.batch_size": 32,
        "similar.k": 10,
    }


def run_local(spark: SparkSession, demo: Path, folder: Path) -> Path:
    """The same nightly in local mode, in this process on the shared local[2] session."""
    cfg: Config = make_config(folder, **settings(demo, folder / "out"))
    nightly.run(cfg, spark, "local-run")
    return Path(cfg["output.root"])


def nested(flat: dict) -> dict:
    """Dotted keys to the YAML sections a config file has."""
    tree: dict = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
    return tree


# ------------------------------------------------------------------------------------------- comparison


def table_names(root: Path) -> set[str]:
    folder = root / "tables"
    return {p.name for p in folder.iterdir() if tables.exists(str(p))} if folder.is_dir() else set()


def read(root: Path, name: str) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), name)).to_pandas()


def _floaty(series: pd.Series) -> bool:
    if series.dtype.kind == "f":
        return True
    first = series.dropna().head(1)
    return len(first) == 1 and isinstance(first.iloc[0], np.ndarray) and first.iloc[0].dtype.kind == "f"


def _plain(value: object) -> object:
    """Arrays and maps as hashable, comparable values."""
    if isinstance(value, np.ndarray):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _is_map(series: pd.Series) -> bool:
    """A Delta map column (the `runs` metrics) reads as lists of (key, value) tuples."""
    first = series.dropna().head(1).tolist()
    return bool(first) and isinstance(first[0], list) and bool(first[0]) and isinstance(first[0][0], tuple)


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    """Without the columns that say when or in which run (they must differ) and without maps (timings)."""
    return df[
        [
            c
            for c in df.columns
            if c not in VOLATILE_COLUMNS and not pd.api.types.is_datetime64_any_dtype(df[c]) and not _is_map(df[c])
        ]
    ]


def compare_rows(name: str, local: pd.DataFrame, cluster: pd.DataFrame) -> None:
    """Same rows in any order: exact for every column but floats (and float arrays), which are allclose."""
    local, cluster = _comparable(local), _comparable(cluster)
    assert sorted(local.columns) == sorted(cluster.columns), name
    floats = [c for c in local.columns if _floaty(local[c]) or _floaty(cluster[c])]
    exact = [c for c in local.columns if c not in floats]
    assert len(local) == len(cluster), f"{name}: {len(local)} rows in local mode, {len(cluster)} on the cluster"
    order = []
    for df in (local, cluster):
        df = df.copy()
        for column in exact:
            df[column] = df[column].map(_plain)
        order.append(df.sort_values(exact, ignore_index=True, key=lambda s: s.map(repr)))
    local, cluster = order
    pd.testing.assert_frame_equal(local[exact], cluster[exact], check_dtype=False, obj=name)
    for column in floats if len(local) else ():
        a, b = (np.stack(df[column].map(lambda v: np.asarray(v, dtype=np.float64)).to_numpy()) for df in order)
        np.testing.assert_allclose(a, b, atol=VECTOR_ATOL, rtol=0, err_msg=f"{name}.{column}")


def _ties_only(name: str, owner: str, item: str, local: pd.DataFrame, cluster: pd.DataFrame) -> list[str]:
    """Rows whose neighbour differs must be ties: the neighbour one run put at rank r is, in the other run,
    at a rank of the same score, or left out where the list ends at that score."""
    problems = []
    lists = {
        run: {key: group.set_index(item)["score"] for key, group in df.groupby(owner)}
        for run, df in (("local", local), ("cluster", cluster))
    }
    for run, other in (("local", "cluster"), ("cluster", "local")):
        for key, scores in lists[run].items():
            theirs = lists[other][key]
            for neighbour, score in scores.items():
                if neighbour in theirs.index:
                    ok = abs(theirs[neighbour] - score) <= TIE
                else:
                    ok = abs(theirs.min() - score) <= TIE  # cut off at the end of the other list by a tie
                if not ok:
                    problems.append(f"{name}: {owner} {key}: {neighbour} ({score:.6f}) in {run} mode only")
    return problems


def compare_ranked(name: str, local: pd.DataFrame, cluster: pd.DataFrame) -> None:
    """Ranked lists: the same owners and ranks with allclose scores, the same neighbour at each rank but
    where scores tie, and the remaining columns equal where the neighbour is the same."""
    owner, item = RANKED[name]
    key = [owner, "rank"]
    merged = local.merge(cluster, on=key, how="outer", suffixes=("_l", "_c"), indicator=True)
    lonely = merged[merged["_merge"] != "both"]
    assert lonely.empty, f"{name}: (owner, rank) rows in one run only:\n{lonely[key + ['_merge']].head(20)}"
    np.testing.assert_allclose(merged["score_l"], merged["score_c"], atol=TIE, rtol=0, err_msg=f"{name}.score")
    moved = merged[merged[f"{item}_l"] != merged[f"{item}_c"]]
    problems = _ties_only(name, owner, item, local, cluster) if len(moved) else []
    assert not problems, "\n".join(problems[:20])
    assert len(moved) <= max(2, len(merged) // 100), f"{name}: {len(moved)} rows differ by ties, too many"
    same = merged[merged[f"{item}_l"] == merged[f"{item}_c"]]
    for column in _comparable(local).columns:
        if column in (*key, item, "score"):
            continue
        a, b = same[f"{column}_l"].map(_plain), same[f"{column}_c"].map(_plain)
        assert (a == b).all(), f"{name}.{column} differs:\n{same.loc[a != b, key + [f'{column}_l', f'{column}_c']]}"


def compare_builds(local_root: Path, cluster_root: Path) -> None:
    """The latest index builds: the same shards, each with the same item ids in the same FAISS order."""
    roots = [str(local_root), str(cluster_root)]
    summaries = [builds.build_summary(root, builds.latest_build(root)) for root in roots]
    assert summaries[0]["model"] == summaries[1]["model"]
    shard_sets = [{s["shard"]: s["ntotal"] for s in b["shards"]} for b in summaries]
    assert shard_sets[0] == shard_sets[1]
    for shard in shard_sets[0]:
        ids = [
            pq.read_table(f"{builds.indexes_root(root)}/{b['run_id']}/{shards.folder_name(shard)}/ids.parquet")
            .column("item_id")
            .to_pylist()
            for root, b in zip(roots, summaries)
        ]
        assert ids[0] == ids[1], f"index shard {shard}: item ids differ"


def exports(root: Path) -> set[str]:
    folder = root / "export"
    return {p.name for p in folder.iterdir() if (p / "LATEST").is_file()} if folder.is_dir() else set()


def read_export(root: Path, name: str) -> pd.DataFrame:
    """The snapshot that `export/<name>/LATEST` names, which must be complete (`_SUCCESS`)."""
    folder = root / "export" / name / f"run_id={(root / 'export' / name / 'LATEST').read_text().strip()}"
    assert (folder / "_SUCCESS").is_file(), f"{folder} has no _SUCCESS"
    return pq.read_table(folder).to_pandas()


def compare(name: str, local: pd.DataFrame, remote: pd.DataFrame) -> None:
    if name in RANKED:
        compare_ranked(name, local, remote)
    elif name == "runs":  # one row per stage; its metrics are timings
        keep = ["stage", "status", "rows_in", "rows_out"]
        compare_rows(name, local[keep], remote[keep])
    else:
        compare_rows(name, local, remote)


# ----------------------------------------------------------------------------------------------- tests


def test_worker_python_prefers_spark_conf_then_pyspark_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executors run `spark.pyspark.python` from `spark.conf` (a venv shipped to a cluster), else what
    spark-submit exported as PYSPARK_PYTHON, else this interpreter; a builder setting alone reaches no worker."""
    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    assert worker_python(make_config(tmp_path)) == sys.executable
    monkeypatch.setenv("PYSPARK_PYTHON", "/opt/venv/bin/python")
    assert worker_python(make_config(tmp_path)) == "/opt/venv/bin/python"
    shipped = make_config(tmp_path, **{"spark.conf": {"spark.pyspark.python": "./environment/bin/python"}})
    assert worker_python(shipped) == "./environment/bin/python"
    assert session_settings(shipped)["spark.executorEnv.PYSPARK_PYTHON"] == "./environment/bin/python"


@pytest.mark.spark
def test_nightly_on_standalone_cluster_matches_local_mode(
    spark: SparkSession, cluster: Cluster, demo: Path, tmp_path: Path
) -> None:
    cluster.wait_for_workers()
    folder = cluster.folder
    root = folder / "out"
    conf = folder / "nightly.yaml"
    # No spark.master: spark-submit's applies. The app name is the config's (lookalike sets it either way).
    conf.write_text(yaml.safe_dump(nested({**settings(demo, root), "spark.app_name": APP_NAME})))
    submit = [
        str(SPARK_HOME / "bin" / "spark-submit"),
        "--master",
        cluster.url,
        "--driver-memory",
        "1g",
        "--executor-memory",
        EXECUTOR_MEMORY,
        "--executor-cores",
        "1",
        "--total-executor-cores",
        str(WORKERS),
        "--conf",
        "spark.driver.host=127.0.0.1",
        "--conf",
        "spark.driver.bindAddress=127.0.0.1",
        "--conf",
        f"spark.pyspark.python={sys.executable}",
        "--conf",
        f"spark.pyspark.driver.python={sys.executable}",
        "--conf",
        "spark.ui.enabled=false",
        str(REPO / "jobs" / "nightly.py"),
        "--conf",
        str(conf),
    ]
    log = folder / "submit.log"
    started = time.time()
    with open(log, "wb") as out, PythonWatcher([p.pid for p in cluster.procs[1:]]) as watcher:
        # cwd is a scratch folder, not the repo: nothing may depend on where the job was started from.
        proc = subprocess.Popen(
            submit,
            env=cluster.env,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            # The local run meanwhile: small Spark jobs wait on latency more than on the two cores.
            local_root = run_local(spark, demo, tmp_path)
            local_seconds = time.time() - started
            rc = proc.wait(max(1.0, SUBMIT_TIMEOUT_S - local_seconds))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            stop([proc])
    seconds = time.time() - started
    assert rc == 0, (
        f"spark-submit {'timed out' if rc is None else f'exited {rc}'} after {seconds:.0f}s\n"
        f"--- submit ---\n{tail(log, 150)}\n{cluster.report()}"
    )

    # It ran on the cluster: the master finished the app, and each worker ran an executor for it.
    apps = cluster.state()["completedapps"] + cluster.state()["activeapps"]
    assert [a["name"] for a in apps] == [APP_NAME], apps
    for n in range(WORKERS):
        assert list(cluster.work_dir(n).glob("app-*/*/stderr")), f"worker {n} ran no executor\n{cluster.report()}"
    # Executors' Python workers ran the venv's interpreter and got the malloc settings (spark.executorEnv).
    assert watcher.seen, f"no Python worker seen under the workers\n{cluster.report()}"
    for pid, (python, malloc) in watcher.seen.items():
        assert python == sys.executable, f"Python worker {pid} runs {python}, not {sys.executable}"
        assert malloc == MALLOC_ENV, f"Python worker {pid} has malloc settings {malloc}"

    written = {"local": table_names(local_root), "cluster": table_names(root)}
    assert written["local"] == written["cluster"], written
    assert written["cluster"] >= EXPECTED_TABLES, written
    quarantine = read(root, "quarantine")
    assert dict(zip(quarantine["item_id"], quarantine["error_kind"])) == {
        "bad-missing": "missing",
        "bad-text": "not_an_image",
    }
    for name in sorted(written["cluster"]):
        compare(name, read(local_root, name), read(root, name))
    exported = {"local": exports(local_root), "cluster": exports(root)}
    assert exported["local"] == exported["cluster"], exported
    for name in sorted(exported["cluster"]):
        compare(name, read_export(local_root, name), read_export(root, name))
    compare_builds(local_root, root)
    print(
        f"\nlocal nightly {local_seconds:.0f}s, cluster nightly {seconds:.0f}s; tables compared: "
        f"{', '.join(sorted(written['cluster']))}; exports: {', '.join(sorted(exported['cluster'])) or 'none'}"
    )

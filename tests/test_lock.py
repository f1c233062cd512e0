"""The run lock: one live run per output root, dead runs' locks taken over, never held forever."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lookalike.run import lock
from lookalike.storage import files

# Child processes import this checkout's lookalike, whatever the test runner's own path.
ENV = {**os.environ, "PYTHONPATH": str(Path(lock.__file__).resolve().parents[2])}

# One contender in a race: says it is ready, waits at the gate (a pipe whose write end the test closes, so that
# every contender wakes at once), tries the lock, says how it went, and holds a lock it won until told to go.
RACER = """
import json, os, sys
from lookalike.run import lock
root, run_id, gate = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
os.read(gate, 1)
held = lock.RunLock(root, run_id, "nightly", 600)
try:
    held.acquire()
except lock.LockError as err:
    print(json.dumps({"refused": str(err)}), flush=True)
    sys.exit(0)
print(json.dumps({"won": run_id, "previous": held.previous and held.previous.run_id}), flush=True)
sys.stdin.readline()
held.release()
"""

# The same, blocked in a real Spark job (a task that sleeps for good, once it has said it started).
STALLED_IN_SPARK = """
import sys, time
from pathlib import Path
from lookalike.run import lock
from pyspark.sql import SparkSession
spark = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
started = Path(sys.argv[1]) / "task-started"
def stall(x):
    started.touch()
    time.sleep(3600)
try:
    with lock.RunLock(sys.argv[1], "run-stalled", "nightly", 600, heartbeat_seconds=0.2):
        spark.sparkContext.parallelize([1], 1).map(stall).collect()
except lock.LockError as err:
    print(f"lookalike: error: {err}", file=sys.stderr)
    sys.exit(1)
"""

# A run that holds the lock and then blocks in a socket read, as the driver does while it waits on the JVM,
# wrapping what interrupts the read the way py4j does; it exits like the CLI, one line and status 1.
STALLED = """
import socket, sys
from lookalike.run import lock
try:
    with lock.RunLock(sys.argv[1], "run-stalled", "nightly", 600, heartbeat_seconds=0.05):
        print("holding", flush=True)
        a, b = socket.socketpair()
        try:
            a.recv(1)
        except Exception as err:
            raise ConnectionError("error while receiving") from err
except lock.LockError as err:
    print(f"lookalike: error: {err}", file=sys.stderr)
    sys.exit(1)
"""


def dead_pid() -> int:
    """A pid that surely does not exist now: a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_holder(root: Path, **fields: object) -> None:
    now = dt.datetime.now(dt.UTC).isoformat()
    holder = {
        "run_id": "old-run",
        "command": "nightly",
        "host": socket.gethostname(),
        "pid": 1,
        "started_at": now,
        "heartbeat": now,
        **fields,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / lock.LOCK_FILE).write_text(json.dumps(holder))


def test_second_run_is_refused_with_the_holders_details(tmp_path: Path) -> None:
    with lock.RunLock(str(tmp_path), "run-a", "nightly", 600) as held:
        assert held.previous is None
        content = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        assert content["run_id"] == "run-a" and content["command"] == "nightly"
        with pytest.raises(lock.LockError, match=r"in use by run run-a \(nightly, pid \d+ on .*wait for it"):
            lock.RunLock(str(tmp_path), "run-b", "embed", 600).acquire()
    assert not (tmp_path / lock.LOCK_FILE).exists()
    with lock.RunLock(str(tmp_path), "run-c", "index", 600) as held:  # free again
        assert held.previous is None


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    write_holder(tmp_path, pid=dead_pid())
    with lock.RunLock(str(tmp_path), "run-new", "nightly", 600) as held:
        assert held.previous is not None and held.previous.run_id == "old-run"
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["run_id"] == "run-new"


def test_lock_of_another_host_expires_with_its_heartbeat(tmp_path: Path) -> None:
    fresh = dt.datetime.now(dt.UTC)
    write_holder(tmp_path, host="elsewhere", heartbeat=(fresh - dt.timedelta(seconds=30)).isoformat())
    with pytest.raises(lock.LockError, match="old-run"):
        lock.RunLock(str(tmp_path), "run-new", "nightly", 600).acquire()
    write_holder(tmp_path, host="elsewhere", heartbeat=(fresh - dt.timedelta(seconds=900)).isoformat())
    with lock.RunLock(str(tmp_path), "run-new", "nightly", 600) as held:
        assert held.previous is not None and held.previous.host == "elsewhere"


def test_unreadable_lock_is_held_until_it_is_stale(tmp_path: Path) -> None:
    path = tmp_path / lock.LOCK_FILE
    for text in ['{"run_id": "trunc', "", '{"run_id": "r", "future_format": true}']:
        path.write_text(text)  # cut short by a crash, empty, or not ours to read: maybe a live run's
        with pytest.raises(
            lock.LockError, match=r"not a readable lock \(last written \d+ s ago.*held until it is 600 s"
        ):
            lock.RunLock(str(tmp_path), "run-new", "nightly", 600).acquire()
        assert path.read_text() == text
    old = time.time() - 601
    os.utime(path, (old, old))
    with lock.RunLock(str(tmp_path), "run-new", "nightly", 600) as held:
        assert held.previous is None  # no run to log as interrupted
        assert json.loads(path.read_text())["run_id"] == "run-new"


def test_unreadable_lock_refuses_a_stage_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "catalog.parquet").write_bytes(b"")  # exists; never read, the lock refuses first
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / lock.LOCK_FILE).write_text("")
    conf = tmp_path / "conf.yaml"
    conf.write_text("catalog: {path: catalog.parquet}\noutput: {root: out}\n")
    out = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "embed", "--conf", str(conf)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=ENV,
        timeout=120,
    )
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"lookalike: error: output root is locked by {tmp_path}/out/{lock.LOCK_FILE}, which is")


def test_a_live_process_on_this_host_holds_the_lock(tmp_path: Path) -> None:
    write_holder(tmp_path, pid=os.getpid())  # alive: this very process
    with pytest.raises(lock.LockError):
        lock.RunLock(str(tmp_path), "run-new", "nightly", 600).acquire()


def race(root: Path, contenders: int) -> list[dict[str, str]]:
    """Start `contenders` processes on `root` at the same moment; their answers, read while the winner holds."""
    gate, opener = os.pipe()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(root), f"run-{i}", str(gate)],
            pass_fds=(gate,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for i in range(contenders)
    ]
    os.close(gate)
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        os.close(opener)  # every contender's read returns now
        answers = [json.loads(proc.stdout.readline()) for proc in procs if proc.stdout is not None]
        [winner] = [answer["won"] for answer in answers if "won" in answer]
        assert json.loads((root / lock.LOCK_FILE).read_text())["run_id"] == winner, "the lock is the winner's"
    finally:
        for proc in procs:
            proc.communicate(timeout=60)  # closes stdin: the winner releases
    assert [proc.returncode for proc in procs] == [0] * contenders
    assert not (root / lock.LOCK_FILE).exists(), "released"
    assert [p.name for p in root.iterdir()] == [lock.LOCK_FILE + lock.MUTEX_SUFFIX], "no temp file left"
    return answers


def test_processes_starting_together_get_one_lock(tmp_path: Path) -> None:
    answers = race(tmp_path, 6)
    [winner] = [answer for answer in answers if "won" in answer]
    assert winner["previous"] is None
    refusals = [answer["refused"] for answer in answers if "refused" in answer]
    assert len(refusals) == 5
    assert all(f"output root is in use by run {winner['won']} (nightly, pid " in refusal for refusal in refusals)


def test_processes_taking_over_one_dead_lock_leave_one_holder(tmp_path: Path) -> None:
    write_holder(tmp_path, pid=dead_pid(), token="dead-token")
    answers = race(tmp_path, 6)
    [winner] = [answer for answer in answers if "won" in answer]
    assert winner["previous"] == "old-run", "the dead run is reported once, by the run that replaced it"
    refusals = [answer["refused"] for answer in answers if "refused" in answer]
    assert len(refusals) == 5
    assert all(f"output root is in use by run {winner['won']} (nightly, pid " in refusal for refusal in refusals)


def take_over(root: Path, run_id: str) -> tuple[str, float]:
    """Replace the lock with another run's, as a takeover does (under the mutex); its text and mtime."""
    path = root / lock.LOCK_FILE
    text = json.dumps({**json.loads(path.read_text()), "run_id": run_id, "pid": os.getpid(), "token": "theirs"})
    with open(str(path) + lock.MUTEX_SUFFIX, "a") as mutex:
        fcntl.flock(mutex, fcntl.LOCK_EX)
        (root / "next.tmp").write_text(text)
        os.replace(root / "next.tmp", path)
        modified = time.time() - 5  # a mark a heartbeat would overwrite
        os.utime(path, (modified, modified))
    return text, path.stat().st_mtime


def test_a_run_that_lost_its_lock_stops_and_leaves_the_new_lock_alone(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
    text, modified = take_over(tmp_path, "run-new")
    _, err = proc.communicate(timeout=60)  # blocked in recv for good unless the lost lock stops it
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    new_owner = f"run run-new (nightly, pid {os.getpid()} on"
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"lookalike: error: run run-stalled lost the lock on {tmp_path} to {new_owner}")
    )
    path = tmp_path / lock.LOCK_FILE
    assert path.read_text() == text and path.stat().st_mtime == modified, "the new owner's lock is untouched"


@pytest.mark.spark
def test_a_run_that_lost_its_lock_stops_while_it_waits_on_spark(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_IN_SPARK, str(tmp_path)], stderr=subprocess.PIPE, text=True, env=ENV
    )
    while not (tmp_path / "task-started").exists():  # the driver is in collect(), waiting on the JVM
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.1)
    take_over(tmp_path, "run-new")
    _, err = proc.communicate(timeout=120)  # the task sleeps for an hour: only the lost lock ends it sooner
    assert proc.returncode == 1, err[-4000:]
    assert any(line.startswith("lookalike: error: run run-stalled lost the lock on") for line in err.splitlines())


def test_heartbeat_renews_the_lock_and_losing_it_interrupts_the_main_thread(tmp_path: Path) -> None:
    path = tmp_path / lock.LOCK_FILE
    interrupted = []
    with (
        pytest.raises(lock.LockLostError, match="run run-a lost the lock on .* to run run-b"),
        lock.RunLock(str(tmp_path), "run-a", "nightly", 600, heartbeat_seconds=0.02),
    ):
        first, deadline = json.loads(path.read_text()), time.monotonic() + 60
        while json.loads(path.read_text())["heartbeat"] == first["heartbeat"]:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.01)  # waits for the heartbeat thread to rewrite the file
        assert json.loads(path.read_text())["token"] == first["token"]
        text, _ = take_over(tmp_path, "run-b")
        try:
            threading.Event().wait(60)
        except lock.LockLostError:
            interrupted.append(True)
            raise
    assert interrupted, "the lost lock interrupted the wait, not only the exit"
    assert path.read_text() == text


def test_release_leaves_another_runs_lock_and_reports_the_loss(tmp_path: Path) -> None:
    held = lock.RunLock(str(tmp_path), "run-a", "nightly", 600)
    held.acquire()
    text, _ = take_over(tmp_path, "run-b")
    with pytest.raises(lock.LockLostError, match="run run-a lost the lock on .* to run run-b"):
        held.release()
    assert (tmp_path / lock.LOCK_FILE).read_text() == text
    (tmp_path / lock.LOCK_FILE).unlink()
    with (
        pytest.raises(lock.LockLostError, match=f"lost the lock on {tmp_path}: .* was deleted"),
        lock.RunLock(str(tmp_path), "run-c", "nightly", 600),
    ):
        (tmp_path / lock.LOCK_FILE).unlink()
    assert [p.name for p in tmp_path.iterdir()] == [lock.LOCK_FILE + lock.MUTEX_SUFFIX]


def test_object_store_lock_refuses_takes_over_and_notices_an_overwrite(tmp_path: Path) -> None:
    """Object stores (here pyarrow's in-memory mock file system) get the weaker write-and-read-back lock."""
    root = f"mock:///{tmp_path.name}/out"
    with lock.RunLock(root, "run-a", "nightly", 600) as held:
        assert held.previous is None
        with pytest.raises(lock.LockError, match="in use by run run-a"):
            lock.RunLock(root, "run-b", "embed", 600).acquire()
    dead = {"run_id": "old-run", "command": "nightly", "host": socket.gethostname(), "pid": dead_pid()}
    now = dt.datetime.now(dt.UTC).isoformat()
    files.write_text(f"{root}/{lock.LOCK_FILE}", json.dumps({**dead, "started_at": now, "heartbeat": now}))
    interrupted = []
    with (
        pytest.raises(lock.LockLostError, match="run run-c lost the lock on .* to run run-d"),
        lock.RunLock(root, "run-c", "nightly", 600, heartbeat_seconds=0.02) as held,
    ):
        assert held.previous is not None and held.previous.run_id == "old-run"
        mine = json.loads(files.read_text(f"{root}/{lock.LOCK_FILE}") or "")
        theirs = json.dumps({**mine, "run_id": "run-d", "token": "theirs"})
        files.write_text(f"{root}/{lock.LOCK_FILE}", theirs)  # a racer's write between our two requests
        try:
            threading.Event().wait(60)
        except lock.LockLostError:
            interrupted.append(True)
            raise
    assert interrupted and files.read_text(f"{root}/{lock.LOCK_FILE}") == theirs


def test_dead_runs_not_yet_logged_are_handed_on_by_a_run_killed_before_logging_them(tmp_path: Path) -> None:
    """A run that took over a dead lock and died before logging the dead run passes it on in its own lock."""
    root = str(tmp_path)
    (tmp_path / lock.LOCK_FILE).write_text(
        json.dumps(
            {
                "run_id": "first",
                "command": "nightly",
                "host": socket.gethostname(),
                "pid": dead_pid(),
                "started_at": "2026-01-01T00:00:00+00:00",
                "heartbeat": "2026-01-01T00:00:00+00:00",
                "token": "t1",
            }
        )
    )
    second = lock.RunLock(root, "second", "nightly", 600.0)
    taker = threading.Thread(target=second.acquire)  # not the main thread: no signal handler to leave behind
    taker.start()
    taker.join()  # "second" took over "first" and is then "killed" before logging it: its lock file stays
    assert [h.run_id for h in second.interrupted] == ["first"]
    on_disk = json.loads((tmp_path / lock.LOCK_FILE).read_text())
    assert [d["run_id"] for d in on_disk["unlogged"]] == ["first"]
    second._stop.set()  # the heartbeat of a killed process stops with it
    on_disk["pid"] = dead_pid()
    (tmp_path / lock.LOCK_FILE).write_text(json.dumps(on_disk))
    with lock.RunLock(root, "third", "nightly", 600.0) as third:
        assert [h.run_id for h in third.interrupted] == ["second", "first"]
        third.logged()
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["unlogged"] == []

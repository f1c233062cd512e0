"""The run lock: one live run per output root, dead runs' locks taken over, never held forever."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.run import lock


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


def test_half_written_lock_does_not_block_forever(tmp_path: Path) -> None:
    (tmp_path / lock.LOCK_FILE).write_text('{"run_id": "trunc')
    with lock.RunLock(str(tmp_path), "run-new", "nightly", 600) as held:
        assert held.previous is not None and held.previous.run_id == "unknown"


def test_a_live_process_on_this_host_holds_the_lock(tmp_path: Path) -> None:
    write_holder(tmp_path, pid=os.getpid())  # alive: this very process
    with pytest.raises(lock.LockError):
        lock.RunLock(str(tmp_path), "run-new", "nightly", 600).acquire()

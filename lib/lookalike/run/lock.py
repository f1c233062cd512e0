"""One run at a time per `output.root`: a lock file with a heartbeat, which a dead run does not hold forever.

`<output.root>/_lock.json` names the run, its host and pid, when it started and its last heartbeat (rewritten
every `HEARTBEAT_SECONDS` by a daemon thread). A second run finds the file and refuses with the holder's
details, unless the holder is dead: on the same host its pid no longer exists, or on any host its heartbeat
is older than `lock.stale_seconds`. The new run then takes the lock over and reports the dead run, so that
it can be logged as interrupted.

On a local or POSIX file system the lock is created with O_EXCL, so two runs racing for it cannot both win.
Object stores have no exclusive create: there the lock is written and read back, which narrows the race to
the time between two requests; schedule one nightly per output root there, as usual.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from types import TracebackType

from lookalike.errors import LookalikeError
from lookalike.storage import files
from lookalike.storage.uri import filesystem

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
HEARTBEAT_SECONDS = 30.0


class LockError(LookalikeError):
    """Another live run holds the output root."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    command: str
    host: str
    pid: int
    started_at: str
    heartbeat: str

    def age_seconds(self, now: dt.datetime) -> float:
        return (now - dt.datetime.fromisoformat(self.heartbeat)).total_seconds()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_dead(holder: Holder, now: dt.datetime, stale_seconds: float) -> bool:
    """A holder is dead when its process is gone (same host) or its heartbeat stopped long ago (any host)."""
    if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
        return True
    return holder.age_seconds(now) > stale_seconds


class RunLock:
    """`with RunLock(root, run_id, command, stale_seconds) as lock:`; `lock.previous` is the dead run it
    replaced, if any."""

    def __init__(self, output_root: str, run_id: str, command: str, stale_seconds: float):
        self.path = f"{output_root.rstrip('/')}/{LOCK_FILE}"
        self.run_id, self.command, self.stale_seconds = run_id, command, stale_seconds
        self.previous: Holder | None = None
        self._started = _now().isoformat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lock-{run_id}")

    def _content(self) -> str:
        holder = Holder(self.run_id, self.command, socket.gethostname(), os.getpid(), self._started, _now().isoformat())
        return json.dumps(asdict(holder))

    def _create(self) -> bool:
        """Write the lock if there is none; False when another run's lock is there."""
        fs, local = filesystem(self.path)
        fs.create_dir(local.rsplit("/", 1)[0], recursive=True)
        if "://" not in self.path or self.path.startswith("file:"):
            try:
                handle = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(handle, "w") as stream:
                stream.write(self._content())
            return True
        if files.exists(self.path):
            return False
        files.write_text(self.path, self._content())
        return json.loads(files.read_text(self.path) or "{}").get("run_id") == self.run_id

    def _holder(self) -> Holder | None:
        try:
            data = files.read_json(self.path)
            return None if data is None else Holder(**data)
        except (ValueError, TypeError):  # half-written by a run killed mid-write: nobody holds it
            epoch = dt.datetime.min.replace(tzinfo=dt.UTC).isoformat()
            return Holder("unknown", "unknown", "", -1, epoch, epoch)

    def acquire(self) -> None:
        for _ in range(2):
            if self._create():
                self._thread.start()
                log.info("run %s holds %s", self.run_id, self.path)
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our two looks
            now = _now()
            if not is_dead(holder, now, self.stale_seconds):
                raise LockError(
                    f"output root is in use by run {holder.run_id} ({holder.command}, pid {holder.pid} on "
                    f"{holder.host}, started {holder.started_at}, last heartbeat {holder.age_seconds(now):.0f} s "
                    f"ago); wait for it to finish. If it died on another host, its lock expires "
                    f"{self.stale_seconds:.0f} s after its last heartbeat (lock.stale_seconds), or delete {self.path}"
                )
            log.warning(
                "run %s: taking over the lock of dead run %s (pid %d on %s, last heartbeat %.0f s ago)",
                self.run_id,
                holder.run_id,
                holder.pid,
                holder.host,
                holder.age_seconds(now),
            )
            self.previous = holder
            fs, local = filesystem(self.path)
            fs.delete_file(local)
        raise LockError(f"could not take the lock {self.path}: another run took it at the same time")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                files.write_text(self.path, self._content())
            except OSError as err:  # a failed heartbeat must not kill the run; the next one may succeed
                log.warning("run %s: lock heartbeat failed: %s", self.run_id, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        holder = self._holder()
        if holder is not None and holder.run_id == self.run_id:
            fs, local = filesystem(self.path)
            fs.delete_file(local)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

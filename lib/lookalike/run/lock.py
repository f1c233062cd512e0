"""One run at a time per `output.root`: a lock file with a heartbeat, which a dead run does not hold forever.

`<output.root>/_lock.json` names the run, its host and pid, when it started, its last heartbeat (rewritten
every `HEARTBEAT_SECONDS` by a daemon thread) and a random owner token. A second run finds the file and
refuses with the holder's details, unless the holder is dead: on the same host its pid no longer exists, or on
any host its heartbeat is older than `lock.stale_seconds`. The new run then takes the lock over and reports the
dead run, so that it can be logged as interrupted. A file that is not a readable lock (garbage, or cut short
by a crash) counts as held until its modification time is `lock.stale_seconds` old.

On a local or POSIX file system every look at the lock and every change to it (take, take over, heartbeat,
release) happens under `flock` on `_lock.json.mutex`, which the kernel drops when a process dies, so a crash
never leaves it held:
- the lock is written whole to a temp file first and then appears at once: `os.link` to take a free lock,
  `os.replace` to take over a dead one, so nobody ever reads an empty or half-written lock, and the path is
  never absent while someone holds it (a takeover that renamed the old file away first would leave a gap in
  which a third run could slip in);
- of runs racing to take over the same dead lock, the first under the mutex replaces it and the others then
  find its fresh lock and refuse;
- a heartbeat or a release first checks that the token in the file is still its own: a run never rewrites or
  deletes another run's lock.

A run whose lock is gone or names another token (it stalled longer than `lock.stale_seconds` and was taken
over) stops: the heartbeat thread sends the main thread `LOST_SIGNAL`, whose handler raises `LockLostError`
there, also out of a blocking socket read such as the driver's wait on the JVM. Leaving the `with` block raises
`LockLostError` whatever else the run raised on the way out (py4j wraps what interrupts its read). Taken in
another thread, the lock cannot interrupt the run and reports the loss when released.

Object stores have neither exclusive create nor file locks: there the lock is written and read back, which
narrows the race to the time between two requests, and a run whose lock another run overwrote stops at its
next heartbeat; schedule one nightly per output root there, as usual.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from types import FrameType, TracebackType
from typing import Any

import pyarrow.fs as pafs

from lookalike.errors import LookalikeError
from lookalike.storage import files
from lookalike.storage.uri import filesystem, is_local

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
MUTEX_SUFFIX = ".mutex"
HEARTBEAT_SECONDS = 30.0
LOST_SIGNAL = signal.SIGUSR1

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class LockError(LookalikeError):
    """Another live run holds the output root."""


class LockLostError(LockError):
    """Another run took this run's lock over (or it was deleted) while this run was still going."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    command: str
    host: str
    pid: int
    started_at: str
    heartbeat: str
    token: str = ""  # absent from the locks of older versions
    # Dead runs this holder took over and had not yet logged as interrupted (plain dicts, as in the file): a
    # holder killed before it logged them hands them on to the run that takes over from it.
    unlogged: tuple[dict[str, Any], ...] = ()

    def age_seconds(self, now: dt.datetime) -> float:
        return (now - dt.datetime.fromisoformat(self.heartbeat)).total_seconds()

    def describe(self) -> str:
        return f"run {self.run_id} ({self.command}, pid {self.pid} on {self.host}, started {self.started_at})"


@dataclass(frozen=True)
class _Seen:
    """The lock file as read: its holder, or None when it is not a readable lock, and when it was last written."""

    holder: Holder | None
    modified: dt.datetime


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


def _parse(text: str) -> Holder | None:
    """The holder a lock file names, or None for anything else (garbage, a file cut short, a foreign format)."""
    try:
        data = json.loads(text)
        holder = Holder(**{f.name: data[f.name] for f in fields(Holder) if f.name in data})
        dt.datetime.fromisoformat(holder.started_at)
        dt.datetime.fromisoformat(holder.heartbeat)
    except (ValueError, TypeError, KeyError):
        return None
    return holder if isinstance(holder.pid, int) else None


@contextmanager
def _mutex(lock_path: str) -> Iterator[None]:
    """Hold the flock that serialises every look at and change to the local lock `lock_path`."""
    path = lock_path + MUTEX_SUFFIX
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # read-write: NFS emulates flock with write locks
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            raise LockError(f"cannot lock {path}: {err.strerror}; output.root needs file locks (flock)") from err
        yield
    finally:
        os.close(fd)  # drops the flock


class RunLock:
    """`with RunLock(root, run_id, command, stale_seconds) as lock:`; `lock.previous` is the dead run it
    replaced, if any. Acquire it in the main thread, so that losing it stops the run."""

    def __init__(
        self,
        output_root: str,
        run_id: str,
        command: str,
        stale_seconds: float,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ):
        self.root = output_root.rstrip("/")
        self.path = f"{self.root}/{LOCK_FILE}"
        self.run_id, self.command = run_id, command
        self.stale_seconds, self.heartbeat_seconds = stale_seconds, heartbeat_seconds
        self.previous: Holder | None = None
        self._unlogged: tuple[dict[str, Any], ...] = ()  # written into our lock until `logged()` clears it
        self._token = secrets.token_hex(16)
        self._started = _now().isoformat()
        self._fs, self._local = filesystem(self.path)
        self._posix = is_local(self.path)
        self._held = False
        self._lost: str | None = None  # the LockLostError message, once the lock is lost
        self._releasing = False
        self._old_handler: _Handler = None
        self._main_ident: int | None = None  # the thread to interrupt when the lock is lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lock-{run_id}")

    # -- reading and writing the file

    def _content(self) -> str:
        holder = Holder(
            self.run_id,
            self.command,
            socket.gethostname(),
            os.getpid(),
            self._started,
            _now().isoformat(),
            self._token,
            self._unlogged,
        )
        return json.dumps(asdict(holder))

    @property
    def interrupted(self) -> list[Holder]:
        """Every dead run this lock took over, directly or through dead runs that took over from others and
        died before logging them: what the `runs` table must record as interrupted."""
        return [holder for item in self._unlogged if (holder := _parse(json.dumps(item))) is not None]

    def logged(self) -> None:
        """The runs of `interrupted` are recorded: drop them from our lock file."""
        if self._unlogged:
            self._unlogged = ()
            if self._held and self._lost is None:
                self._lost = self._renew()

    def _read(self) -> _Seen | None:
        info = self._fs.get_file_info(self._local)
        if info.type == pafs.FileType.NotFound:
            return None
        try:
            with self._fs.open_input_stream(self._local) as stream:
                text = stream.read().decode(errors="replace")
        except FileNotFoundError:  # released between the two looks (object stores: there is no mutex)
            return None
        return _Seen(_parse(text), info.mtime or _now())

    def _temp(self) -> str:
        """Our next lock content, whole and on disk, in a temp file beside the lock (same file system)."""
        tmp = f"{self._local}.{self._token}.tmp"
        with open(tmp, "w") as stream:
            stream.write(self._content())
            stream.flush()
            os.fsync(stream.fileno())
        return tmp

    def _ours(self, seen: _Seen | None) -> bool:
        return seen is not None and seen.holder is not None and seen.holder.token == self._token

    def _lost_message(self, seen: _Seen | None) -> str:
        if seen is None:
            to = f": {self.path} was deleted"
        elif seen.holder is None:
            to = f": {self.path} was replaced by a file that is not a lock"
        else:
            to = f" to {seen.holder.describe()}"
        return (
            f"run {self.run_id} lost the lock on {self.root}{to}; stopped so that two runs never write the same "
            f"tables (a run whose heartbeat stops for lock.stale_seconds counts as dead)"
        )

    # -- acquiring

    def _took_over(self, dead: Holder | None) -> None:
        self.previous = dead
        if dead is None:
            self._unlogged = ()
        else:
            logged_by_none = {**asdict(dead), "unlogged": ()}
            self._unlogged = (logged_by_none, *dead.unlogged)

    def _dead_holder(self, seen: _Seen, now: dt.datetime) -> Holder | None:
        """The dead holder of `seen` (None when the file was not a readable lock); LockError if it is alive."""
        holder = seen.holder
        if holder is None:
            age = (now - seen.modified).total_seconds()
            if age <= self.stale_seconds:
                raise LockError(
                    f"output root is locked by {self.path}, which is not a readable lock (last written {age:.0f} s "
                    f"ago: by an older lookalike, or cut short by a crash); it counts as held until it is "
                    f"{self.stale_seconds:.0f} s old (lock.stale_seconds), or delete it"
                )
            log.warning(
                "run %s: taking over %s, not a readable lock, last written %.0f s ago", self.run_id, self.path, age
            )
            return None
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
        return holder

    def _acquire_posix(self) -> None:
        tmp = self._temp()
        try:
            with _mutex(self._local):
                seen = self._read()
                if seen is None:
                    try:
                        os.link(tmp, self._local)  # never replaces: fails if a lock is there
                    except FileExistsError as err:  # only a run outside the mutex (an older lookalike) gets here
                        raise LockError(
                            f"could not take the lock {self.path}: another run took it at the same time"
                        ) from err
                else:
                    self._took_over(self._dead_holder(seen, _now()))
                    os.unlink(tmp)
                    tmp = self._temp()  # now naming the runs to log
                    os.replace(tmp, self._local)  # the dead lock is replaced, never absent
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)

    def _acquire_store(self) -> None:
        for _ in range(2):
            seen = self._read()
            self._took_over(None if seen is None else self._dead_holder(seen, _now()))
            files.write_text(self.path, self._content())
            if self._ours(self._read()):
                return
            # another run wrote its lock between our two requests: the next look refuses with its details
        raise LockError(f"could not take the lock {self.path}: another run took it at the same time")

    def acquire(self) -> None:
        self._fs.create_dir(self._local.rsplit("/", 1)[0], recursive=True)
        if self._posix:
            self._acquire_posix()
        else:
            self._acquire_store()
        self._held = True
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(LOST_SIGNAL, self._on_lost_signal)
            self._main_ident = threading.get_ident()
        self._thread.start()
        log.info("run %s holds %s", self.run_id, self.path)

    # -- heartbeat and loss

    def _renew(self) -> str | None:
        """Rewrite our heartbeat if the lock is still ours; else the LockLostError message."""
        if not self._posix:
            seen = self._read()
            if not self._ours(seen):
                return self._lost_message(seen)
            files.write_text(self.path, self._content())
            return None
        with _mutex(self._local):
            seen = self._read()
            if not self._ours(seen):
                return self._lost_message(seen)
            os.replace(self._temp(), self._local)
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                lost = self._renew()
            except OSError as err:  # a failed heartbeat must not kill the run; the next one may succeed
                log.warning("run %s: lock heartbeat failed: %s", self.run_id, err)
                continue
            if lost is not None:
                self._lost = lost
                log.error("%s", lost)
                if self._main_ident is not None:
                    signal.pthread_kill(self._main_ident, LOST_SIGNAL)
                return

    def _on_lost_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._lost is not None and not self._releasing:
            raise LockLostError(self._lost)

    # -- releasing

    def release(self) -> None:
        """Remove the lock if it is still ours; LockLostError if it was lost at any time while we held it."""
        if not self._held:
            return
        self._releasing = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._lost is None:
            if self._posix:
                with _mutex(self._local):
                    self._remove_if_ours()
            else:
                self._remove_if_ours()
        if self._main_ident is not None:
            signal.signal(LOST_SIGNAL, signal.SIG_DFL if self._old_handler is None else self._old_handler)
        self._held = False
        if self._lost is not None:
            raise LockLostError(self._lost)

    def _remove_if_ours(self) -> None:
        seen = self._read()
        if self._ours(seen):
            self._fs.delete_file(self._local)
        else:
            self._lost = self._lost_message(seen)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

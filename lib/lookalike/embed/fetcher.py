"""http(s) image URIs -> bytes: the embed stage's downloader, polite to every host and truthful about failures.

Runs on executors, inside each embed task's reading step: the driver never holds image bytes. One task's
`Fetcher` is shared by its `fetch.concurrency` reading threads and holds, per host (scheme, name and port):

* a connection cap (a semaphore of this task's share of `fetch.max_connections_per_host`), taken before the
  request and held until its body is read, so it bounds the requests in flight;
* a rate cap (`HostLimiter`: at most this task's share of `fetch.max_requests_per_host_per_s` in any one
  second), taken after the connection, so a request leaves when its turn comes instead of queueing behind a
  slow one and then going out in a burst;
* a pause, set by a `Retry-After` answer, that every thread of the task honours for that host.

Shares are computed on the driver (`task_share`): the job's budget divided by the tasks that run at once, so
the limits hold for the whole job (docs/fetching.md says how that works out on a cluster).

urllib3 is the client: a thread-safe connection pool per host, streaming reads (the byte limit stops a
download instead of refusing it after 200 MB), TLS verified against the system's or `fetch.ca_bundle`'s
certificates, and no event loop to marry to Spark's Python workers; requests, pip and botocore run on it.
Redirects and retries are done here, not by urllib3: every hop must pass the catalog's image policy and the
host limits, and `Retry-After` must pause the host, not only the one request.

Every failure is an `ImageError` whose kind says what happened (`http_error` with the status, `timeout`,
`connection_error`, `truncated`, `tls_error`, `redirect_error`, `too_large`); transient ones (5xx, 408, 429,
timeouts, resets, short bodies) are retried with exponential backoff and jitter up to `fetch.retries` times.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import (
    HTTPError,
    LocationParseError,
    NewConnectionError,
    ProtocolError,
    SSLError,
    TimeoutError,
)

from lookalike.embed.decode import ImageError

SCHEMES = ("http", "https")
REDIRECTS = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
BACKOFF_BASE_S = 0.5  # the first retry waits 0.25-0.5 s, the n-th up to BACKOFF_BASE_S * 2**n
BACKOFF_CAP_S = 30.0
MAX_RETRY_AFTER_S = 60.0  # a host that asks for a longer pause is tried again on a later night instead
BODY_DEADLINE_TIMEOUTS = 4  # a whole response must arrive within this many fetch.timeout_s (a slow drip ends)
CHUNK = 64 * 1024
RETRY_DELAY_CAP_S = 30 * 86400.0  # a URL that keeps failing is still tried once a month
# Added to the limiter's window: a request reaches the host some milliseconds after it leaves, not always the
# same number (queues, a busy server thread), and the limit is for the host's clock. 20 ms let a loaded CI
# machine's server see 21 arrivals in one second under a limit of 20; 50 ms costs 5% of the rate at the limit.
ARRIVAL_JITTER_S = 0.05


def is_http(uri: str) -> bool:
    return uri[:8].lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class FetchSettings:
    """What one task may do to each host, and how patiently: plain values, pickled into the UDF."""

    requests_per_s: float  # this task's share of fetch.max_requests_per_host_per_s
    connections: int  # this task's share of fetch.max_connections_per_host
    timeout_s: float
    retries: int
    concurrency: int  # reading threads per task
    max_redirects: int
    user_agent: str
    ca_bundle: str | None = None
    partitions: int = 1  # the stage's tasks: all but the last may hand their slot over to another (`HostLimiter`)


@dataclass(frozen=True)
class Fetched:
    """A 200's body with its validators, or (`data` None) a 304: the bytes named by the validators sent."""

    data: bytes | None
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None


def task_share(max_requests_per_s: float, max_connections: int, tasks_at_once: int) -> tuple[float, int]:
    """One task's share of a host's budget when `tasks_at_once` tasks fetch at the same time.

    The connection share is never below one: with more tasks than `max_connections` a host may see one
    connection per task (the stage warns).
    """
    tasks = max(1, tasks_at_once)
    return max_requests_per_s / tasks, max(1, max_connections // tasks)


def limiter_budget(requests_per_s: float) -> tuple[int, float]:
    """(n, window): at most n requests in any `window` seconds. Whole requests per second where the rate
    allows one (a fraction is dropped: 2.5/s sends 2), else one request per 1/rate seconds."""
    if requests_per_s >= 1:
        return math.floor(requests_per_s), 1.0
    return 1, 1.0 / requests_per_s


def backoff_s(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The wait before retry number `attempt` (0-based): exponential, half of it jittered, so that the
    threads and tasks that failed together do not come back together."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
    return ceiling / 2 + rand() * ceiling / 2


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header: delay-seconds or an HTTP date (RFC 9110); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def retry_delay_s(attempts: int, base_hours: float) -> float:
    """How long after its `attempts`-th failed night a URL is tried again: `base_hours`, doubling per
    failure, capped at a month."""
    return min(RETRY_DELAY_CAP_S, base_hours * 3600.0 * 2 ** max(0, attempts - 1))


def host_of(url: str) -> str:
    """The politeness key: scheme, host name and port (default ports spelled out)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


class HostLimiter:
    """At most n requests per window per host from this task (`limiter_budget`), plus `Retry-After` pauses.

    A task's share must hold across the hand-over of its executor slot to the next task, which starts with an
    empty log: `drain` waits until no host's log holds a request of the last window. A task that ends while
    the last requests are still being decoded and embedded (most tasks of a night with new images) waits for
    nothing.
    """

    def __init__(self, requests_per_s: float, clock: Callable[[], float] = time.monotonic):
        self.n, self.window = limiter_budget(requests_per_s)
        self._clock = clock
        self._sent: dict[str, deque[float]] = {}
        self._paused_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str) -> float:
        """Seconds to wait before the next request to `host`; 0 means it may go now (and is counted)."""
        with self._lock:
            now = self._clock()
            sent = self._sent.setdefault(host, deque())
            window = self.window + ARRIVAL_JITTER_S
            while sent and sent[0] + window <= now:
                sent.popleft()
            wait = self._paused_until.get(host, 0.0) - now
            if len(sent) >= self.n:
                wait = max(wait, sent[0] + window - now)
            if wait > 0:
                return wait
            sent.append(now)
            return 0.0

    def acquire(self, host: str) -> None:
        while (wait := self.wait(host)) > 0:
            time.sleep(wait)

    def clear_in(self) -> float:
        """Seconds until every request sent is older than the window (0: already)."""
        with self._lock:
            last = max((sent[-1] for sent in self._sent.values() if sent), default=None)
            return 0.0 if last is None else max(0.0, last + self.window + ARRIVAL_JITTER_S - self._clock())

    def drain(self) -> None:
        time.sleep(self.clear_in())

    def pause(self, host: str, seconds: float) -> None:
        with self._lock:
            until = self._clock() + seconds
            self._paused_until[host] = max(self._paused_until.get(host, 0.0), until)


@dataclass
class FetchStats:
    """What this task's fetcher moved: requests sent (every hop and retry) and body bytes received."""

    requests: int = 0
    bytes: int = 0


# One pool manager per Python worker and settings: Spark reuses workers for later tasks, which then skip
# building the TLS context. Its connections are closed when each task ends (`Fetcher.close`), so an idle worker
# holds no connection against a host's limit.
_POOLS: dict[FetchSettings, urllib3.PoolManager] = {}


def _pool(settings: FetchSettings) -> urllib3.PoolManager:
    if settings not in _POOLS:
        _POOLS[settings] = urllib3.PoolManager(
            num_pools=256,
            maxsize=settings.connections,
            cert_reqs="CERT_REQUIRED",
            ca_certs=settings.ca_bundle,
        )
    return _POOLS[settings]


class Fetcher:
    """One task's http(s) client: `fetch` is safe to call from all of the task's reading threads."""

    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self.stats = FetchStats()
        self._pool = _pool(settings)
        self._limiter = HostLimiter(settings.requests_per_s)
        self._connections: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def close(self, hand_over: bool = False) -> None:
        """Close the connections; with `hand_over` (another task may take this one's slot next), first wait
        until this task's requests have left the rate window (`HostLimiter.drain`)."""
        if hand_over:
            self._limiter.drain()
        self._pool.clear()

    def fetch(
        self,
        uri: str,
        max_bytes: int,
        check: Callable[[str], None] = lambda url: None,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> Fetched:
        """The image at `uri`, following redirects (each hop passes `check`, the image policy), retrying
        transient failures. With `etag` / `last_modified` the request is conditional and a 304 comes back as
        `Fetched(data=None)`. Raises ImageError."""
        attempt = 0
        while True:
            try:
                return self._follow(uri, max_bytes, check, etag, last_modified)
            except ImageError as err:
                if not err.transient or attempt >= self.settings.retries:
                    raise
                wait = err.retry_after_s if err.retry_after_s is not None else backoff_s(attempt)
                if wait > MAX_RETRY_AFTER_S:
                    raise ImageError(err.kind, f"{err.message}; the host asks to wait {wait:.0f} s", True) from None
                time.sleep(wait)
                attempt += 1

    def _follow(
        self, uri: str, max_bytes: int, check: Callable[[str], None], etag: str | None, last_modified: str | None
    ) -> Fetched:
        url, seen = uri, {uri}
        for _ in range(self.settings.max_redirects + 1):
            check(url)
            headers = {"User-Agent": self.settings.user_agent, "Accept": "image/*,*/*;q=0.8"}
            if etag:
                headers["If-None-Match"] = etag
            if last_modified:
                headers["If-Modified-Since"] = last_modified
            location, fetched = self._request(uri, url, headers, max_bytes)
            if fetched is not None and fetched.data is None and not (etag or last_modified):
                raise ImageError("http_error", f"{uri}: HTTP 304 Not Modified to a request that named no version")
            if fetched is not None:
                return fetched
            assert location is not None
            url = urljoin(url, location)
            if not is_http(url):
                raise ImageError("redirect_error", f"{uri}: redirected to {url}, which is not an http(s) URL")
            if url in seen:
                raise ImageError("redirect_error", f"{uri}: redirect loop back to {url}")
            seen.add(url)
        raise ImageError("redirect_error", f"{uri}: more than fetch.max_redirects={self.settings.max_redirects}")

    @contextmanager
    def _turn(self, host: str) -> Iterator[None]:
        """A connection of this task's share for `host`, then a rate-limit slot: the request may go."""
        with self._lock:
            connections = self._connections.setdefault(host, threading.BoundedSemaphore(self.settings.connections))
        with connections:
            self._limiter.acquire(host)
            with self._lock:
                self.stats.requests += 1
            yield

    def _request(
        self, uri: str, url: str, headers: dict[str, str], max_bytes: int
    ) -> tuple[str | None, Fetched | None]:
        """One GET: (a redirect's Location, None) or (None, what came back). Raises ImageError."""
        try:
            host = host_of(url)
        except ValueError as err:  # a port out of range
            raise ImageError("bad_uri", f"{uri}: {err}") from None
        timeout = self.settings.timeout_s
        with self._turn(host):
            try:
                response = self._pool.request(
                    "GET",
                    url,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    timeout=urllib3.Timeout(connect=timeout, read=timeout),
                )
            except (HTTPError, ValueError) as err:
                raise _transport_error(uri, err, timeout) from None
            try:
                return self._answer(uri, url, response, max_bytes, host)
            finally:
                response.release_conn()

    def _answer(
        self, uri: str, url: str, response: urllib3.BaseHTTPResponse, max_bytes: int, host: str
    ) -> tuple[str | None, Fetched | None]:
        status = response.status
        if status in REDIRECTS:
            location = response.headers.get("Location")
            response.close()  # not drained: a hostile server could send an endless body with its redirect
            if not location:
                raise ImageError("redirect_error", f"{uri}: HTTP {status} without a Location header")
            return location, None
        if status == 304:
            response.drain_conn()
            return None, Fetched(None)
        if status != 200:
            response.close()
            wait = retry_after_s(response.headers.get("Retry-After"), time.time()) if status in (429, 503) else None
            if wait is not None:
                self._limiter.pause(host, min(wait, MAX_RETRY_AFTER_S))
            where = "" if url == uri else f" (redirected to {url})"
            raise ImageError(
                "http_error",
                f"{uri}: HTTP {status} {response.reason or ''}{where}".rstrip(),
                transient=status in TRANSIENT_STATUSES,
                retry_after_s=wait,
            )
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            response.close()  # a connection with an unread body cannot be reused
            raise ImageError("too_large", f"{uri}: {declared} bytes (Content-Length), over the limit of {max_bytes}")
        data = self._body(uri, response, max_bytes)
        headers = response.headers
        return None, Fetched(data, headers.get("ETag"), headers.get("Last-Modified"), headers.get("Content-Type"))

    def _body(self, uri: str, response: urllib3.BaseHTTPResponse, max_bytes: int) -> bytes:
        """The body, streamed: stops past `max_bytes` or past the deadline, whatever the server promised.
        `read1` returns what one socket read brought, so a server dripping bytes meets the deadline too."""
        deadline = time.monotonic() + BODY_DEADLINE_TIMEOUTS * self.settings.timeout_s
        chunks, size = [], 0
        try:
            while chunk := response.read1(CHUNK):
                size += len(chunk)
                with self._lock:
                    self.stats.bytes += len(chunk)
                if size > max_bytes:
                    response.close()
                    raise ImageError("too_large", f"{uri}: more than {max_bytes} bytes, over the limit")
                if time.monotonic() > deadline:
                    response.close()
                    raise ImageError(
                        "timeout",
                        f"{uri}: body not complete after {BODY_DEADLINE_TIMEOUTS * self.settings.timeout_s:.0f} s "
                        f"({size} bytes so far)",
                        transient=True,
                    )
                chunks.append(chunk)
        except ProtocolError as err:
            response.close()
            if "IncompleteRead" in str(err) or "incomplete" in str(err).lower():
                raise ImageError("truncated", f"{uri}: body ended early: {err}", transient=True) from None
            raise ImageError("connection_error", f"{uri}: {err}", transient=True) from None
        except TimeoutError:
            response.close()
            raise ImageError(
                "timeout", f"{uri}: no bytes for {self.settings.timeout_s:g} s while reading", transient=True
            ) from None
        except HTTPError as err:
            response.close()
            raise ImageError("connection_error", f"{uri}: {err}", transient=True) from None
        return b"".join(chunks)


def _transport_error(uri: str, err: Exception, timeout: float) -> ImageError:
    """A failure before any answer: the URL, the name, the connection, TLS or the clock."""
    if isinstance(err, (LocationParseError, ValueError)):
        return ImageError("bad_uri", f"{uri}: {err}")
    if isinstance(err, SSLError):
        return ImageError("tls_error", f"{uri}: {err} (a private CA can be trusted with fetch.ca_bundle)")
    if isinstance(err, NewConnectionError):  # before TimeoutError: urllib3 derives it from ConnectTimeoutError
        return ImageError("connection_error", f"{uri}: cannot connect: {err}", transient=True)
    if isinstance(err, TimeoutError):
        return ImageError("timeout", f"{uri}: no answer within fetch.timeout_s={timeout:g} s", transient=True)
    return ImageError("connection_error", f"{uri}: {err}", transient=True)

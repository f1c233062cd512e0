"""The http(s) fetcher against a real server on 127.0.0.1 that injects faults (tests/http_faults.py), and
its pure pieces: backoff, Retry-After, the per-host budget and the limiter. No Spark here: the embed stage
over URL catalogs is tests/test_fetch_stage.py."""

from __future__ import annotations

import email.utils
import hashlib
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from lookalike.embed.catalog import fetch_settings
from lookalike.embed.decode import ImageError
from lookalike.embed.fetcher import (
    ARRIVAL_JITTER_S,
    BACKOFF_BASE_S,
    Fetched,
    Fetcher,
    FetchSettings,
    HostLimiter,
    backoff_s,
    host_of,
    limiter_budget,
    retry_after_s,
    retry_delay_s,
    task_share,
)
from lookalike.embed.reader import ImagePolicy, read
from tests.conftest import make_config
from tests.http_faults import FaultServer, write_ca


def png(seed: int, size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 256, seed * 90 % 256, 120)).save(buffer, "PNG")
    return buffer.getvalue()


FILES = {f"p{i}.png": png(i) for i in range(24)}


def settings(**overrides: object) -> FetchSettings:
    values: dict = dict(
        requests_per_s=1000.0,
        connections=4,
        timeout_s=0.5,
        retries=2,
        concurrency=8,
        max_redirects=3,
        user_agent="lookalike-test/1",
    )
    values.update(overrides)
    return FetchSettings(**values)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(FILES) as running:
        yield running


def fetch(server: FaultServer, path: str, max_bytes: int = 10 * 1024 * 1024, **overrides: object) -> Fetched:
    fetcher = Fetcher(settings(**overrides))
    try:
        return fetcher.fetch(server.url(path), max_bytes)
    finally:
        fetcher.close()


def failure(server: FaultServer, path: str, **kwargs: object) -> ImageError:
    with pytest.raises(ImageError) as caught:
        fetch(server, path, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in caught.value.message and server.url(path) in caught.value.message
    return caught.value


# -- pure pieces ---------------------------------------------------------------------------------------------


def test_backoff_grows_and_is_jittered_within_bounds() -> None:
    assert backoff_s(0, lambda: 0.0) == BACKOFF_BASE_S / 2 and backoff_s(0, lambda: 1.0) == BACKOFF_BASE_S
    assert [backoff_s(a, lambda: 0.0) for a in range(4)] == [BACKOFF_BASE_S * 2**a / 2 for a in range(4)]
    assert backoff_s(30, lambda: 1.0) == 30.0  # capped


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after_s("7", now) == 7.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after_s(None, now) is None and retry_after_s("soon", now) is None


def test_the_hosts_budget_is_split_over_the_tasks_that_run_at_once() -> None:
    assert task_share(10.0, 4, 2) == (5.0, 2)
    assert task_share(10.0, 4, 8) == (1.25, 1)  # never below one connection (the stage warns)
    assert task_share(10.0, 4, 0) == (10.0, 4)
    assert limiter_budget(5.0) == (5, 1.0) and limiter_budget(2.5) == (2, 1.0) and limiter_budget(0.25) == (1, 4.0)


def test_failed_urls_wait_longer_each_run() -> None:
    delays = [retry_delay_s(a, 20.0) for a in (1, 2, 3)]
    assert delays == [20 * 3600.0, 40 * 3600.0, 80 * 3600.0]
    assert retry_delay_s(50, 20.0) == 30 * 86400.0


def test_hosts_are_told_apart_by_scheme_name_and_port() -> None:
    assert host_of("HTTP://Example.com/a.jpg") == "http://example.com:80"
    assert host_of("https://example.com/a.jpg") == "https://example.com:443"
    assert host_of("http://example.com:8080/a") != host_of("http://example.com/a")


def test_limiter_allows_n_per_window_drains_for_the_next_task_and_honours_pauses() -> None:
    now = [100.0]
    limiter = HostLimiter(2.0, clock=lambda: now[0])
    assert limiter.clear_in() == 0  # nothing sent: a task that fetched nothing hands its slot over at once
    assert limiter.wait("h") == 0 and limiter.wait("h") == 0 and limiter.wait("h") > 0.9
    assert limiter.wait("other") == 0  # each host has its own log
    now[0] += 0.5
    assert limiter.clear_in() == pytest.approx(0.5 + ARRIVAL_JITTER_S)  # the window plus jitter after the last
    now[0] += 0.6
    assert limiter.clear_in() == 0 and limiter.wait("h") == 0
    limiter.pause("h", 5.0)
    assert limiter.wait("h") == pytest.approx(5.0)


# -- against the server --------------------------------------------------------------------------------------


def test_an_image_arrives_with_its_validators_and_a_conditional_request_moves_nothing(server: FaultServer) -> None:
    got = fetch(server, "/img/p1.png")
    assert got.data == FILES["p1.png"] and got.etag == server.etag("p1.png") and got.last_modified
    assert server.log.user_agents == {"lookalike-test/1"}
    sent = server.log.body_bytes
    fetcher = Fetcher(settings())
    assert fetcher.fetch(server.url("/img/p1.png"), 10**6, etag=got.etag).data is None
    assert fetcher.fetch(server.url("/img/p1.png"), 10**6, last_modified=got.last_modified).data is None
    assert server.log.not_modified == 2 and server.log.body_bytes == sent
    server.files["p1.png"] = FILES["p2.png"]  # changed: the old validators no longer match
    assert fetcher.fetch(server.url("/img/p1.png"), 10**6, etag=got.etag).data == FILES["p2.png"]


@pytest.mark.parametrize("code", [404, 410, 403])
def test_permanent_statuses_fail_at_once_with_the_status(server: FaultServer, code: int) -> None:
    err = failure(server, f"/status/{code}")
    assert err.kind == "http_error" and f"HTTP {code}" in err.message and not err.transient
    assert server.log.paths[f"/status/{code}"] == 1  # not retried


def test_server_errors_are_retried_then_reported_as_transient(server: FaultServer) -> None:
    err = failure(server, "/status/500")
    assert err.kind == "http_error" and "HTTP 500" in err.message and err.transient
    assert server.log.paths["/status/500"] == 3  # the request and fetch.retries=2 more


def test_503_then_200_succeeds_after_waiting_for_retry_after(server: FaultServer) -> None:
    started = time.monotonic()
    assert fetch(server, "/fail/1/503/p3.png").data == FILES["p3.png"]
    assert time.monotonic() - started >= 0.95  # Retry-After: 1 was honoured, not the 0.25 s backoff
    assert server.log.paths["/fail/1/503/p3.png"] == 2


def test_429_pauses_the_whole_host_for_retry_after(server: FaultServer) -> None:
    fetcher = Fetcher(settings())
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(fetcher.fetch, server.url("/fail/1/429/p4.png"), 10**6)
        time.sleep(0.2)  # the 429 has come back: the host is paused for 1 s
        others = [pool.submit(fetcher.fetch, server.url(f"/img/p{i}.png"), 10**6) for i in (5, 6, 7)]
        assert first.result().data == FILES["p4.png"] and all(f.result().data for f in others)
    arrivals = sorted(server.log.arrivals)
    assert arrivals[1] - arrivals[0] >= 0.95  # after the 429, nothing went to the host during its pause


def test_429_after_the_retries_is_a_transient_http_error(server: FaultServer) -> None:
    err = failure(server, "/fail/9/429/p1.png")
    assert err.kind == "http_error" and "HTTP 429" in err.message and err.transient


def test_a_slow_answer_times_out_and_is_transient(server: FaultServer) -> None:
    err = failure(server, "/slow/3/p1.png", retries=0)
    assert err.kind == "timeout" and err.transient


def test_a_dripping_body_meets_the_deadline(server: FaultServer) -> None:
    started = time.monotonic()
    err = failure(server, "/drip/100", retries=0)  # 20 s of bytes, each well within the 0.5 s read timeout
    assert err.kind == "timeout" and "body not complete" in err.message and time.monotonic() - started < 4.5


def test_a_304_to_an_unconditional_request_is_not_taken_for_unchanged(server: FaultServer) -> None:
    err = failure(server, "/unasked/p1.png")
    assert err.kind == "http_error" and "304" in err.message


@pytest.mark.parametrize(
    "uri", ["http://", "http://:80/a.jpg", "http://h:99999/a.jpg", "http://[::1/a.jpg", "https://exa mple.com/a b"]
)
def test_hostile_urls_are_image_errors(uri: str) -> None:
    with pytest.raises(ImageError) as caught:
        read(uri, 10**6, ImagePolicy(), Fetcher(settings(retries=0, timeout_s=0.2)))
    assert caught.value.kind in ("bad_uri", "connection_error") and "\n" not in caught.value.message


def test_a_body_cut_short_is_truncated_and_retried(server: FaultServer) -> None:
    err = failure(server, "/short/p1.png")
    assert err.kind == "truncated" and err.transient and server.log.paths["/short/p1.png"] == 3


def test_a_declared_200_mb_body_is_refused_from_its_header(server: FaultServer) -> None:
    err = failure(server, "/huge/200", max_bytes=1024 * 1024)
    assert err.kind == "too_large" and "Content-Length" in err.message and not err.transient


def test_an_endless_body_stops_at_the_byte_limit(server: FaultServer) -> None:
    fetcher = Fetcher(settings())
    with pytest.raises(ImageError) as caught:
        fetcher.fetch(server.url("/endless/200"), 1024 * 1024)
    assert caught.value.kind == "too_large"
    assert fetcher.stats.bytes <= 1024 * 1024 + 64 * 1024  # stopped within one chunk of the limit


def test_redirects_are_followed_up_to_the_limit_and_loops_fail_at_once(server: FaultServer) -> None:
    assert fetch(server, "/redirect/3/p2.png").data == FILES["p2.png"]
    assert failure(server, "/redirect/4/p2.png").kind == "redirect_error"  # fetch.max_redirects=3
    err = failure(server, "/loop/A")
    assert err.kind == "redirect_error" and "loop" in err.message
    assert server.log.paths["/loop/A"] == 1 and server.log.paths["/loop/B"] == 1


def test_a_redirect_to_a_local_file_is_refused(server: FaultServer) -> None:
    err = failure(server, "/to?url=file:///etc/passwd")
    assert err.kind == "redirect_error" and "root:" not in err.message


def test_a_redirect_must_stay_under_the_image_roots(server: FaultServer) -> None:
    policy = ImagePolicy.of(None, [server.url("/redirect/")])
    with pytest.raises(ImageError) as caught:
        read(server.url("/redirect/1/p1.png"), 10**6, policy, Fetcher(settings()))  # to /img/p1.png: outside
    assert caught.value.kind == "forbidden" and server.log.paths["/img/p1.png"] == 0
    inside = ImagePolicy.of(None, [server.url("/")])
    assert read(server.url("/redirect/1/p1.png"), 10**6, inside, Fetcher(settings())).data == FILES["p1.png"]


def test_a_connection_refused_is_transient(server: FaultServer) -> None:
    with FaultServer({}) as gone:
        url = gone.url("/img/x.png")
    with pytest.raises(ImageError) as caught:
        Fetcher(settings(retries=0)).fetch(url, 10**6)
    assert caught.value.kind == "connection_error" and caught.value.transient


def test_https_with_a_private_ca_is_refused_unless_its_bundle_is_given(tmp_path: Path) -> None:
    certificate, bundle = write_ca(tmp_path)
    with FaultServer(FILES, certificate) as secure:
        url = secure.url("/img/p1.png")
        with pytest.raises(ImageError) as caught:
            Fetcher(settings()).fetch(url, 10**6)
        assert caught.value.kind == "tls_error" and "fetch.ca_bundle" in caught.value.message
        assert Fetcher(settings(ca_bundle=str(bundle))).fetch(url, 10**6).data == FILES["p1.png"]


def test_the_per_host_limits_hold_under_many_threads(server: FaultServer) -> None:
    fetcher = Fetcher(settings(requests_per_s=8.0, connections=2))
    names = [f"p{i}.png" for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda name: fetcher.fetch(server.url(f"/slow/0.05/{name}"), 10**6), names))
    assert [g.data for g in got] == [FILES[name] for name in names]
    assert server.log.max_in_flight <= 2
    assert server.log.max_per_window(1.0) <= 8
    assert fetcher.stats.requests == 20 and fetcher.stats.bytes == sum(len(FILES[n]) for n in names)


def test_bytes_that_arrive_are_the_served_bytes(server: FaultServer) -> None:
    for name in ("p0.png", "p9.png"):
        got = fetch(server, f"/as/text/plain/{name}")  # a wrong Content-Type does not decide: the bytes do
        assert hashlib.sha256(got.data or b"").digest() == hashlib.sha256(FILES[name]).digest()
        assert got.content_type == "text/plain"


def test_each_task_gets_its_share_of_the_configured_budget(tmp_path: Path) -> None:
    _, bundle = write_ca(tmp_path)
    cfg = make_config(
        tmp_path,
        **{
            "fetch.max_requests_per_host_per_s": 12.0,
            "fetch.max_connections_per_host": 6,
            "fetch.ca_bundle": str(bundle),
            "fetch.user_agent": "shop-bot (ops@example.com)",
        },
    )
    shared = fetch_settings(cfg, tasks_at_once=3)
    assert (shared.requests_per_s, shared.connections) == (4.0, 2)
    assert shared.ca_bundle == str(bundle) and shared.user_agent == "shop-bot (ops@example.com)"
    assert fetch_settings(cfg).connections == 6  # the report's one fetcher gets the whole budget

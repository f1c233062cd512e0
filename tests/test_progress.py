"""The driver's progress line: done, rate, what was fetched, failures by kind, time left."""

from __future__ import annotations

from lookalike.progress import CountsParam, progress_line


def test_a_file_catalog_line_has_no_fetch_rates() -> None:
    line = progress_line("embed r1", 1200, 5000, 10.0, {"missing": 3})
    assert line == "embed r1: 1200/5000 (24%), 120.0 img/s, 3 failed (missing 3), ~32s left"


def test_a_url_catalog_line_shows_bytes_requests_and_failures_by_kind() -> None:
    line = progress_line("embed r1", 500, 500, 10.0, {"timeout": 2, "http_error": 5, "missing": 0}, 21_000_000, 402)
    assert line == "embed r1: 500/500 (100%), 50.0 img/s, 2.1 MB/s, 40.2 req/s, 7 failed (http_error 5, timeout 2)"


def test_failure_counts_add_up_by_kind() -> None:
    param = CountsParam()
    total = param.zero({})
    for part in ({"timeout": 1}, {"timeout": 2, "http_error": 1}, {}):
        total = param.addInPlace(total, part)
    assert total == {"timeout": 3, "http_error": 1}

"""The embed stage over a URL catalog on a faulty host (tests/http_faults.py), night after night, at the
default guards: every reachable image embedded with the right bytes, the dead ones quarantined with their
kinds, the per-host limits held for the whole job, an unchanged night moving (almost) no bytes, one changed
file embedded again alone, `--retry-failed` retrying the failures only, and a host that goes down keeping its
items' embeddings."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.embed import stage as embed
from lookalike.storage import tables
from tests.conftest import make_config
from tests.http_faults import FaultServer
from tests.image_corpus import photo

GOOD = 30
LIMIT_PER_S, LIMIT_CONNECTIONS = 20.0, 2


def served_png(i: int) -> bytes:
    buffer = io.BytesIO()
    photo(40 + i % 7, 36, seed=100 + i).save(buffer, "PNG")
    return buffer.getvalue()


# item -> (path, what the first night makes of it: None embeds, else the quarantine kind). The faults that the
# fetcher walks away from (a timeout, a refused body) live on a host of their own, `rude`: the server counts
# those requests in flight a little after the client left, and the limits are asserted on `host`.
FAULTS: dict[str, tuple[str, str | None]] = {
    "redirected": ("/redirect/2/g0.png", None),
    "as_text": ("/as/text/plain/g1.png", None),  # a wrong Content-Type: the bytes decide
    "flaky": ("/fail/1/503/g2.png", None),  # 503 once, then 200
    "busy": ("/fail/1/429/g3.png", None),  # 429 with Retry-After once, then 200
    "late": ("/img/late.png", "http_error"),  # 404 until the file appears
    "gone": ("/status/410", "http_error"),
    "short": ("/short/g5.png", "truncated"),
    "loop": ("/loop/A", "redirect_error"),
    "soft404": ("/as/text/html/page.html", "not_an_image"),
}
RUDE: dict[str, tuple[str, str | None]] = {
    "slow": ("/slow/3/g4.png", "timeout"),
    "huge": ("/huge/200", "too_large"),
}


@pytest.fixture(scope="module")
def host() -> Iterator[FaultServer]:
    files = {f"g{i}.png": served_png(i) for i in range(GOOD)} | {"page.html": b"<html>no such product</html>"}
    with FaultServer(files) as server:
        yield server


@pytest.fixture(scope="module")
def rude() -> Iterator[FaultServer]:
    with FaultServer({"g4.png": served_png(4)}) as server:
        yield server


def config(
    folder: Path, host: FaultServer, rude: FaultServer | None = None, faults: bool = True, **overrides: object
) -> Config:
    uris = {f"g{i}": host.url(f"/img/g{i}.png") for i in range(GOOD)}
    if faults:
        uris |= {item: host.url(path) for item, (path, _) in FAULTS.items()}
    if rude is not None:
        uris |= {item: rude.url(path) for item, (path, _) in RUDE.items()}
    catalog = folder / "catalog.parquet"
    pd.DataFrame({"item_id": list(uris), "image_uri": list(uris.values()), "category": "c"}).to_parquet(catalog)
    values = {
        "catalog.path": str(catalog),
        "embed.image_size": 32,
        "embed.batch_size": 8,
        "embed.partition_size": 12,
        "embed.max_bytes": 1024 * 1024,
        "fetch.timeout_s": 0.5,
        "fetch.retries": 1,
        "fetch.max_requests_per_host_per_s": LIMIT_PER_S,
        "fetch.max_connections_per_host": LIMIT_CONNECTIONS,
        "fetch.user_agent": "lookalike-test (ops@example.com)",
    }
    return make_config(folder, **{**values, **overrides})


def table(root: Path, name: str) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), name)).to_pandas().set_index("item_id")


def hours_until(when: pd.Series) -> pd.Series:
    return (pd.to_datetime(when, utc=True) - pd.Timestamp.now(tz="UTC")) / pd.Timedelta(hours=1)


def versions(root: Path) -> list[int | None]:
    return [tables.version(tables.table_path(str(root), name)) for name in ("embeddings", "quarantine", "fetch_state")]


def test_a_url_catalog_on_a_faulty_host_night_after_night(
    spark: SparkSession, tmp_path: Path, host: FaultServer, rude: FaultServer
) -> None:
    out = tmp_path / "out"
    faults = FAULTS | RUDE
    expected_failures = {item: kind for item, (_, kind) in faults.items() if kind is not None}
    n_embedded = GOOD + len(faults) - len(expected_failures)

    # Night 1: everything reachable is embedded, the rest quarantined with its kind, within the host's limits.
    first = embed.run(config(tmp_path, host, rude), spark, "r1")
    assert first.metrics["embedded"] == n_embedded and first.metrics["quarantined"] == len(expected_failures)
    rows = table(out, "embeddings")
    served = {f"g{i}": served_png(i) for i in range(GOOD)} | {
        "redirected": served_png(0),
        "as_text": served_png(1),
        "flaky": served_png(2),
        "busy": served_png(3),
    }
    assert rows["image_sha256"].to_dict() == {item: hashlib.sha256(data).hexdigest() for item, data in served.items()}
    quarantine = table(out, "quarantine")
    assert quarantine["error_kind"].to_dict() == expected_failures
    assert "HTTP 404" in quarantine.loc["late", "error_message"]
    assert "HTTP 410" in quarantine.loc["gone", "error_message"]
    assert "served as text/html" in quarantine.loc["soft404", "error_message"]
    assert set(quarantine["attempts"]) == {1}
    assert hours_until(quarantine["next_retry_at"]).between(19, 20).all()  # fetch.retry_delay_hours=20
    assert host.log.max_in_flight <= LIMIT_CONNECTIONS and host.log.max_per_window(1.0) <= LIMIT_PER_S
    assert host.log.user_agents == {"lookalike-test (ops@example.com)"}
    state = table(out, "fetch_state")
    assert state.loc["g3", "etag"] == host.etag("g3.png") and state.loc["g3", "last_modified"]
    first_bytes = host.log.body_bytes

    # Night 2, nothing changed: conditional requests answered 304, no bytes, the failures wait for their time.
    host.reset_log()
    rude.reset_log()
    second = embed.run(config(tmp_path, host, rude), spark, "r2")
    assert second.metrics["embedded"] == 0 and second.metrics["unchanged"] == n_embedded
    assert second.metrics["deferred"] == len(expected_failures)
    assert host.log.not_modified == n_embedded and host.log.body_bytes < first_bytes / 100
    assert not {faults[item][0] for item in expected_failures} & set(host.log.paths) and not rude.log.paths
    assert table(out, "quarantine")["error_kind"].to_dict() == expected_failures  # kept as they were

    # Night 3: one served file changed; exactly that item is embedded again.
    host.files["g7.png"] = served_png(99)
    third = embed.run(config(tmp_path, host, rude), spark, "r3")
    assert third.rows_out == 1 and third.metrics["unchanged"] == n_embedded - 1
    assert table(out, "embeddings").loc["g7", "image_sha256"] == hashlib.sha256(served_png(99)).hexdigest()

    # --retry-failed: the quarantined items only, now; the one that came back is embedded, the rest wait longer.
    host.files["late.png"] = served_png(50)
    host.reset_log()
    rude.reset_log()
    retried = embed.run(config(tmp_path, host, rude, **{"embed.retry_failed": True}), spark, "r4")
    assert retried.metrics["embedded"] == 1
    # The HTML page's bytes were asked for conditionally (304): still the same bytes, still not an image.
    assert retried.metrics["quarantined"] + retried.metrics["still_quarantined"] == len(expected_failures) - 1
    assert retried.metrics["still_quarantined"] == 1
    asked = {path for path in [*host.log.paths, *rude.log.paths] if path != "/loop/B"}
    assert asked == {faults[item][0] for item in expected_failures}  # not one good image was asked for
    quarantine = table(out, "quarantine")
    assert "late" not in quarantine.index and "late" in table(out, "embeddings").index
    assert set(quarantine["attempts"]) == {2}
    assert hours_until(quarantine["next_retry_at"]).between(39, 40).all()  # twice as long after two failures


def test_a_host_that_is_down_is_refused_by_the_guard_or_keeps_the_embeddings(
    spark: SparkSession, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    files = {f"g{i}.png": served_png(i) for i in range(GOOD)} | {"page.html": b"<html></html>"}
    with FaultServer(files) as server:
        cfg = config(tmp_path, server, None, faults=False, **{"fetch.retries": 0})
        assert embed.run(cfg, spark, "r1").metrics["embedded"] == GOOD
    before, embedded = versions(out), table(out, "embeddings")
    # The host is gone (its port closed): every request fails with connection_error.
    with pytest.raises(embed.TooManyBadImages, match="connection_error"):
        embed.run(cfg, spark, "r2")
    assert versions(out) == before  # refused before anything was committed
    # Told to go through anyway, the unchanged items keep their embeddings and the quarantine says so.
    cfg = config(tmp_path, server, None, faults=False, **{"fetch.retries": 0, "embed.max_bad_fraction": 1.0})
    kept = embed.run(cfg, spark, "r3")
    assert kept.metrics["kept_after_failure"] == GOOD and kept.metrics["embedded"] == 0
    after = table(out, "embeddings")
    assert after.index.sort_values().equals(embedded.index.sort_values())
    assert (after["run_id"] == "r1").all()
    quarantine = table(out, "quarantine")
    assert (quarantine.loc[after.index, "error_kind"] == "connection_error").all()
    assert quarantine.loc[after.index, "error_message"].str.contains("previous embedding is kept").all()
    assert hours_until(quarantine["next_retry_at"]).between(19, 20).all()

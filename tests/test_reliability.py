"""Bad nights are refused before anything is committed, good nights always go through: the embed stage at the
defaults a user gets (`embed.max_bad_fraction` 0.2, `embed.max_removed_fraction` 0.2), on real files.

Each test reproduces a finding of the reliability issue: permanently bad images must not stop later nights,
an empty or truncated feed must not empty the tables, hostile rows must land in quarantine (never fail a task),
and a row must not read files outside the catalog's folder or `catalog.image_roots`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.embed import catalog
from lookalike.embed import stage as embed
from lookalike.storage import tables
from tests.conftest import make_config
from tests.image_corpus import make_corpus, photo

GOOD = 40
SECRET = "root:x:0:0:root:/root:/bin/bash"


def write_catalog(folder: Path, uris: dict[str, str]) -> Path:
    path = folder / "catalog.parquet"
    pd.DataFrame({"item_id": list(uris), "image_uri": list(uris.values()), "category": "c"}).to_parquet(path)
    return path


def good_images(folder: Path, n: int = GOOD) -> dict[str, str]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(24 + i % 5, 20, seed=i).save(folder / "img" / f"g{i}.png")
    return {f"g{i}": f"img/g{i}.png" for i in range(n)}  # relative to the catalog's folder


def config(folder: Path, catalog_path: Path, **overrides: object) -> Config:
    # The user's defaults for every guard: only sizes are made small.
    small = {"embed.image_size": 32, "embed.batch_size": 8, "embed.partition_size": 16}
    return make_config(folder, **{"catalog.path": str(catalog_path), **small, **overrides})


def table(root: Path, name: str) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), name)).to_pandas().set_index("item_id")


def versions(root: Path) -> tuple[int | None, int | None]:
    return tuple(tables.version(tables.table_path(str(root), name)) for name in ("embeddings", "quarantine"))


def test_permanently_bad_images_do_not_stop_later_nights(spark: SparkSession, tmp_path: Path) -> None:
    cases = [case for case in make_corpus(tmp_path / "corpus") if case.expected_kind is not None]
    n_good = 60
    uris = good_images(tmp_path, n_good) | {case.name: str(case.path) for case in cases}
    assert len(cases) / len(uris) < 0.2  # a catalog with some permanently bad images, under the default guard
    cfg = config(tmp_path, write_catalog(tmp_path, uris))
    first = embed.run(cfg, spark, "r1")
    assert first.metrics["embedded"] == n_good and first.metrics["quarantined"] == len(cases)
    before = table(tmp_path / "out", "quarantine")

    second = embed.run(cfg, spark, "r2")  # used to fail: "8 of 8 images failed (100% > 20%)"
    skipped = {case.name for case in cases if case.expected_kind in ("not_an_image", "decode_error")}
    assert second.metrics["embedded"] == 0 and second.metrics["unchanged"] == n_good
    assert second.metrics["still_quarantined"] == len(skipped)  # their bytes were read and hashed, not decoded
    after = table(tmp_path / "out", "quarantine")
    assert after["error_kind"].to_dict() == before["error_kind"].to_dict()
    assert (after.loc[sorted(skipped), "run_id"] == "r1").all()  # kept as they were
    assert (after.drop(index=sorted(skipped))["run_id"] == "r2").all()  # missing, too_large, ...: tried again

    # New bytes under a quarantined URI are tried again at once.
    fixed = next(case for case in cases if case.name == "truncated_jpeg")
    photo(30, 30, seed=99).save(fixed.path, format="JPEG")
    third = embed.run(cfg, spark, "r3")
    assert third.metrics["embedded"] == 1 and "truncated_jpeg" in table(tmp_path / "out", "embeddings").index
    assert "truncated_jpeg" not in table(tmp_path / "out", "quarantine").index


def test_a_broken_mount_is_still_refused(spark: SparkSession, tmp_path: Path) -> None:
    uris = good_images(tmp_path)
    cfg = config(tmp_path, write_catalog(tmp_path, uris))
    embed.run(cfg, spark, "r1")
    committed = versions(tmp_path / "out")
    for image in (tmp_path / "img").iterdir():
        image.unlink()  # every image gone: a storage problem, not a catalog change
    with pytest.raises(embed.TooManyBadImages, match=rf"{GOOD} of {GOOD} images failed .*nothing was committed"):
        embed.run(cfg, spark, "r2")
    assert versions(tmp_path / "out") == committed


def test_an_empty_feed_is_refused_and_commits_nothing(spark: SparkSession, tmp_path: Path) -> None:
    uris = good_images(tmp_path)
    catalog_path = write_catalog(tmp_path, uris)
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"item_id": pd.Series([], dtype=str), "image_uri": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(catalog.CatalogError, match="has no rows: refusing to run on an empty feed"):
        embed.run(config(tmp_path, empty), spark, "r0")  # not even a first night on an empty feed
    assert versions(tmp_path / "out") == (None, None)
    embed.run(config(tmp_path, catalog_path), spark, "r1")
    committed = versions(tmp_path / "out")
    with pytest.raises(catalog.CatalogError, match="has no rows"):
        embed.run(config(tmp_path, empty), spark, "r2")
    assert versions(tmp_path / "out") == committed
    assert len(table(tmp_path / "out", "embeddings")) == GOOD


def test_a_truncated_feed_is_refused_unless_the_shrink_is_meant(spark: SparkSession, tmp_path: Path) -> None:
    uris = good_images(tmp_path)
    embed.run(config(tmp_path, write_catalog(tmp_path, uris)), spark, "r1")
    committed = versions(tmp_path / "out")
    half = dict(list(uris.items())[: GOOD // 2])
    cut = config(tmp_path, write_catalog(tmp_path, half))
    with pytest.raises(embed.TooManyRemoved, match=r"remove 20 of the 40 items .*50% > embed.max_removed_fraction"):
        embed.run(cut, spark, "r2")
    assert versions(tmp_path / "out") == committed
    # A small, real clean-up goes through at the default; a big one with the explicit override.
    embed.run(config(tmp_path, write_catalog(tmp_path, dict(list(uris.items())[: GOOD - 4]))), spark, "r3")
    assert len(table(tmp_path / "out", "embeddings")) == GOOD - 4
    embed.run(config(tmp_path, write_catalog(tmp_path, half), **{"embed.max_removed_fraction": 1.0}), spark, "r4")
    assert sorted(table(tmp_path / "out", "embeddings").index) == sorted(half)


def test_images_that_stop_embedding_count_as_removed(spark: SparkSession, tmp_path: Path) -> None:
    uris = good_images(tmp_path)
    cfg = config(tmp_path, write_catalog(tmp_path, uris), **{"embed.max_bad_fraction": 1.0})
    embed.run(cfg, spark, "r1")
    committed = versions(tmp_path / "out")
    for i in range(GOOD // 2):
        (tmp_path / "img" / f"g{i}.png").write_bytes(b"<html>CDN error</html>")
    with pytest.raises(embed.TooManyRemoved, match="their images no longer embed"):
        embed.run(cfg, spark, "r2")
    assert versions(tmp_path / "out") == committed


def test_hostile_rows_are_quarantined_not_task_failures(spark: SparkSession, tmp_path: Path) -> None:
    shop = tmp_path / "shop"  # the catalog's folder; the secret lies beside it, outside
    uris = good_images(shop)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    os.mkfifo(shop / "img" / "pipe.jpg")
    (shop / "img" / "link.jpg").symlink_to(secret)
    hostile = {
        "nul": "img/a\x00b.jpg",
        "nul_encoded": "file:///a%00b.jpg",
        "bad_url": "http://[oops/x.jpg",
        "fifo": "img/pipe.jpg",
        "folder": "img",
        "dotdot": "../secret.txt",
        "dotdot_deep": "img/../../secret.txt",
        "symlink": "img/link.jpg",
    }
    cfg = config(tmp_path, write_catalog(shop, uris | hostile))
    result = embed.run(cfg, spark, "r1")  # 8 hostile rows of 48: under the default guard
    assert result.metrics["embedded"] == GOOD
    quarantined = table(tmp_path / "out", "quarantine")
    assert quarantined["error_kind"].to_dict() == {
        "nul": "bad_uri",
        "nul_encoded": "bad_uri",
        "bad_url": "bad_uri",
        "fifo": "not_a_file",
        "folder": "not_a_file",
        "dotdot": "forbidden",
        "dotdot_deep": "forbidden",
        "symlink": "forbidden",
    }
    assert not quarantined["error_message"].str.contains("root:x").any()


def test_image_roots_quarantine_everything_outside(spark: SparkSession, tmp_path: Path) -> None:
    uris = good_images(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    photo(20, 20).save(outside / "x.png")
    (outside / "notes.txt").write_text(SECRET)
    rows = uris | {"outside": str(outside / "x.png"), "text": str(outside / "notes.txt")}
    cfg = config(tmp_path, write_catalog(tmp_path, rows), **{"catalog.image_roots": [str(tmp_path / "img")]})
    assert embed.run(cfg, spark, "r1").metrics["embedded"] == GOOD
    quarantined = table(tmp_path / "out", "quarantine")
    assert quarantined["error_kind"].to_dict() == {"outside": "forbidden", "text": "forbidden"}
    assert not quarantined["error_message"].str.contains("root:x").any()


def test_non_images_are_named_by_type_never_by_content(spark: SparkSession, tmp_path: Path) -> None:
    uris = good_images(tmp_path)
    (tmp_path / "img" / "passwd.jpg").write_text(SECRET + "\n" * 3)
    (tmp_path / "img" / "page.jpg").write_text("<!DOCTYPE html><html><body>secret token 1234</body></html>")
    cfg = config(tmp_path, write_catalog(tmp_path, uris | {"passwd": "img/passwd.jpg", "page": "img/page.jpg"}))
    embed.run(cfg, spark, "r1")
    quarantined = table(tmp_path / "out", "quarantine")
    assert quarantined.loc["passwd", "error_message"].endswith("bytes of text")
    assert quarantined.loc["page", "error_message"].endswith("bytes of HTML")
    assert not quarantined["error_message"].str.contains("root:x|secret token").any()

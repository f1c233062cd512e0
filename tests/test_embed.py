"""The embed stage end to end on a real SparkSession with the real pretrained model.

A generated corpus of good, odd and bad images goes through `embed.run`: every good image must land in
`embeddings`, every bad one in `quarantine` with its kind, and re-runs must be incremental.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pyspark.sql import SparkSession

from lookalike.config import Config
from lookalike.embed import reader
from lookalike.embed import stage as embed
from lookalike.embed.models import device
from lookalike.embed.task import Readers, TaskModel, WorkRow, _prefetch, embed_rows
from lookalike.storage import tables
from tests.conftest import make_config
from tests.image_corpus import make_corpus, photo

SMALL = {"embed.image_size": 64, "embed.batch_size": 8, "embed.partition_size": 4}


def write_catalog(folder: Path, uris: dict[str, str], categories: dict[str, str] | None = None) -> Path:
    path = folder / "catalog.parquet"
    pd.DataFrame(
        {
            "item_id": list(uris),
            "image_uri": list(uris.values()),
            "category": [(categories or {}).get(i, "odd") for i in uris],
        }
    ).to_parquet(path)
    return path


def embeddings(root: Path) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), "embeddings")).to_pandas().set_index("item_id")


def quarantine(root: Path) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), "quarantine")).to_pandas().set_index("item_id")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_corpus(folder)


def config(tmp_path: Path, catalog: Path, **overrides: object) -> Config:
    return make_config(tmp_path, **{"catalog.path": str(catalog), "embed.max_bad_fraction": 1.0, **SMALL, **overrides})


def test_corpus_good_embedded_bad_quarantined(spark: SparkSession, tmp_path: Path, corpus) -> None:
    _, cases = corpus
    catalog = write_catalog(tmp_path, {case.name: str(case.path) for case in cases})
    cfg = config(tmp_path, catalog)
    result = embed.run(cfg, spark, "run1")
    emb, quar = embeddings(tmp_path / "out"), quarantine(tmp_path / "out")
    good = {case.name for case in cases if case.expected_kind is None}
    bad = {case.name: case.expected_kind for case in cases if case.expected_kind is not None}
    assert set(emb.index) == good
    assert quar["error_kind"].to_dict() == bad
    assert quar["error_message"].str.len().min() > 0
    vectors = np.stack(emb["embedding"].to_numpy())
    assert vectors.shape == (len(good), 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert emb["model"].str.fullmatch(r"efficientnet-lite0@[0-9a-f]{8,}/64px").all()
    assert (emb["run_id"] == "run1").all() and (emb["shard"] == "odd").all()
    for case in cases:
        if case.expected_kind is None and case.size is not None:
            assert (emb.loc[case.name, "width"], emb.loc[case.name, "height"]) == case.size, case.name
    assert result.rows_out == len(good) and result.metrics["quarantined"] == len(bad)
    # The model loads once per Python worker, not once per batch or task (local[2]: two workers at most; a
    # worker reused from an earlier test in this session may hold the model already and load nothing).
    assert result.metrics["model_loads"] <= 2


def test_incremental_reruns(spark: SparkSession, tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    for i in range(6):
        photo(40 + i, 30, seed=i).save(images / f"p{i}.png")
    uris = {f"p{i}": f"img/p{i}.png" for i in range(6)}  # relative to the catalog's folder
    uris["broken"] = "img/absent.png"
    # Unset batch size: each task takes its device's default (16 on the CPU).
    cfg = config(tmp_path, write_catalog(tmp_path, uris), **{"embed.batch_size": None, "embed.partition_size": 1000})
    assert embed.run(cfg, spark, "r1").rows_out == 6
    first = embeddings(tmp_path / "out")

    second = embed.run(cfg, spark, "r2")
    assert second.rows_out == 0 and second.metrics["unchanged"] == 6
    assert embeddings(tmp_path / "out")["run_id"].eq("r1").all()

    photo(40, 30, seed=99).save(images / "p0.png")  # one image changes
    photo(20, 20, seed=5).save(images / "absent.png")  # the broken one is fixed
    del uris["p5"]  # one item leaves the catalog
    cfg = config(tmp_path, write_catalog(tmp_path, uris))
    third = embed.run(cfg, spark, "r3")
    after = embeddings(tmp_path / "out")
    assert third.rows_out == 2 and third.metrics["unchanged"] == 4
    assert set(after.index) == {"p0", "p1", "p2", "p3", "p4", "broken"}
    assert after.loc["p0", "run_id"] == "r3" and after.loc["p1", "run_id"] == "r1"
    assert after.loc["p0", "image_sha256"] != first.loc["p0", "image_sha256"]
    assert len(quarantine(tmp_path / "out")) == 0  # healed images leave quarantine

    # A different input size is a different model version: everything is embedded again.
    assert (
        embed.run(config(tmp_path, write_catalog(tmp_path, uris), **{"embed.image_size": 48}), spark, "r4").rows_out
        == 6
    )


def test_unchanged_local_images_are_not_read_again(spark: SparkSession, tmp_path: Path) -> None:
    """A local image's stat is its validator (`reader.stat_tag`, kept in `fetch_state`): an unchanged night
    reads no image (nothing is `fetched`), a rewritten image is read and embedded, a touched one read and
    found unchanged."""
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        photo(40 + i, 30, seed=i).save(images / f"p{i}.png")
    time.sleep(reader.FRESH_SECONDS + 0.1)  # older than the window in which a file gets no validator
    cfg = config(tmp_path, write_catalog(tmp_path, {f"p{i}": f"img/p{i}.png" for i in range(3)}))
    assert embed.run(cfg, spark, "r1").metrics["fetched"] == 3
    state = tables.read_arrow(tables.table_path(str(tmp_path / "out"), "fetch_state")).to_pandas()
    tags = {f"p{i}": reader.stat_tag(os.stat(images / f"p{i}.png"), time.time()) for i in range(3)}
    assert dict(zip(state["item_id"], state["etag"])) == tags

    second = embed.run(cfg, spark, "r2")
    assert second.metrics["fetched"] == 0 and second.metrics["unchanged"] == 3

    photo(40, 30, seed=99).save(images / "p0.png")
    os.utime(images / "p1.png")
    time.sleep(reader.FRESH_SECONDS + 0.1)
    third = embed.run(cfg, spark, "r3")
    assert third.rows_out == 1 and third.metrics["fetched"] == 2 and third.metrics["unchanged"] == 2
    assert embeddings(tmp_path / "out")["run_id"].to_dict() == {"p0": "r3", "p1": "r1", "p2": "r1"}


def test_too_many_bad_images_stops_and_commits_nothing(spark: SparkSession, tmp_path: Path) -> None:
    photo(32, 32).save(tmp_path / "ok.png")
    uris = {"ok": str(tmp_path / "ok.png")}
    cfg = config(tmp_path, write_catalog(tmp_path, uris))
    embed.run(cfg, spark, "r1")
    uris.update({f"gone{i}": f"/mnt/unmounted/{i}.jpg" for i in range(4)})
    cfg = config(tmp_path, write_catalog(tmp_path, uris), **{"embed.max_bad_fraction": 0.5})
    # Counted against the whole catalog (4 of 5), not only against the images this run tried (4 of 4).
    with pytest.raises(embed.TooManyBadImages, match=r"4 of 5 images failed .*missing: 4 \(e.g. /mnt/unmounted/"):
        embed.run(cfg, spark, "r2")
    assert list(embeddings(tmp_path / "out").index) == ["ok"]
    assert tables.version(tables.table_path(str(tmp_path / "out"), "embeddings")) == 0


def test_big_shard_splits_into_stable_sub_shards(spark: SparkSession, tmp_path: Path) -> None:
    photo(16, 16).save(tmp_path / "a.png")
    uris = {f"i{i}": str(tmp_path / "a.png") for i in range(9)}
    categories = {f"i{i}": ("shoe" if i < 7 else "bag") for i in range(9)}
    cfg = config(tmp_path, write_catalog(tmp_path, uris, categories), **{"index.max_shard_size": 3})
    embed.run(cfg, spark, "r1")
    shard = embeddings(tmp_path / "out")["shard"]
    assert set(shard[[f"i{i}" for i in range(7)]]) <= {"shoe#00", "shoe#01", "shoe#02"}
    assert set(shard[["i7", "i8"]]) == {"bag"}
    # The shard moves when the limit changes, without embedding the images again.
    rerun = embed.run(config(tmp_path, write_catalog(tmp_path, uris, categories)), spark, "r2")
    assert rerun.rows_out == 0 and set(embeddings(tmp_path / "out")["shard"]) == {"shoe", "bag"}


class CountingPool(ThreadPoolExecutor):
    """A real thread pool that counts what it was given: how far ahead `_prefetch` ran, without timing."""

    submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_decode_ahead_is_bounded() -> None:
    with CountingPool(max_workers=2) as pool:
        results = _prefetch(lambda i: pool.submit(lambda: i), range(100), ahead=4)
        assert next(results) == 0
        assert pool.submitted == 5  # the one consumed and four ahead, not the whole Arrow batch
        assert list(results) == list(range(1, 100))


def test_default_batch_size_follows_the_device() -> None:
    assert device.default_batch_size(torch.device("cpu")) == device.CPU_BATCH_SIZE == 16
    assert device.default_batch_size(torch.device("cuda", 0)) == device.GPU_BATCH_SIZE


def test_a_task_with_nothing_to_embed_never_asks_for_the_model(tmp_path: Path) -> None:
    photo(32, 32).save(tmp_path / "a.png")
    sha = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    settings = embed.settings_from(config(tmp_path, write_catalog(tmp_path, {})))
    model = TaskModel(settings)
    work = [WorkRow(str(tmp_path / "a.png"), sha, *[None] * 5), WorkRow(str(tmp_path / "gone.png"), *[None] * 6)]
    with Readers(settings) as readers:
        frame = embed_rows(work, model, readers)
    assert list(frame["status"]) == ["unchanged", "failed"]
    # Neither the device (torch) nor the batch size nor the model was resolved: an unchanged night is cheap.
    assert not {"device", "batch_size", "embedder"} & set(vars(model)) and model.loads == 0

"""`lookalike.Searcher`: search by image over the latest index build without Spark, on a catalog that the real
embed and index stages wrote; a newer build is picked up atomically while queries run."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import urllib3
from PIL import Image
from pyspark.sql import SparkSession

import lookalike
from lookalike.config import SCHEMA, Config
from lookalike.embed import stage as embed
from lookalike.embed.decode import ImageError
from lookalike.index import stage as index
from lookalike.search.searcher import FilterError, Hit, Searcher, SearchError, merge, parse_model_version
from tests.conftest import make_config
from tests.image_corpus import photo


def write_catalog(folder: Path, n: int) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(40 + i % 9, 36 + i % 5, seed=i).save(folder / "img" / f"p{i}.png")
    catalog = folder / "catalog.parquet"
    pd.DataFrame(
        {
            "item_id": [f"p{i}" for i in range(n)],
            "image_uri": [f"img/p{i}.png" for i in range(n)],
            "category": [("a", "b")[i % 2] for i in range(n)],
            "in_stock": [i % 3 != 0 for i in range(n)],
            "price": [float(i) for i in range(n)],
        }
    ).to_parquet(catalog)
    return catalog


def config(folder: Path, catalog: Path) -> Config:
    return make_config(folder, **{"catalog.path": str(catalog), "embed.image_size": 32, "embed.batch_size": 8})


@pytest.fixture(scope="module")
def built(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config]:
    folder = tmp_path_factory.mktemp("searcher")
    cfg = config(folder, write_catalog(folder, 30))
    embed.run(cfg, spark, "b1")
    index.run(cfg, spark, "b1")
    return folder, cfg


def jpeg_of(path: Path, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_a_catalog_image_finds_itself_across_shards(built: tuple[Path, Config]) -> None:
    folder, cfg = built
    searcher = lookalike.Searcher.open(cfg["output.root"])
    assert searcher.build == "b1"
    for item in ("p3", "p8"):  # one from each shard
        hits = searcher.search((folder / "img" / f"{item}.png").read_bytes(), k=5)
        assert hits[0].item_id == item and hits[0].score > 0.999
        assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Results come from both shards, merged by score; a recompressed copy still finds its original first.
    assert {h.item_id for h in searcher.search(folder / "img" / "p3.png", k=30)} == {f"p{i}" for i in range(30)}
    assert searcher.search(jpeg_of(folder / "img" / "p5.png"), k=1)[0].item_id == "p5"
    # `embed` gives the vectors `search` queries with: searching them answers the same.
    images = [jpeg_of(folder / "img" / "p5.png"), folder / "img" / "p8.png"]
    vectors = searcher.embed(images)
    assert vectors.shape == (2, searcher.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for batched, image in zip(searcher.search_vectors(vectors, 5), images):  # a batch of two, or one at a time
        alone = searcher.search(image, k=5)
        assert [h.item_id for h in batched] == [h.item_id for h in alone]
        np.testing.assert_allclose([h.score for h in batched], [h.score for h in alone], atol=1e-5)


def test_bad_queries_are_one_line_errors(built: tuple[Path, Config], tmp_path: Path) -> None:
    _, cfg = built
    searcher = Searcher.open(cfg["output.root"])
    with pytest.raises(ImageError) as caught:
        searcher.search(b"<html>not an image</html>")
    assert caught.value.kind == "not_an_image"
    with pytest.raises(ImageError) as missing:
        searcher.search(tmp_path / "nope.png")
    assert missing.value.kind == "missing"
    with pytest.raises(ImageError):
        searcher.embed([b"GIF89a not really"])
    with pytest.raises(SearchError, match="vectors only"):
        Searcher.open(cfg["output.root"], with_model=False).embed([b"x"])
    with pytest.raises(SearchError, match="k must be >= 1"):
        searcher.search(b"", k=0)
    with pytest.raises(SearchError, match="no index build"):
        Searcher.open(str(tmp_path / "empty"))


@pytest.fixture
def service(built: tuple[Path, Config]) -> Iterator[str]:
    """examples/search_service.py served by uvicorn on 127.0.0.1 (a free port), stopped after the test."""
    import uvicorn

    from examples.search_service import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    folder, cfg = built
    app = create_app(cfg["output.root"], str(folder / "catalog.parquet"))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_the_example_service_answers_over_http(built: tuple[Path, Config], service: str) -> None:
    folder, _ = built
    http = urllib3.PoolManager()
    answer = http.request("POST", f"{service}/search?k=3", body=(folder / "img" / "p4.png").read_bytes())
    assert answer.status == 200
    body = answer.json()
    assert body["build"] == "b1" and [r["item_id"] for r in body["results"]][0] == "p4" and len(body["results"]) == 3
    assert body["results"][0]["duplicate"] and [r["duplicate"] for r in body["results"]] == [
        r["score"] >= SCHEMA["search.duplicate_score"].default for r in body["results"]
    ]
    bad = http.request("POST", f"{service}/search", body=b"GIF89a not really")
    assert bad.status == 422 and bad.json()["error_kind"] in ("not_an_image", "decode_error")
    assert http.request("POST", f"{service}/search?k=zero", body=b"x").status == 400
    filtered = http.request(
        "POST", f"{service}/search?k=5&where=price%20%3C%203", body=(folder / "img" / "p4.png").read_bytes()
    )
    assert {r["item_id"] for r in filtered.json()["results"]} == {"p0", "p1", "p2"}
    refused = http.request("POST", f"{service}/search?where=prise%20%3C%203", body=b"x")
    assert refused.status == 400 and "prise" in refused.json()["error"]
    assert http.request("GET", f"{service}/health").json() == {"build": "b1"}


def test_where_filters_on_catalog_columns_and_still_fills_k(built: tuple[Path, Config]) -> None:
    folder, cfg = built
    searcher = Searcher.open(cfg["output.root"], catalog=str(folder / "catalog.parquet"))
    query = (folder / "img" / "p4.png").read_bytes()
    hits = searcher.search(query, k=8, where="in_stock AND category = 'a'")
    # 10 of the 15 items in 'a' are in stock, spread over one shard: all 8 asked for are found and match.
    assert len(hits) == 8 and hits[0].item_id == "p4"
    assert all(int(h.item_id[1:]) % 2 == 0 and int(h.item_id[1:]) % 3 != 0 for h in hits)
    assert {h.item_id for h in searcher.search(query, k=10, where="price BETWEEN 10 AND 12")} == {"p10", "p11", "p12"}
    assert searcher.search(query, k=5, where="price > 1000") == []
    vectors = searcher.search_vectors(
        np.full((2, searcher.dim), searcher.dim**-0.5, np.float32), 3, where="NOT in_stock"
    )
    assert all(int(h.item_id[1:]) % 3 == 0 for row in vectors for h in row) and [len(r) for r in vectors] == [3, 3]
    for bad, said in [("prise < 3", "prise"), ("price <", "not a SQL predicate"), ("1=1; DROP TABLE x", "not a SQL")]:
        with pytest.raises(FilterError, match=said) as caught:
            searcher.search(query, where=bad)
        assert "\n" not in str(caught.value)
    with pytest.raises(FilterError, match="Permission|disabled"):
        searcher.search(query, where="(SELECT count(*) FROM read_csv('/etc/passwd')) > 0")
    with pytest.raises(SearchError, match="no catalog to filter on"):
        Searcher.open(cfg["output.root"]).search(query, where="in_stock")


def test_a_newer_build_is_swapped_in_while_queries_run(
    spark: SparkSession, built: tuple[Path, Config], tmp_path: Path
) -> None:
    folder, cfg = built
    searcher = Searcher.open(cfg["output.root"], refresh_every_s=3600)
    query = (folder / "img" / "p1.png").read_bytes()
    # Nightly adds items: the new build holds p30..p33.
    bigger = config(folder, write_catalog(folder, 34))
    embed.run(bigger, spark, "b2")
    index.run(bigger, spark, "b2")
    stop, results, errors = threading.Event(), [], []

    def keep_searching() -> None:
        while not stop.is_set():
            try:
                results.append(searcher.search(query, k=34))
            except Exception as err:  # noqa: BLE001 (any failure is the finding)
                errors.append(err)

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(keep_searching) for _ in range(2)]
        assert searcher.refresh() and searcher.build == "b2"
        stop.set()
        for future in running:
            future.result()
    assert not errors and results
    # Every answer came whole from one build or the other: 30 items (b1) or 34 (b2), nothing in between.
    assert {len(r) for r in results} <= {30, 34}
    assert len(searcher.search(query, k=34)) == 34 and not searcher.refresh()


def test_model_versions_and_merging_are_pure() -> None:
    lite = parse_model_version("efficientnet-lite0@3f2a9c1b/112px")
    assert (lite.name, lite.image_size, lite.head) == ("efficientnet-lite0", 112, None)
    text = parse_model_version("all-minilm-l6-v2@0a1b2c3d")
    assert (text.name, text.image_size) == ("all-minilm-l6-v2", None)
    tuned = parse_model_version("efficientnet-lite0@3f2a9c1b/112px+head@20261202T010000Z-3f2a9c")
    assert (tuned.backbone, tuned.head) == ("efficientnet-lite0@3f2a9c1b/112px", "20261202T010000Z-3f2a9c")
    with pytest.raises(SearchError):
        parse_model_version("no version here")
    a = (pa.array(["x", "y"]), np.array([[0.9, 0.5]]), np.array([[0, 1]]))
    b = (pa.array(["z"]), np.array([[0.7, -np.inf]]), np.array([[0, -1]]))
    assert merge([a, b], 2) == [Hit("x", pytest.approx(0.9)), Hit("z", pytest.approx(0.7))]

"""`embed.input: image+title`: the fusion math (pure), and end to end on the real demo catalog: fused vectors
whose cosine is the weighted sum of image and title cosines, items without a title on their image alone and
items whose image fails on their title alone, an edited title or a new weight re-derived without any image
embedded, and searches by image and by words against the fused build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import SparkSession

from lookalike.config import Config, ConfigError
from lookalike.demo_data import FASHION_MNIST_DIR, build_demo_data
from lookalike.embed import stage as embed
from lookalike.embed.models import fusion
from lookalike.embed.models.head import l2_normalise
from lookalike.run import nightly
from lookalike.search.searcher import Searcher, parse_model_version
from lookalike.storage import tables
from tests.conftest import make_config


def test_fused_cosine_is_the_weighted_sum_of_the_parts() -> None:
    rng = np.random.default_rng(0)
    image, title = l2_normalise(rng.standard_normal((4, 6))), l2_normalise(rng.standard_normal((4, 3)))
    fused = fusion.fuse(image, title, 0.3)
    assert np.allclose(np.linalg.norm(fused, axis=1), 1.0)
    expected = 0.7 * image @ image.T + 0.3 * title @ title.T
    np.testing.assert_allclose(fused @ fused.T, expected, atol=1e-6)
    np.testing.assert_allclose(l2_normalise(fused[:, :6]), image, atol=1e-6)  # each part readable from the vector
    np.testing.assert_allclose(l2_normalise(fused[:, 6:]), title, atol=1e-6)
    # a missing part: the other alone, still a unit vector
    title[1] = 0
    image[2] = 0
    one_sided = fusion.fuse(image, title, 0.3)
    np.testing.assert_allclose(one_sided[1, :6], image[1], atol=1e-6)
    np.testing.assert_allclose(one_sided[2, 6:], title[2], atol=1e-6)
    assert np.allclose(fusion.image_query(image[:1], 3)[0, 6:], 0)
    assert np.allclose(fusion.text_query(title[:1], 6, 0.3)[0, :6], 0)
    version = fusion.fused_version("efficientnet-lite0@1234abcd/64px+head@v1", 0.25, "all-minilm-l6-v2@53aa5117")
    parsed = parse_model_version(version)
    assert (parsed.head, parsed.title_weight, parsed.text) == ("v1", 0.25, "all-minilm-l6-v2@53aa5117")


def test_fusion_needs_an_image_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="embed.input is 'image\\+title' but model.name 'all-minilm-l6-v2'"):
        make_config(tmp_path, **{"embed.input": "image+title", "model.name": "all-minilm-l6-v2"})
    with pytest.raises(ConfigError, match="embed.title_weight"):
        make_config(tmp_path, **{"embed.input": "image+title", "embed.title_weight": 1.5})


NO_TITLE, BROKEN, NOTHING = [0, 1, 2, 3, 4, 5], [6, 7, 8], 9  # catalog rows: no title; broken image; neither


@pytest.fixture(scope="module")
def fused(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, pd.DataFrame]:
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (make datasets)")
    folder = tmp_path_factory.mktemp("fusion")
    demo = folder / "demo"
    build_demo_data(demo, limit=150, workers=1)
    catalog = pd.read_parquet(demo / "catalog.parquet")
    catalog.loc[NO_TITLE, "title"] = None
    catalog.loc[BROKEN, "image_uri"] = "images/gone.png"
    catalog.loc[NOTHING, ["image_uri", "title"]] = ["images/gone-too.png", "  "]
    catalog.to_parquet(demo / "fused.parquet")
    cfg = make_config(
        folder,
        **{
            "catalog.path": str(demo / "fused.parquet"),
            "embed.input": "image+title",
            "embed.image_size": 64,
            "embed.partition_size": 80,
            "index.shard_by": "in_stock",
        },
    )
    result = embed.run(cfg, spark, "20260101T000000Z-fuse01")
    assert result.metrics["embedded"] == 146 and result.metrics["title_only"] == 3
    return cfg, catalog


def _table(cfg: Config, name: str) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(cfg["output.root"], name)).to_pandas().set_index("item_id")


def test_fused_vectors_weigh_images_and_titles(fused: tuple[Config, pd.DataFrame]) -> None:
    cfg, catalog = fused
    vectors, parts = _table(cfg, "embeddings"), _table(cfg, "features")
    ids = catalog["item_id"]
    assert len(vectors) == 149 and ids[NOTHING] not in vectors.index  # neither image nor title: quarantined only
    assert (
        set(vectors["model"]) == {vectors["model"].iloc[0]}
        and "+title@0.3:all-minilm-l6-v2@" in vectors["model"].iloc[0]
    )
    a, b = ids[20], ids[21]
    cosine = float(np.dot(vectors.loc[a, "embedding"], vectors.loc[b, "embedding"]))
    image_cos = float(np.dot(parts.loc[a, "feature"], parts.loc[b, "feature"]))
    title_cos = float(np.dot(parts.loc[a, "title_feature"], parts.loc[b, "title_feature"]))
    assert cosine == pytest.approx(0.7 * image_cos + 0.3 * title_cos, abs=1e-5)
    for item in ids[NO_TITLE]:
        vector = np.asarray(vectors.loc[item, "embedding"])
        assert np.linalg.norm(vector[1280:]) == 0 and np.linalg.norm(vector[:1280]) == pytest.approx(1, abs=1e-5)
    for item in ids[BROKEN]:
        vector = np.asarray(vectors.loc[item, "embedding"])
        assert np.linalg.norm(vector[:1280]) == 0 and vectors.loc[item, "image_sha256"] is None
    quarantine = _table(cfg, "quarantine")
    assert set(ids[BROKEN]) | {ids[NOTHING]} <= set(quarantine.index)


def test_edited_titles_and_weights_re_derive_without_images(
    spark: SparkSession, fused: tuple[Config, pd.DataFrame]
) -> None:
    cfg, catalog = fused
    again = embed.run(cfg, spark, "20260101T000000Z-fuse02").metrics
    assert (again["embedded"], again["rederived"], again["unchanged"]) == (0, 0, 146)
    edited = catalog.copy()
    edited.loc[30, "title"] = "Ankle boot in suede"
    edited.loc[7, "title"] = "Relisted ankle boot"  # a broken image's title: its title-only vector follows
    edited.to_parquet(cfg["catalog.path"])
    before = _table(cfg, "embeddings")
    after_edit = embed.run(cfg, spark, "20260101T000000Z-fuse03").metrics
    assert (after_edit["embedded"], after_edit["rederived"]) == (0, 1)
    after = _table(cfg, "embeddings")
    changed = {i for i in after.index if not np.allclose(after.loc[i, "embedding"], before.loc[i, "embedding"])}
    assert changed == {catalog["item_id"][30], catalog["item_id"][7]}
    heavier = embed.run(cfg.with_overrides({"embed.title_weight": 0.6}), spark, "20260101T000000Z-fuse04").metrics
    assert (heavier["embedded"], heavier["rederived"], heavier["model_loads"]) == (0, 146, 0)

    # the rest of the night on fused vectors: index, similar (no events: no recommend), exports
    stages = nightly.run(cfg.with_overrides({"embed.title_weight": 0.6}), spark, "20260101T000000Z-fuse05")
    assert [r.stage for r in stages] == ["embed", "index", "similar"]
    similar = _table(cfg, "similar_items")
    assert catalog["item_id"][7] in set(similar.index)  # a title-only item has neighbours too
    searcher = Searcher.open(cfg["output.root"])
    categories = pd.read_parquet(Path(cfg["catalog.path"]).parent / "catalog.parquet").set_index("item_id")["category"]
    hits = searcher.search_text("black ankle boot", k=5)
    assert [categories[h.item_id] for h in hits].count("Ankle boot") >= 4
    item = catalog["item_id"][50]
    image = Path(cfg["catalog.path"]).parent / catalog.loc[50, "image_uri"]
    best = searcher.search(image.read_bytes(), k=1)[0]
    assert best.item_id == item and best.score == pytest.approx(np.sqrt(0.4), abs=1e-3)  # its image part only

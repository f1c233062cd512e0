"""The train stage and trained heads: fitting (pure, on synthetic vectors), the artefact and its refusals,
the text map, and end to end on the real demo catalog: embed, train, embed again with `model.head: latest`
(every vector re-derived from the stored backbone vectors, no image embedded), index, search by text."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from lookalike import cli
from lookalike.config import Config
from lookalike.demo_data import FASHION_MNIST_DIR, build_demo_data
from lookalike.embed import stage as embed
from lookalike.embed.models import head
from lookalike.index import stage as index
from lookalike.run import nightly, runs
from lookalike.search.searcher import Searcher, SearchError
from lookalike.storage import tables
from lookalike.train import fit, losses, textmap
from lookalike.train import stage as train
from tests.conftest import make_config

BACKBONE = "efficientnet-lite0@00000000/64px"


def clustered(n: int = 3000, classes: int = 8, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors whose class signal is weaker than their noise: a head can learn to find it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d))[labels] * 0.35 + rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def same_class_pairs(labels: np.ndarray, n_pairs: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n_pairs:
        a, b = rng.integers(0, len(labels), 2)
        if a != b and labels[a] == labels[b]:
            pairs.append((a, b))
    return np.array(pairs, dtype=np.int64)


FAST = fit.TrainOptions(dim=16, max_epochs=15, patience=3)
NO_PAIRS = np.empty((0, 2), dtype=np.int64)


@pytest.mark.parametrize("loss", ["supcon", "proxy"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_head_learns_what_labels_with_nulls_say(loss: str, kind: str) -> None:
    x, labels = clustered()
    codes = labels.copy()
    codes[::2] = -1  # half the items unlabelled
    fitted = fit.fit(
        fit.TrainData(x, {"category": codes}, NO_PAIRS),
        fit.TrainOptions(**{**FAST.__dict__, "loss": loss, "kind": kind}),
    )
    m = fitted.metrics
    assert m["precision_at_10_category_head"] > m["precision_at_10_category_frozen"] + 0.1
    assert m["best_epoch"] >= 1 and m["validation_score"] < m["validation_score_at_start"]
    assert {"w1", "b1"} <= set(fitted.tensors) and (kind == "linear") == ("w3" not in fitted.tensors)


def test_null_labels_add_nothing_to_the_loss() -> None:
    import torch

    z = torch.nn.functional.normalize(torch.randn(12, 5), dim=1)
    labels = torch.tensor([0, 1, 0, 1, -1, -1, 2, 2, -1, 0, 1, 2])
    known = labels >= 0
    assert torch.isclose(losses.supcon(z, labels, 0.1), losses.supcon(z[known], labels[known], 0.1))
    proxies = torch.randn(3, 5)
    assert torch.isclose(losses.proxy(z, labels, proxies, 0.1), losses.proxy(z[known], labels[known], proxies, 0.1))
    assert losses.supcon(z, torch.full((12,), -1), 0.1).item() == 0.0


def test_behaviour_alone_teaches_a_head() -> None:
    x, labels = clustered()
    fitted = fit.fit(fit.TrainData(x, {}, same_class_pairs(labels, 4000)), FAST)
    m = fitted.metrics
    assert m["pair_recall_at_10_head"] > m["pair_recall_at_10_frozen"]
    # what the pairs taught carries over to the classes behind them
    assert (
        fit.precision_at_k(head.Head("v", BACKBONE, "linear", fitted.tensors).apply(x), labels)
        > fit.precision_at_k(x, labels) + 0.1
    )


def test_nothing_to_learn_from_is_a_one_line_error() -> None:
    x, labels = clustered(200)
    with pytest.raises(fit.TrainError, match="nothing to learn from") as no_labels:
        fit.fit(fit.TrainData(x, {}, NO_PAIRS), FAST)
    one_value = np.zeros(len(x), dtype=np.int64)
    with pytest.raises(fit.TrainError, match="nothing to learn from"):
        fit.fit(fit.TrainData(x, {"category": one_value}, NO_PAIRS), FAST)
    assert "\n" not in str(no_labels.value)
    # one label value is ignored, and the behaviour still trains
    fitted = fit.fit(fit.TrainData(x, {"category": one_value}, same_class_pairs(labels, 300)), FAST)
    assert "pair_recall_at_10_head" in fitted.metrics and not any("precision" in k for k in fitted.metrics)
    with pytest.raises(fit.TrainError, match="train.dim 128 is larger"):
        fit.fit(fit.TrainData(x, {"category": labels}, NO_PAIRS), fit.TrainOptions(dim=128))


def test_ridge_and_contrastive_maps_find_the_right_image() -> None:
    rng = np.random.default_rng(1)
    text = rng.standard_normal((800, 24)).astype(np.float32)
    image = head.l2_normalise(text @ rng.standard_normal((24, 16)) + 0.1 * rng.standard_normal((800, 16)))
    val = textmap.held_out(len(text), 0.2, 0)
    _, _, ridge = textmap.fit_ridge(text, image, val)
    _, _, contrastive = textmap.fit_contrastive(text, image, val, 0.1, epochs=5)
    assert ridge["text_recall_at_10"] > 0.9 and contrastive["text_recall_at_10"] >= ridge["text_recall_at_10"]


def saved_head(root: Path, version: str = "20261202T000000Z-aaaaaa", backbone: str = BACKBONE) -> head.Head:
    rng = np.random.default_rng(0)
    tensors = {
        "w1": rng.standard_normal((32, 8)).astype(np.float32),
        "b1": np.zeros(8, np.float32),
        "text_w": rng.standard_normal((384, 8)).astype(np.float32),
        "text_b": np.zeros(8, np.float32),
    }
    trained = head.Head(version, backbone, "linear", tensors, {"trained_at": dt.datetime.now(dt.UTC).isoformat()})
    head.save(str(root), version, trained)
    return trained


def test_an_artefact_round_trips_and_bad_ones_are_refused(tmp_path: Path) -> None:
    trained = saved_head(tmp_path)
    assert head.resolve_version(str(tmp_path), "latest") == trained.version
    loaded = head.for_backbone(str(tmp_path), "latest", BACKBONE)
    assert loaded is not None and loaded.model_version() == f"{BACKBONE}+head@{trained.version}"
    x = np.random.default_rng(2).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(loaded.apply(x), trained.apply(x), rtol=1e-6)
    assert np.allclose(np.linalg.norm(loaded.apply(x), axis=1), 1.0)
    assert head.for_backbone(str(tmp_path), "none", BACKBONE) is None
    assert head.resolve_version(str(tmp_path / "elsewhere"), "latest") is None  # `latest` before any train

    with pytest.raises(head.HeadError, match="trained on efficientnet-lite0@00000000/64px, but .* give other@1/1px"):
        head.for_backbone(str(tmp_path), "latest", "other@1/1px")
    with pytest.raises(head.HeadError, match="no trained head 'nope'"):
        head.for_backbone(str(tmp_path), "nope", BACKBONE)
    tensors = tmp_path / "models" / trained.version / head.TENSORS
    blob = bytearray(tensors.read_bytes())
    blob[-5] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(head.HeadError, match="does not match the sha256 .* corrupt") as corrupt:
        head.for_backbone(str(tmp_path), "latest", BACKBONE)
    assert "\n" not in str(corrupt.value)
    (tmp_path / "models" / trained.version / head.METADATA).write_text("{not json")
    with pytest.raises(head.HeadError, match="is not a head's metadata"):
        head.load(str(tmp_path), trained.version)
    bad = head.Head("v", BACKBONE, "mlp", {"w1": np.zeros((4, 2)), "b1": np.zeros(2)})
    with pytest.raises(head.HeadError, match="needs tensors"):
        head.check(bad)


def test_the_schedule_says_when_a_head_is_due(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"train.schedule": "weekly"})
    assert train.due(cfg)  # no head yet
    saved_head(Path(cfg["output.root"]))
    assert not train.due(cfg)
    assert train.due(cfg, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=7))
    newest = Path(cfg["output.root"]) / "models" / "20261202T000000Z-aaaaaa" / head.METADATA
    newest.write_text("{not json")
    assert train.due(cfg)  # a broken newest head is replaced, not a crash of the nightly
    saved_head(Path(cfg["output.root"]))
    assert not train.due(
        cfg.with_overrides({"train.schedule": "never"}), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=99)
    )


def test_a_head_needs_image_input(tmp_path: Path) -> None:
    from lookalike.config import ConfigError

    titles = {"embed.input": "title", "model.name": "all-minilm-l6-v2"}
    with pytest.raises(ConfigError, match="model.head is 'latest' but embed.input is 'title'"):
        make_config(tmp_path, **{"model.head": "latest", **titles})
    with pytest.raises(fit.TrainError, match="tunes image vectors, but embed.input is 'title'"):
        train.run(make_config(tmp_path, **titles), None, "20260101T000000Z-title1")  # type: ignore[arg-type]


# ---- end to end on the demo catalog ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict]:
    """Demo data (300 real images, shoppers) embedded without a head, then `lookalike train`."""
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (make datasets)")
    folder = tmp_path_factory.mktemp("train")
    demo = folder / "demo"
    build_demo_data(demo, limit=300, workers=1)
    catalog = pq.read_table(demo / "catalog.parquet").to_pandas()
    catalog.loc[::3, "category"] = None  # labels with nulls
    catalog.to_parquet(demo / "catalog_nulls.parquet")
    cfg = make_config(
        folder,
        **{
            "catalog.path": str(demo / "catalog_nulls.parquet"),
            "events.path": str(demo / "events.parquet"),
            "index.shard_by": "in_stock",
            "embed.image_size": 64,
            "embed.partition_size": 100,
            "train.dim": 32,
        },
    )
    embed.run(cfg, spark, "20260101T000000Z-embed1")
    assert cli.main(["train", "--conf", _conf_file(folder, cfg)]) == 0
    version = head.resolve_version(cfg["output.root"], "latest")
    assert version is not None
    meta = json.loads((Path(cfg["output.root"]) / "models" / version / head.METADATA).read_text())
    return cfg, meta


def _conf_file(folder: Path, cfg: Config) -> str:
    """`cfg` as a YAML file the CLI reads (the keys these tests set)."""
    import yaml

    keys = (
        "catalog.path",
        "events.path",
        "output.root",
        "spark.master",
        "index.shard_by",
        "embed.image_size",
        "train.dim",
    )
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({key: cfg[key] for key in keys}))
    return str(path)


def test_train_writes_a_versioned_artefact_from_labels_and_behaviour(trained: tuple[Config, dict]) -> None:
    cfg, meta = trained
    assert meta["backbone"] == train.backbone_version(cfg)
    assert meta["label_columns"] == ["category"] and meta["data"]["pairs"] > 0 and meta["data"]["items"] == 300
    assert meta["text_map"] and meta["metrics"]["text_recall_at_10"] > 0
    assert meta["metrics"]["precision_at_10_category_head"] >= meta["metrics"]["precision_at_10_category_frozen"] - 0.05
    logged = tables.read_arrow(tables.table_path(cfg["output.root"], "runs")).to_pylist()
    row = next(r for r in logged if r["stage"] == "train")
    assert row["status"] == runs.SUCCEEDED and row["rows_in"] == 300


def test_a_new_head_re_derives_every_vector_without_the_images(
    spark: SparkSession, trained: tuple[Config, dict]
) -> None:
    cfg, meta = trained
    with_head = cfg.with_overrides({"model.head": "latest"})
    before = tables.read_arrow(tables.table_path(cfg["output.root"], "embeddings")).to_pandas().set_index("item_id")
    result = embed.run(with_head, spark, "20260101T000000Z-embed2")
    assert result.metrics["rederived"] == 300 and result.metrics["embedded"] == 0 and result.metrics["model_loads"] == 0
    after = tables.read_arrow(tables.table_path(cfg["output.root"], "embeddings")).to_pandas().set_index("item_id")
    assert set(after["model"]) == {f"{meta['backbone']}+head@{meta['version']}"}
    assert len(after["embedding"].iloc[0]) == 32
    stored = tables.read_arrow(tables.table_path(cfg["output.root"], "features")).to_pandas().set_index("item_id")
    assert set(stored["model"]) == {meta["backbone"]}
    np.testing.assert_allclose(np.stack(stored.loc[before.index, "feature"]), np.stack(before["embedding"]), atol=1e-6)
    assert embed.run(with_head, spark, "20260101T000000Z-embed3").metrics["unchanged"] == 300

    index.run(with_head, spark, "20260101T000000Z-index1")
    searcher = Searcher.open(cfg["output.root"])
    catalog = pq.read_table(Path(cfg["catalog.path"]).parent / "catalog.parquet").to_pandas().set_index("item_id")
    for words, category in (("black ankle boot", "Ankle boot"), ("grey trousers", "Trouser"), ("a bag", "Bag")):
        hits = searcher.search_text(words, k=5)
        found = list(catalog.loc[[h.item_id for h in hits], "category"])
        assert len(hits) == 5 and found.count(category) >= 3, (words, found)
    with pytest.raises(SearchError, match="empty"):
        searcher.search_text("  ")
    # the same image finds itself through the head
    item = catalog.index[0]
    image = Path(cfg["catalog.path"]).parent / catalog.loc[item, "image_uri"]
    assert searcher.search(image.read_bytes(), k=1)[0].item_id == item

    # `lookalike search --text` commits the same hits under query_id text:<the text>
    conf = _conf_file(Path(cfg["output.root"]).parent, cfg)
    assert cli.main(["search", "--conf", conf, "--text", "black ankle boot", "--text", "a bag"]) == 0
    results = tables.read_arrow(tables.table_path(cfg["output.root"], "search_results")).to_pandas()
    assert set(results["query_id"]) == {"text:black ankle boot", "text:a bag"}
    boots = results[results["query_id"] == "text:black ankle boot"].sort_values("rank")
    assert list(boots["item_id"]) == [h.item_id for h in searcher.search_text("black ankle boot", k=10)]
    assert cli.main(["search", "--conf", conf, "--text", "x", "--queries", cfg["catalog.path"]]) == cli.EXIT_ERROR

    back = embed.run(cfg, spark, "20260101T000000Z-embed4")  # model.head: none again, still no image embedded
    assert back.metrics["rederived"] == 300 and back.metrics["embedded"] == 0


def test_a_head_of_another_backbone_is_refused_in_one_line(
    trained: tuple[Config, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _ = trained
    conf = _conf_file(tmp_path, cfg)
    assert (
        cli.main(["embed", "--conf", conf, "--set", "model.head=latest", "--set", "embed.image_size=96"])
        == cli.EXIT_ERROR
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained on" in err and "lookalike train" in err


def test_nightly_trains_when_the_schedule_says(spark: SparkSession, trained: tuple[Config, dict]) -> None:
    cfg, meta = trained
    weekly = cfg.with_overrides({"train.schedule": "weekly", "model.head": "latest", "events.path": None})
    assert not train.due(weekly)  # the head trained above is fresh
    monthly_old = dt.datetime.fromisoformat(meta["trained_at"]) + dt.timedelta(days=40)
    assert train.due(weekly.with_overrides({"train.schedule": "monthly"}), now=monthly_old)
    # the head is made a week old: the weekly schedule now asks for a new one
    path = Path(cfg["output.root"]) / "models" / meta["version"] / head.METADATA
    path.write_text(json.dumps({**meta, "trained_at": (dt.datetime.now(dt.UTC) - dt.timedelta(days=8)).isoformat()}))
    assert train.due(weekly)
    results = nightly.run(weekly.with_overrides({"train.max_epochs": 2}), spark, "20260102T000000Z-night1")
    assert [r.stage for r in results][:2] == ["train", "embed"]
    newest = head.resolve_version(cfg["output.root"], "latest")
    assert newest == "20260102T000000Z-night1" and results[1].metrics["rederived"] == 300


def test_batches_give_every_labelled_item_partners_even_with_thousands_of_values() -> None:
    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(3000), 4)  # 3,000 product types of 4 items: random batches hold almost no pair
    codes[::7] = -1
    batches = fit.Batches(codes, np.arange(len(codes)))
    drawn = batches.draw(rng)
    values, counts = np.unique(codes[drawn], return_counts=True)
    assert len(drawn) >= fit.BATCH // 2 and (counts[values >= 0] >= 2).all()
    few = fit.Batches(np.arange(1000) % 3, np.arange(1000))  # three values: large groups fill the batch
    assert len(few.draw(rng)) >= fit.BATCH - 3


def test_a_head_worse_than_the_frozen_backbone_is_not_published() -> None:
    # isotropic classes: the frozen vectors are already the best metric, and 8 of their 64 dimensions lose it
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 400, 6000)
    x = rng.standard_normal((400, 64))[labels] * 0.5 + rng.standard_normal((6000, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    with pytest.raises(fit.TrainError, match="ranks held-out items worse than the frozen backbone .* not published"):
        fit.fit(fit.TrainData(x, {"category": labels}, NO_PAIRS), fit.TrainOptions(dim=8, max_epochs=3))

"""`embed.input: title`: catalog titles embedded with the real all-MiniLM-L6-v2 from its PyPI wheel.

End to end through `embed.run` on the shared SparkSession first (so that its model-load count sees the
workers' first load), then the model itself, the catalog contract and the config checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pyspark.sql import SparkSession
from safetensors.torch import load_file, save_file

from lookalike import cli
from lookalike.config import Config, ConfigError
from lookalike.embed import stage as embed
from lookalike.embed import task as inference
from lookalike.embed.catalog import CatalogError, read_catalog
from lookalike.embed.models import cache, registry
from lookalike.storage import tables
from tests.conftest import make_config

MODEL = "all-minilm-l6-v2"
TEXT = {"embed.input": "title", "model.name": MODEL, "embed.batch_size": 3, "embed.partition_size": 2}
TITLES = {
    "shoe-1": "Red running shoes",
    "shoe-2": "Crimson sneakers for jogging",
    "shoe-3": "Leather ankle boots",
    "pan-1": "Stainless steel saucepan",
    "pan-2": "Non-stick frying pan, 28 cm",
    "pan-3": "Cast iron skillet",
    "bag-1": "Canvas tote bag",
    "bag-2": "Small leather handbag with shoulder strap",
}


def write_catalog(folder: Path, titles: dict[str, str | None]) -> Path:
    """A catalog without `image_uri`: item_id, title and a category per item (its id's prefix)."""
    path = folder / "catalog.parquet"
    pd.DataFrame(
        {"item_id": list(titles), "title": list(titles.values()), "category": [item.split("-")[0] for item in titles]}
    ).to_parquet(path)
    return path


def config(tmp_path: Path, catalog: Path, **overrides: object) -> Config:
    return make_config(tmp_path, **{"catalog.path": str(catalog), **TEXT, **overrides})


def embeddings(root: Path) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), "embeddings")).to_pandas().set_index("item_id")


def quarantine(root: Path) -> pd.DataFrame:
    return tables.read_arrow(tables.table_path(str(root), "quarantine")).to_pandas().set_index("item_id")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run like a Spark task (one torch thread), as tests/test_models.py does, on this busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm(one_torch_thread):
    return cache.get_embedder(MODEL)


# ---------------------------------------------------------------------------------------------- embed stage


def test_titles_embed_end_to_end_and_incrementally(spark: SparkSession, tmp_path: Path) -> None:
    titles = dict(TITLES)
    # The packaged weights, as a file of this test's own: the loads counted below are this test's, whatever an
    # earlier test (image+title fusion loads the same text model) left cached in the reused Python workers.
    own = tmp_path / "minilm.safetensors"
    shutil.copyfile(registry.weights_file(MODEL), own)
    cfg = config(tmp_path, write_catalog(tmp_path, titles), **{"model.weights": str(own)})
    first = embed.run(cfg, spark, "r1")
    emb = embeddings(tmp_path / "out")
    assert set(emb.index) == set(titles) and first.rows_out == len(titles)
    vectors = np.stack(emb.loc[list(titles), "embedding"].to_numpy())
    assert vectors.shape == (len(titles), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert emb["model"].str.fullmatch(rf"{MODEL}@[0-9a-f]{{8}}").all()
    assert emb["width"].isna().all() and emb["height"].isna().all()
    assert emb.loc["pan-1", "image_sha256"] == inference.text_sha256("Stainless steel saucepan")
    assert emb.loc["shoe-1", "shard"] == "shoe" and emb.loc["pan-3", "shard"] == "pan"
    # Real semantics: each item's nearest other item is one of its own kind.
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -1)
    nearest = {item: list(titles)[j] for item, j in zip(titles, scores.argmax(axis=1))}
    assert nearest["shoe-1"] == "shoe-2" and nearest["pan-1"].startswith("pan-")
    assert len(quarantine(tmp_path / "out")) == 0

    # Unchanged titles: nothing is embedded (the model is still fetched by every task, from the cache).
    second = embed.run(cfg, spark, "r2")
    assert second.rows_out == 0 and second.metrics["unchanged"] == len(titles)
    # 4 tasks a run, 2 Python workers (local[2]): loading once per task would count 8 over the two runs.
    assert 1 <= first.metrics["model_loads"] <= 2
    assert first.metrics["model_loads"] + second.metrics["model_loads"] <= 2

    # One title changes: exactly that item is embedded again.
    titles["bag-1"] = "Canvas beach tote bag"
    cfg = config(tmp_path, write_catalog(tmp_path, titles), **{"model.weights": str(own)})
    third = embed.run(cfg, spark, "r3")
    after = embeddings(tmp_path / "out")
    assert third.rows_out == 1 and third.metrics["unchanged"] == len(titles) - 1
    assert after.loc["bag-1", "run_id"] == "r3" and (after.drop(index="bag-1")["run_id"] == "r1").all()
    assert after.loc["bag-1", "image_sha256"] == inference.text_sha256("Canvas beach tote bag")
    assert not np.allclose(after.loc["bag-1", "embedding"], emb.loc["bag-1", "embedding"])
    np.testing.assert_array_equal(after.loc["pan-2", "embedding"], emb.loc["pan-2", "embedding"])

    # Other weights are another model version: every item is embedded again.
    state = load_file(registry.weights_file(MODEL))
    state["encoder.layer.5.output.dense.bias"] += 0.01
    weights = tmp_path / "tuned.safetensors"
    save_file(state, str(weights))
    fourth = embed.run(
        config(tmp_path, write_catalog(tmp_path, titles), **{"model.weights": str(weights)}), spark, "r4"
    )
    final = embeddings(tmp_path / "out")
    assert fourth.rows_out == len(titles) and (final["run_id"] == "r4").all()
    assert final["model"].nunique() == 1 and final["model"].iloc[0] != after["model"].iloc[0]


def test_titles_without_text_are_quarantined_as_no_text(spark: SparkSession, tmp_path: Path) -> None:
    titles = {"ok-1": "Blue denim jacket", "ok-2": "Wool scarf", "null-1": None, "empty-1": "", "blank-1": " \t "}
    cfg = config(tmp_path, write_catalog(tmp_path, titles), **{"embed.max_bad_fraction": 1.0})
    result = embed.run(cfg, spark, "r1")
    assert set(embeddings(tmp_path / "out").index) == {"ok-1", "ok-2"}
    quar = quarantine(tmp_path / "out")
    assert set(quar.index) == {"null-1", "empty-1", "blank-1"} and (quar["error_kind"] == "no_text").all()
    assert quar["error_message"].str.contains("no title text").all() and quar["image_uri"].isna().all()
    assert quar.loc["null-1", "error_message"].endswith("title is null")
    assert result.rows_out == 2 and result.metrics["quarantined"] == 3

    # A title that gets text leaves quarantine and is embedded; the job went on meanwhile.
    titles["empty-1"] = "Leather gloves"
    again = embed.run(config(tmp_path, write_catalog(tmp_path, titles), **{"embed.max_bad_fraction": 1.0}), spark, "r2")
    assert again.rows_out == 1 and "empty-1" in embeddings(tmp_path / "out").index
    assert set(quarantine(tmp_path / "out").index) == {"null-1", "blank-1"}


def test_too_many_empty_titles_stop_the_run(spark: SparkSession, tmp_path: Path) -> None:
    titles = {"ok": "Linen shirt", "a": "", "b": None, "c": "  "}
    cfg = config(tmp_path, write_catalog(tmp_path, titles), **{"embed.max_bad_fraction": 0.5})
    with pytest.raises(embed.TooManyBadImages, match=r"3 of 4 titles failed .*no_text: 3 \(e.g. "):
        embed.run(cfg, spark, "r1")
    assert not tables.exists(tables.table_path(str(tmp_path / "out"), "embeddings"))


# ---------------------------------------------------------------------------------------------- catalog


def test_title_input_needs_title_not_image_uri(spark: SparkSession, tmp_path: Path) -> None:
    df = read_catalog(spark, config(tmp_path, write_catalog(tmp_path, {"a-1": "Wool socks"})))
    [row] = df.collect()
    assert row["image_uri"] is None and row["title"] == "Wool socks"
    path = tmp_path / "no_title.parquet"
    pd.DataFrame({"item_id": ["a"], "image_uri": ["a.png"]}).to_parquet(path)
    with pytest.raises(CatalogError, match=r"lacks required column\(s\) \['title'\] \(embed.input is 'title'\)"):
        read_catalog(spark, config(tmp_path, path))


# ---------------------------------------------------------------------------------------------- model


def test_similar_meaning_is_closer(minilm) -> None:
    shoes, sneakers, pan = minilm.embed(
        ["red running shoes", "crimson sneakers for jogging", "stainless steel saucepan"]
    )
    assert float(shoes @ sneakers) > float(shoes @ pan) + 0.3
    # Measured here and with sentence-transformers 6.2.0: 0.683 and 0.056.
    assert float(shoes @ sneakers) == pytest.approx(0.6835, abs=1e-3)


def test_matches_sentence_transformers_reference(minilm) -> None:
    """Reference values from sentence-transformers 6.2.0 `SentenceTransformer(<wheel's model folder>).encode`.

    Over 14 varied texts (accents, CJK, emoji, control characters, texts past 256 tokens) its vectors and ours
    agreed to 1.4e-7 and its token ids were identical; these leading values keep that pinned.
    """
    vectors = minilm.embed(["red running shoes", "Slim black sandal"])
    np.testing.assert_allclose(
        vectors[0, :6], [-0.081954, -0.007958, -0.058658, 0.042644, 0.03555, 0.006476], atol=2e-5
    )
    np.testing.assert_allclose(
        vectors[1, :6], [-0.093001, 0.038902, -0.001567, 0.046189, -0.015854, 0.016794], atol=2e-5
    )


def test_tokenizer_truncates_at_the_models_length_and_batches_do_not_change_vectors(minilm) -> None:
    folder = Path(registry.text_model_dir(MODEL))
    assert minilm.max_tokens == json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    texts = ["word " * 400, "short title", "x"]
    ids, mask = minilm.tokenize(texts)
    assert ids.shape == (3, 256) and mask[0].all() and int(mask[1].sum()) == 4  # [CLS] short title [SEP]
    batch = minilm.embed(texts)
    assert batch.shape == (3, 384) and batch.dtype == np.float32
    for i, text in enumerate(texts):
        np.testing.assert_allclose(minilm.embed([text])[0], batch[i], atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_text_model_shares_the_registry_cache_and_versioning(minilm) -> None:
    before = cache.load_count()
    assert cache.get_embedder(MODEL, image_size=112) is minilm  # a pixel size means nothing to a text model
    assert cache.load_count() == before
    spec = registry.get_spec(MODEL)
    assert (spec.modality, spec.dim, spec.max_tokens, spec.needs_weights_file) == ("text", 384, 256, False)
    assert minilm.version == registry.model_version(MODEL) and registry.weights_file(MODEL).endswith(".safetensors")
    assert minilm.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"embed.input": "title"},
            r"embed.input is 'title' but model.name 'efficientnet-lite0' is an image model; .*use a text model "
            r"\(all-minilm-l6-v2\)",
        ),
        (
            {"model.name": MODEL},
            r"embed.input is 'image' but model.name 'all-minilm-l6-v2' is a text model; .*or set embed.input: title",
        ),
        ({"embed.input": "text"}, r"embed.input: must be one of image, title"),
        ({"model.name": "bert"}, r"model.name: unknown model 'bert'"),
    ],
)
def test_model_and_input_must_agree(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **overrides)


def test_mismatch_fails_on_the_command_line_before_spark(tmp_path: Path, capsys) -> None:
    catalog = write_catalog(tmp_path, {"a-1": "Wool socks"})
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"catalog: {{path: {catalog}}}\noutput: {{root: {tmp_path / 'out'}}}\n")
    assert cli.main(["embed", "--conf", str(conf), "--set", "embed.input=title"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "embed.input" in err and "model.name" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
